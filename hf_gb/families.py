"""The g-net families, registered by name for `GBConfig.family` (the interface they implement: `hf_gb.bank`).

``"mlp"`` (the default): one hidden layer over position codes, one g-net per tile (`MLPBank`).

``"deep"``: a second hidden layer after the separable first one (the PNAS g-nets had two hidden layers). Per tile::

    H1[i, j] = relu(row_code(i) @ w_row + col_code(j) @ w_col + w_ker[k] + b1)        (h1 = hidden_dim)
    H2[i, j] = relu(H1[i, j] @ w2 + b2)                                              (h2 = second_hidden_dim)
    W[i, j]  = scale * (H2[i, j] . w3 + b3)

The first layer is separable, so the tables are ``A`` (n, rows, h1), ``B`` (n, cols * K, h1) and the small second
and output layers. The second layer mixes hidden units per position, so it costs ``h1 * h2`` multiply-adds per
weight and cannot be split by rows and columns: `DeepBank` evaluates it in chunks of rows (and tiles) so that at most
`CHUNK_ELEMENTS` hidden values exist at once, and its backward recomputes each chunk under autograd. There is one
implementation (``GBConfig.kernel`` does not change it), so eager and compiled settings give the same values.

``"shared"``: the one hidden layer of ``"mlp"``, but one g-net for the whole bank (every tile of one geometry, e.g.
all attention projections of a transformer). Per tile ``t`` only the first-layer bias ``b1[t]`` (a learned tile
embedding of h values) and an output gain are its own::

    W_t[i, j, k] = scale_t * (gain_t * w2 . relu(row_code(i) @ w_row + col_code(j) @ w_col + w_ker[k] + b1[t]) + b2_t)

A bank stores ``(bits + 1) * h`` shared values and ``h + 1`` per tile, so at equal storage ``h`` can be far
larger than one g-net per tile allows. The tables are those of ``"mlp"`` with the shared weights expanded to every
tile, so the same fused kernels evaluate them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from .bank import GNetBank, Tables, _pick, _randn, _scatter, register_family
from .kernels import backward_from, forward_into, fused_backward, fused_forward, reference_forward
from .tiling import TileGeometry, TileRows, code_inputs

if TYPE_CHECKING:
    from .config import GBConfig

__all__ = ["CHUNK_ELEMENTS", "DeepBank", "MLPBank", "SharedBank"]

CHUNK_ELEMENTS = 1 << 21  # hidden values (both layers) alive at once in a chunk: 8 MB in fp32


@register_family
class MLPBank(GNetBank):
    """One hidden layer over position codes, one g-net per tile (family ``"mlp"``).

    Per tile: ``W[i, j, k] = scale * (w2 . relu(row_code(i) @ w_row + col_code(j) @ w_col + w_ker[k] + b1) + b2)``.
    The first layer is split by code part, so the tables ``A = codes_row @ w_row + b1`` (n, rows, h) and
    ``B = codes_col @ w_col (+ w_ker)`` (n, cols * K, h) are all that the fused kernels need. Centred banks have no
    ``b2``: the centring removes any constant.

    Example::

        >>> import torch
        >>> from hf_gb import GBConfig
        >>> from hf_gb.bank import MLPBank
        >>> from hf_gb.tiling import TileGeometry
        >>> bank = MLPBank(TileGeometry(8, 16), 3, GBConfig(hidden_dim=4), torch.Generator().manual_seed(0))
        >>> bank().shape
        torch.Size([3, 8, 16])
    """

    family = "mlp"

    def __init__(self, geometry: TileGeometry, n_tiles: int, config: GBConfig, generator: torch.Generator):
        super().__init__(geometry, n_tiles, config, generator)
        h, n = config.hidden_dim, n_tiles
        self.hidden_dim = h
        self._init_separable(config, h, generator)
        # The output is calibrated to the layer's scale in `calibrate`.
        self.w2 = _randn(generator, n, h, std=1 / math.sqrt(h))
        self.b2 = None if self.center else nn.Parameter(torch.zeros(n))

    @classmethod
    def tile_params(cls, geometry: TileGeometry, config: GBConfig) -> float:
        inputs = code_inputs(geometry, config.encoding)
        return (inputs + 2) * config.hidden_dim + (0 if config.center else 1)

    def tables(self, index: torch.Tensor | None = None) -> Tables:
        """``(A, B, w2)`` or ``(A, B, w2, b2)`` of tiles ``index``, with the output scale folded into w2 and b2."""
        scale = _pick(self.scale, index)
        tables = (*self._separable_tables(index), _pick(self.w2, index) * scale[:, None])
        return tables if self.b2 is None else (*tables, _pick(self.b2, index) * scale)

    def table_backward(
        self, index: torch.Tensor | None, table_grads: Tables
    ) -> list[tuple[nn.Parameter, torch.Tensor]]:
        # Closed form instead of autograd through `tables`: the same sums, without a graph to build and walk.
        dA, dB, dw2 = table_grads[:3]
        scale = _pick(self.scale, index)
        pairs = [*self._separable_backward(index, dA, dB), (self.w2, _scatter(self.w2, index, dw2 * scale[:, None]))]
        if self.b2 is not None:
            pairs.append((self.b2, _scatter(self.b2, index, table_grads[3] * scale)))
        return pairs

    def evaluate(self, tables: Tables) -> torch.Tensor:
        A, B, w2 = tables[:3]
        b2 = tables[3] if len(tables) > 3 else None
        return fused_forward(A, B, w2, b2, compiled=self.kernel_path())

    def evaluate_centered(self, tables: Tables) -> torch.Tensor:
        A, B, w2 = tables[:3]  # centred banks have no b2
        return fused_forward(A, B, w2, compiled=self.kernel_path(), center=True)

    def writes_rows(self) -> bool:
        return self.kernel_path() == "native"

    def evaluate_into(self, tables: Tables, rows: TileRows) -> None:
        A, B, w2 = tables[:3]
        forward_into(A, B, w2, rows, center=self.center, b2=tables[3] if len(tables) > 3 else None)

    def evaluate_backward_from(self, tables: Tables, rows: TileRows) -> Tables:
        dA, dB, dw2, db2 = backward_from(*tables[:3], rows, center=self.center)
        return (dA, dB, dw2) if len(tables) == 3 else (dA, dB, dw2, db2)

    def evaluate_backward(self, tables: Tables, grad: torch.Tensor) -> Tables:
        A, B, w2 = tables[:3]
        dA, dB, dw2, db2 = fused_backward(A, B, w2, grad, compiled=self.kernel_path(), bias=len(tables) > 3)
        return (dA, dB, dw2) if len(tables) == 3 else (dA, dB, dw2, db2)

    def reference(self, tables: Tables) -> torch.Tensor:
        A, B, w2 = tables[:3]
        return reference_forward(A, B, w2, tables[3] if len(tables) > 3 else None)

    def _remove_mean_(self, mean: torch.Tensor) -> None:
        if self.b2 is not None:
            self.b2.sub_(mean)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints of format 1 stored a frozen, always-zero b2 for centred banks; centring removes it anyway.
        if self.b2 is None:
            state_dict.pop(prefix + "b2", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


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
class DeepBank(GNetBank):
    """Two hidden layers per tile, the first separable over position codes (family ``"deep"``).

    Example::

        >>> import torch
        >>> from hf_gb import GBConfig
        >>> from hf_gb.families import DeepBank
        >>> from hf_gb.tiling import TileGeometry
        >>> config = GBConfig(family="deep", hidden_dim=8, second_hidden_dim=4)
        >>> bank = DeepBank(TileGeometry(8, 16), 3, config, torch.Generator().manual_seed(0))
        >>> bank().shape
        torch.Size([3, 8, 16])
    """

    family = "deep"

    def __init__(self, geometry: TileGeometry, n_tiles: int, config: GBConfig, generator: torch.Generator):
        super().__init__(geometry, n_tiles, config, generator)
        h1, h2, n = config.hidden_dim, config.second_hidden_dim, n_tiles
        self.hidden_dim, self.second_hidden_dim = h1, h2
        # Unit-variance first pre-activations (as "mlp"), He-scaled second layer; `calibrate` sets the output scale.
        self._init_separable(config, h1, generator)

        def randn(*shape, std):
            return nn.Parameter(torch.randn(*shape, generator=generator) * std)

        self.w2 = randn(n, h1, h2, std=math.sqrt(2 / h1))
        self.b2 = randn(n, h2, std=0.1)
        self.w3 = randn(n, h2, std=1 / math.sqrt(h2))
        self.b3 = None if self.center else nn.Parameter(torch.zeros(n))  # centring removes any constant

    @classmethod
    def tile_params(cls, geometry: TileGeometry, config: GBConfig) -> float:
        h1, h2 = config.hidden_dim, config.second_hidden_dim
        inputs = code_inputs(geometry, config.encoding)
        return (inputs + 1) * h1 + (h1 + 2) * h2 + (0 if config.center else 1)

    def tables(self, index: torch.Tensor | None = None) -> Tables:
        """``(A, B, w2, b2, w3)`` (and ``b3`` when uncentred) of tiles ``index``, the scale folded into w3, b3."""

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t if index is None else t[index]

        scale = pick(self.scale)
        tables = (*self._separable_tables(index), pick(self.w2), pick(self.b2), pick(self.w3) * scale[:, None])
        return tables if self.b3 is None else (*tables, pick(self.b3) * scale)

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


@register_family
class SharedBank(MLPBank):
    """One hidden layer over position codes, one g-net shared by every tile of the bank (family ``"shared"``).

    The code weights ``w_row`` (1, br, h), ``w_col`` (1, bc, h), ``w_ker`` (1, K, h) and the output weights ``w2``
    (1, h) are one set per bank; each tile keeps its first-layer bias ``b1[t]`` (h values: a learned tile
    embedding that moves the tile to its own region of the shared function), a learned output gain ``gain[t]``
    (``GBConfig.tile_gain``) and, uncentred, an output bias ``b2[t]``. `tables` expands the shared weights to
    per-tile tables, so the fused kernels of ``"mlp"`` run unchanged and the autograd of the expansion sums every
    tile's gradient into the shared weights. The tile embeddings start at unit std (``"mlp"``: 0.1), so that tiles
    differ from the first step instead of starting as copies of one matrix.

    Example::

        >>> import torch
        >>> from hf_gb import GBConfig
        >>> from hf_gb.families import SharedBank
        >>> from hf_gb.tiling import TileGeometry
        >>> bank = SharedBank(TileGeometry(8, 16), 3, GBConfig(family="shared", hidden_dim=4),
        ...                   torch.Generator().manual_seed(0))
        >>> bank().shape, tuple(bank.w_row.shape), tuple(bank.b1.shape)
        (torch.Size([3, 8, 16]), (1, 3, 4), (3, 4))
    """

    family = "shared"

    def __init__(self, geometry: TileGeometry, n_tiles: int, config: GBConfig, generator: torch.Generator):
        GNetBank.__init__(self, geometry, n_tiles, config, generator)
        h = config.hidden_dim
        self.hidden_dim = h
        self._init_separable(config, h, generator, shared=True, b1_std=1.0)
        self.w2 = _randn(generator, 1, h, std=1 / math.sqrt(h))  # `calibrate` sets each tile's output scale
        self.b2 = None if self.center else nn.Parameter(torch.zeros(n_tiles))
        self.gain = nn.Parameter(torch.ones(n_tiles)) if config.tile_gain else None

    @classmethod
    def tile_params(cls, geometry: TileGeometry, config: GBConfig) -> float:
        return config.hidden_dim + (1 if config.tile_gain else 0) + (0 if config.center else 1)

    @classmethod
    def bank_params(cls, geometry: TileGeometry, config: GBConfig) -> float:
        inputs = code_inputs(geometry, config.encoding)
        return (inputs + 1) * config.hidden_dim

    def tables(self, index: torch.Tensor | None = None) -> Tables:
        """``(A, B, w2)`` or ``(A, B, w2, b2)`` of tiles ``index``: per-tile tables (n_sel, ...), the shared
        ``w2`` times each tile's scale and gain."""
        scale = _pick(self.scale, index)
        gain = scale if self.gain is None else scale * _pick(self.gain, index)
        tables = (*self._separable_tables(index), self.w2 * gain[:, None])  # w2: (1, h) -> (n_sel, h)
        return tables if self.b2 is None else (*tables, _pick(self.b2, index) * scale)

    def table_backward(
        self, index: torch.Tensor | None, table_grads: Tables
    ) -> list[tuple[nn.Parameter, torch.Tensor]]:
        # Closed form, as "mlp": shared weights sum over the tiles, per-tile ones land in rows `index`.
        dA, dB, dw2 = table_grads[:3]
        scale = _pick(self.scale, index)
        gain = scale if self.gain is None else scale * _pick(self.gain, index)
        pairs = [*self._separable_backward(index, dA, dB), (self.w2, (dw2 * gain[:, None]).sum(0, keepdim=True))]
        if self.gain is not None:
            pairs.append((self.gain, _scatter(self.gain, index, (dw2 * self.w2).sum(1) * scale)))
        if self.b2 is not None:
            pairs.append((self.b2, _scatter(self.b2, index, table_grads[3] * scale)))
        return pairs
