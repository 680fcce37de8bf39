"""Position codes: the binary (or Gray, or Fourier) code of each row, column and kernel position of a tile.

A g-net maps the code of a position to the weight there; `code_inputs` counts its inputs for a `TileGeometry`.
"""

from __future__ import annotations

import math

import torch

from .tiling import TileGeometry


def num_bits(size: int) -> int:
    """Bits needed to number ``size`` positions (0 for a single position)."""
    return (size - 1).bit_length()


# Sine/cosine pairs that `position_codes(encoding="fourier")` adds to the binary bits (fewer for tiny sides).
FOURIER_PAIRS = 4


def _fourier_pairs(size: int) -> int:
    return min(FOURIER_PAIRS, num_bits(size))


def code_width(size: int, encoding: str = "binary") -> int:
    """Columns of `position_codes` of ``size`` positions: the g-net's inputs for that axis."""
    return num_bits(size) + (2 * _fourier_pairs(size) if encoding == "fourier" else 0)


def position_codes(size: int, encoding: str = "binary") -> torch.Tensor:
    """Codes of positions ``0..size-1``: a (size, `code_width`) tensor.

    ``binary`` and ``gray``: the position's bits as -1/+1, least significant bit first. ``fourier``: the binary bits
    followed by ``sin`` and ``cos`` of ``pi * k * (p + 1/2) / size`` for ``k = 1..FOURIER_PAIRS``, smooth functions
    of the position that a sum of bits can express only with many hidden units."""
    index = torch.arange(size)
    if encoding == "gray":
        index = index ^ (index >> 1)
    elif encoding not in ("binary", "fourier"):
        raise ValueError(f"encoding must be 'binary', 'gray' or 'fourier', got encoding={encoding!r}")
    bits = (index[:, None] >> torch.arange(num_bits(size))) & 1
    codes = bits.float() * 2 - 1
    if encoding == "fourier" and _fourier_pairs(size):
        k = torch.arange(1, _fourier_pairs(size) + 1, dtype=torch.float32)
        angle = math.pi * (index[:, None].float() + 0.5) * k / size
        codes = torch.cat([codes, torch.sin(angle), torch.cos(angle)], dim=1)
    return codes


def axis_codes(axes: tuple[int, ...], encoding: str = "binary") -> torch.Tensor:
    """Codes of the positions of an ordered multi-axis range (an image's (channel, y, x), a kernel's (ky, kx)), in
    row-major (C) order as torch flattens them: each position's `position_codes` of every coordinate, side by side.
    A ``(prod(axes), axes_width(axes))`` tensor; a 28 x 28 image needs 5 + 5 bits and no padding."""
    parts = []
    for d, size in enumerate(axes):
        codes = position_codes(size, encoding)  # (size, w_d)
        before, after = math.prod(axes[:d]), math.prod(axes[d + 1 :])
        parts.append(codes[None, :, None, :].expand(before, size, after, -1).reshape(-1, codes.shape[1]))
    return torch.cat(parts, dim=1)


def axes_width(axes: tuple[int, ...], encoding: str = "binary") -> int:
    """Columns of `axis_codes` of ``axes``."""
    return sum(code_width(size, encoding) for size in axes)


def column_codes(geom: TileGeometry, encoding: str = "binary") -> torch.Tensor:
    """The codes of a tile's columns: of their coordinates (``geom.col_axes``) or of their index."""
    return axis_codes(geom.col_axes, encoding) if geom.col_axes else position_codes(geom.cols, encoding)


def code_inputs(geom: TileGeometry, encoding: str = "binary") -> int:
    """Inputs of a g-net over tiles of ``geom``: row code, column code and the kernel code (one input per kernel
    position, or the bits of each kernel axis)."""
    cols = axes_width(geom.col_axes, encoding) if geom.col_axes else code_width(geom.cols, encoding)
    kernel = axes_width(geom.kernel_axes, encoding) if geom.kernel_axes else geom.kernel_bits
    return code_width(geom.rows, encoding) + cols + kernel
