"""The default g-net family ``"mlp"``: one hidden layer over position codes, one g-net per tile (`MLPBank`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..bank import Tables, pick, randn_parameter, scatter
from ..codes import code_inputs
from ..kernels import backward_from, forward_into, fused_backward, fused_forward, reference_forward
from ..registry import register_family
from ..tiling import TileGeometry, TileRows
from .separable import SeparableBank

if TYPE_CHECKING:
    from ..config import GBConfig

__all__ = ["MLPBank"]


@register_family
class MLPBank(SeparableBank):
    """One hidden layer over position codes, one g-net per tile (family ``"mlp"``).

    Per tile: ``W[i, j, k] = scale * (w2 . relu(row_code(i) @ w_row + col_code(j) @ w_col + w_ker[k] + b1) + b2)``.
    The first layer is split by code part, so the tables ``A = codes_row @ w_row + b1`` (n, rows, h) and
    ``B = codes_col @ w_col (+ w_ker)`` (n, cols * K, h) are all that the fused kernels need. Centred banks have no
    ``b2``: the centring removes any constant.

    Example::

        >>> import torch
        >>> from hf_gb import GBConfig
        >>> from hf_gb.engine.families import MLPBank
        >>> from hf_gb.engine.tiling import TileGeometry
        >>> bank = MLPBank(TileGeometry(8, 16), 3, GBConfig(hidden_dim=4), torch.Generator().manual_seed(0))
        >>> bank().shape
        torch.Size([3, 8, 16])
    """

    family = "mlp"

    def __init__(self, geometry: TileGeometry, n_tiles: int, config: GBConfig, generator: torch.Generator):
        super().__init__(geometry, n_tiles, config, generator)
        h, n = config.width, n_tiles
        self.hidden_dim = h
        self._init_separable(config, h, generator)
        # The output is calibrated to the layer's scale in `calibrate`.
        self.w2 = randn_parameter(generator, n, h, std=1 / math.sqrt(h))
        self.b2 = None if self.center else nn.Parameter(torch.zeros(n))

    @classmethod
    def tile_params(cls, geometry: TileGeometry, config: GBConfig) -> float:
        inputs = code_inputs(geometry, config.encoding)
        return (inputs + 2) * config.width + (0 if config.center else 1)

    def tables(self, index: torch.Tensor | None = None) -> Tables:
        """``(A, B, w2)`` or ``(A, B, w2, b2)`` of tiles ``index``, with the output scale folded into w2 and b2."""
        return self._output_tables(index, pick(self.w2, index) * pick(self.scale, index)[:, None])

    def table_backward(
        self, index: torch.Tensor | None, table_grads: Tables
    ) -> list[tuple[nn.Parameter, torch.Tensor]]:
        # Closed form instead of autograd through `tables`: the same sums, without a graph to build and walk.
        dw2 = table_grads[2] * pick(self.scale, index)[:, None]
        return self._output_backward(index, table_grads, (self.w2, scatter(self.w2, index, dw2)))

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
