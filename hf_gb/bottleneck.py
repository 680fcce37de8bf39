"""`GenomicBottleneck`: attaches g-net banks to any ``nn.Module`` and keeps its covered weights predicted."""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .bank import GNetBank, family_class
from .config import GBConfig
from .layers import find_targets, view3d
from .tiling import (
    TileGeometry,
    TileRows,
    choose_geometry,
    compression_of,
    gain_values,
    grid,
    tile_into,
    tile_rows,
    untile_into,
)

logger = logging.getLogger(__name__)

# Tile used when the config names neither `compression` nor `tile_size`.
DEFAULT_TILE_SIZE = (128, 128)
# Attribute of a model that points (weakly) to the bottleneck attached to it.
_ATTACHED = "_hf_gb_bottleneck"


def stored_per_tile(shape: tuple[int, int, int], geometry: TileGeometry, config: GBConfig) -> float:
    """Stored values per tile of an ``(out, in, K)`` tensor: its g-net's, and its share of the bank's shared values
    (`GNetBank.params_per_tile_of`) and of the tensor's gains, so that `compression` counts everything stored."""
    n_tiles = math.prod(grid(shape, geometry))
    own = family_class(config.family).params_per_tile_of(geometry, config, n_tiles)
    return own + gain_values(shape, config.gains) / n_tiles


def tensor_geometry(shape: tuple[int, int, int], config: GBConfig) -> TileGeometry:
    """The tile of an ``(out, in, K)`` tensor under ``config``: `tile_size` clipped to it, else the tile whose
    stored values (`stored_per_tile`) come closest to `compression`, else `DEFAULT_TILE_SIZE`."""
    tile_size = config.tile_size
    if tile_size is None and config.compression is None:
        tile_size = DEFAULT_TILE_SIZE
    return choose_geometry(shape, lambda g: stored_per_tile(shape, g, config), config.compression, tile_size)


