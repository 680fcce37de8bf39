"""Distributed runs: one policy for `GBTrainer` and `GBPlugin`.

Replicated g-nets (DDP, docs/design.md §7): every rank holds the same g-nets: they start from rank 0's
(`broadcast_gnets`; calibration reads each rank's own random init, so the scales may differ before), every rank
predicts the same weights, DDP averages the weight gradients, and every rank pushes the same g-net gradient.
`replica_checksums` is how a run checks that this still holds. Noise of stochastic g-nets is seeded by the optimizer
step (`Bottleneck.noise_seed`), so all ranks, and a resumed run, draw the same.

Under FSDP2 (``fsdp_version=2``) the g-nets are replicated the same way, but each rank predicts only the tiles of its
own rows (`hf_gb.engine.shards`). Under DeepSpeed ZeRO stage 1 or 2 (`GBTrainer`, `hf_gb.training.deepspeed`, and
`GBPlugin.accelerator_prepare`) the parameters stay replicated as under DDP and the g-net gradients are handed to
DeepSpeed's optimizer just before its step (the DeepSpeed glue at the end of this module). `check_setup` refuses, at
start and with the reason and what works instead, the setups that would train wrong: FSDP1 (one ``FlatParameter``
per unit: no rows to predict), ZeRO stage 0, and under `GBTrainer` a DeepSpeed ``optimizer`` section. Under ZeRO-3
each rank predicts the elements of each covered weight it owns (`bind_zero3`), and the g-nets are held gathered from
each prediction to its push (`GatheredGnets`). The rest is the glue FSDP2 needs around Accelerate: the optimizer
around its ``prepare`` and optimizer state saved rank by rank.
"""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..engine.bottleneck import Bottleneck
from ..engine.shards import is_dtensor
from ..files import atomic_write

logger = logging.getLogger(__name__)

def process_group_active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@torch.no_grad()
def broadcast_gnets(gb: Bottleneck, src: int = 0) -> None:
    """Copy rank ``src``'s g-net state (parameters and saved buffers) to every rank, in place; no-op alone."""
    if not process_group_active() or torch.distributed.get_world_size() == 1:
        return
    for tensor in gb.state_dict().values():
        torch.distributed.broadcast(tensor, src=src)


@torch.no_grad()
def replica_checksums(gb: Bottleneck) -> torch.Tensor:
    """float64 ``(3,)``: sum of every g-net tensor, sum and sum of squares of the covered weights (this rank).

    Under FSDP2 each rank holds other rows of the covered weights, so the last two are the sum and sum of squares
    of the g-nets' saved buffers (the output scales) instead.
    """
    if gb.sharded:
        buffers = [b.detach().double() for b in gb.buffers()] or [torch.zeros(1, dtype=torch.float64)]
        second = torch.stack([b.sum() for b in buffers]).sum()
        third = torch.stack([b.square().sum() for b in buffers]).sum()
    else:
        second = torch.stack([t.param.detach().double().sum() for t in gb.covered]).sum()
        third = torch.stack([t.param.detach().double().square().sum() for t in gb.covered]).sum()
    return torch.stack([torch.stack([p.detach().double().sum() for p in gb.parameters()]).sum(), second, third])


def check_replicas(gb: Bottleneck, gather) -> None:
    """Raise ``RuntimeError`` unless every rank holds the same g-nets and predicted weights.

    ``gather`` maps a ``(1, 3)`` tensor to the ``(world, 3)`` stack of every rank's (e.g. ``accelerator.gather``).
    """
    if not gb.covered:
        return
    everyone = gather(replica_checksums(gb)[None]).cpu()
    if not torch.equal(everyone, everyone[:1].expand_as(everyone)):
        raise RuntimeError(f"Processes disagree on the g-nets or predicted weights; checksums by rank: {everyone}")


def check_launch(num_processes: int, who: str, fix: str) -> None:
    """Refuse a launch of several processes (``WORLD_SIZE`` > 1) in which this one sees itself alone.

    E.g. ``torchrun --nproc_per_node 2`` on a machine without GPUs: unless told to use the CPU, Accelerate starts no
    process group, so every process would train on its own, as process 0 of 1, and write the same output folder.
    ``fix`` says how to make them one run (``use_cpu=True`` for Trainer, ``Accelerator(cpu=True)`` for a loop).
    """
    raw = os.environ.get("WORLD_SIZE", "").strip()
    launched = int(raw) if raw.isdigit() else 1
    if launched > 1 and num_processes == 1:
        raise RuntimeError(
            f"{who}: the launcher started WORLD_SIZE={launched} processes, but this one runs alone (1 process, no "
            "process group), so each would train on its own and all would write the same output folder. On a "
            f"machine without GPUs, {fix} to train them as one run over gloo."
        )


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def requested(args: Any) -> tuple[bool, bool]:
    """(FSDP requested, DeepSpeed requested) by Trainer arguments or Accelerate's launcher environment."""
    fsdp = bool(getattr(args, "fsdp", None)) or _env_true("ACCELERATE_USE_FSDP")
    deepspeed = bool(getattr(args, "deepspeed", None)) or _env_true("ACCELERATE_USE_DEEPSPEED")
    return fsdp, deepspeed


