"""The g-net family ``"shared"``: the one hidden layer of ``"mlp"``, but one g-net for the whole bank (every tile
of one geometry, e.g. all attention projections of a transformer). Per tile ``t`` only the first-layer bias
``b1[t]`` (a learned tile embedding of h values) and an output gain are its own::

    W_t[i, j, k] = scale_t * (gain_t * w2 . relu(row_code(i) @ w_row + col_code(j) @ w_col + w_ker[k] + b1[t]) + b2_t)

A bank stores ``(bits + 1) * h`` shared values and ``h + 1`` per tile, so at equal storage ``h`` can be far
larger than one g-net per tile allows. The tables are those of ``"mlp"`` with the shared weights expanded to every
tile, so the same fused kernels evaluate them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..bank import GNetBank, Tables, pick, randn_parameter, scatter
from ..codes import code_inputs
from ..registry import FamilyOption, register_family
from ..tiling import TileGeometry
from ..validation import check_bool
from .mlp import MLPBank

if TYPE_CHECKING:
    from ..config import GBConfig

__all__ = ["SharedBank"]


@register_family
class SharedBank(MLPBank):
    """One hidden layer over position codes, one g-net shared by every tile of the bank (family ``"shared"``).

    The code weights ``w_row`` (1, br, h), ``w_col`` (1, bc, h), ``w_ker`` (1, K, h) and the output weights ``w2``
    (1, h) are one set per bank; each tile keeps its first-layer bias ``b1[t]`` (h values: a learned tile
    embedding that moves the tile to its own region of the shared function), a learned output gain ``gain[t]``
    (``family_options['tile_gain']``) and, uncentred, an output bias ``b2[t]``. `tables` expands the shared weights to
    per-tile tables, so the fused kernels of ``"mlp"`` run unchanged and the autograd of the expansion sums every
    tile's gradient into the shared weights. The tile embeddings start at unit std (``"mlp"``: 0.1), so that tiles
    differ from the first step instead of starting as copies of one matrix.

    Example::

        >>> import torch
        >>> from hf_gb import GBConfig
        >>> from hf_gb.engine.families import SharedBank
        >>> from hf_gb.engine.tiling import TileGeometry
        >>> bank = SharedBank(TileGeometry(8, 16), 3, GBConfig(family="shared", hidden_dim=4),
        ...                   torch.Generator().manual_seed(0))
        >>> bank().shape, tuple(bank.w_row.shape), tuple(bank.b1.shape)
        (torch.Size([3, 8, 16]), (1, 3, 4), (3, 4))
    """

    family = "shared"
    options = {"tile_gain": FamilyOption(True, "A learned output gain per tile.", check_bool)}

    def __init__(self, geometry: TileGeometry, n_tiles: int, config: GBConfig, generator: torch.Generator):
        GNetBank.__init__(self, geometry, n_tiles, config, generator)
        h = config.width
        self.hidden_dim = h
        self._init_separable(config, h, generator, shared=True, b1_std=1.0)
        self.w2 = randn_parameter(generator, 1, h, std=1 / math.sqrt(h))  # `calibrate` sets each tile's output scale
        self.b2 = None if self.center else nn.Parameter(torch.zeros(n_tiles))
        self.gain = nn.Parameter(torch.ones(n_tiles)) if self.option(config, "tile_gain") else None

    @classmethod
    def tile_params(cls, geometry: TileGeometry, config: GBConfig) -> float:
        return config.width + (1 if cls.option(config, "tile_gain") else 0) + (0 if config.center else 1)

    @classmethod
    def bank_params(cls, geometry: TileGeometry, config: GBConfig) -> float:
        inputs = code_inputs(geometry, config.encoding)
        return (inputs + 1) * config.width

    def tables(self, index: torch.Tensor | None = None) -> Tables:
        """``(A, B, w2)`` or ``(A, B, w2, b2)`` of tiles ``index``: per-tile tables (n_sel, ...), the shared
        ``w2`` times each tile's scale and gain."""
        scale = pick(self.scale, index)
        gain = scale if self.gain is None else scale * pick(self.gain, index)
        return self._output_tables(index, self.w2 * gain[:, None])  # w2: (1, h) -> (n_sel, h)

    def table_backward(
        self, index: torch.Tensor | None, table_grads: Tables
    ) -> list[tuple[nn.Parameter, torch.Tensor]]:
        # Closed form, as "mlp": shared weights sum over the tiles, per-tile ones land in rows `index`.
        dw2 = table_grads[2]
        scale = pick(self.scale, index)
        gain = scale if self.gain is None else scale * pick(self.gain, index)
        own = [(self.w2, (dw2 * gain[:, None]).sum(0, keepdim=True))]
        if self.gain is not None:
            own.append((self.gain, scatter(self.gain, index, (dw2 * self.w2).sum(1) * scale)))
        return self._output_backward(index, table_grads, *own)
