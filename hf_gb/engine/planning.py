"""Which tensors the g-nets cover and with which tiles: the plan a bottleneck is built from, from shapes alone.

`plan_covered` turns the targets of `hf_gb.engine.layers.find_targets` into `CoveredTensor` groups, one per tile
geometry (one bank each); `tensor_geometry` is the one tile choice, and `stored_per_tile` what it counts. The
checkpoint size check (`hf_gb.io.checks`) runs the same plan on a model that has no data yet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .layers import Target, view3d
from .registry import family_class
from .tiling import TileGeometry, choose_geometry, compression_of, gain_values, grid

if TYPE_CHECKING:
    from .config import GBConfig

__all__ = ["DEFAULT_TILE_SIZE", "CoveredTensor", "plan_covered", "stored_per_tile", "tensor_geometry"]

# Tile used when the config names neither `compression` nor `tile_size`.
DEFAULT_TILE_SIZE = (128, 128)


def stored_per_tile(shape: tuple[int, int, int], geometry: TileGeometry, config: GBConfig) -> float:
    """Stored values per tile of an ``(out, in, K)`` tensor: its g-net's, and its share of the bank's shared values
    (`GNetBank.params_per_tile_of`) and of the tensor's gains, so that `compression` counts everything stored."""
    n_tiles = math.prod(grid(shape, geometry))
    own = family_class(config.family).params_per_tile_of(geometry, config, n_tiles)
    return own + gain_values(shape, config.gains) / n_tiles


def tensor_geometry(shape: tuple[int, int, int], config: GBConfig) -> TileGeometry:
    """The tile of an ``(out, in, K)`` tensor under ``config``: `tile_size` clipped to it, else the tile whose
    stored values (`stored_per_tile`) come closest to `compression`, else `DEFAULT_TILE_SIZE`."""
    tile_size = config.tile_size
    if tile_size is None and config.compression is None:
        tile_size = DEFAULT_TILE_SIZE
    return choose_geometry(shape, lambda g: stored_per_tile(shape, g, config), config.compression, tile_size)


@dataclass
class CoveredTensor:
    """One model tensor whose values the g-nets predict."""

    name: str  # full parameter name in the model (first name, for tied tensors)
    module_type: str
    layout: str
    shape: tuple[int, int, int]  # the (out, in, K) view
    param_shape: tuple[int, ...]
    geometry: TileGeometry
    offset: int  # first tile in its bank
    n_tiles: int
    param: nn.Parameter

    def gnet_params(self, config: GBConfig) -> int:
        """Values of this tensor's own tiles and gains (a bank's shared values are not included; see
        `Bottleneck.bank_shares`)."""
        tiles = self.n_tiles * family_class(config.family).params_per_tile(self.geometry, config)
        return round(tiles) + gain_values(self.shape, config.gains)

    def to_json(self) -> dict[str, Any]:
        g = self.geometry
        return {
            "name": self.name,
            "module_type": self.module_type,
            "layout": self.layout,
            "shape": list(self.param_shape),
            "tile": [g.rows, g.cols, g.kernel],
            "n_tiles": self.n_tiles,
        }


def plan_covered(
    targets: list[Target], config: GBConfig
) -> tuple[dict[TileGeometry, list[CoveredTensor]], list[tuple[str, str]]]:
    """The covered tensors of ``targets`` grouped by tile geometry (in target order, each group numbering its
    tiles from 0), and ``(name, reason)`` of the targets that `min_compression` leaves uncompressed."""
    by_geometry: dict[TileGeometry, list[CoveredTensor]] = {}
    skipped: list[tuple[str, str]] = []
    for target in targets:
        # The full (out, in, K) shape, also of a DTensor shard (a meta tensor holds no data).
        shape = tuple(view3d(torch.empty(target.param.shape, device="meta"), target.layout).shape)
        geometry = tensor_geometry(shape, config)
        n_tiles = math.prod(grid(shape, geometry))
        ratio = compression_of(shape, geometry, stored_per_tile(shape, geometry, config))
        if ratio < config.min_compression:
            skipped.append((target.name, f"g-nets would compress it only {ratio:.2f}x"))
            continue
        group = by_geometry.setdefault(geometry, [])
        group.append(CoveredTensor(
            target.name, target.module_type, target.layout, shape, tuple(target.param.shape), geometry,
            offset=sum(t.n_tiles for t in group), n_tiles=n_tiles, param=target.param,
        ))
    return by_geometry, skipped
