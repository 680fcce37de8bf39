"""Which tensors the g-nets cover, with which family, tiles and width: the plan a bottleneck is built from, from
shapes alone.

`plan_covered` turns the targets of `hf_gb.engine.layers.find_targets` into `CoveredTensor` groups, one per
`BankSpec` (one bank each); `tensor_spec` is the one choice per tensor and `stored_per_tile` what it counts. The
checkpoint size check (`hf_gb.io.checks`) runs the same plan on a model that has no data yet.

Under ``family="auto"`` a tensor whose input axis is an ordered image (`GBConfig.input_shapes`) gets a
``"coords"`` g-net over the coordinates of its positions (with hashed features of its unordered rows), one tile
spanning all its columns as the PNAS g-nets covered whole matrices; every other tensor gets random weight sharing
(``"hash"``), which at equal storage beats position-coded g-nets where positions carry no meaning (docs/design.md).
A target that the tiles cannot reach is met with narrower g-nets where the width is free (``hidden_dim=None``),
and refused with the reachable ratio otherwise: never silently missed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .config import AUTO_FAMILY
from .families.coords import coords_sizes
from .layers import Target, name_matches, view3d
from .registry import family_class, family_options
from .tiling import TileGeometry, choose_geometry, compression_of, gain_values, grid, tile_sides

if TYPE_CHECKING:
    from .config import GBConfig

__all__ = ["DEFAULT_TILE_SIZE", "BankSpec", "CoveredTensor", "plan_covered", "stored_per_tile", "tensor_geometry",
           "tensor_spec"]

# Tile used when the config names neither `compression` nor `tile_size`.
DEFAULT_TILE_SIZE = (128, 128)
# Covered compression that family "auto" aims at when the config names none (about the default tiles' 32x).
AUTO_COMPRESSION = 32.0
# Widths tried, widest first, when a free width (hidden_dim=None) must shrink to reach a target.
_WIDTHS = (32, 24, 16, 12, 8, 6, 4, 3, 2, 1)
# A plan may fall short of the target by this factor (tile sides are powers of two and 1.5x powers of two).
TOLERANCE = 1.25


@dataclass(frozen=True)
class BankSpec:
    """What one bank is: the family, the tile geometry and the g-nets' hidden width (unused by ``"hash"``)."""

    family: str
    geometry: TileGeometry
    hidden_dim: int
    center: bool | None = None  # None: the config's; "auto" gives random sharing the paper's function, uncentred

    def bank_config(self, config: GBConfig) -> GBConfig:
        """``config`` as this bank's family reads it: its own family name, width, centring and options."""
        center = config.center if self.center is None else self.center
        if config.family == self.family and config.hidden_dim == self.hidden_dim and config.center == center:
            return config
        declared = family_options(self.family)
        options = {k: v for k, v in (config.family_options or {}).items() if k in declared} or None
        return dataclasses.replace(config, family=self.family, hidden_dim=self.hidden_dim, center=center,
                                   family_options=options)

    def key(self, config: GBConfig) -> str:
        """The bank's name in ``Bottleneck.banks`` (and in checkpoints): the geometry alone where the bank is what
        the config names (as in every earlier version), else with the family and width in front."""
        if self.family == config.family and self.hidden_dim == config.width:
            return self.geometry.key()
        if self.family == "hash":
            return f"hash-{self.geometry.key()}"
        return f"{self.family}-h{self.hidden_dim}-{self.geometry.key()}"


def stored_per_tile(shape: tuple[int, int, int], spec: BankSpec, config: GBConfig) -> float:
    """Stored values per tile of an ``(out, in, K)`` tensor: its g-net's, and its share of the bank's shared values
    (`GNetBank.params_per_tile_of`) and of the tensor's gains, so that `compression` counts everything stored."""
    n_tiles = math.prod(grid(shape, spec.geometry))
    own = family_class(spec.family).params_per_tile_of(spec.geometry, spec.bank_config(config), n_tiles)
    return own + gain_values(shape, config.gains) / n_tiles


def _ratio(shape: tuple[int, int, int], spec: BankSpec, config: GBConfig) -> float:
    return compression_of(shape, spec.geometry, stored_per_tile(shape, spec, config))