DEEPSPEED_STAGES = (1, 2, 3)  # ZeRO stages hf_gb trains under (see hf_gb.training.deepspeed)


def _refuse_deepspeed(who: str, stage: Any, optimizer_section: bool = False) -> None:
    """Raise for the DeepSpeed setups ``who`` cannot train; return for ZeRO stage 1 or 2.

    ``optimizer_section``: the config has an ``optimizer`` section that Trainer would build over every model
    parameter (a `GBPlugin` loop builds its ``DummyOptim`` itself, over ``plugin.trainable_parameters()``).
    """
    instead = ("Train with ZeRO stage 1, 2 or 3, DDP (accelerate launch --multi_gpu / torchrun) or FSDP2 "
               "(fsdp_version=2).")
    if optimizer_section:
        raise NotImplementedError(
            "GBTrainer does not support a DeepSpeed config with an 'optimizer' section: DeepSpeed would build it over "
            "every model parameter, covered weights included, which the g-nets overwrite. Remove the section; "
            "Trainer then builds the optimizer (optim, learning_rate, gb_learning_rate) over the g-nets and the "
            "uncompressed tensors and hands it to DeepSpeed."
        )
    if stage is not None and int(stage) not in DEEPSPEED_STAGES:
        raise NotImplementedError(
            f"{who} does not support DeepSpeed ZeRO stage {stage}: stage 0 is plain data parallelism, which DDP "
            "does without DeepSpeed. " + instead
        )


def _refuse_fsdp1(who: str, version: Any) -> None:
    raise NotImplementedError(
        f"{who} supports FSDP only as FSDP2 (fsdp_version=2, torch.distributed.fsdp.fully_shard), got "
        f"fsdp_version={version}: FSDP1 flattens each unit's weights into one FlatParameter, so there are no rows "
        "to predict. Set fsdp_version: 2 in the Accelerate config (or fsdp_config={'version': 2})."
    )


def _deepspeed_config(args: Any) -> dict:
    """The DeepSpeed config Trainer arguments carry ({} when it cannot be read without DeepSpeed)."""
    config = getattr(getattr(args, "hf_deepspeed_config", None), "config", None)
    if config is None and isinstance(getattr(args, "deepspeed", None), dict):
        config = args.deepspeed
    return config or {}


def _zero_stage(args: Any) -> Any:
    """The ZeRO stage Trainer arguments configure (None when it cannot be read without DeepSpeed)."""
    return _deepspeed_config(args).get("zero_optimization", {}).get("stage")


def check_arguments(args: Any, who: str) -> None:
    """Refuse, before anything is built, what Trainer arguments ask for and `check_setup` would refuse."""
    fsdp, deepspeed = requested(args)
    if deepspeed:
        _refuse_deepspeed(who, _zero_stage(args), "optimizer" in _deepspeed_config(args))
    config = getattr(args, "fsdp_config", None) or {}
    version = config.get("version", config.get("fsdp_version", 2)) if isinstance(config, dict) else 2
    if fsdp and int(version) != 2:
        _refuse_fsdp1(who, version)


def check_setup(accelerator: Any, fsdp_requested: bool, deepspeed_requested: bool, who: str) -> str:
    """The kind of run the bottleneck sees (``"single"``, ``"ddp"``, ``"fsdp2"`` or ``"deepspeed"``); raises for
    the setups that would train wrong and warns when FSDP was asked for but Accelerate did not engage it."""
    state = accelerator.state
    ds_plugin = getattr(state, "deepspeed_plugin", None)
    if ds_plugin is not None or deepspeed_requested:
        config = getattr(getattr(ds_plugin, "hf_ds_config", None), "config", None) or {}
        stage = getattr(ds_plugin, "zero_stage", None)
        _refuse_deepspeed(who, stage, "optimizer" in config and who == "GBTrainer")
        if ds_plugin is None:  # asked for, but Accelerate did not engage it
            raise RuntimeError(f"{who}: DeepSpeed was requested but Accelerate did not enable it")
        return "deepspeed"
    fsdp_plugin = getattr(state, "fsdp_plugin", None)
    if fsdp_plugin is not None:
        version = getattr(fsdp_plugin, "fsdp_version", 1)
        if version != 2:
            _refuse_fsdp1(who, version)
        return "fsdp2"
    if fsdp_requested:
        logger.warning(
            "%s: FSDP was requested but Accelerate did not enable it (it never does on CPU-only machines); the "
            "model is replicated as under DDP and every rank predicts every covered weight", who,
        )
    return "ddp" if accelerator.num_processes > 1 else "single"


