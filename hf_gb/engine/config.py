"""`GBConfig`: what the genomic bottleneck covers and how big its g-nets are."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from ..files import CONFIG_NAME, atomic_write_text
from ..version import __version__
from .registry import (
    AUTO_FAMILY,
    DEPRECATED_OPTIONS,
    adopt_deprecated_options,
    check_family_options,
    declared_options,
    families,
    legacy_options,
)
from .validation import (
    MAX_CONFIG_BYTES,
    MAX_HIDDEN_DIM,
    MAX_TENSOR_DIMS,
    MAX_TILE_SIDE,
    check_bool,
    check_input_shapes,
    check_pattern,
    int_in,
    is_int,
    number,
    positive,
)

__all__ = ["AUTO_FAMILY", "CONFIG_NAME", "DEFAULT_HIDDEN_DIM", "FORMAT_VERSION", "GBConfig", "check_pattern",
           "config_json", "file_format", "parse_config_json", "read_config_json"]

logger = logging.getLogger(__name__)

# Bumped only when a saved checkpoint can no longer be read by older code. Readers accept 1 .. FORMAT_VERSION.
# 2: centred banks store no b2; 3: family "auto", hidden_dim None, input_shapes, kernel_code; 4: family_options;
# 5: "coords" g-nets stored divided by their option lr_multiplier (default 10; files of format 3 and 4 mean 10/3).
FORMAT_VERSION = 5
# The multiplier of the "coords" g-nets of format 3 and 4 files (`hf_gb.engine.families.coords`).
_LEGACY_COORDS = {"lr_multiplier": 10 / 3}
# What a gb_config.json of format 1 or 2 meant by a field it does not name (those defaults have changed since).
_LEGACY_DEFAULTS = {"family": "mlp", "hidden_dim": 32, "kernel_code": "one_hot"}

# Keys of gb_config.json that describe the file, not the config.
_META_KEYS = ("hf_gb_version", "format_version", "tensors", "save_id")
_ENCODINGS = ("binary", "gray", "fourier")
_KERNELS = ("auto", "native", "compiled", "eager")
_GAINS = ("none", "rows", "columns", "both")
_KERNEL_CODES = ("one_hot", "axes")
# Hidden width of a family's g-nets when `hidden_dim` is None and no target asks for another.
DEFAULT_HIDDEN_DIM = 32


@dataclass
class GBConfig:
    """Configuration of a genomic bottleneck.

    Every covered weight tensor is cut into tiles and its weights are predicted from their positions. By default
    (``family="auto"``) a tensor whose positions carry meaning (a Linear whose input is an image named in
    `input_shapes`) gets a g-net over the position codes of its axes, and every other tensor gets random weight
    sharing (``"hash"``), which at equal storage is what works where positions mean nothing (the hidden units of a
    transformer). ``"mlp"``, ``"deep"``, ``"shared"`` and ``"hash"`` name one family for every tensor.

    Example::

        >>> from hf_gb import GBConfig
        >>> config = GBConfig(hidden_dim=16, compression=50)
        >>> GBConfig.from_dict(config.to_dict()) == config
        True
    """

    hidden_dim: int | None = field(
        default=None,
        metadata={"help": "Width of each g-net's hidden layer. None: 32, or the width a `compression` target "
                  "needs (family 'auto': the width the tensor's budget allows, one g-net per tensor)."},
    )
    compression: float | None = field(
        default=None,
        metadata={
            "help": "Target ratio (covered weights / g-net parameters); picks the tile size per tensor. None: the "
            "tiles of `tile_size`, or 128x128 tiles when that is None too."
        },
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
    encoding: str = field(
        default="binary",
        metadata={"help": "Position code: 'binary', 'gray', or 'fourier' (the binary bits plus 4 sine/cosine pairs "
                  "of the position per axis; more inputs per g-net)."},
    )
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
    init_active: float | None = field(
        default=None,
        metadata={
            "help": "Fraction of each tile's positions at which every first-layer hidden unit of the g-nets is "
            "active at init (its bias set to that quantile of its pre-activations), e.g. 0.05 for sparse units; "
            "None: biases near 0 (about half active)."
        },
    )
    min_compression: float = field(
        default=1.0,
        metadata={"help": "Tensors whose g-nets would compress them less than this are left uncompressed."},
    )
    kernel: str = field(
        default="auto",
        metadata={
            "help": "'native' (a C++ kernel for float32 on CPU, built on first use), 'compiled' (torch.compile fused "
            "kernels), 'eager' (chunked reference), or 'auto' (native on CPU, else compiled; small banks eager)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the g-net initialisation."})
    family: str = field(
        default=AUTO_FAMILY,
        metadata={
            "help": "g-net family: 'auto' (per tensor: 'mlp' over the position codes of a tensor with ordered axes "
            "(`input_shapes`), 'hash' elsewhere), 'mlp' (one hidden layer over position codes, one g-net per "
            "tile), 'deep' (a second hidden layer, `family_options` second_hidden_dim), 'shared' (one g-net per bank, "
            "each tile keeping only its own first-layer bias) or 'hash' (random weight sharing: a seeded hash of "
            "each position into learned values); hf_gb.engine.families."
        },
    )
    input_shapes: dict[str, list[int]] | None = field(
        default=None,
        metadata={
            "help": "Ordered input axes of Linears that read an image: {module name suffix: shape}, e.g. "
            "{'fc1': [28, 28]} or {'fc1': [3, 32, 32]} (channel-major, as torch flattens). The g-nets of those "
            "weights code each input by its coordinates (Gray/binary bits of channel, y and x) instead of its flat "
            "index, and family 'auto' gives them g-nets instead of random sharing."
        },
    )
    kernel_code: str = field(
        default="one_hot",
        metadata={"help": "Code of a conv kernel position: 'one_hot' (one input per position) or 'axes' (the "
                  "bits of each kernel axis, e.g. ky and kx of a 3x3 kernel: 4 inputs instead of 9)."},
    )
    gains: str = field(
        default="none",
        metadata={
            "help": "Learned output gains of every covered tensor, any family: 'rows' (one per output row), "
            "'columns' (one per input channel), 'both' (weight = diag(exp(r)) G diag(exp(c))), or 'none'. "
            "They are stored values too: `compression` counts them."
        },
    )
    skip_nonfinite: bool = field(
        default=True,
        metadata={
            "help": "Skip the g-net update of a step whose gradients are NaN or Inf (with a warning); one bad step "
            "would otherwise turn every predicted weight into NaN."
        },
    )

    family_options: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Settings of the chosen family, e.g. {'second_hidden_dim': 16} for 'deep'; each family's "
                  "are listed in docs/configuration.md (most take none)."},
    )
    # Deprecated spellings of family options, kept so that old code and old gb_config.json files still work.
    second_hidden_dim: int | None = field(
        default=None, repr=False,
        metadata={"help": "Deprecated: family_options={'second_hidden_dim': N} (family 'deep').",
                  "deprecated": True},
    )
    tile_gain: bool | None = field(
        default=None, repr=False,
        metadata={"help": "Deprecated: family_options={'tile_gain': false} (family 'shared').", "deprecated": True},
    )

    def __post_init__(self):
        if self.hidden_dim is not None:
            self.hidden_dim = int_in("hidden_dim", self.hidden_dim, 1, MAX_HIDDEN_DIM)
        if self.compression is not None:
            self.compression = number("compression", self.compression)
            if self.compression < 1.0:
                raise ValueError(f"compression must be a finite ratio >= 1, got compression={self.compression!r}")
        if self.tile_size is not None:
            sizes = [self.tile_size] * 2 if is_int(self.tile_size) else self.tile_size
            ok = isinstance(sizes, (list, tuple)) and len(sizes) == 2
            if not (ok and all(is_int(s) and 1 <= s <= MAX_TILE_SIDE for s in sizes)):
                raise ValueError(
                    f"tile_size must be a positive int or [rows, cols] of positive ints (at most {MAX_TILE_SIDE}), "
                    f"got tile_size={self.tile_size!r:.80}"
                )
            self.tile_size = list(sizes)
        for name in ("target_modules", "exclude_modules"):
            setattr(self, name, check_pattern(name, getattr(self, name)))
        self.input_shapes = check_input_shapes(self.input_shapes)
        for name, choices in (("encoding", _ENCODINGS), ("kernel", _KERNELS), ("gains", _GAINS),
                              ("kernel_code", _KERNEL_CODES)):
            if not (isinstance(getattr(self, name), str) and getattr(self, name) in choices):
                raise ValueError(f"{name} must be one of {choices}, got {name}={getattr(self, name)!r}")
        # strict: "no" or null must not read as a boolean
        for name in ("stochastic", "center", "skip_nonfinite"):
            check_bool(name, getattr(self, name))
        for name in ("init_noise", "min_compression"):
            setattr(self, name, positive(name, getattr(self, name)))
        if self.init_active is not None:
            self.init_active = number("init_active", self.init_active)
            if not 0 < self.init_active < 1:
                raise ValueError(f"init_active must be a fraction in (0, 1) or null, "
                                 f"got init_active={self.init_active!r}")
        self.seed = int_in("seed", self.seed, 0, 2**63 - 1)
        known = [AUTO_FAMILY, *families()]
        if not (isinstance(self.family, str) and self.family in known):
            raise ValueError(f"family must be one of {known}, got family={self.family!r:.80}")
        given = {name: getattr(self, name) for name in DEPRECATED_OPTIONS}
        for name in DEPRECATED_OPTIONS:
            setattr(self, name, None)
        options = adopt_deprecated_options(self.family, self.family_options, given)
        self.family_options = check_family_options(self.family, options)

    def option(self, name: str) -> Any:
        """A setting of this config's family: `family_options`'s value, else the family's default."""
        declared = declared_options(self.family)
        if name not in declared:
            raise KeyError(f"family {self.family!r} has no option {name!r}")
        return (self.family_options or {}).get(name, declared[name].default)

    @property
    def width(self) -> int:
        """`hidden_dim`, or `DEFAULT_HIDDEN_DIM` when it is None."""
        return DEFAULT_HIDDEN_DIM if self.hidden_dim is None else self.hidden_dim

    def to_dict(self) -> dict[str, Any]:
        """Every field (deprecated ones, always None after construction, left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in DEPRECATED_OPTIONS}

    def differences(self, other: GBConfig, ignore: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
        """``(field, self's value, other's value)`` for every field, in declaration order, where the two differ."""
        return [(f.name, getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self)
                if f.name not in ignore and getattr(self, f.name) != getattr(other, f.name)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GBConfig:
        """Build a config from a dict, dropping (with a warning) keys this version does not know."""
        data = dict(data)
        for meta in _META_KEYS:
            data.pop(meta, None)
        data = legacy_options(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("Ignoring unknown GBConfig keys: %s", ", ".join(unknown))
        return cls(**{k: v for k, v in data.items() if k in known})

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write `gb_config.json` (with the hf_gb version) into `save_directory`; return its path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        atomic_write_text(path, config_json(self))
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> GBConfig:
        """Read `gb_config.json` from a folder (or the file itself)."""
        path = os.fspath(directory)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_NAME)
        return read_config_json(path)["gb_config"]


def config_json(config: GBConfig, tensors: list[dict[str, Any]] | None = None, save_id: str | None = None) -> str:
    """The text of a `gb_config.json`: the config, the hf_gb and format versions, and (for a checkpoint) the
    covered tensors and the id of the save. The one way both `GBConfig.save_pretrained` and checkpoints write it."""
    # Each file has the lowest format that means what it holds, so older hf_gb reads whatever it can read right
    # (without an unknown key to warn about) and refuses the rest: 5 where "coords" g-nets may be in it (older
    # readers would scale them by 10/3), 4 with family options, 3 otherwise.
    fields = config.to_dict()
    version = file_format(config)
    if version == 3:
        fields.pop("family_options")
    payload: dict[str, Any] = {**fields, "hf_gb_version": __version__, "format_version": version}
    if tensors is not None:
        payload["tensors"] = tensors
    if save_id is not None:
        payload["save_id"] = save_id
    return json.dumps(payload, indent=2, sort_keys=True) + "\n"


def read_config_json(path: str) -> dict[str, Any]:
    """Read and check a `gb_config.json`.

    Returns ``{"gb_config": GBConfig, "config": dict, "tensors": list | None, "save_id": str | None,
    "hf_gb_version": ..., "path": path}``. Every problem is one ``ValueError`` naming the file, the field and what
    was expected (``FileNotFoundError`` when there is no file).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No {CONFIG_NAME} found at {path}")
    size = os.path.getsize(path)
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path} is {size:,} bytes; a {CONFIG_NAME} is at most {MAX_CONFIG_BYTES:,}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    except RecursionError as e:
        raise ValueError(f"{path} is not valid JSON: nested too deeply") from e
    return parse_config_json(data, path)