def _input_axes(name: str, shape: tuple[int, int, int], layout: str, config: GBConfig) -> tuple[int, ...] | None:
    """The ordered input axes `GBConfig.input_shapes` gives the module of parameter ``name``, checked."""
    module = name.rpartition(".")[0]
    for key, axes in (config.input_shapes or {}).items():
        if name_matches(module, [key]):
            if layout != "matrix" or math.prod(axes) != shape[1]:
                raise ValueError(f"input_shapes[{key!r}] = {axes} does not describe the input of {name} "
                                 f"(shape {shape[:2]} as (out, in), layout {layout!r})")
            return tuple(axes)
    return None


def _spec(family: str, shape: tuple[int, int, int], config: GBConfig, width: int, col_axes, kernel_axes,
          tile_size) -> BankSpec:
    """The spec of one family at one width: tiles by `choose_geometry` (whole columns when they are ordered)."""
    out, inp, k = shape

    def spec_of(g: TileGeometry) -> BankSpec:
        cols = g.cols == inp and col_axes is not None
        return BankSpec(family, dataclasses.replace(g, col_axes=col_axes if cols else None, kernel_axes=kernel_axes),
                        width)

    if col_axes is not None:  # ordered columns are coded by their coordinates: a tile spans all of them
        tile_size = None if tile_size is None else [tile_size[0], inp]
        if tile_size is None:
            sides = [TileGeometry(r, inp, k) for r in tile_sides(out)]
            target = math.log(config.compression)
            return min((spec_of(g) for g in sides),
                       key=lambda s: (abs(math.log(_ratio(shape, s, config)) - target), -s.geometry.numel))
    g = choose_geometry(shape, lambda g: stored_per_tile(shape, spec_of(g), config), config.compression, tile_size)
    return spec_of(g)


def tensor_spec(name: str, shape: tuple[int, int, int], layout: str, param_shape: tuple[int, ...],
                config: GBConfig) -> BankSpec:
    """The bank of one ``(out, in, K)`` tensor: family, tiles (`tile_size` clipped to it, else the tiles whose
    stored values come closest to `compression`, else `DEFAULT_TILE_SIZE`) and width (module docstring)."""
    col_axes = _input_axes(name, shape, layout, config)
    kernel_axes = tuple(param_shape[2:]) if layout == "kernel" and shape[2] > 1 and config.kernel_code == "axes" \
        else None
    family = config.family
    tile_size = config.tile_size
    if tile_size is None and config.compression is None and family != AUTO_FAMILY:
        tile_size = list(DEFAULT_TILE_SIZE)
    if family == AUTO_FAMILY:
        family = "hash" if col_axes is None else "coords"
        if config.compression is None:
            config = dataclasses.replace(config, compression=AUTO_COMPRESSION)
        if family == "coords" and tile_size is None:
            return _ordered(shape, config, col_axes, kernel_axes)
    widths = [config.width] if config.hidden_dim is not None or config.compression is None else _WIDTHS
    for width in widths:  # widest first; a free width shrinks until the target is met
        spec = _spec(family, shape, config, width, col_axes, kernel_axes, tile_size)
        if config.compression is None or _ratio(shape, spec, config) * TOLERANCE >= config.compression:
            break
    if config.family == AUTO_FAMILY and family == "hash":  # random sharing exactly as HashedNets has it
        spec = dataclasses.replace(spec, center=False)
    return spec


def _ordered(shape: tuple[int, int, int], config: GBConfig, col_axes, kernel_axes) -> BankSpec:
    """Family "auto" on an ordered tensor: a ``"coords"`` bank of the fewest tiles of whole columns (rows split
    evenly) whose hashed row pools are no larger than their row tables (one tile whenever the budget allows)."""
    out, inp, k = shape
    for n_tiles in range(1, out + 1):
        rows = math.ceil(out / n_tiles)
        if math.ceil(out / rows) != n_tiles:  # this many tiles cannot split the rows evenly; the next can
            continue
        g = TileGeometry(rows, inp, k, col_axes=col_axes, kernel_axes=kernel_axes)
        width, pool = coords_sizes(g, config)
        if pool <= rows * width:
            break
    return BankSpec("coords", g, width)