# ----------------------------------------------------------------------------- optimizer state, rank by rank
def optimizer_shard_name(rank: int, world_size: int) -> str:
    return f"optimizer.rank{rank}-of-{world_size}.safetensors"


def save_optimizer_shard(optimizer: torch.optim.Optimizer, directory: str, rank: int, world_size: int) -> str:
    """Write this rank's optimizer state (local shards of DTensor states, whole g-net states) as safetensors.

    The hyperparameters go into the file's metadata as JSON: nothing in it is unpickled when loading.
    """
    import json
    import os

    from safetensors.torch import save_file

    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if not torch.is_tensor(value):
                raise TypeError(f"optimizer state {key!r} of parameter {index} is a {type(value).__name__}, not a "
                                "tensor; cannot save it rank by rank")
            local = value.to_local() if is_dtensor(value) else value
            tensors[f"state.{index}.{key}"] = local.detach().contiguous().cpu()
    metadata = {"param_groups": json.dumps(state["param_groups"]), "world_size": str(world_size)}
    path = os.path.join(directory, optimizer_shard_name(rank, world_size))
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def load_optimizer_shard(optimizer: torch.optim.Optimizer, directory: str, rank: int, world_size: int) -> None:
    """Inverse of `save_optimizer_shard` for the same world size (``ValueError`` naming the file otherwise)."""
    import json
    import os

    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    path = os.path.join(directory, optimizer_shard_name(rank, world_size))
    if not os.path.isfile(path):
        found = sorted(n for n in os.listdir(directory) if n.startswith("optimizer.rank"))
        raise ValueError(f"{path} does not exist (found {found or 'no optimizer shards'}); resume with the same "
                         f"number of processes ({world_size}) that wrote the checkpoint")
    with safe_open(path, framework="pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
        raw = {k: f.get_tensor(k) for k in f.keys()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in raw.items():
        _, index, name = key.split(".", 2)
        index = int(index)
        if index >= len(params):
            raise ValueError(f"{path} holds state for parameter {index}, the optimizer has {len(params)}")
        param = params[index]
        if is_dtensor(param) and value.dim() > 0:
            value = DTensor.from_local(value, param.device_mesh, param.placements, run_check=False,
                                       shape=param.shape, stride=param.stride())
        state.setdefault(index, {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ----------------------------------------------------------------------------- optimizer and FSDP2 wrapping
def detach_params(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> list[tuple[int, bool, list]]:
    """Take ``params`` out of ``optimizer``'s groups (Accelerate's FSDP2 ``prepare`` maps every optimizer parameter to
    a model parameter and fails on the g-nets, which are not in the model); `reattach_params` puts them back.

    Returns, per group that held some: (its index, whether the group is still there, the parameters taken).
    """
    ids = {id(p) for p in params}
    taken, kept = [], []
    for i, group in enumerate(optimizer.param_groups):
        mine = [p for p in group["params"] if id(p) in ids]
        rest = [p for p in group["params"] if id(p) not in ids]
        if mine:
            group["params"] = rest
            taken.append((i, bool(rest), mine, {k: v for k, v in group.items() if k != "params"}))
        if rest:
            kept.append(group)
    optimizer.param_groups[:] = kept
    return taken


def reattach_params(optimizer: torch.optim.Optimizer, taken: list) -> None:
    """Inverse of `detach_params`, on the optimizer ``prepare`` returned (the same groups in the same order;
    Accelerate may have rebuilt the group dicts, so groups are matched by position)."""
    for i, still_there, mine, options in taken:
        if still_there:
            group = optimizer.param_groups[i]
            group["params"] = [*mine, *group["params"]]
        else:
            optimizer.param_groups.insert(i, {**options, "params": list(mine)})


# ----------------------------------------------------------------------------- DeepSpeed ZeRO 1/2
GNET_MODULE = "hf_gb"  # the g-nets' name inside the model while DeepSpeed builds its engine


def join_model(model: nn.Module, gb: Bottleneck) -> None:
    """Make the g-nets the submodule ``hf_gb`` of ``model`` for the ``accelerator.prepare`` that builds a DeepSpeed
    engine: DeepSpeed maps every optimizer parameter to a named parameter of the model it wraps, and `leave_model`
    right after keeps them out of the model's ``state_dict``."""
    if GNET_MODULE not in dict(model.named_children()):
        model.add_module(GNET_MODULE, gb)


def leave_model(model: nn.Module) -> None:
    """Undo `join_model`: the g-nets are no submodule of ``model`` again."""
    if GNET_MODULE in dict(model.named_children()):
        delattr(model, GNET_MODULE)


def wrap_engine_step(engine: Any, gb: Bottleneck, gathered: GatheredGnets | None = None) -> None:
    """Push the g-net gradients into ``engine`` just before each of its optimizer steps.

    Accelerate's ``backward`` runs DeepSpeed's ``engine.backward`` and then ``engine.step()``, and the g-net gradients
    exist only once the weight gradients are complete, so ``step`` is wrapped on this one engine object: at a
    gradient-accumulation boundary it first calls `push_into_deepspeed` (then, under ZeRO-3, releases ``gathered``).
    Raises ``RuntimeError`` when the engine's optimizer does not hold the g-nets.
    """
    if getattr(engine, "_hf_gb_step", None) is not None:
        return
    unlinked = [n for n, p in gb.named_parameters() if not (hasattr(p, "_hp_mapping") or hasattr(p, "ds_id"))]
    if unlinked:
        raise RuntimeError(f"DeepSpeed's ZeRO optimizer does not hold the g-net parameter {unlinked[0]!r}; build the "
                           "optimizer over the g-nets and the uncompressed parameters")
    step = engine.step

    def step_with_push(self, *args, **kwargs):
        if self.is_gradient_accumulation_boundary():
            push_into_deepspeed(gb)
            if gathered is not None:
                gathered.release()  # ZeRO-3: DeepSpeed steps the g-nets' partitions
        return step(*args, **kwargs)

    engine._hf_gb_step = step
    engine.step = types.MethodType(step_with_push, engine)


def push_into_deepspeed(gb: Bottleneck) -> None:
    """This rank's weight gradients -> g-net gradients averaged over the ranks -> DeepSpeed's gradient partitions.

    The covered weights are in no optimizer, so DeepSpeed leaves their ``.grad`` unreduced; averaging the g-net
    gradients instead gives what DDP's averaged weight gradients would (the push is linear in them).
    """
    from deepspeed.utils import safe_set_full_grad

    kept = gb.push_gradients(average_replicas=True)
    for p in gb.parameters():
        grad, p.grad = p.grad, None  # DeepSpeed writes .grad when one exists, its partitions otherwise
        if grad is None:
            grad = torch.zeros(p.ds_shape if hasattr(p, "ds_id") else p.shape, dtype=p.dtype)  # skipped or unused
        if hasattr(p, "ds_id"):  # ZeRO-3 reads the partition at rank * size: pad the tail as DeepSpeed does
            size = p.ds_tensor.numel() * torch.distributed.get_world_size(group=p.ds_process_group)
            grad = torch.nn.functional.pad(grad.reshape(-1), (0, size - grad.numel()))
        safe_set_full_grad(p, grad)
    if not kept:
        logger.warning("Under DeepSpeed the uncompressed tensors of the skipped step are still stepped by "
                       "DeepSpeed's own rules (its fp16 loss scaler skips overflowing steps; bf16 and fp32 do not)")


# ----------------------------------------------------------------------------- DeepSpeed ZeRO-3
class GatheredGnets:
    """The g-nets held whole on every rank from a prediction to its push: ZeRO-3 partitions them with the model,
    and DeepSpeed gathers a parameter only inside the forward of the module that owns it, which the g-nets never
    run in (`predict_weights` and `push_gradients` use them directly, through a kept graph)."""

    def __init__(self, gb: Bottleneck):
        self.gb = gb
        self._context: Any = None

    @property
    def held(self) -> bool:
        return self._context is not None

    def gather(self) -> None:
        if self._context is None:
            from deepspeed.runtime.zero.partition_parameters import GatheredParameters

            self._context = GatheredParameters(list(self.gb.parameters()), modifier_rank=None)
            self._context.__enter__()

    def release(self) -> None:
        if self._context is not None:
            context, self._context = self._context, None
            context.__exit__(None, None, None)


def bind_zero3(model: nn.Module, gb: Bottleneck) -> None:
    """Bind ``gb`` to the ZeRO-3 partitions of ``model``'s covered weights (each rank predicts its own elements).

    ``ValueError`` for a covered weight DeepSpeed keeps whole on every rank (``ds_persist``: no larger than
    ``stage3_param_persistence_threshold``): it fetches such a weight once and would never see a new prediction.
    """
    persistent = [t for t in gb.covered if getattr(t.param, "ds_persist", False)]
    if persistent:
        t = min(persistent, key=lambda t: t.param.ds_numel)
        raise ValueError(
            f"DeepSpeed ZeRO-3 keeps {len(persistent)} covered weights whole on every rank (e.g. {t.name}, "
            f"{t.param.ds_numel} elements: under zero_optimization.stage3_param_persistence_threshold) and would not "
            "see their predictions; set stage3_param_persistence_threshold below the smallest covered weight "
            "(0 is always safe)"
        )
    gb.rebind(model)

