"""The separable first layer that the "mlp", "deep" and "shared" families share.

The pre-activation of hidden unit ``h`` at position ``(i, j, k)`` of a tile is ``A[i, h] + B[j * K + k, h]`` with
``A = row_codes @ w_row + b1`` (rows, h) and ``B = col_codes @ w_col (+ w_ker[k])`` (cols * K, h), so the code
matrix of a tile never exists. `SeparableBank` builds these parameters, the tables ``A`` and ``B``, their
closed-form gradients, and the sparse bias init of `GBConfig.init_active`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..bank import GNetBank, Tables, pick, randn_parameter, scatter
from ..codes import axes_width, axis_codes, code_width, column_codes, position_codes

if TYPE_CHECKING:
    from ..config import GBConfig

__all__ = ["SPARSE_SAMPLE", "SeparableBank"]

# Positions per tile sampled to set the biases of GBConfig.init_active (all of them in smaller tiles).
SPARSE_SAMPLE = 1024


class SeparableBank(GNetBank):
    """A `GNetBank` whose first layer is separable over the row, column and kernel codes (see the module docstring).

    Not a family itself: the families call `_init_separable` in their constructor and build their tables on
    `_separable_tables` (and, in closed form, their gradients on `_separable_backward`); those with one hidden layer
    ("mlp", "shared") build them with `_output_tables` and `_output_backward`.
    """

    def _init_separable(
        self, config: GBConfig, hidden: int, generator: torch.Generator, shared: bool = False, b1_std: float = 0.1
    ) -> None:
        """Position codes and the first layer ``w_row``, ``w_col``, ``w_ker``, ``b1`` of ``hidden`` units per tile,
        drawn in that order from ``generator``, with code pre-activations of unit variance. ``shared``: one set of
        code weights ``(1, bits, hidden)`` for the whole bank, and only ``b1`` per tile."""
        g, n = self.geometry, self.n_tiles
        m = 1 if shared else n
        self._shared_codes = shared
        self.register_buffer("row_codes", position_codes(g.rows, config.encoding), persistent=False)  # (rows, br)
        self.register_buffer("col_codes", column_codes(g, config.encoding), persistent=False)  # (cols, bc)
        # Kernel positions: one-hot (w_ker[k] is their row of the first layer), or the bits of each kernel axis
        # (ker_codes (K, bk), and w_ker (bk, h) is the first layer of those bits).
        ker_codes = axis_codes(g.kernel_axes, config.encoding) if g.kernel_axes else None
        self.register_buffer("ker_codes", ker_codes, persistent=False)
        br, bc = code_width(g.rows, config.encoding), self.col_codes.shape[1]
        bk = axes_width(g.kernel_axes, config.encoding) if g.kernel_axes else g.kernel_bits
        # Unit-variance pre-activations: every ±1 code bit (and the one active one-hot input) adds std².
        std = 1 / math.sqrt(max(1, br + bc + (bk if g.kernel_axes else min(1, bk))))
        self.w_row = randn_parameter(generator, m, br, hidden, std=std)
        self.w_col = randn_parameter(generator, m, bc, hidden, std=std)
        self.w_ker = randn_parameter(generator, m, bk, hidden, std=std) if bk else None
        self.b1 = randn_parameter(generator, n, hidden, std=b1_std)

    @torch.no_grad()
    def sparse_biases_(self, active: float, generator: torch.Generator) -> None:
        """Set each tile's first-layer biases so that every hidden unit is active (pre-activation > 0) on the
        fraction ``active`` of the tile's positions: minus the ``1 - active`` quantile of its pre-activations over
        every position or, in larger tiles, `SPARSE_SAMPLE` random ones. No unit starts dead or everywhere linear."""
        g = self.geometry
        if g.rows * g.cols * g.kernel < 2:  # one position: nothing to be sparse over
            return
        self.b1.zero_()
        A, B = self._separable_tables(None)  # (n, rows, h), (n, cols * K, h) without the biases
        n, rows, h = A.shape
        cols = B.shape[1]
        exact = rows * cols <= SPARSE_SAMPLE
        samples = rows * cols if exact else SPARSE_SAMPLE
        # k samples stay below 0 and at least one above; the bias sits halfway between the k-th and the next.
        k = min(samples - 1, max(1, round((1 - active) * samples)))
        step = max(1, (1 << 22) // (samples * h))  # tiles per chunk: at most 4M pre-activations at once
        for t0 in range(0, n, step):
            a, b = A[t0 : t0 + step], B[t0 : t0 + step]
            if exact:
                pre = (a[:, :, None, :] + b[:, None, :, :]).reshape(a.shape[0], samples, h)
            else:
                i = torch.randint(rows, (a.shape[0], samples, 1), generator=generator).expand(-1, -1, h)
                j = torch.randint(cols, (a.shape[0], samples, 1), generator=generator).expand(-1, -1, h)
                pre = a.gather(1, i) + b.gather(1, j)
            self.b1[t0 : t0 + step] = -(pre.kthvalue(k, dim=1).values + pre.kthvalue(k + 1, dim=1).values) / 2

    def _separable_tables(self, index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``A = codes_row @ w_row + b1`` (n, rows, h) and ``B = codes_col @ w_col (+ w_ker)`` (n, cols * K, h).

        Shared code weights give one ``B`` for every tile, expanded (and copied: the kernels take one table per
        tile); the autograd of the expansion sums the tiles' gradients into the shared weights."""
        g = self.geometry

        def codes_of(t: torch.Tensor) -> torch.Tensor:
            return t if self._shared_codes else pick(t, index)

        A = torch.einsum("rb,nbh->nrh", self.row_codes, codes_of(self.w_row)) + pick(self.b1, index)[:, None, :]
        B = torch.einsum("cb,nbh->nch", self.col_codes, codes_of(self.w_col))  # (n or 1, cols, h)
        if self.w_ker is not None:
            ker = codes_of(self.w_ker)  # (n or 1, K, h): one row per kernel position
            if self.ker_codes is not None:
                ker = torch.einsum("kb,nbh->nkh", self.ker_codes, ker)
            B = (B[:, :, None, :] + ker[:, None, :, :]).reshape(B.shape[0], g.cols * g.kernel, -1)
        B = B.expand(A.shape[0], -1, -1)  # a no-op for per-tile weights
        # Contiguous tables: einsum may return a permuted layout, and one layout per shape keeps the compiled
        # kernels to one compilation (their guards include strides).
        return A.contiguous(), B.contiguous()

    def _separable_backward(
        self, index: torch.Tensor | None, dA: torch.Tensor, dB: torch.Tensor
    ) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """Closed-form gradients of `_separable_tables`' parameters from ``dA`` (n, rows, h), ``dB`` (n, cols*K, h).

        Shared code weights get the sum over the tiles (the backward of their expansion to every tile)."""
        g = self.geometry
        b1 = (self.b1, scatter(self.b1, index, dA.sum(1)))
        if self._shared_codes:  # sum the tiles first: the einsums then run once, not once per tile
            dA, dB = dA.sum(0, keepdim=True), dB.sum(0, keepdim=True)
        pairs = [(self.w_row, torch.einsum("rb,nrh->nbh", self.row_codes, dA))]
        if self.w_ker is not None:
            dB = dB.reshape(dB.shape[0], g.cols, g.kernel, dB.shape[2])
            dker = dB.sum(1)  # (n, K, h)
            if self.ker_codes is not None:
                dker = torch.einsum("kb,nkh->nbh", self.ker_codes, dker)
            pairs.append((self.w_ker, dker))
            dB = dB.sum(2)
        pairs.append((self.w_col, torch.einsum("cb,nch->nbh", self.col_codes, dB)))
        if not self._shared_codes:
            pairs = [(p, scatter(p, index, grad)) for p, grad in pairs]
        return [pairs[0], b1, *pairs[1:]]

    def _output_tables(self, index: torch.Tensor | None, w2: torch.Tensor) -> Tables:
        """``(A, B, w2)`` or, uncentred, ``(A, B, w2, b2)`` of tiles ``index``, for a family with one hidden
        layer: ``w2`` (n_sel, h) holds the family's output weights with the tiles' scale folded in, and the output
        bias ``b2`` (None when centred) is scaled here."""
        tables = (*self._separable_tables(index), w2)
        return tables if self.b2 is None else (*tables, pick(self.b2, index) * pick(self.scale, index))

    def _output_backward(
        self, index: torch.Tensor | None, table_grads: Tables, *output_pairs: tuple[nn.Parameter, torch.Tensor]
    ) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """The closed-form gradients of `_output_tables`: the first layer's, the family's own ``output_pairs``
        (from ``table_grads[2]``), and the output bias's."""
        pairs = [*self._separable_backward(index, *table_grads[:2]), *output_pairs]
        if self.b2 is not None:
            pairs.append((self.b2, scatter(self.b2, index, table_grads[3] * pick(self.scale, index))))
        return pairs
