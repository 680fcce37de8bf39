"""`GNetBank`: the g-nets of every tile of one geometry, stored as stacked tensors and run as one batched call."""

from __future__ import annotations

import math

import torch
from torch import nn

from .kernels import GNetFunction, center_tiles, center_tiles_, fused_forward, reference_forward
from .tiling import TileGeometry, num_bits, position_codes


class GNetBank(nn.Module):
    """``n_tiles`` one-hidden-layer g-nets over tiles of one `TileGeometry`.

    Per tile: ``W[i, j, k] = scale * (w2 . relu(row_code(i) @ w_row + col_code(j) @ w_col + w_ker[k] + b1) + b2)``.
    The first layer is split by code part, so the tables ``A = codes_row @ w_row + b1`` (n, rows, h) and
    ``B = codes_col @ w_col (+ w_ker)`` (n, cols * K, h) are all that the fused kernels need.

    Example::

        >>> from hf_gb.bank import GNetBank
        >>> from hf_gb.tiling import TileGeometry
        >>> bank = GNetBank(TileGeometry(8, 16), n_tiles=3, hidden_dim=4)
        >>> bank().shape
        torch.Size([3, 8, 16])
    """

    def __init__(
        self,
        geometry: TileGeometry,
        n_tiles: int,
        hidden_dim: int,
        encoding: str = "binary",
        stochastic: bool = False,
        generator: torch.Generator | None = None,
        center: bool = True,
    ):
        super().__init__()
        self.geometry = geometry
        self.center = center  # double-centre each predicted tile (see kernels.center_tiles)
        self.n_tiles = n_tiles
        self.hidden_dim = hidden_dim
        g, h, n = geometry, hidden_dim, n_tiles
        self.register_buffer("row_codes", position_codes(g.rows, encoding), persistent=False)  # (rows, br)
        self.register_buffer("col_codes", position_codes(g.cols, encoding), persistent=False)  # (cols, bc)
        fan_in = max(1, num_bits(g.rows) + num_bits(g.cols) + (1 if g.kernel_bits else 0))

        def randn(*shape, std):
            return nn.Parameter(torch.randn(*shape, generator=generator) * std)

        # Pre-activations of unit variance; the output is calibrated to the layer's scale in `calibrate`.
        self.w_row = randn(n, num_bits(g.rows), h, std=1 / math.sqrt(fan_in))
        self.w_col = randn(n, num_bits(g.cols), h, std=1 / math.sqrt(fan_in))
        self.w_ker = randn(n, g.kernel_bits, h, std=1 / math.sqrt(fan_in)) if g.kernel_bits else None
        self.b1 = randn(n, h, std=0.1)
        self.w2 = randn(n, h, std=1 / math.sqrt(h))
        self.b2 = nn.Parameter(torch.zeros(n), requires_grad=not center)  # centring removes it: frozen then
        self.log_sigma = nn.Parameter(torch.zeros(n)) if stochastic else None
        self.register_buffer("scale", torch.ones(n))  # per-tile output scale, saved with the g-nets

    def num_gnet_params(self) -> int:
        return self.n_tiles * self.geometry.gnet_params(self.hidden_dim)

    def tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A, B, w2, b2)`` for the fused kernels, with the output scale folded into w2 and b2."""
        g, n = self.geometry, self.n_tiles
        A = torch.einsum("rb,nbh->nrh", self.row_codes, self.w_row) + self.b1[:, None, :]  # (n, rows, h)
        B = torch.einsum("cb,nbh->nch", self.col_codes, self.w_col)  # (n, cols, h)
        if self.w_ker is not None:
            B = (B[:, :, None, :] + self.w_ker[:, None, :, :]).reshape(n, g.cols * g.kernel, -1)
        # Contiguous tables: einsum may return a permuted layout, and one layout per shape keeps the compiled
        # kernels to one compilation (their guards include strides).
        # Centring removes any constant, so b2 then takes no part (and gets no gradient, not even rounding noise
        # that Adam would blow up into full-size steps).
        b2 = torch.zeros_like(self.b2) if self.center else self.b2 * self.scale
        return A.contiguous(), B.contiguous(), self.w2 * self.scale[:, None], b2

    def forward(self, compiled: bool = False, reference: bool = False) -> torch.Tensor:
        """Differentiable prediction of all tiles, ``(n_tiles, rows, cols * K)`` (noise-free)."""
        A, B, w2, b2 = self.tables()
        if reference:
            out = reference_forward(A, B, w2, b2)
        else:
            out = GNetFunction.apply(A, B, w2, b2, compiled)
        return center_tiles(out) if self.center else out

    @torch.no_grad()
    def calibrate(self, target_std: torch.Tensor, compiled: bool = False) -> None:
        """Set each tile's output to mean 0 and std ``target_std[t]`` over its positions (DESIGN.md §4)."""
        self.scale.fill_(1.0)
        A, B, w2, b2 = self.tables()
        out = fused_forward(A, B, w2, b2, compiled)
        if self.center:
            center_tiles_(out)
        std, mean = torch.std_mean(out.flatten(1), dim=1, correction=0)
        self.b2.sub_(mean)
        target = target_std.to(self.scale)
        # A tile of one position (or a degenerate g-net) has no spread to match: keep unit gain there.
        self.scale.copy_(torch.where(std > 1e-6, target / std.clamp_min(1e-6), target))
