"""Tile geometry and the tile/untile round trip (the position codes of a tile: `hf_gb.engine.codes`).

A covered weight is viewed as ``(out, in, K)``: rows are output units, columns input units, and ``K`` the
flattened kernel positions (1 for a plain matrix). It is cut into ``rows x cols`` tiles over the first two axes
(padded with zeros at the far edges, cropped back after prediction); the kernel axis is never cut.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Tile sides tried when a target compression picks the tile: powers of two and 1.5x powers of two.
_MAX_SIDE = 1 << 14


@dataclass(frozen=True)
class TileGeometry:
    """Shape of one tile: ``rows x cols`` positions of a weight, times ``kernel`` positions each."""

    rows: int
    cols: int
    kernel: int = 1

    @property
    def numel(self) -> int:
        return self.rows * self.cols * self.kernel

    @property
    def kernel_bits(self) -> int:
        # One bit per kernel position (one-hot); a single position carries no information.
        return self.kernel if self.kernel > 1 else 0

    def key(self) -> str:
        return f"{self.rows}x{self.cols}x{self.kernel}"


def grid(shape: Sequence[int], geom: TileGeometry) -> tuple[int, int]:
    """Number of tiles along rows and columns of an ``(out, in, K)`` tensor."""
    return math.ceil(shape[0] / geom.rows), math.ceil(shape[1] / geom.cols)


def tile(w: torch.Tensor, geom: TileGeometry) -> torch.Tensor:
    """Cut an ``(out, in, K)`` tensor into ``(n_tiles, rows, cols * K)`` tiles (row-major tile order, zero padded)."""
    out, inp, k = w.shape
    assert k == geom.kernel, (w.shape, geom)
    nr, nc = grid(w.shape, geom)
    w = F.pad(w, (0, 0, 0, nc * geom.cols - inp, 0, nr * geom.rows - out))
    w = w.reshape(nr, geom.rows, nc, geom.cols, k).permute(0, 2, 1, 3, 4)
    return w.reshape(nr * nc, geom.rows, geom.cols * k)


def untile(tiles: torch.Tensor, shape: Sequence[int], geom: TileGeometry) -> torch.Tensor:
    """Inverse of `tile`: ``(n_tiles, rows, cols * K)`` back to the ``(out, in, K)`` tensor (cropped)."""
    out, inp, k = shape
    nr, nc = grid(shape, geom)
    w = tiles.reshape(nr, nc, geom.rows, geom.cols, k).permute(0, 2, 1, 3, 4)
    return w.reshape(nr * geom.rows, nc * geom.cols, k)[:out, :inp]


def _blocks(w: torch.Tensor, geom: TileGeometry) -> torch.Tensor | None:
    """``(nr, rows, nc, cols, K)`` view of an ``(out, in, K)`` tensor the tiles divide exactly, else None."""
    out, inp, k = w.shape
    if out % geom.rows or inp % geom.cols:
        return None
    try:
        return w.view(out // geom.rows, geom.rows, inp // geom.cols, geom.cols, k)
    except RuntimeError:  # a layout whose strides cannot be split
        return None


def tile_into(dst: torch.Tensor, w: torch.Tensor, geom: TileGeometry) -> None:
    """``dst.copy_(tile(w, geom))`` with one copy (no padded intermediate) when the tiles divide ``w`` exactly."""
    blocks = _blocks(w, geom)
    if blocks is None:
        dst.copy_(tile(w, geom))
        return
    nr, _, nc, _, k = blocks.shape
    dst.view(nr, nc, geom.rows, geom.cols, k).copy_(blocks.permute(0, 2, 1, 3, 4))


def untile_into(dst: torch.Tensor, tiles: torch.Tensor, geom: TileGeometry) -> None:
    """``dst.copy_(untile(tiles, dst.shape, geom))`` for an ``(out, in, K)`` view ``dst``, copying once."""
    blocks = _blocks(dst, geom)
    if blocks is None:
        dst.copy_(untile(tiles, dst.shape, geom))
        return
    nr, _, nc, _, k = blocks.shape
    blocks.copy_(tiles.reshape(nr, nc, geom.rows, geom.cols, k).permute(0, 2, 1, 3, 4))


def compression_of(shape: Sequence[int], geom: TileGeometry, tile_params: float) -> float:
    """Covered compression of an ``(out, in, K)`` tensor tiled by ``geom`` with ``tile_params`` stored per tile."""
    nr, nc = grid(shape, geom)
    return shape[0] * shape[1] * shape[2] / (nr * nc * tile_params)


def gain_values(shape: Sequence[int], gains: str) -> int:
    """Stored output gains of an ``(out, in, K)`` tensor under ``GBConfig.gains``: one per row and/or per input."""
    return (shape[0] if gains in ("rows", "both") else 0) + (shape[1] if gains in ("columns", "both") else 0)


def _sides(size: int) -> list[int]:
    sides = {size}
    p = 1
    while p < min(size, _MAX_SIDE):
        sides.add(p)
        if 3 * p // 2 < size:
            sides.add(3 * p // 2)
        p *= 2
    return sorted(s for s in sides if s <= size)


def choose_geometry(
    shape: Sequence[int],
    tile_params: Callable[[TileGeometry], float],
    compression: float | None,
    tile_size: Sequence[int] | None,
) -> TileGeometry:
    """Pick the tile for an ``(out, in, K)`` tensor; ``tile_params(geometry)`` counts a g-net family's values per tile.

    An explicit ``tile_size`` is clipped to the tensor. Otherwise the tile whose compression is closest to
    ``compression`` (in log ratio) wins; ties go to the larger tile (fewer g-nets).
    """
    out, inp, k = shape
    if tile_size is not None:
        return TileGeometry(min(tile_size[0], out), min(tile_size[1], inp), k)
    target = math.log(compression)
    best, best_score = None, None
    for r in _sides(out):
        for c in _sides(inp):
            geom = TileGeometry(r, c, k)
            score = (abs(math.log(compression_of(shape, geom, tile_params(geom))) - target), -geom.numel)
            if best_score is None or score < best_score:
                best, best_score = geom, score
    return best


@dataclass(frozen=True)
class TileRows:
    """Where the rows of a bank's tiles live in its weights, for kernels that write and read them in place.

    Row ``i`` of tile ``t`` is the ``cols * K`` contiguous values at element offset ``offsets[t, i]`` of
    ``tensors[which[t]]``, an ``(out, in, K)`` contiguous view of a weight (or of its gradient)."""

    tensors: tuple[torch.Tensor, ...]
    which: torch.Tensor  # (n_tiles,) int64
    offsets: torch.Tensor  # (n_tiles, rows) int64
    geometry: TileGeometry

    def grid(self, m: int) -> torch.Tensor:
        """``(nr, nc, rows, cols, K)`` view of tensor ``m`` by tile."""
        return _blocks(self.tensors[m], self.geometry).permute(0, 2, 1, 3, 4)


def tile_rows(views: Sequence[torch.Tensor], geom: TileGeometry) -> TileRows | None:
    """`TileRows` of ``views`` (``(out, in, K)`` views, tiled one after the other in row-major tile order, as
    `tile`), or None unless every view is contiguous float32 and divided exactly by the tiles."""
    which, offsets = [], []
    for m, v in enumerate(views):
        if v.dtype != torch.float32 or not v.is_contiguous() or _blocks(v, geom) is None:
            return None
        _, inp, k = v.shape
        nr, nc = grid(v.shape, geom)
        rows = torch.arange(nr)[:, None, None] * geom.rows + torch.arange(geom.rows)
        off = rows * (inp * k) + (torch.arange(nc) * (geom.cols * k))[None, :, None]  # (nr, nc, rows)
        offsets.append(off.reshape(nr * nc, geom.rows))
        which.append(torch.full((nr * nc,), m, dtype=torch.int64))
    return TileRows(tuple(views), torch.cat(which), torch.cat(offsets).contiguous(), geom)
