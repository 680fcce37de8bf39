"""The distributed side of the engine: weights sharded by FSDP2 (DTensor ``Shard(0)``) or partitioned by DeepSpeed
ZeRO-3 (flat ``ds_tensor`` partitions), read and written shard-local.

A rank that holds rows ``[start, stop)`` of a covered weight predicts only the whole tiles that intersect those rows
(each tile is predicted whole, so its double centring stays exact without communication), writes its rows into
``param.to_local()`` and, in push, builds the gradient of those tiles from ``param.grad.to_local()`` with zeros for
the rows it does not hold. Push is linear in that gradient, so the SUM over ranks of the g-net gradients is the
gradient of the full weight: `all_reduce_gradients` finishes the step and the g-nets stay replicated.

Under ZeRO-3 a rank owns the flat elements ``[f0, f1)`` of each (row-major) weight (`ds_partition`): the rows they
touch are its `RowShard`, predicted into a buffer of those rows and published into ``param.ds_tensor``
(`publish_partitions`). DeepSpeed leaves a covered weight outside its optimizer with this rank's own, unreduced,
full ``.grad``: `reduce_partition_grads` averages it over the ranks and keeps the owned elements in a buffer of the
same rows, zeros elsewhere, so the same push and SUM reduction apply.

Everything here is a function of what it is passed; the bottleneck keeps the plans (`Bottleneck.rebind` makes
them). This module is the only one of the engine that touches ``torch.distributed``; it imports it lazily, so the
core keeps working on one device without it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .layers import view3d
from .partitions import (
    RowShard,
    full_shape,
    grad_tiles,
    is_partitioned,
    local_rows,
    local_tiles,
    owned_slice,
    tile_rows,  # noqa: F401 (hf_gb.engine.shards.tile_rows, as before partitions.py)
    write_rows,
)
from .tiling import tile_into, untile_into

logger = logging.getLogger(__name__)


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (False when torch.distributed is absent)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def model_class(model: nn.Module) -> type:
    """The class ``model`` was built as: ``fully_shard`` swaps it for a generated ``FSDP<Name>`` subclass."""
    cls = type(model)
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule

        if isinstance(model, FSDPModule):
            return next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))
    return cls


def _chunk_offset(size: int, chunks: int, index: int) -> tuple[int, int]:
    """(local size, offset) of chunk ``index`` when ``size`` rows are split like ``torch.chunk`` into ``chunks``."""
    step = math.ceil(size / chunks) if chunks else 0
    start = min(size, step * index)
    return min(size, start + step) - start, start


def _shard_size_and_offset(size: int, chunks: int, index: int) -> tuple[int, int]:
    """One place for the placement arithmetic of ``Shard(0)``.

    ``Shard.local_shard_size_and_offset`` is public in recent torch; older releases only have the private
    ``torch.distributed.tensor._utils.compute_local_shape_and_global_offset``. Both follow ``torch.chunk``, which
    is the fallback when neither answers.
    """
    from torch.distributed.tensor import Shard

    public = getattr(Shard, "local_shard_size_and_offset", None)
    if public is not None:
        local, offset = public(size, chunks, index)
        return int(local), int(offset)
    return _chunk_offset(size, chunks, index)


def row_shard(param: torch.Tensor) -> RowShard | None:
    """The rows of ``param`` this rank holds, or None when ``param`` is an ordinary (replicated) tensor.

    Raises ``ValueError`` for a DTensor placed in a way shard-local prediction cannot follow (anything but
    ``Shard(0)`` and ``Replicate()``, or dim 0 sharded over more than one mesh dimension).
    """
    if not is_dtensor(param):
        return None
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = param.device_mesh, param.placements
    rows = int(param.shape[0])
    start, size, group = 0, rows, None
    sharded = [d for d, p in enumerate(placements) if isinstance(p, Shard)]
    for d, p in enumerate(placements):
        if isinstance(p, Replicate):
            continue
        if not (isinstance(p, Shard) and p.dim == 0) or len(sharded) > 1:
            raise ValueError(
                f"cannot predict a weight of shape {tuple(param.shape)} placed as {placements} shard-locally: "
                "only Shard(0) on one mesh dimension (as fully_shard places it) and Replicate() are supported"
            )
        local, offset = _shard_size_and_offset(size, mesh.size(d), mesh.get_local_rank(d))
        start, size = start + offset, local
        group = mesh.get_group(d)
    held = param.to_local().shape[0]
    if held != size:  # the placement arithmetic disagrees with the tensor torch handed us: never guess
        raise RuntimeError(f"local shard of {tuple(param.shape)} has {held} rows, placement arithmetic says {size}")
    return RowShard(start, start + size, rows, group)


def ds_partition(param: torch.Tensor, shape: tuple[int, int, int]) -> RowShard | None:
    """The flat elements of ``param`` this rank owns under DeepSpeed ZeRO-3 (``rank * partition`` on, as DeepSpeed
    partitions), as the `RowShard` of the rows of ``shape`` (the (out, in, K) view) they touch; None otherwise."""
    if not is_partitioned(param):
        return None
    import torch.distributed as dist

    group = getattr(param, "ds_process_group", None)
    part = param.ds_tensor
    size = int(getattr(part, "ds_numel", part.numel()))
    numel, per_row = int(param.ds_numel), shape[1] * shape[2]
    f0 = min(numel, dist.get_rank(group=group) * size)
    f1 = min(numel, f0 + size)
    start = f0 // per_row
    stop = -(-f1 // per_row) if f1 > f0 else start
    buffers = [part.new_zeros(stop - start, shape[1], shape[2]) for _ in range(2)]
    return RowShard(start, stop, shape[0], group, (f0, f1), *buffers)


@torch.no_grad()
def reduce_partition_grads(covered: Iterable[Any], shards: dict[str, RowShard]) -> None:
    """Each ZeRO-3 covered weight's full local ``.grad``, averaged over the ranks; its owned elements go into the
    gradient buffer of ``shard``'s rows (zeros elsewhere). A collective: every rank calls it, in the same order."""
    import torch.distributed as dist

    for t in covered:
        shard = shards.get(t.name)
        if shard is None or shard.flat is None:
            continue
        grad = t.param.grad
        full = shard.grad.new_zeros(full_shape(t.param)) if grad is None else grad.detach().clone()
        dist.all_reduce(full, op=dist.ReduceOp.SUM, group=shard.group)
        shard.grad.zero_()
        if shard.local_rows:
            f0, f1 = shard.flat
            shard.grad.view(-1)[owned_slice(shard)] = full.reshape(-1)[f0:f1] / dist.get_world_size(group=shard.group)