def parse_config_json(data: Any, where: str) -> dict[str, Any]:
    """Check the object a `gb_config.json` holds (or the copy in ``config.json``'s ``quantization_config``; see
    `hf_gb.io.loader`); returns what `read_config_json` does, with errors that name ``where``."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must hold a JSON object, got {type(data).__name__}")
    version = data.get("format_version", 1)
    if not is_int(version) or version < 1:
        raise ValueError(f"{where}: format_version must be a positive int, got format_version={version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{where} has format_version={version!r} (written by hf_gb {data.get('hf_gb_version', '?')}), "
            f"but this hf_gb {__version__} reads format_version <= {FORMAT_VERSION}; upgrade hf_gb"
        )
    save_id = data.get("save_id")
    if save_id is not None and not (isinstance(save_id, str) and len(save_id) <= 64):
        raise ValueError(f"{where}: save_id must be a string of at most 64 characters, got save_id={save_id!r:.80}")
    config = {k: v for k, v in data.items() if k not in _META_KEYS}
    if version < 3:  # written before these defaults changed: what the file meant by leaving them out
        config = {**_LEGACY_DEFAULTS, **config}
    try:
        gb_config = GBConfig.from_dict(config)
        if version < 5 and file_format(gb_config) == 5:  # may hold "coords" g-nets of the old multiplier
            options = {**_LEGACY_COORDS, **(gb_config.family_options or {})}
            gb_config = dataclasses.replace(gb_config, family_options=options)
        tensors = _check_entries(data.get("tensors"))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from e
    return {"gb_config": gb_config, "config": config, "tensors": tensors, "save_id": save_id,
            "format_version": version, "hf_gb_version": data.get("hf_gb_version"), "path": where}


def file_format(config: GBConfig) -> int:
    """The format version of the files a checkpoint of ``config`` writes: the lowest that means what they hold, 5
    where "coords" g-nets may be in them, 4 with family options, 3 otherwise."""
    coords = config.family == "coords" or (config.family == AUTO_FAMILY and bool(config.input_shapes))
    return 5 if coords else 4 if config.family_options else 3


def _check_entries(entries: Any) -> list[dict[str, Any]] | None:
    """The ``tensors`` list of a checkpoint's config: one entry per covered tensor, with its shape and tile."""
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise ValueError(f"tensors must be a list of covered tensors, got tensors={entries!r:.80}")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"tensors[{i}] must be an object, got {entry!r:.80}")
        for key in ("name", "shape", "tile"):
            if key not in entry:
                raise ValueError(f"tensors[{i}] has no {key!r}")
        if not isinstance(entry["name"], str) or not entry["name"]:
            raise ValueError(f"tensors[{i}].name must be a parameter name, got {entry['name']!r:.80}")
        for key, dims in (("shape", None), ("tile", 3)):
            value = entry[key]
            ok = isinstance(value, list) and 1 <= len(value) <= (dims or MAX_TENSOR_DIMS) and (
                dims is None or len(value) == dims) and all(is_int(v) and v >= 1 for v in value)
            if not ok:
                expected = "3 positive ints" if dims else "a list of positive ints"
                raise ValueError(f"tensors[{i}].{key} ({entry['name']}) must be {expected}, got {value!r:.80}")
        if "n_tiles" in entry and not (is_int(entry["n_tiles"]) and entry["n_tiles"] >= 1):
            raise ValueError(f"tensors[{i}].n_tiles ({entry['name']}) must be a positive int, "
                             f"got {entry['n_tiles']!r:.80}")
    return entries


