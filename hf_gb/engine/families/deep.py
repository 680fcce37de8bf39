"""The g-net family ``"deep"``: a second hidden layer after the separable first one (the PNAS g-nets had two
hidden layers). Per tile::

    H1[i, j] = relu(row_code(i) @ w_row + col_code(j) @ w_col + w_ker[k] + b1)        (h1 = hidden_dim)
    H2[i, j] = relu(H1[i, j] @ w2 + b2)                          (h2 = family_options['second_hidden_dim'], 8)
    W[i, j]  = scale * (H2[i, j] . w3 + b3)

The first layer is separable, so the tables are ``A`` (n, rows, h1), ``B`` (n, cols * K, h1) and the small second
and output layers. The second layer mixes hidden units per position, so it costs ``h1 * h2`` multiply-adds per
weight and cannot be split by rows and columns: `DeepBank` evaluates it in chunks of rows (and tiles) so that at most
`CHUNK_ELEMENTS` hidden values exist at once, and its backward recomputes each chunk under autograd. There is one
implementation (``GBConfig.kernel`` does not change it), so eager and compiled settings give the same values.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..bank import Tables, pick, randn_parameter
from ..codes import code_inputs
from ..registry import FamilyOption, register_family
from ..tiling import TileGeometry
from ..validation import MAX_HIDDEN_DIM, int_in
from .separable import SeparableBank

if TYPE_CHECKING:
    from ..config import GBConfig

__all__ = ["CHUNK_ELEMENTS", "DeepBank"]

CHUNK_ELEMENTS = 1 << 21  # hidden values (both layers) alive at once in a chunk: 8 MB in fp32


def _chunks(n: int, rows: int, per_row: int, budget: int) -> Iterator[tuple[slice, slice]]:
    """(tile slice, row slice) pairs covering (n, rows) so that each holds at most ``budget // per_row`` rows."""
    rows_per_chunk = max(1, budget // max(1, per_row))
    if rows_per_chunk >= rows:  # whole tiles per chunk
        tiles = max(1, rows_per_chunk // rows)
        for t0 in range(0, n, tiles):
            yield slice(t0, min(n, t0 + tiles)), slice(0, rows)
    else:
        for t0 in range(n):
            for r0 in range(0, rows, rows_per_chunk):
                yield slice(t0, t0 + 1), slice(r0, min(rows, r0 + rows_per_chunk))


def _deep_tiles(A, B, w2, b2, w3, b3=None) -> torch.Tensor:
    """Tiles (n, r, c) of row table A (n, r, h1), column table B (n, c, h1), w2 (n, h1, h2), b2 (n, h2), w3 (n, h2)."""
    n, r, h1 = A.shape
    c = B.shape[1]
    H1 = torch.relu(A[:, :, None, :] + B[:, None, :, :]).reshape(n, r * c, h1)  # (n, r*c, h1)
    H2 = torch.relu(torch.baddbmm(b2[:, None, :], H1, w2))  # (n, r*c, h2)
    out = torch.bmm(H2, w3[:, :, None]).reshape(n, r, c)
    return out if b3 is None else out + b3[:, None, None]


@register_family
class DeepBank(SeparableBank):
    """Two hidden layers per tile, the first separable over position codes (family ``"deep"``).

    Example::

        >>> import torch
        >>> from hf_gb import GBConfig
        >>> from hf_gb.engine.families import DeepBank
        >>> from hf_gb.engine.tiling import TileGeometry
        >>> config = GBConfig(family="deep", hidden_dim=8, family_options={"second_hidden_dim": 4})
        >>> bank = DeepBank(TileGeometry(8, 16), 3, config, torch.Generator().manual_seed(0))
        >>> bank().shape
        torch.Size([3, 8, 16])
    """

    family = "deep"
    options = {"second_hidden_dim": FamilyOption(8, "Width of the second hidden layer.",
                                                 lambda name, value: int_in(name, value, 1, MAX_HIDDEN_DIM))}

    def __init__(self, geometry: TileGeometry, n_tiles: int, config: GBConfig, generator: torch.Generator):
        super().__init__(geometry, n_tiles, config, generator)
        h1, h2, n = config.width, self.option(config, "second_hidden_dim"), n_tiles
        self.hidden_dim, self.second_hidden_dim = h1, h2
        # Unit-variance first pre-activations (as "mlp"), He-scaled second layer; `calibrate` sets the output scale.
        self._init_separable(config, h1, generator)
        self.w2 = randn_parameter(generator, n, h1, h2, std=math.sqrt(2 / h1))
        self.b2 = randn_parameter(generator, n, h2, std=0.1)
        self.w3 = randn_parameter(generator, n, h2, std=1 / math.sqrt(h2))
        self.b3 = None if self.center else nn.Parameter(torch.zeros(n))  # centring removes any constant

    @classmethod
    def tile_params(cls, geometry: TileGeometry, config: GBConfig) -> float:
        h1, h2 = config.width, cls.option(config, "second_hidden_dim")
        inputs = code_inputs(geometry, config.encoding)
        return (inputs + 1) * h1 + (h1 + 2) * h2 + (0 if config.center else 1)

    def tables(self, index: torch.Tensor | None = None) -> Tables:
        """``(A, B, w2, b2, w3)`` (and ``b3`` when uncentred) of tiles ``index``, the scale folded into w3, b3."""
        scale = pick(self.scale, index)
        tables = (*self._separable_tables(index), pick(self.w2, index), pick(self.b2, index),
                  pick(self.w3, index) * scale[:, None])
        return tables if self.b3 is None else (*tables, pick(self.b3, index) * scale)

    def _chunks(self, tables: Tables) -> Iterator[tuple[slice, slice]]:
        A, B = tables[0], tables[1]
        per_row = B.shape[1] * (self.hidden_dim + self.second_hidden_dim)
        return _chunks(A.shape[0], A.shape[1], per_row, CHUNK_ELEMENTS)

    @staticmethod
    def _select(tables: Tables, ts: slice, rs: slice) -> Tables:
        A, B, *rest = tables
        return (A[ts, rs], B[ts], *(t[ts] for t in rest))

    def evaluate(self, tables: Tables) -> torch.Tensor:
        A, B = tables[0], tables[1]
        out = A.new_empty(A.shape[0], A.shape[1], B.shape[1])
        for ts, rs in self._chunks(tables):
            out[ts, rs] = _deep_tiles(*self._select(tables, ts, rs))
        return out

    def evaluate_backward(self, tables: Tables, grad: torch.Tensor) -> Tables:
        grads = [torch.zeros_like(t) for t in tables]
        with torch.enable_grad():
            for ts, rs in self._chunks(tables):
                leaves = [t.detach().requires_grad_() for t in self._select(tables, ts, rs)]
                chunk_grads = torch.autograd.grad(_deep_tiles(*leaves), leaves, grad[ts, rs])
                grads[0][ts, rs] = chunk_grads[0]
                for total, g in zip(grads[1:], chunk_grads[1:]):
                    total[ts] += g
        return tuple(grads)

    def reference(self, tables: Tables) -> torch.Tensor:
        return _deep_tiles(*tables)

    def _remove_mean_(self, mean: torch.Tensor) -> None:
        if self.b3 is not None:
            self.b3.sub_(mean)
