"""`GBConfig`: what the genomic bottleneck covers and how big its g-nets are."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .version import __version__

logger = logging.getLogger(__name__)

CONFIG_NAME = "gb_config.json"
# Bumped only when a saved checkpoint can no longer be read by older code.
FORMAT_VERSION = 2  # 2: centred banks store no b2 (version 1 files still load)

# Keys of gb_config.json that describe the file, not the config.
_META_KEYS = ("hf_gb_version", "format_version", "tensors")
_ENCODINGS = ("binary", "gray")
_KERNELS = ("auto", "compiled", "eager")


@dataclass
class GBConfig:
    """Configuration of a genomic bottleneck.

    Every covered weight tensor is cut into tiles; each tile gets its own g-net, a one-hidden-layer MLP that maps
    the binary code of a position (row bits, column bits, one bit per kernel position) to the weight there.

    Example::

        >>> from hf_gb import GBConfig
        >>> config = GBConfig(hidden_dim=16, compression=50)
        >>> GBConfig.from_dict(config.to_dict()) == config
        True
    """

    hidden_dim: int = field(default=32, metadata={"help": "Width of each g-net's hidden layer."})
    compression: float | None = field(
        default=None,
        metadata={"help": "Target ratio (covered weights / g-net parameters); picks the tile size per tensor."},
    )
    tile_size: int | list[int] | None = field(
        default=None,
        metadata={"help": "Explicit tile size: an int (square) or [rows, cols]. Overrides `compression`."},
    )
    target_modules: str | list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules to cover: a regex matched against the full module name, or a list of name suffixes. "
            "Default: every Linear, Conv1d/2d/3d, GPT-2 Conv1D and MultiheadAttention."
        },
    )
    exclude_modules: str | list[str] | None = field(
        default=None, metadata={"help": "Modules never to cover (regex or list of name suffixes)."}
    )
    encoding: str = field(default="binary", metadata={"help": "Position code: 'binary' or 'gray'."})
    stochastic: bool = field(
        default=False,
        metadata={"help": "Sample weights around the g-net output with a learned per-tile noise scale in training."},
    )
    center: bool = field(
        default=True,
        metadata={
            "help": "Remove each predicted tile's row and column means. Without it the g-net's output has a large "
            "additive part f(row) + g(col), so predicted matrices start nearly rank 2 and train poorly."
        },
    )
    init_noise: float = field(
        default=0.1, metadata={"help": "Initial noise std relative to the weight scale when `stochastic`."}
    )
    min_compression: float = field(
        default=1.0,
        metadata={"help": "Tensors whose g-nets would compress them less than this are left uncompressed."},
    )
    kernel: str = field(
        default="auto",
        metadata={"help": "'compiled' (torch.compile fused kernels), 'eager' (chunked reference), or 'auto'."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the g-net initialisation."})
    family: str = field(
        default="mlp",
        metadata={
            "help": "g-net family: 'mlp' (one hidden layer over position codes, one g-net per tile) or 'deep' (a "
            "second hidden layer of `second_hidden_dim` units after the first; hf_gb.families)."
        },
    )
    second_hidden_dim: int = field(
        default=8, metadata={"help": "Width of the second hidden layer of the 'deep' family (other families: unused)."}
    )
    skip_nonfinite: bool = field(
        default=True,
        metadata={
            "help": "Skip the g-net update of a step whose gradients are NaN or Inf (with a warning); one bad step "
            "would otherwise turn every predicted weight into NaN."
        },
    )

    def __post_init__(self):
        if isinstance(self.hidden_dim, bool) or not isinstance(self.hidden_dim, int) or self.hidden_dim < 1:
            raise ValueError(f"hidden_dim must be a positive int, got hidden_dim={self.hidden_dim!r}")
        if self.compression is not None:
            c = float(self.compression)
            if not math.isfinite(c) or c < 1.0:
                raise ValueError(f"compression must be a finite ratio >= 1, got compression={self.compression!r}")
            self.compression = c
        if self.tile_size is not None:
            sizes = [self.tile_size] * 2 if isinstance(self.tile_size, int) else list(self.tile_size)
            if len(sizes) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
                raise ValueError(
                    "tile_size must be a positive int or [rows, cols] of positive ints, "
                    f"got tile_size={self.tile_size!r}"
                )
            self.tile_size = sizes
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None or isinstance(value, str):
                continue
            value = list(value)
            if not all(isinstance(v, str) for v in value):
                raise ValueError(f"{name} must be a regex string or a list of strings, got {name}={value!r}")
            setattr(self, name, value)
        if self.encoding not in _ENCODINGS:
            raise ValueError(f"encoding must be one of {_ENCODINGS}, got encoding={self.encoding!r}")
        from .bank import families  # local import: the bank module imports this one's type for hints only

        if self.family not in families():
            raise ValueError(f"family must be one of {families()}, got family={self.family!r}")
        if (
            isinstance(self.second_hidden_dim, bool)
            or not isinstance(self.second_hidden_dim, int)
            or self.second_hidden_dim < 1
        ):
            raise ValueError(
                f"second_hidden_dim must be a positive int, got second_hidden_dim={self.second_hidden_dim!r}"
            )
        if self.kernel not in _KERNELS:
            raise ValueError(f"kernel must be one of {_KERNELS}, got kernel={self.kernel!r}")
        if not (math.isfinite(float(self.init_noise)) and self.init_noise > 0):
            raise ValueError(f"init_noise must be a positive number, got init_noise={self.init_noise!r}")
        if not (math.isfinite(float(self.min_compression)) and self.min_compression > 0):
            raise ValueError(
                f"min_compression must be a positive number, got min_compression={self.min_compression!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GBConfig:
        """Build a config from a dict, dropping (with a warning) keys this version does not know."""
        data = dict(data)
        for meta in _META_KEYS:
            data.pop(meta, None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("Ignoring unknown GBConfig keys: %s", ", ".join(unknown))
        return cls(**{k: v for k, v in data.items() if k in known})

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write `gb_config.json` (with the hf_gb version) into `save_directory`; return its path."""
        from .checkpoint import atomic_write_text  # local import: checkpoint imports this module

        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        payload = {**self.to_dict(), "hf_gb_version": __version__, "format_version": FORMAT_VERSION}
        atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> GBConfig:
        """Read `gb_config.json` from a folder (or the file itself)."""
        path = os.fspath(directory)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_NAME)
        return cls.from_dict(read_config_json(path)["config"])


def read_config_json(path: str) -> dict[str, Any]:
    """Read a `gb_config.json`; returns {"config": ..., "tensors": ..., ...}, checking its format version."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No {CONFIG_NAME} found at {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    version = data.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version={version!r} (written by hf_gb {data.get('hf_gb_version', '?')}), "
            f"but this hf_gb {__version__} reads format_version <= {FORMAT_VERSION}; upgrade hf_gb"
        )
    config = {k: v for k, v in data.items() if k not in _META_KEYS}
    return {"config": config, "tensors": data.get("tensors"), "hf_gb_version": data.get("hf_gb_version")}