def tensor_geometry(shape: tuple[int, int, int], config: GBConfig, name: str = "", layout: str = "matrix",
                    param_shape: tuple[int, ...] | None = None) -> TileGeometry:
    """The tile of an ``(out, in, K)`` tensor under ``config`` (`tensor_spec`'s geometry)."""
    return tensor_spec(name, shape, layout, param_shape or shape, config).geometry


@dataclass
class CoveredTensor:
    """One model tensor whose values the g-nets predict."""

    name: str  # full parameter name in the model (first name, for tied tensors)
    module_type: str
    layout: str
    shape: tuple[int, int, int]  # the (out, in, K) view
    param_shape: tuple[int, ...]
    spec: BankSpec
    bank: str  # the key of its bank in Bottleneck.banks
    offset: int  # first tile in its bank
    n_tiles: int
    param: nn.Parameter

    @property
    def geometry(self) -> TileGeometry:
        return self.spec.geometry

    def gnet_params(self, config: GBConfig) -> int:
        """Values of this tensor's own tiles and gains (a bank's shared values are not included; see
        `Bottleneck.bank_shares`)."""
        bank_config = self.spec.bank_config(config)
        tiles = self.n_tiles * family_class(self.spec.family).params_per_tile(self.geometry, bank_config)
        return round(tiles) + gain_values(self.shape, config.gains)

    def to_json(self) -> dict[str, Any]:
        g = self.geometry
        entry = {
            "name": self.name,
            "module_type": self.module_type,
            "layout": self.layout,
            "shape": list(self.param_shape),
            "tile": [g.rows, g.cols, g.kernel],
            "n_tiles": self.n_tiles,
        }
        return entry | {"family": self.spec.family, "hidden_dim": self.spec.hidden_dim, "bank": self.bank}


def plan_covered(
    targets: list[Target], config: GBConfig
) -> tuple[dict[BankSpec, list[CoveredTensor]], list[tuple[str, str]]]:
    """The covered tensors of ``targets`` grouped by bank (in target order, each group numbering its tiles from
    0), and ``(name, reason)`` of the targets that `min_compression` leaves uncompressed.

    Raises ``ValueError`` when `compression` is more than the plan can give (with the ratio it can give), or when
    an `input_shapes` entry names no covered module or does not fit its input."""
    groups: dict[BankSpec, list[CoveredTensor]] = {}
    skipped: list[tuple[str, str]] = []
    numel = stored = 0.0
    for target in targets:
        # The full (out, in, K) shape, also of a DTensor shard (a meta tensor holds no data).
        shape = tuple(view3d(torch.empty(target.param.shape, device="meta"), target.layout).shape)
        spec = tensor_spec(target.name, shape, target.layout, tuple(target.param.shape), config)
        n_tiles = math.prod(grid(shape, spec.geometry))
        ratio = _ratio(shape, spec, config)
        if ratio < config.min_compression:
            skipped.append((target.name, f"g-nets would compress it only {ratio:.2f}x"))
            continue
        group = groups.setdefault(spec, [])
        group.append(CoveredTensor(
            target.name, target.module_type, target.layout, shape, tuple(target.param.shape), spec,
            spec.key(config), offset=sum(t.n_tiles for t in group), n_tiles=n_tiles, param=target.param,
        ))
        numel += math.prod(shape)
        stored += n_tiles * stored_per_tile(shape, spec, config)
    _check_input_shapes_used(targets, config)
    if config.compression is not None and config.tile_size is None and stored and \
            numel / stored * TOLERANCE < config.compression:
        raise ValueError(
            f"compression={config.compression:g} cannot be reached: the g-nets of family {config.family!r} "
            f"(hidden_dim={config.hidden_dim}) compress the covered tensors at most {numel / stored:.1f}x; ask for "
            f"that, a smaller hidden_dim (or None, to let the width shrink), or family='hash'"
        )
    return groups, skipped


def _check_input_shapes_used(targets: list[Target], config: GBConfig) -> None:
    modules = [t.name.rpartition(".")[0] for t in targets]
    unused = [k for k in (config.input_shapes or {}) if not any(name_matches(m, [k]) for m in modules)]
    if unused:
        raise ValueError(f"input_shapes names {unused}, which match no covered module (covered: {modules[:5]}...)")
