"""Which part of a weight this rank holds (`RowShard`: rows of an FSDP2 DTensor shard, or the rows a DeepSpeed ZeRO-3
partition's flat elements touch), the tiles over those rows, and the tensors a rank reads and writes for them.

Pure functions of what they are passed, without collectives (those are `hf_gb.engine.shards`'s): ZeRO-3 parameters
are recognised by their ``ds_tensor`` / ``ds_shape`` attributes, DTensors by their type name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .layers import view3d
from .tiling import TileGeometry, grid, tile, untile


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (FSDP2 DTensor) tensor; the tensor itself when it is not sharded."""
    return tensor.to_local() if type(tensor).__name__ == "DTensor" else tensor


@dataclass(frozen=True)
class RowShard:
    """The rows ``[start, stop)`` of a weight's dim 0 that this rank holds, and the process group sharing them."""

    start: int
    stop: int
    rows: int  # global rows
    group: Any  # process group over which the rows are split (None: the default group)
    # DeepSpeed ZeRO-3: the flat elements [f0, f1) this rank owns (start/stop: the rows they touch), and buffers of
    # those rows for the prediction and the gradient (the parameter itself holds no rows).
    flat: tuple[int, int] | None = None
    data: torch.Tensor | None = field(default=None, compare=False, repr=False)
    grad: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def local_rows(self) -> int:
        return self.stop - self.start


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The shape of the whole weight: DeepSpeed ZeRO-3 leaves a partitioned parameter with ``shape (0,)``."""
    return tuple(param.ds_shape) if is_partitioned(param) else tuple(param.shape)


def is_partitioned(param: torch.Tensor) -> bool:
    """Whether ``param`` is a DeepSpeed ZeRO-3 parameter (a flat ``ds_tensor`` partition per rank)."""
    return getattr(param, "ds_tensor", None) is not None and hasattr(param, "ds_shape")


def refuse_partitioned(model: Any) -> None:
    """``ValueError`` for a model DeepSpeed ZeRO-3 has partitioned already (e.g. built under ``zero.Init``, when the
    arguments naming ZeRO-3 came first): a bottleneck reads whole weights when it is built."""
    name = next((n for n, p in model.named_parameters() if is_partitioned(p)), None)
    if name is not None:
        raise ValueError(f"{type(model).__name__} is partitioned by DeepSpeed ZeRO-3 already (e.g. {name}): attach "
                         "the bottleneck before (build the model before the arguments that name the DeepSpeed config)")


def local_rows(param: torch.Tensor, layout: str, shard: RowShard | None, what: str = "data") -> torch.Tensor | None:
    """The (local rows, in, K) tensor of ``param``'s ``what`` ('data' or 'grad') this rank works on: the buffer of
    a ZeRO-3 partition, the local shard of a DTensor, or the whole tensor; None for a missing gradient."""
    if shard is not None and shard.flat is not None:
        return getattr(shard, what)
    value = getattr(param, what)
    return None if value is None else view3d(local_part(value), layout)


def owned_slice(shard: RowShard) -> slice:
    """Where the owned elements lie in the flattened buffer of ``shard``'s rows."""
    per_row = shard.data[0].numel() if shard.local_rows else 1
    f0, f1 = shard.flat
    return slice(f0 - shard.start * per_row, f1 - shard.start * per_row)


@torch.no_grad()
def publish_partitions(covered: Iterable[Any], shards: dict[str, RowShard]) -> None:
    """Copy the owned elements of each ZeRO-3 buffer (predicted rows) into ``param.ds_tensor`` (the forward's)."""
    for t in covered:
        shard = shards.get(t.name)
        if shard is not None and shard.flat is not None and shard.local_rows:
            owned = shard.data.reshape(-1)[owned_slice(shard)]
            t.param.ds_tensor.data[: owned.numel()].copy_(owned)


def tile_rows(shard: RowShard, geometry: TileGeometry) -> range:
    """Tile rows (of the weight's tile grid) that intersect the rows ``shard`` holds; empty for an empty shard."""
    if shard.local_rows == 0:
        return range(0)
    return range(shard.start // geometry.rows, (shard.stop - 1) // geometry.rows + 1)


def local_tiles(shape: tuple[int, int, int], geometry: TileGeometry, shard: RowShard) -> torch.Tensor:
    """Indices (in the weight's row-major tile order) of the whole tiles intersecting the rows ``shard`` holds."""
    _, n_cols = grid(shape, geometry)
    rows = tile_rows(shard, geometry)
    return torch.arange(rows.start * n_cols, rows.stop * n_cols, dtype=torch.long)


def write_rows(local: torch.Tensor, tiles: torch.Tensor, shape: tuple[int, int, int], geometry: TileGeometry,
               shard: RowShard) -> None:
    """Copy this rank's rows out of ``tiles`` (its `local_tiles`, ``(n, rows, cols * K)``) into ``local``.

    ``local`` is the ``(local rows, in, K)`` view of ``param.to_local()``: written in place, never reassigned.
    """
    rows = tile_rows(shard, geometry)
    if not len(rows):
        return
    first = rows.start * geometry.rows
    block = untile(tiles, (len(rows) * geometry.rows, shape[1], shape[2]), geometry)  # (n_tr * R, in, K)
    local.copy_(block[shard.start - first : shard.stop - first])


def grad_tiles(dst: torch.Tensor, local_grad: torch.Tensor | None, shape: tuple[int, int, int],
               geometry: TileGeometry, shard: RowShard) -> None:
    """Fill ``dst`` (``(n, rows, cols * K)`` for `local_tiles`) with the tiles of this rank's gradient rows.

    Rows of those tiles that another rank holds are zero: their gradient arrives through `all_reduce_gradients`.
    """
    rows = tile_rows(shard, geometry)
    if not len(rows):
        return
    if local_grad is None:
        dst.zero_()
        return
    first = rows.start * geometry.rows
    block = local_grad.new_zeros(len(rows) * geometry.rows, shape[1], shape[2])
    block[shard.start - first : shard.stop - first] = local_grad
    dst.copy_(tile(block, geometry))