def gain_key(name: str) -> str:
    """The key of a covered tensor's gains in `GenomicBottleneck.row_gains` / ``col_gains`` (no dots allowed)."""
    return name.replace(".", "-")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (FSDP2 DTensor) tensor; the tensor itself when it is not sharded."""
    return tensor.to_local() if type(tensor).__name__ == "DTensor" else tensor


def _check_model(model: nn.Module) -> None:
    """Errors that say what to do for models the bottleneck cannot attach to."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"GenomicBottleneck needs a torch.nn.Module, got {type(model).__name__}")
    meta = next((n for n, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise ValueError(
            f"{type(model).__name__} has parameters on the meta device (e.g. {meta}); materialise them first "
            "(model.to_empty(device=...) and an init, or load real weights), or load a compressed checkpoint "
            "with hf_gb.load_compressed, which builds the model itself"
        )
    ref = getattr(model, _ATTACHED, None)
    other = ref() if ref is not None else None
    if other is not None and other.covered:
        raise ValueError(
            f"{type(model).__name__} already has a GenomicBottleneck attached; use that one, or call its "
            "detach_model() first (two bottlenecks would overwrite each other's predictions)"
        )


@dataclass
class CoveredTensor:
    """One model tensor whose values the g-nets predict."""

    name: str  # full parameter name in the model (first name, for tied tensors)
    module_type: str
    layout: str
    shape: tuple[int, int, int]  # the (out, in, K) view
    param_shape: tuple[int, ...]
    geometry: TileGeometry
    offset: int  # first tile in its bank
    n_tiles: int
    param: nn.Parameter

    def gnet_params(self, config: GBConfig) -> int:
        """Values of this tensor's own tiles and gains (a bank's shared values are not included; see
        `bank_shares`)."""
        tiles = self.n_tiles * family_class(config.family).params_per_tile(self.geometry, config)
        return round(tiles) + gain_values(self.shape, config.gains)

    def to_json(self) -> dict[str, Any]:
        g = self.geometry
        return {
            "name": self.name,
            "module_type": self.module_type,
            "layout": self.layout,
            "shape": list(self.param_shape),
            "tile": [g.rows, g.cols, g.kernel],
            "n_tiles": self.n_tiles,
        }


class GenomicBottleneck(nn.Module):
    """g-nets that predict the covered weights of ``model``.

    The model is referenced, not registered: ``parameters()`` and ``state_dict()`` of the bottleneck are exactly the
    g-net parameters (and their output scales). One optimizer step is::

        gb.predict_weights()          # g-nets -> model weights, in place
        loss = model(x).loss; loss.backward()   # any number of micro-batches
        gb.push_gradients()           # accumulated weight grads -> g-net grads
        optimizer.step(); optimizer.zero_grad(); gb.zero_grad()

    with ``optimizer`` over ``gb.parameters()`` and ``gb.uncompressed_parameters()``.

    Example::

        >>> import torch
        >>> from hf_gb import GBConfig, GenomicBottleneck
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
        >>> gb = GenomicBottleneck(model, GBConfig(hidden_dim=8, tile_size=32))
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
        # Sharded models (FSDP2 DTensors, see hf_gb.sharding): this rank's rows of each covered weight and, per
        # bank, the tiles that intersect them; empty on an unsharded model.
        self._shards: dict[str, Any] = {}
        self._plans: dict[str, Any] = {}
        self._shard_group: Any = None
        self._full_uncompressed: dict[str, torch.Tensor] | None = None  # set while `sharding.gathered` saves

        family = family_class(config.family)
        targets, self.skipped = find_targets(model, config)
        by_geometry: dict[TileGeometry, list[CoveredTensor]] = {}
        for target in targets:
            # The full (out, in, K) shape, also of a DTensor shard (a meta tensor holds no data).
            shape = tuple(view3d(torch.empty(target.param.shape, device="meta"), target.layout).shape)
            geometry = tensor_geometry(shape, config)
            n_tiles = math.prod(grid(shape, geometry))
            ratio = compression_of(shape, geometry, stored_per_tile(shape, geometry, config))
            if ratio < config.min_compression:
                self.skipped.append((target.name, f"g-nets would compress it only {ratio:.2f}x"))
                continue
            group = by_geometry.setdefault(geometry, [])
            group.append(CoveredTensor(
                target.name, target.module_type, target.layout, shape, tuple(target.param.shape), geometry,
                offset=sum(t.n_tiles for t in group), n_tiles=n_tiles, param=target.param,
            ))
        generator = torch.Generator().manual_seed(config.seed)
        for geometry, group in by_geometry.items():
            self.banks[geometry.key()] = family(geometry, sum(t.n_tiles for t in group), config, generator)
            self.covered.extend(group)
        order = {t.name: i for i, t in enumerate(targets)}
        self.covered.sort(key=lambda t: order[t.name])  # model order, for tables and files
        self._members = {key: [t for t in self.covered if t.geometry.key() == key] for key in self.banks}
        # GBConfig.gains: log-gains, so exp() keeps them positive and 0 (the init) predicts what the banks do.
        self.row_gains, self.col_gains = nn.ParameterDict(), nn.ParameterDict()
        for t in self.covered:
            key = gain_key(t.name)
            if key in self.row_gains or key in self.col_gains:
                raise ValueError(f"covered tensors {t.name!r} and another map to the same gain name {key!r}")
            if config.gains in ("rows", "both"):
                self.row_gains[key] = nn.Parameter(torch.zeros(t.shape[0]))
            if config.gains in ("columns", "both"):
                self.col_gains[key] = nn.Parameter(torch.zeros(t.shape[1]))
        device = next((t.param.device for t in self.covered), None)
        if device is not None:
            self.to(device)
        object.__setattr__(model, _ATTACHED, weakref.ref(self))
        if any(type(t.param).__name__ == "DTensor" for t in self.covered):  # e.g. FSDP2: plan shard-local work
            from .sharding import rebind

            rebind(self, model)
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
                    from .sharding import exact_std

                    std = exact_std(t.param, self._shards[t.name])
                else:
                    w = t.param.detach().float()
                    std = w.std().item() if w.numel() > 1 else 0.0
                if not std > 0:  # zero or constant init: fall back to the fan-in rule
                    std = 1 / math.sqrt(t.shape[1] * t.shape[2])
                target[t.offset : t.offset + t.n_tiles] = std
            if key in self._plans:  # sharded: from this rank's tiles, statistics summed over ranks
                from .sharding import calibrate_bank

                calibrate_bank(bank, target, self._plans[key], self._shard_group)
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
        seed = None
        if sample:
            seed = self.noise_seed(step) if step is not None else int(torch.randint(0, 2**62, ()))
        for i, (key, bank) in enumerate(self.banks.items()):
            bank_seed = None if seed is None else (seed * 1_000_003 + i) % (2**63)  # distinct noise per bank
            plan = self._plans.get(key)
            if plan is not None:  # sharded: only the whole tiles that intersect this rank's rows
                from .sharding import write_bank

                if not len(plan.index):
                    bank.discard()
                    continue
                out = bank.predict(plan.index.to(bank.scale.device), noise_seed=bank_seed, keep_graph=keep_graph)
                write_bank(out, plan)
                continue
            rows = self._weight_rows(key, bank, "data") if bank_seed is None else None
            if rows is not None:  # the kernels write the weights' rows themselves: no tile-shaped copy
                bank.predict_into(rows, keep_graph=keep_graph)
                continue
            out = bank.predict(noise_seed=bank_seed, keep_graph=keep_graph)
            with torch.no_grad():
                for t in self._members[key]:
                    untile_into(view3d(t.param.data, t.layout), out[t.offset : t.offset + t.n_tiles], t.geometry)
        if self.row_gains or self.col_gains:
            self._apply_gains()
        self._predicted = keep_graph

    def _gains_of(self, t: CoveredTensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Tensor ``t``'s (rows, columns) gains, as (out, 1, 1) and (1, in, 1) factors of its local rows."""
        key = gain_key(t.name)
        rows = self.row_gains[key] if key in self.row_gains else None
        cols = self.col_gains[key] if key in self.col_gains else None
        shard = self._shards.get(t.name)
        if rows is not None and shard is not None:
            rows = rows[shard.start : shard.stop]
        return (None if rows is None else rows.detach().exp()[:, None, None],
                None if cols is None else cols.detach().exp()[None, :, None])

    @torch.no_grad()
    def _apply_gains(self) -> None:
        """Weight = exp(rows) * G * exp(columns), in place over what the banks wrote."""
        for t in self.covered:
            w = view3d(_local(t.param.data), t.layout)
            for gain in self._gains_of(t):
                if gain is not None:
                    w.mul_(gain)

    @torch.no_grad()
    def _push_gains(self) -> None:
        """The gains' gradients from the weights' (d log r_i = sum_j dW_ij W_ij, likewise per column), then the
        weights' gradients turned into the banks' output gradients (dG = r dW c), in place."""
        for t in self.covered:
            if t.param.grad is None:
                continue
            grad = view3d(_local(t.param.grad), t.layout)
            key = gain_key(t.name)
            dtype = (self.row_gains[key] if key in self.row_gains else self.col_gains[key]).dtype
            prod = grad.to(dtype) * view3d(_local(t.param.data), t.layout).to(dtype)
            for gains, dims in ((self.row_gains, (1, 2)), (self.col_gains, (0, 2))):
                if key not in gains:
                    continue
                g = prod.sum(dims)
                shard = self._shards.get(t.name)
                if dims == (1, 2) and shard is not None:  # this rank's rows; the sum over ranks fills the rest
                    full = torch.zeros_like(gains[key])
                    full[shard.start : shard.stop] = g
                    g = full
                gains[key].grad = g if gains[key].grad is None else gains[key].grad.add_(g)
            del prod
            for gain in self._gains_of(t):
                if gain is not None:
                    grad.mul_(gain)

    def _weight_rows(self, key: str, bank: GNetBank, what: str) -> TileRows | None:
        """Where bank ``key``'s tile rows lie in its weights' ``what`` ('data' or 'grad'), if its kernels address
        them in place (`GNetBank.writes_rows`) and the weights allow it (contiguous float32, whole tiles)."""
        if not bank.writes_rows():
            return None
        return tile_rows([view3d(getattr(t.param, what), t.layout) for t in self._members[key]], bank.geometry)

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
        if self.row_gains or self.col_gains:
            self._push_gains()
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
                from .sharding import grad_bank

                grad_bank(G, plan)
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
            from .sharding import all_reduce_gradients

            all_reduce_gradients(self.parameters(), self._shard_group)  # before the finiteness check: all agree
        elif average_replicas and torch.distributed.is_available() and torch.distributed.is_initialized():
            from .sharding import all_reduce_gradients

            all_reduce_gradients(self.parameters())
            world = torch.distributed.get_world_size()
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.div_(world)
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

    def forward(self) -> None:
        """Same as `predict_weights` (so hooks registered on the bottleneck fire)."""
        self.predict_weights()

    # ----------------------------------------------------------------- bookkeeping
    def uncompressed_parameters(self) -> list[nn.Parameter]:
        """Model parameters an optimizer must still train: everything not covered that requires grad."""
        covered = {id(t.param) for t in self.covered} | {id(p) for p in self.parameters()}  # ours may join it
        seen, out = set(), []
        for p in self._model.parameters():
            if id(p) not in covered and id(p) not in seen and p.requires_grad:
                seen.add(id(p))
                out.append(p)
        return out

    def uncompressed_state_dict(self) -> dict[str, torch.Tensor]:
        """Model tensors (parameters and persistent buffers) that the g-nets do not predict, by model name."""
        covered = {id(t.param) for t in self.covered}
        state = {k: v for k, v in self._model.state_dict(keep_vars=True).items() if id(v) not in covered}
        if self._full_uncompressed is not None:  # gathered copies of sharded tensors, for saving
            state = {k: self._full_uncompressed.get(k, v) for k, v in state.items()}
        return state

    def bank_shares(self) -> dict[str, int]:
        """Each covered tensor's share of its bank's shared values (`GNetBank.bank_params`), in proportion to its
        tiles and rounded so that a bank's shares sum to its shared values exactly (all 0 for per-tile families)."""
        family = family_class(self.config.family)
        shares = {}
        for key, members in self._members.items():
            total = family.bank_params(self.banks[key].geometry, self.config)
            n = sum(t.n_tiles for t in members)
            done = 0
            for t in members:
                shares[t.name] = round(total * (done + t.n_tiles) / n) - round(total * done / n)
                done += t.n_tiles
        return shares

    def stats(self) -> dict[str, Any]:
        """Sizes and compression ratios: totals and one row per covered tensor (with its share of shared values)."""
        shares = self.bank_shares()
        values = {t.name: t.gnet_params(self.config) + shares[t.name] for t in self.covered}
        rows = [
            {
                "name": t.name,
                "module_type": t.module_type,
                "shape": list(t.param_shape),
                "tile": [t.geometry.rows, t.geometry.cols, t.geometry.kernel],
                "n_tiles": t.n_tiles,
                "numel": t.param.numel(),
                "gnet_params": values[t.name],
                "compression": t.param.numel() / values[t.name],
            }
            for t in self.covered
        ]
        covered = sum(r["numel"] for r in rows)
        gnet = sum(p.numel() for p in self.parameters())
        uncompressed = sum(p.numel() for p in self.uncompressed_parameters())
        return {
            "covered_params": covered,
            "gnet_params": gnet,
            "uncompressed_params": uncompressed,
            "covered_compression": covered / gnet if gnet else 1.0,
            "overall_compression": (covered + uncompressed) / (gnet + uncompressed) if gnet + uncompressed else 1.0,
            "tensors": rows,
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
        }

    def summary(self, per_tensor: bool = True) -> str:
        """A printable compression table."""
        s = self.stats()
        lines = []
        if per_tensor:
            width = max([len(r["name"]) for r in s["tensors"]] + [6])
            lines.append(f"{'tensor':<{width}}  {'shape':>16}  {'tile':>12}  {'tiles':>6}  {'g-net':>9}  {'ratio':>8}")
            for r in s["tensors"]:
                shape = "x".join(map(str, r["shape"]))
                tile_ = "x".join(map(str, r["tile"]))
                lines.append(f"{r['name']:<{width}}  {shape:>16}  {tile_:>12}  {r['n_tiles']:>6}  "
                             f"{r['gnet_params']:>9,}  {r['compression']:>7.1f}x")
            for k in s["skipped"]:
                lines.append(f"{k['name']:<{width}}  not covered: {k['reason']}")
        lines.append(
            f"covered params: {s['covered_params']:,} || g-net params: {s['gnet_params']:,} || "
            f"uncompressed params: {s['uncompressed_params']:,} || covered compression: "
            f"{s['covered_compression']:.1f}x || overall compression: {s['overall_compression']:.2f}x"
        )
        return "\n".join(lines)

    def print_summary(self, per_tensor: bool = False) -> None:
        """Print the compression summary (like PEFT's ``print_trainable_parameters``)."""
        print(self.summary(per_tensor=per_tensor))

    # ----------------------------------------------------------------- checkpoints
    def save_pretrained(self, save_directory: str, processing_class: Any = None, **kwargs: Any) -> str:
        """Write the compressed checkpoint (see `hf_gb.checkpoint`); loadable with `hf_gb.load_compressed`."""
        from .checkpoint import save_compressed

        return save_compressed(self, save_directory, processing_class=processing_class, **kwargs)

    @classmethod
    def from_pretrained(cls, path_or_repo: str, model: nn.Module | None = None, **kwargs: Any) -> GenomicBottleneck:
        """Restore a bottleneck from a compressed checkpoint, onto ``model`` or a model built from its config."""
        from .checkpoint import bottleneck_from_pretrained

        return bottleneck_from_pretrained(path_or_repo, model=model, **kwargs)

    def push_to_hub(self, repo_id: str, processing_class: Any = None, **kwargs: Any) -> Any:
        """Push the compressed checkpoint (with its model card) to the Hub repo ``repo_id``; see `hf_gb.hub`."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, processing_class=processing_class, **kwargs)

    def extra_repr(self) -> str:
        return f"covered={len(self.covered)}, banks={len(self.banks)}, hidden_dim={self.config.hidden_dim}"
