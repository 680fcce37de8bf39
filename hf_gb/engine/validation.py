"""Checks of user-given config values: each returns the value normalised or raises ``ValueError`` naming the field
and the bad value. The bounds keep a crafted ``gb_config.json`` from asking for a hang or an allocation too large.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["MAX_CONFIG_BYTES", "MAX_HIDDEN_DIM", "MAX_PATTERN_ITEMS", "MAX_PATTERN_LENGTH", "MAX_TENSOR_DIMS",
           "MAX_TILE_SIDE", "check_input_shapes", "check_pattern", "is_int", "int_in", "number"]

# Bounds on what a config (or a crafted gb_config.json) may ask for: far above any useful value, far below a hang.
MAX_HIDDEN_DIM = 65536
MAX_TILE_SIDE = 2**24
MAX_PATTERN_LENGTH = 4096  # characters of one regex or one name suffix
MAX_PATTERN_ITEMS = 65536  # names in a list of module names
MAX_CONFIG_BYTES = 64 * 2**20
MAX_TENSOR_DIMS = 8


def check_input_shapes(value: Any) -> dict[str, list[int]] | None:
    """`GBConfig.input_shapes` as a dict of module name suffix -> list of positive ints (JSON text accepted)."""
    if value is None:
        return None
    if isinstance(value, str):  # from the command line or an environment variable
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"input_shapes must be a JSON object of name -> shape, got input_shapes={value!r:.80}"
                             f" ({e})") from None
    if not isinstance(value, dict) or len(value) > MAX_PATTERN_ITEMS:
        raise ValueError(f"input_shapes must map module names to shapes, got input_shapes={value!r:.80}")
    out = {}
    for name, shape in value.items():
        ok = isinstance(name, str) and 0 < len(name) <= MAX_PATTERN_LENGTH and isinstance(shape, (list, tuple))
        if not (ok and 1 <= len(shape) <= MAX_TENSOR_DIMS and all(is_int(s) and 1 <= s <= MAX_TILE_SIDE
                                                                  for s in shape)):
            raise ValueError(f"input_shapes[{name!r:.40}] must be a list of 1 to {MAX_TENSOR_DIMS} positive ints, "
                             f"got {shape!r:.80}")
        out[name] = list(shape)
    return out


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_bool(name: str, value: Any) -> bool:
    """Strictly a boolean: "no" or null must not read as one."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {name}={value!r:.80}")
    return value


def int_in(name: str, value: Any, low: int, high: int) -> int:
    if not is_int(value) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {name}={value!r:.80}")
    return value


def number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {name}={value!r:.80}")
    return float(value)


def positive(name: str, value: Any) -> float:
    value = number(name, value)
    if not value > 0:
        raise ValueError(f"{name} must be a positive number, got {name}={value!r:.80}")
    return value


def check_pattern(name: str, value: Any) -> None | str | list[str]:
    """A module pattern as `GBConfig` keeps it: None, a regex (checked to compile) or a list of name suffixes.

    Raises ``ValueError`` naming the field for a value of another type, a pattern longer than
    `MAX_PATTERN_LENGTH`, or a regex that does not compile.
    """
    if value is None:
        return None
    if isinstance(value, str):
        if len(value) > MAX_PATTERN_LENGTH:
            raise ValueError(f"{name} is a regex of {len(value):,} characters; at most {MAX_PATTERN_LENGTH} are "
                             f"allowed, got {name}={value[:40]!r}...")
        import regex

        try:
            regex.compile(value)
        except (regex.error, RecursionError, OverflowError) as e:
            raise ValueError(f"{name} is not a valid regular expression ({e}), got {name}={value!r:.80}") from None
        return value
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a regex string or a list of strings, got {name}={value!r:.80}")
    value = list(value)
    if len(value) > MAX_PATTERN_ITEMS:
        raise ValueError(f"{name} lists {len(value):,} names; at most {MAX_PATTERN_ITEMS} are allowed")
    if not all(isinstance(v, str) and len(v) <= MAX_PATTERN_LENGTH for v in value):
        raise ValueError(f"{name} must be a regex string or a list of strings, got {name}={value!r:.80}")
    return value
