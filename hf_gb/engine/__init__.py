"""The engine: g-nets that predict the weights of any ``nn.Module``, with torch alone (no transformers, no files).

Bottom up: `codes` and `tiling` (positions and tiles), `config` and `registry` (what a bottleneck covers, the
families by name), `layers` (which module tensors), `kernels` and `native` (the fused g-net math), `bank` and
`families` (g-nets of one tile geometry), `planning`, `gains`, `shards` and `report` (the pieces of the step),
`bottleneck` (`Bottleneck`, which runs them) and `step` (`TrainStep`, its step in a plain loop). Importing it
registers the built-in families.
"""

from . import families as _families  # noqa: F401  (registers the built-in g-net families)
from .bank import GNetBank
from .bottleneck import Bottleneck
from .config import GBConfig
from .registry import family_class, register_family
from .step import TrainStep
from .tiling import TileGeometry

__all__ = ["Bottleneck", "GBConfig", "GNetBank", "TileGeometry", "TrainStep", "family_class", "register_family"]
