"""Tile geometry and the tile/untile round trip (the position codes of a tile: `hf_gb.engine.codes`).

A covered weight is viewed as ``(out, in, K)``: rows are output units, columns input units, and ``K`` the
flattened kernel positions (1 for a plain matrix). It is cut into ``rows x cols`` tiles over the first two axes
(padded with zeros at the far edges, cropped back after prediction); the kernel axis is never cut.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Tile sides tried when a target compression picks the tile: powers of two and 1.5x powers of two.
_MAX_SIDE = 1 << 14


@dataclass(frozen=True)
class TileGeometry:
    """Shape of one tile: ``rows x cols`` positions of a weight, times ``kernel`` positions each.

    ``col_axes``: the shape a tile's columns unravel to when they are an ordered input (an image a Linear reads,
    `GBConfig.input_shapes`; the tile then spans the whole input axis); ``kernel_axes``: the kernel's shape (e.g.
    ``(3, 3)``) when kernel positions are coded by their axes (`GBConfig.kernel_code`). Either changes the codes the
    g-nets read, so it is part of the bank's `key`; both None is the geometry of earlier versions.
    """

    rows: int
    cols: int
    kernel: int = 1
    col_axes: tuple[int, ...] | None = None
    kernel_axes: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.col_axes is not None and math.prod(self.col_axes) != self.cols:
            raise ValueError(f"col_axes {self.col_axes} do not hold the tile's {self.cols} columns")
        if self.kernel_axes is not None and math.prod(self.kernel_axes) != self.kernel:
            raise ValueError(f"kernel_axes {self.kernel_axes} do not hold the tile's {self.kernel} kernel positions")

    @property
    def numel(self) -> int:
        return self.rows * self.cols * self.kernel

    @property
    def kernel_bits(self) -> int:
        # One-hot kernel codes: one input per kernel position; a single position carries no information.
        return self.kernel if self.kernel > 1 and self.kernel_axes is None else 0

    def key(self) -> str:
        key = f"{self.rows}x{self.cols}x{self.kernel}"
        if self.col_axes is not None:
            key += "-in" + "x".join(map(str, self.col_axes))
        if self.kernel_axes is not None:
            key += "-k" + "x".join(map(str, self.kernel_axes))
        return key


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


def tile_sides(size: int) -> list[int]:
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
    for r in tile_sides(out):
        for c in tile_sides(inp):
            geom = TileGeometry(r, c, k)
            score = (abs(math.log(compression_of(shape, geom, tile_params(geom))) - target), -geom.numel)
            if best_score is None or score < best_score:
                best, best_score = geom, score
    return best


@dataclass(frozen=True)
class TileRows:
    """Where the rows of a bank's tiles live in its weights, for kernels that write and read them in place.

    Row ``i`` of tile ``t`` is the ``cols * K`` contiguous values at element offset ``offsets[t, i]`` of
    ``tensors[which[t]]``: an ``(out, in, K)`` contiguous view of a weight (or of its gradient) for a tile inside
    it, or an edge buffer for a tile that overhangs the weight's far edges (its padding lies outside the weight).
    A kernel that writes rows calls `store_edges` after (the buffers' valid parts into the weights), one that
    reads them `load_edges` before (the weights' edges into the buffers, zero padded, as `tile` pads).
    ``regions[m]`` is the part of ``tensors[m]`` that its tiles cover, divided exactly by them (for `grid`)."""

    tensors: tuple[torch.Tensor, ...]
    which: torch.Tensor  # (n_tiles,) int64
    offsets: torch.Tensor  # (n_tiles, rows) int64
    geometry: TileGeometry
    regions: tuple[torch.Tensor, ...] = ()
    edges: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...] = ()  # (weight part, buffer, buffer part)

    def grid(self, m: int) -> torch.Tensor:
        """``(nr, nc, rows, cols, K)`` view by tile of the tiles that lie in ``tensors[m]`` (row-major order)."""
        return _blocks((self.regions or self.tensors)[m], self.geometry).permute(0, 2, 1, 3, 4)

    def load_edges(self) -> None:
        """Copy the weights' edges into the edge buffers, zero outside them (before a kernel reads the rows)."""
        for part, buffer, inside in self.edges:
            rows, cols = inside.shape[:2]
            buffer[rows:].zero_()
            buffer[:rows, cols:].zero_()
            inside.copy_(part)

    def store_edges(self) -> None:
        """Copy the edge buffers' valid parts into the weights (after a kernel wrote the rows)."""
        for part, _, inside in self.edges:
            part.copy_(inside)


@functools.lru_cache(maxsize=64)
def _addresses(shapes: tuple[tuple[int, int, int], ...], geom: TileGeometry):
    """``which`` (n_tiles,), ``offsets`` (n_tiles, rows) and the edge buffers ``(view, kind, shape)`` of views of
    ``shapes`` (see `tile_rows`); kind 'right' holds the last tile column, 'bottom' the rest of the last tile row."""
    R, C = geom.rows, geom.cols
    which, offsets, buffers = [], [], []
    for m, (out, inp, k) in enumerate(shapes):
        nr, nc = grid((out, inp, k), geom)
        fr, fc = out // R, inp // C  # whole tiles along each axis
        a, b = torch.arange(nr).view(nr, 1, 1), torch.arange(nc).view(1, nc, 1)
        i = torch.arange(R).view(1, 1, R)
        right = (b >= fc).expand(nr, nc, 1)
        bottom = (a >= fr) & ~right
        w = torch.full((nr, nc, 1), m, dtype=torch.int64)
        off = ((a * R + i) * (inp * k) + b * (C * k)).expand(nr, nc, R)
        if inp % C:
            w = torch.where(right, len(shapes) + len(buffers), w)
            off = torch.where(right, (a * R + i) * (C * k), off)
            buffers.append((m, "right", (nr * R, C, k)))
        if out % R and fc:
            w = torch.where(bottom, len(shapes) + len(buffers), w)
            off = torch.where(bottom, i * (fc * C * k) + b * (C * k), off)
            buffers.append((m, "bottom", (R, fc * C, k)))
        which.append(w.reshape(nr * nc))
        offsets.append(off.reshape(nr * nc, R))
    return torch.cat(which), torch.cat(offsets).contiguous(), tuple(buffers)


def tile_rows(views: Sequence[torch.Tensor], geom: TileGeometry) -> TileRows | None:
    """`TileRows` of ``views`` (``(out, in, K)`` views, tiled one after the other in row-major tile order, as
    `tile`), or None unless every view is contiguous float32. Tiles that overhang a view's far edges get edge
    buffers (a copy of those edges only), so no view needs to be divided exactly by the tiles."""
    if any(v.dtype != torch.float32 or not v.is_contiguous() for v in views):
        return None
    which, offsets, kinds = _addresses(tuple(tuple(v.shape) for v in views), geom)
    R, C = geom.rows, geom.cols
    regions = [v[: v.shape[0] // R * R, : v.shape[1] // C * C] for v in views]
    buffers, edges = [], []
    for m, kind, shape in kinds:
        v = views[m]
        (out, inp, _), full_rows, full_cols = v.shape, v.shape[0] // R * R, v.shape[1] // C * C
        buffer = v.new_empty(shape)
        if kind == "right":  # the last tile column, every row of tiles
            edges.append((v[:, full_cols:], buffer, buffer[:out, : inp - full_cols]))
        else:  # the last tile row, but for its last tile (in the right buffer)
            edges.append((v[full_rows:, :full_cols], buffer, buffer[: out - full_rows]))
        buffers.append(buffer)
        regions.append(buffer)
    return TileRows(tuple(views) + tuple(buffers), which, offsets, geom, tuple(regions), tuple(edges))