# ----------------------------------------------------------------------------- collectives
def exact_std(param: torch.Tensor, shard: RowShard) -> float:
    """``param.std()`` (Bessel-corrected) of the full weight, from this rank's shard and one all-reduce.

    Sums in float64 so the result matches the single-process std to rounding; every rank gets the same value.
    """
    import torch.distributed as dist

    local = param.to_local().detach().double()
    stats = torch.stack([local.sum(), local.square().sum()]).cpu()
    dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=shard.group)
    n = param.numel()
    if n < 2:
        return 0.0
    total, squares = stats.tolist()
    var = max(0.0, (squares - total * total / n) / (n - 1))
    return math.sqrt(var)


def all_reduce_gradients(params: Iterable[nn.Parameter], group: Any = None) -> None:
    """SUM the ``.grad`` of ``params`` over ``group`` in one flat buffer.

    A parameter no rank gave a gradient keeps ``.grad = None`` (as in one process, so optimizers skip it); one
    that only some ranks gave a gradient gets the sum, with zeros from the others.
    """
    import torch.distributed as dist

    params = [p for p in params if p.requires_grad]
    if not params:
        return
    flags = torch.tensor([float(p.grad is not None) for p in params], dtype=params[0].dtype)
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    flat = torch.cat([*parts, flags.to(parts[0].device)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for i, p in enumerate(params):
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone() if flat[-len(params) + i] > 0 else None
        offset += n


def average_over_processes(params: Iterable[nn.Parameter]) -> None:
    """Average the ``.grad`` of ``params`` over the processes of the default group (`all_reduce_gradients`, then
    divided by the world size); a no-op without a process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    params = list(params)
    all_reduce_gradients(params)
    world = torch.distributed.get_world_size()
    for p in params:
        if p.grad is not None:
            p.grad.div_(world)


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind ``value`` (a collective for a DTensor: every rank must call it)."""
    return value.full_tensor() if is_dtensor(value) else value


# ----------------------------------------------------------------------------- the engine, shard-local
@dataclass
class _Member:
    tensor: Any  # the CoveredTensor
    shard: RowShard | None  # None: the tensor is whole on this rank (replicated), all its tiles are predicted
    pos: int  # first of its tiles in the bank's selection
    n: int  # how many of its tiles are selected


@dataclass
class BankPlan:
    """Which tiles of one bank this rank predicts: ``index`` (into the bank) and where each tensor's tiles sit."""

    index: torch.Tensor
    members: list[_Member]


def plan_bank(tensors: Iterable[Any], shards: dict[str, RowShard | None]) -> BankPlan:
    """The tiles of one bank that intersect this rank's rows of each of its ``tensors`` (CoveredTensors)."""
    parts, members, pos = [], [], 0
    for t in tensors:
        shard = shards.get(t.name)
        if shard is None:
            idx = torch.arange(t.n_tiles, dtype=torch.long)
        else:
            idx = local_tiles(t.shape, t.geometry, shard)
        parts.append(idx + t.offset)
        members.append(_Member(t, shard, pos, len(idx)))
        pos += len(idx)
    index = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    return BankPlan(index, members)


def find_shards(covered: Iterable[Any], layouts_ok: tuple[str, ...] = ("matrix", "kernel")) -> dict[str, RowShard]:
    """`RowShard` of every covered tensor that is a DTensor or a ZeRO-3 partition; ``ValueError`` for one whose rows
    are not the (out, in, K) view's rows (GPT-2's transposed ``Conv1D``: FSDP splits its input dimension)."""
    shards = {}
    for t in covered:
        shard = row_shard(t.param)
        if shard is None:
            shard = ds_partition(t.param, t.shape)
        if shard is None:
            continue
        if t.layout not in layouts_ok:
            raise ValueError(
                f"{t.name} ({t.module_type}, layout {t.layout!r}) is sharded on its input dimension; shard-local "
                f"prediction needs the output dimension sharded; exclude it (exclude_modules) or do not shard it"
            )
        shards[t.name] = shard
    return shards


def shard_group(shards: dict[str, RowShard]) -> Any:
    """The one process group the covered tensors are sharded over (``ValueError`` if they use several)."""
    groups = {id(s.group): s.group for s in shards.values()}
    if len(groups) > 1:
        raise ValueError(f"covered weights are sharded over {len(groups)} different process groups; use one mesh")
    return next(iter(groups.values()), None)


@torch.no_grad()
def calibrate_bank(bank: nn.Module, target_std: torch.Tensor, plan: BankPlan, group: Any = None) -> None:
    """`GNetBank.calibrate` from this rank's tiles only: the per-tile (std, mean, count) are summed over ranks (a
    tile two ranks share is computed identically by both), so every rank ends with the scales one process would
    set, and no rank ever predicts the whole bank."""
    import torch.distributed as dist

    bank.calibrate(target_std, index=plan.index.to(bank.scale.device),
                   reduce=lambda stats: dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group))


def write_bank(out: torch.Tensor, plan: BankPlan) -> None:
    """Write the predicted tiles ``out`` (one bank, ``plan.index`` order) into each tensor's local rows."""
    with torch.no_grad():
        for m in plan.members:
            t, tiles = m.tensor, out[m.pos : m.pos + m.n]
            if m.shard is None:
                untile_into(view3d(t.param.data, t.layout), tiles, t.geometry)
            else:  # a view of this rank's shard (or its ZeRO-3 buffer): written in place, never reassigned
                write_rows(local_rows(t.param, t.layout, m.shard), tiles, t.shape, t.geometry, m.shard)


def grad_bank(G: torch.Tensor, plan: BankPlan) -> None:
    """Fill ``G`` (``plan.index`` order) from each tensor's local gradient rows, then drop those gradients."""
    for m in plan.members:
        t, dst = m.tensor, G[m.pos : m.pos + m.n]
        grad = t.param.grad
        if grad is None:
            dst.zero_()
        elif m.shard is None:
            tile_into(dst, view3d(grad, t.layout), t.geometry)
        else:
            grad_tiles(dst, local_rows(t.param, t.layout, m.shard, "grad"), t.shape, t.geometry, m.shard)
        t.param.grad = None


def distribute_like(targets: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Replace each whole tensor ``tensors[prefix + name]`` whose target is a sharded DTensor by a DTensor holding
    this rank's rows (so ``target.copy_(value)`` loads a checkpoint shard-locally); shapes are checked later."""
    from torch.distributed.tensor import DTensor

    for name, target in targets.items():
        value = tensors.get(prefix + name)
        if value is None or not is_dtensor(target) or tuple(value.shape) != tuple(target.shape):
            continue
        shard = row_shard(target)
        local = value[shard.start : shard.stop].to(target.to_local().dtype).contiguous()
        tensors[prefix + name] = DTensor.from_local(local, target.device_mesh, target.placements, run_check=False,
                                                    shape=target.shape, stride=target.stride())
