"""Family ``"coords"``: the g-net for tensors whose positions carry meaning, sized by the compression target.

What family ``"auto"`` gives a Linear that reads an image (`GBConfig.input_shapes`). Per tile (one tile spans all
the tensor's columns, so their codes are the coordinates of the whole input)::

    A[i] = row_code(i) @ w_row + s(i, :) * u[h(i, :)] + b1     (n, rows, h): the bits of the unit's index plus
                                                                hashed learned features of it (FunHashNN-like)
    B[j] = col_code(j) @ w_col (+ kernel code @ w_ker)         (n, cols * K, h): the coordinates of the input
    W[i, j] = scale * center(w2 . relu(A[i] + B[j]))

The hidden units of the layer (its rows) have no order, so their index bits alone give every unit's pre-activations
only ``log2(rows) + 1`` directions; the hashed features ``u[h(i, k)]`` (seeded as in `hf_gb.engine.hashing`, a pool
of learned values per tile) give every unit its own. The inputs (columns) are ordered: their coordinates' bits
make each unit's receptive field a smooth function of the pixel position, the prior random sharing lacks.

Size from the target: a tile's budget is ``tile weights / compression``; the width is ``min(COORDS_MAX_WIDTH,
budget / (inputs + 2))`` (or `GBConfig.hidden_dim` when given) and the hashed pool takes the rest. Every stored
tensor is kept divided by the family option ``lr_multiplier`` (default `LR_MULTIPLIER`) and used multiplied by it,
so that an optimizer like Adam, whose steps do not depend on the gradient's scale, moves the g-nets as far per step
as the model's own learning rate moves a dense weight relative to its size (docs/design.md). Checkpoints of format 4
or lower were written with 10/3 and are read with it (`hf_gb.engine.config`).

The tables are those of ``"mlp"``, so its fused kernels (native, compiled, eager) and the in-place rows route run
them unchanged.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..bank import Tables, pick, randn_parameter, scatter
from ..codes import code_inputs
from ..hashing import bucket_and_sign, seed_key
from ..registry import FamilyOption, register_family
from ..tiling import TileGeometry
from ..validation import positive
from .mlp import MLPBank

if TYPE_CHECKING:
    from ..config import GBConfig

__all__ = ["COORDS_MAX_WIDTH", "LR_MULTIPLIER", "CoordsBank", "coords_sizes"]

# Widest g-net of a tile when the width follows from the budget; the rest of the budget goes to the hashed pool.
COORDS_MAX_WIDTH = 32
# Stored tensors are the g-net's divided by this (and multiplied back when used): see the module docstring. With
# 10, the model's own LR (3e-3 for the MNIST MLP) trains the g-nets as well as the best of a grid (docs/benchmarks.md).
LR_MULTIPLIER = 10.0
# Covered compression when `GBConfig.compression` is None (what the default 128 x 128 "mlp" tiles give).
DEFAULT_COORDS_COMPRESSION = 32.0
# Std of the hashed row features at init (the row bits' pre-activations have unit variance).
ROW_FEATURE_STD = 0.5


def coords_sizes(geometry: TileGeometry, config: GBConfig) -> tuple[int, int]:
    """``(hidden width, hashed pool values)`` of one tile of ``geometry`` under ``config``."""
    ratio = config.compression if config.compression is not None else DEFAULT_COORDS_COMPRESSION
    budget = max(1, math.floor(geometry.numel / ratio) - (0 if config.center else 1))
    per_unit = code_inputs(geometry, config.encoding) + 2  # w_row, w_col, w_ker rows, b1 and w2 of one unit
    width = config.hidden_dim if config.hidden_dim is not None else min(COORDS_MAX_WIDTH, budget // per_unit)
    width = max(1, width)
    return width, max(0, budget - per_unit * width)


@register_family
class CoordsBank(MLPBank):
    """The g-net over the coordinates of ordered positions, with hashed features of the rows (family
    ``"coords"``; see the module docstring).

    Example::

        >>> import torch
        >>> from hf_gb import GBConfig
        >>> from hf_gb.engine.families import CoordsBank
        >>> from hf_gb.engine.tiling import TileGeometry
        >>> geometry = TileGeometry(100, 784, col_axes=(28, 28))
        >>> bank = CoordsBank(geometry, 2, GBConfig(family="coords", compression=100),
        ...                   torch.Generator().manual_seed(0))
        >>> bank().shape, bank.hidden_dim, tuple(bank.row_pool.shape)
        (torch.Size([2, 100, 784]), 32, (2, 176))
    """

    family = "coords"
    options = {"lr_multiplier": FamilyOption(
        LR_MULTIPLIER, "The g-net tensors are stored divided by this and used multiplied by it, so that Adam moves "
        "them this many times further per step than the LR alone would.", positive)}

    def __init__(self, geometry: TileGeometry, n_tiles: int, config: GBConfig, generator: torch.Generator):
        h, pool = coords_sizes(geometry, config)
        super().__init__(geometry, n_tiles, _with_width(config, h), generator)
        # The std `_init_separable` drew the code weights with was 1 / sqrt(all code inputs).
        bk = 0 if self.w_ker is None else (self.w_ker.shape[1] if self.ker_codes is not None else 1)
        self._code_inputs = self.row_codes.shape[1] + self.col_codes.shape[1] + bk
        self.pool = pool
        m = self.multiplier = self.option(config, "lr_multiplier")
        self.row_pool = randn_parameter(generator, n_tiles, max(1, pool), std=ROW_FEATURE_STD) if pool else None
        # Which pool value (and sign) each (row, unit) of each tile reads: as small as the row table, kept.
        positions = torch.arange(n_tiles * geometry.rows * h).view(n_tiles, geometry.rows, h)
        bucket, sign = bucket_and_sign(positions, seed_key(config.seed, 1, *geometry_key(geometry)), max(1, pool),
                                       torch.float32, wide=False)
        self.register_buffer("row_bucket", bucket, persistent=False)
        self.register_buffer("row_sign", sign, persistent=False)
        with torch.no_grad():
            # Each code's pre-activations at unit variance (the "mlp" init gives the row and column codes unit
            # variance together): the units then see the rows and the coordinates equally at the start.
            for weight, width in ((self.w_row, self.row_codes.shape[1]), (self.w_col, self.col_codes.shape[1])):
                weight.mul_(math.sqrt(self._code_inputs) / math.sqrt(max(1, width)))
            if self.w_ker is not None:
                self.w_ker.mul_(math.sqrt(self._code_inputs) / math.sqrt(max(1, self.w_ker.shape[1])))
            for p in self.parameters():
                p.div_(m)

    @classmethod
    def tile_params(cls, geometry: TileGeometry, config: GBConfig) -> float:
        h, pool = coords_sizes(geometry, config)
        return super().tile_params(geometry, _with_width(config, h)) + pool

    def _separable_tables(self, index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        A, B = super()._separable_tables(index)  # of the stored (divided) tensors
        if self.row_pool is not None:
            pool = pick(self.row_pool, index)  # (n, pool)
            A = A + torch.gather(pool, 1, pick(self.row_bucket, index).flatten(1)).view_as(A) * pick(
                self.row_sign, index).to(A.dtype)
        return A * self.multiplier, B * self.multiplier

    def tables(self, index: torch.Tensor | None = None) -> Tables:
        A, B, *rest = super().tables(index)  # w2 (and an uncentred bank's b2) of the stored tensors
        return (A, B, *(t * self.multiplier for t in rest))

    def table_backward(self, index: torch.Tensor | None, table_grads: Tables) -> list[tuple[nn.Parameter,
                                                                                             torch.Tensor]]:
        table_grads = tuple(g * self.multiplier for g in table_grads)  # every table is its stored tensors times m
        dA = table_grads[0]
        pairs = super().table_backward(index, table_grads)
        if self.row_pool is not None:
            signed = (dA * pick(self.row_sign, index).to(dA.dtype)).flatten(1)
            grad = torch.zeros(dA.shape[0], self.row_pool.shape[1], dtype=dA.dtype, device=dA.device)
            grad.scatter_add_(1, pick(self.row_bucket, index).flatten(1), signed)
            pairs.append((self.row_pool, scatter(self.row_pool, index, grad)))
        return pairs

    def _remove_mean_(self, mean: torch.Tensor) -> None:
        super()._remove_mean_(mean / self.multiplier)

    @torch.no_grad()
    def sparse_biases_(self, active: float, generator: torch.Generator) -> None:
        super().sparse_biases_(active, generator)  # biases of the used (multiplied) table: store them divided
        self.b1.div_(self.multiplier)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", hidden_dim={self.hidden_dim}, row_pool={self.pool}"


def geometry_key(geometry: TileGeometry) -> tuple[int, ...]:
    """The ints of a geometry, to seed its hashes."""
    return (geometry.rows, geometry.cols, geometry.kernel, *(geometry.col_axes or ()), *(geometry.kernel_axes or ()))


def _with_width(config: GBConfig, width: int) -> GBConfig:
    import dataclasses

    return config if config.hidden_dim == width else dataclasses.replace(config, hidden_dim=width)
