"""`Bottleneck`: attaches g-net banks to any ``nn.Module`` and keeps its covered weights predicted.

The engine's core class, with torch alone: no file methods. ``hf_gb.GenomicBottleneck`` (`hf_gb.io.pretrained`)
is this class plus ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``; it is the one users build.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from . import partitions, report, shards
from .bank import GNetBank
from .config import GBConfig
from .gains import apply_gains, make_gains, push_gains
from .kernels import prediction_only
from .layers import find_targets, view3d
from .planning import CoveredTensor, plan_covered
from .registry import family_class
from .step import TrainStep
from .tiling import TileRows, tile_into, tile_rows, untile_into

__all__ = ["Bottleneck"]

logger = logging.getLogger(__name__)

# Attribute of a model that points (weakly) to the bottleneck attached to it.
_ATTACHED = "_hf_gb_bottleneck"


def _check_model(model: nn.Module) -> None:
    """Errors that say what to do for models the bottleneck cannot attach to."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"GenomicBottleneck needs a torch.nn.Module, got {type(model).__name__}")
    partitions.refuse_partitioned(model)
    meta = next((n for n, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise ValueError(
            f"{type(model).__name__} has parameters on the meta device (e.g. {meta}); materialise them first "
            "(model.to_empty(device=...) and an init, or load real weights), or load a compressed checkpoint "
            "with hf_gb.load_compressed, which builds the model itself"
        )
    if Bottleneck.attached_to(model) is not None:
        raise ValueError(
            f"{type(model).__name__} already has a GenomicBottleneck attached; use that one, or call its "
            "detach_model() first (two bottlenecks would overwrite each other's predictions)"
        )


class Bottleneck(nn.Module):
    """g-nets that predict the covered weights of ``model`` (the engine's core; users build its subclass
    ``hf_gb.GenomicBottleneck``, which adds the checkpoint and Hub methods).

    The model is referenced, not registered: ``parameters()`` and ``state_dict()`` of the bottleneck are exactly the
    g-net parameters (and their output scales). One optimizer step, the optimizer over `trainable_parameters`, is
    `predict_weights`, ``loss.backward()`` (any number of micro-batches), `push_gradients`, ``optimizer.step()`` and
    zeroed gradients; `step` makes them around a loop's forward and backward (`hf_gb.engine.step.TrainStep`).

    Example::

        >>> import torch
        >>> from hf_gb import GBConfig
        >>> from hf_gb.engine import Bottleneck
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
        >>> gb = Bottleneck(model, GBConfig(hidden_dim=8, tile_size=32))
        >>> gb.stats()["covered_params"]
        9472
    """

    def __init__(self, model: nn.Module, config: GBConfig | None = None, *, init_gnets: bool = True):
        super().__init__()
        self.config = config = config if config is not None else GBConfig()
        _check_model(model)
        object.__setattr__(self, "_model", model)  # not a submodule: our parameters are the g-nets only
        self.covered: list[CoveredTensor] = []
        self.skipped: list[tuple[str, str]] = []  # (name, reason) of weights left uncompressed
        self.banks = nn.ModuleDict()
        self._predicted = False  # a prediction with kept tables is waiting for its push
        # Sharded models (FSDP2 DTensors, see hf_gb.engine.shards): this rank's rows of each covered weight and,
        # per bank, the tiles that intersect them; empty on an unsharded model (set by `rebind`).
        self._shards: dict[str, partitions.RowShard] = {}
        self._plans: dict[str, shards.BankPlan] = {}
        self._shard_group: Any = None
        self._full_uncompressed: dict[str, torch.Tensor] | None = None  # set while `gathered` is open
        self._step: TrainStep | None = None  # what `step` returns, kept across the micro-batches of a window

        targets, self.skipped = find_targets(model, config)
        groups, too_small = plan_covered(targets, config)
        self.skipped.extend(too_small)
        generator = torch.Generator().manual_seed(config.seed)
        for spec, group in groups.items():
            family = family_class(spec.family)
            self.banks[spec.key(config)] = family(spec.geometry, sum(t.n_tiles for t in group),
                                                  spec.bank_config(config), generator)
            self.covered.extend(group)
        order = {t.name: i for i, t in enumerate(targets)}
        self.covered.sort(key=lambda t: order[t.name])  # model order, for tables and files
        self._members = {key: [t for t in self.covered if t.bank == key] for key in self.banks}
        # GBConfig.gains: log-gains, so exp() keeps them positive and 0 (the init) predicts what the banks do.
        self.row_gains, self.col_gains = make_gains(self.covered, config.gains)
        device = next((t.param.device for t in self.covered), None)
        if device is not None:
            self.to(device)
        object.__setattr__(model, _ATTACHED, weakref.ref(self))
        if any(type(t.param).__name__ == "DTensor" for t in self.covered):  # e.g. FSDP2: plan shard-local work
            self.rebind(model)
        if init_gnets:
            if config.init_active is not None:  # before the calibration: it scales what these biases give
                for bank in self.banks.values():
                    bank.sparse_biases_(config.init_active, generator)
            self._calibrate()
            self.predict_weights(sample=False, keep_graph=False)

    # ----------------------------------------------------------------- construction
    @torch.no_grad()
    def _calibrate(self) -> None:
        """Match each tile's predicted std to its layer's current (initial) weights (docs/design.md §4)."""
        for key, bank in self.banks.items():
            target = torch.empty(bank.n_tiles)
            for t in self._members[key]:
                if t.name in self._shards:  # exact std of the whole weight from the shards (one all-reduce)
                    std = shards.exact_std(t.param, self._shards[t.name])
                else:
                    w = t.param.detach().float()
                    std = w.std().item() if w.numel() > 1 else 0.0
                if not std > 0:  # zero or constant init: fall back to the fan-in rule
                    std = 1 / math.sqrt(t.shape[1] * t.shape[2])
                target[t.offset : t.offset + t.n_tiles] = std
            if key in self._plans:  # sharded: from this rank's tiles, statistics summed over ranks
                shards.calibrate_bank(bank, target, self._plans[key], self._shard_group)
            else:
                bank.calibrate(target)

    def detach_model(self) -> None:
        """Release the model so that another bottleneck may attach to it; this one then predicts nothing."""
        if getattr(self._model, _ATTACHED, None) is not None and getattr(self._model, _ATTACHED)() is self:
            object.__delattr__(self._model, _ATTACHED)
        self.covered, self._members, self._predicted = [], {key: [] for key in self.banks}, False

    # ----------------------------------------------------------------- the step
    @property
    def model(self) -> nn.Module:
        return self._model

    @staticmethod
    def attached_to(model: nn.Module) -> Bottleneck | None:
        """The bottleneck that predicts ``model``'s weights now, or None (none attached, or it was detached)."""
        gb = getattr(model, _ATTACHED, lambda: None)()
        return gb if gb is not None and gb.covered else None

    @property
    def prediction_pending(self) -> bool:
        """Whether the last `predict_weights` kept what `push_gradients` needs and no push has consumed it yet."""
        return self._predicted

    # ----------------------------------------------------------------- shard state (FSDP2)
    @property
    def sharded(self) -> bool:
        """Whether some covered weights are sharded DTensors, so that this rank predicts only its own rows."""
        return bool(self._shards)

    @property
    def row_shards(self) -> dict[str, partitions.RowShard]:
        """The rows this rank holds of each sharded covered weight, by name (empty when nothing is sharded)."""
        return dict(self._shards)

    @property
    def local_tile_count(self) -> int:
        """How many tiles this rank predicts: those that intersect its rows, or every tile when not sharded."""
        return sum([len(p.index) for p in self._plans.values()] or [b.n_tiles for b in self.banks.values()])

    def rebind(self, model: nn.Module) -> bool:
        """Point the covered tensors at ``model``'s parameters of the same names (after ``fully_shard`` or
        Accelerate replaced them) and plan shard-local prediction; True when anything changed."""
        params = dict(model.named_parameters(remove_duplicate=False))
        changed = False
        for t in self.covered:
            new = params.get(t.name)
            if new is None:
                names = ", ".join(sorted(params)[:5])
                raise ValueError(f"covered weight {t.name!r} is not a parameter of the wrapped model ({names}, ...)")
            if partitions.full_shape(new) != tuple(t.param_shape):
                raise ValueError(f"covered weight {t.name!r} has shape {partitions.full_shape(new)} after wrapping, "
                                 f"{tuple(t.param_shape)} before")
            changed |= new is not t.param
            t.param = new
        if model is not self._model:
            object.__setattr__(model, _ATTACHED, getattr(self._model, _ATTACHED, None))
            object.__setattr__(self, "_model", model)
        self._shards = shards.find_shards(self.covered)
        self._shard_group = shards.shard_group(self._shards)
        self._plans = {key: shards.plan_bank(self._members[key], self._shards) for key in self.banks} \
            if self._shards else {}
        for bank in self.banks.values():  # a prediction kept before rebinding belongs to the old tensors
            bank.discard()
        self._predicted = False
        return changed

    @contextmanager
    def gathered(self) -> Iterator[None]:
        """While open, `uncompressed_state_dict` holds whole copies of the sharded uncompressed tensors.

        Every rank must enter it (gathering is a collective); only the covered weights are never gathered. Use it
        around a save on the main process::

            with gb.gathered():
                if is_main_process:
                    gb.save_pretrained(path)
        """
        state = self.uncompressed_state_dict()
        self._full_uncompressed = {k: shards.full_tensor(v.detach()) for k, v in state.items()
                                   if shards.is_dtensor(v)}
        try:
            yield
        finally:
            self._full_uncompressed = None

    def noise_seed(self, step: int) -> int:
        """The noise seed of optimizer step ``step``: the same on every rank and after a resume."""
        return (self.config.seed * 1_000_003 + step) % (2**63)

    def predict_weights(self, sample: bool | None = None, keep_graph: bool = True, step: int | None = None) -> None:
        """Write the g-nets' prediction into the covered weights (in place).

        ``sample`` (default: ``self.training and config.stochastic``) adds the learned per-tile noise, seeded by
        `noise_seed` of ``step`` when given (Trainer and plugin pass the optimizer step) and else drawn from
        torch's global generator. ``keep_graph`` keeps what `push_gradients` needs; pass ``False`` for a prediction
        that no gradient will follow (evaluation, export, after loading a checkpoint).
        Raises ``RuntimeError`` if covered weights still hold gradients that were never pushed.
        """
        pending = [t.name for t in self.covered if t.param.grad is not None]
        if pending:
            raise RuntimeError(
                f"predict_weights() called while {len(pending)} covered weights (e.g. {pending[0]}) hold gradients "
                "that push_gradients() has not consumed; push (or zero the model's gradients) first"
            )
        sample = (self.training and self.config.stochastic) if sample is None else sample
        if sample and not self.config.stochastic:
            raise ValueError("predict_weights(sample=True) needs GBConfig(stochastic=True)")
        seed = (self.noise_seed(step) if step is not None else int(torch.randint(0, 2**62, ()))) if sample else None
        with nullcontext() if keep_graph else prediction_only():  # no wait for a kernel build
            for i, (key, bank) in enumerate(self.banks.items()):
                bank_seed = None if seed is None else (seed * 1_000_003 + i) % (2**63)  # distinct noise per bank
                plan = self._plans.get(key)
                if plan is not None:  # sharded: only the whole tiles that intersect this rank's rows
                    if not len(plan.index):
                        bank.discard()
                        continue
                    out = bank.predict(plan.index.to(bank.scale.device), noise_seed=bank_seed, keep_graph=keep_graph)
                    shards.write_bank(out, plan)
                    continue
                rows = self._weight_rows(key, bank, "data") if bank_seed is None else None
                if rows is not None:  # the kernels write the weights' rows themselves: no tile-shaped copy
                    bank.predict_into(rows, keep_graph=keep_graph)
                    continue
                out = bank.predict(noise_seed=bank_seed, keep_graph=keep_graph)
                for t in self._members[key]:  # out is detached, t.param.data untracked: nothing for autograd to see
                    untile_into(view3d(t.param.data, t.layout), out[t.offset : t.offset + t.n_tiles], t.geometry)
        if self.row_gains or self.col_gains:
            apply_gains(self.covered, self.row_gains, self.col_gains, self._shards)
        partitions.publish_partitions(self.covered, self._shards)  # ZeRO-3: owned elements into ds_tensor
        self._predicted = keep_graph

    def _weight_rows(self, key: str, bank: GNetBank, what: str) -> TileRows | None:
        """Where bank ``key``'s tile rows lie in its weights' ``what`` ('data' or 'grad'), if its kernels address
        them in place (`GNetBank.writes_rows`) and the weights allow it (contiguous float32)."""
        views = [view3d(getattr(t.param, what), t.layout) for t in self._members[key]]
        return tile_rows(views, bank.geometry) if bank.writes_rows() else None

    def push_gradients(self, average_replicas: bool = False) -> bool:
        """Chain rule from the covered weights' accumulated ``.grad`` into the g-net parameters' ``.grad``.

        Adds to the g-net gradients (call ``zero_grad()`` after each optimizer step) and sets the covered
        weights' ``.grad`` to None. Must follow `predict_weights` (with ``keep_graph=True``); one push per
        prediction. With ``config.skip_nonfinite`` (default), a step whose gradients are not finite is skipped:
        the g-net and uncompressed gradients are set to None (so optimizers leave those tensors alone) and a
        warning is logged. Returns whether the gradients were kept.

        ``average_replicas``: the covered weights' gradients are this process's own (an engine that does not
        average them, e.g. DeepSpeed, which reduces only its optimizer's parameters): the g-net gradients are
        averaged over the processes after the push, which equals pushing the averaged weight gradients (the push
        is linear in them) at a fraction of the communication.
        """
        if not self._predicted:
            raise RuntimeError("push_gradients() called without a preceding predict_weights() for this step")
        self._predicted = False
        shards.reduce_partition_grads(self.covered, self._shards)  # ZeRO-3: this rank's averaged elements
        if self.row_gains or self.col_gains:
            push_gains(self.covered, self.row_gains, self.col_gains, self._shards)
        for key, bank in self.banks.items():
            members = self._members[key]
            plan = self._plans.get(key)
            if all(t.param.grad is None for t in members) or (plan is not None and not len(plan.index)):
                bank.discard()
                for t in members:
                    t.param.grad = None
                continue
            if plan is None and all(t.param.grad is not None for t in members):
                rows = self._weight_rows(key, bank, "grad")
                if rows is not None and bank.push_from(rows):  # read in place, centred on the fly
                    continue
            g0 = bank.geometry
            G = bank.scale.new_empty(bank.n_tiles if plan is None else len(plan.index), g0.rows, g0.cols * g0.kernel)
            if plan is not None:  # this rank's rows of each tile, zeros elsewhere; summed over ranks below
                shards.grad_bank(G, plan)
            for t in members if plan is None else ():
                dst = G[t.offset : t.offset + t.n_tiles]
                if t.param.grad is None:  # this tensor took no part in the loss
                    dst.zero_()
                else:  # written straight into the bank's tile layout: no padded or concatenated copies
                    tile_into(dst, view3d(t.param.grad, t.layout), t.geometry)
                    t.param.grad = None  # freed as soon as copied: G replaces the grads instead of adding to them
            bank.push(G)
            del G
        for t in self.covered:
            t.param.grad = None
        if self._shards:  # each rank pushed its rows: the sum over ranks is the gradient of the whole weights
            shards.all_reduce_gradients(self.parameters(), self._shard_group)  # before the finiteness check
        elif average_replicas:
            shards.average_over_processes(self.parameters())
        if self.config.skip_nonfinite and not self._gradients_finite():
            logger.warning(
                "Skipping the g-net update of this step: its gradients are not finite (NaN or Inf; "
                "GBConfig.skip_nonfinite=False would apply them and turn every predicted weight into NaN)"
            )
            for p in [*self.parameters(), *self.uncompressed_parameters()]:
                p.grad = None
            return False
        return True

    def _gradients_finite(self) -> bool:
        grads = [p.grad.sum() for p in self.parameters() if p.grad is not None]
        return not grads or bool(torch.stack(grads).sum().isfinite())

    def step(self, optimizer: torch.optim.Optimizer, accumulation_steps: int = 1,
             max_grad_norm: float | None = None) -> TrainStep:
        """The context manager of one micro-batch of a plain loop (`hf_gb.engine.step.TrainStep`, with an example):
        ``with gb.step(optimizer): loss.backward()``; the same `TrainStep` while the arguments stay the same."""
        self._step = TrainStep.following(self._step, self, optimizer, accumulation_steps, max_grad_norm)
        return self._step

    def forward(self) -> None:
        """Same as `predict_weights` (so hooks registered on the bottleneck fire)."""
        self.predict_weights()

    # ----------------------------------------------------------------- bookkeeping
    def uncompressed_parameters(self) -> list[nn.Parameter]:
        """Model parameters an optimizer must still train: everything not covered that requires grad."""
        covered = {id(t.param) for t in self.covered} | {id(p) for p in self.parameters()}  # ours may join it
        return list({id(p): p for p in self._model.parameters() if id(p) not in covered and p.requires_grad}.values())

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What an optimizer trains: the g-net parameters, then `uncompressed_parameters`."""
        return [*self.parameters(), *self.uncompressed_parameters()]

    def uncompressed_state_dict(self) -> dict[str, torch.Tensor]:
        """Model tensors (parameters and persistent buffers) that the g-nets do not predict, by model name."""
        covered = {id(t.param) for t in self.covered}
        state = {k: v for k, v in self._model.state_dict(keep_vars=True).items() if id(v) not in covered}
        if self._full_uncompressed is not None:  # gathered copies of sharded tensors, for saving
            state = {k: self._full_uncompressed.get(k, v) for k, v in state.items()}
        return state

    def bank_shares(self) -> dict[str, int]:
        """Each covered tensor's share of its bank's shared values (`hf_gb.engine.report.bank_shares`)."""
        return report.bank_shares(self._members.values(), self.config)

    def stats(self) -> dict[str, Any]:
        """Sizes and compression ratios: totals and one row per covered tensor (with its share of shared values)."""
        return report.stats(self.covered, self.config, self.bank_shares(), sum(p.numel() for p in self.parameters()),
                            sum(p.numel() for p in self.uncompressed_parameters()), self.skipped)

    def summary(self, per_tensor: bool = True) -> str:
        """A printable compression table."""
        return report.summary(self.stats(), per_tensor)

    def print_summary(self, per_tensor: bool = False) -> None:
        """Print the compression summary (like PEFT's ``print_trainable_parameters``)."""
        print(self.summary(per_tensor=per_tensor))

    def extra_repr(self) -> str:
        return f"covered={len(self.covered)}, banks={len(self.banks)}, family={self.config.family!r}"
