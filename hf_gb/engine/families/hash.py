"""Family ``"hash"``: random weight sharing (HashedNets, Chen et al., ICML 2015) as a g-net family.

Every tile ``t`` of a bank keeps ``buckets`` learned values ``v[t]``; the weight at position ``p`` of the tile is::

    W[t, p] = s(t, p) * v[t, h(t, p)]

with ``h`` a seeded hash into ``[0, buckets)`` and ``s`` a seeded random sign (`hf_gb.engine.hashing`). Only ``v`` is
stored: the hash is regenerated from ``GBConfig.seed`` and the bank's tile shape, in chunks, so nothing of the
weights' size is kept. ``buckets`` follows from the compression target: ``ceil(tile weights / compression)``; the
tile choice then prefers whole tensors (one tile per tensor: the layer-wide sharing of the paper).

The values start at unit variance and `calibrate` folds the layer's initial std into them (the output scale stays
1), so an optimizer moves each weight by about its learning rate, as it moves a dense weight: one learning rate
serves the hashed and the dense tensors. With ``GBConfig.center`` (the default) each tile is double-centred as in
every family; ``center=False`` is the paper's function exactly.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from .. import native
from ..bank import GNetBank, Tables, pick, scatter
from ..hashing import bucket_and_sign, seed_key
from ..registry import register_family
from ..tiling import TileGeometry

if TYPE_CHECKING:
    from ..config import GBConfig

__all__ = ["HashBank", "hash_buckets"]

# Positions hashed at once: bounds the int64 temporaries of one chunk (about 8 bytes x 4 per position).
HASH_CHUNK = 1 << 20
# Covered compression of a hash bank when `GBConfig.compression` is None (what the default 128 x 128 tiles of the
# "mlp" family give at hidden_dim=32).
DEFAULT_HASH_COMPRESSION = 32.0


def hash_buckets(geometry: TileGeometry, config: GBConfig) -> int:
    """Learned values per tile: the tile's weights over the compression target, at least 1."""
    ratio = config.compression if config.compression is not None else DEFAULT_HASH_COMPRESSION
    return max(1, math.ceil(geometry.numel / ratio))


@register_family
class HashBank(GNetBank):
    """Random weight sharing over the tiles of one geometry (family ``"hash"``).

    Example: both Linears of a small MLP shared at 16x, each 32 x 64 (or 10 x 32) weights read from 128 (or 20)
    learned values::

        >>> import torch
        >>> from hf_gb import GBConfig, GenomicBottleneck
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
        >>> gb = GenomicBottleneck(mlp, GBConfig(family="hash", compression=16))
        >>> [tuple(bank.values.shape) for bank in gb.banks.values()], gb.stats()["covered_compression"]
        ([(1, 128), (1, 20)], 16.0)
    """

    family = "hash"
    removes_mean = False  # no output bias: the random signs keep the mean near 0, as in the paper

    def __init__(self, geometry: TileGeometry, n_tiles: int, config: GBConfig, generator: torch.Generator):
        super().__init__(geometry, n_tiles, config, generator)
        self.buckets = hash_buckets(geometry, config)
        self.key = seed_key(config.seed, geometry.rows, geometry.cols, geometry.kernel)
        self.values = nn.Parameter(torch.randn(n_tiles, self.buckets, generator=generator))

    @classmethod
    def tile_params(cls, geometry: TileGeometry, config: GBConfig) -> float:
        return hash_buckets(geometry, config)

    def tables(self, index: torch.Tensor | None = None) -> Tables:
        """``(values, tiles)``: the selected tiles' values times their scale, and their indices in the bank."""
        tiles = torch.arange(self.n_tiles, device=self.values.device) if index is None else index
        return pick(self.values, index) * pick(self.scale, index)[:, None], tiles

    def table_backward(self, index: torch.Tensor | None, table_grads: Tables) -> list[tuple[nn.Parameter,
                                                                                             torch.Tensor]]:
        scale = pick(self.scale, index)
        return [(self.values, scatter(self.values, index, table_grads[0] * scale[:, None]))]

    def _chunks(self, tiles: torch.Tensor):
        """(slice of the selection, positions (t, numel) int64) in chunks of about `HASH_CHUNK` positions."""
        numel = self.geometry.numel
        per = max(1, HASH_CHUNK // numel)
        wide = self.n_tiles * numel >= 1 << 31
        local = torch.arange(numel, device=tiles.device)
        for t0 in range(0, len(tiles), per):
            part = slice(t0, min(len(tiles), t0 + per))
            yield part, tiles[part, None] * numel + local, wide

    def evaluate(self, tables: Tables) -> torch.Tensor:
        values, tiles = tables
        g = self.geometry
        if self.kernel_path() == "native":
            out = native.get().hash_forward(values.contiguous(), tiles.contiguous(), g.numel, self.key)
            return out.view(len(tiles), g.rows, g.cols * g.kernel)
        out = values.new_empty(len(tiles), g.numel)
        for part, positions, wide in self._chunks(tiles):
            bucket, sign = bucket_and_sign(positions, self.key, self.buckets, values.dtype, wide)
            out[part] = torch.gather(values[part], 1, bucket) * sign
        return out.view(len(tiles), g.rows, g.cols * g.kernel)

    def evaluate_backward(self, tables: Tables, grad: torch.Tensor) -> Tables:
        values, tiles = tables
        grad = grad.reshape(len(tiles), -1)
        if self.kernel_path() == "native":
            return native.get().hash_backward(grad, tiles.contiguous(), self.buckets, self.key), None
        dv = torch.zeros_like(values)
        for part, positions, wide in self._chunks(tiles):
            bucket, sign = bucket_and_sign(positions, self.key, self.buckets, values.dtype, wide)
            dv[part].scatter_add_(1, bucket, grad[part] * sign)
        return dv, None

    def reference(self, tables: Tables) -> torch.Tensor:
        values, tiles = tables
        g = self.geometry
        positions = tiles[:, None] * g.numel + torch.arange(g.numel, device=tiles.device)
        bucket, sign = bucket_and_sign(positions, self.key, self.buckets, values.dtype)
        return (torch.gather(values, 1, bucket) * sign).view(len(tiles), g.rows, g.cols * g.kernel)

    @torch.no_grad()
    def calibrate(self, target_std: torch.Tensor, index: torch.Tensor | None = None, reduce=None) -> None:
        """`GNetBank.calibrate`, then the scale folded into the values (and the noise's log-scale), so that the
        stored values are the weights' own and the output scale is 1."""
        super().calibrate(target_std, index=index, reduce=reduce)
        self.values.mul_(self.scale[:, None])
        if self.log_sigma is not None:
            self.log_sigma.add_(self.scale.clamp_min(1e-30).log())
        self.scale.fill_(1.0)

    def sparse_biases_(self, active: float, generator: torch.Generator) -> None:
        """`GBConfig.init_active` sets first-layer biases of g-nets; shared values have none: nothing to do."""

    def extra_repr(self) -> str:
        return super().extra_repr() + f", buckets={self.buckets}"
