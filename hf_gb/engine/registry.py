"""The g-net families by name: what `GBConfig.family` may name and which `GNetBank` subclass builds its banks.

Families register themselves (`register_family`, usable as a decorator) when `hf_gb.engine.families` is imported,
which importing `hf_gb` does. The registry holds classes only: it imports nothing, so the config can check a name
without importing the banks.
"""

from __future__ import annotations

from typing import Any

__all__ = ["families", "family_class", "register_family"]

_FAMILIES: dict[str, type[Any]] = {}


def register_family(cls: type[Any]) -> type[Any]:
    """Register a `GNetBank` subclass under ``cls.family`` (usable as a decorator); duplicates raise."""
    name = getattr(cls, "family", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute `family`")
    if name in _FAMILIES and _FAMILIES[name] is not cls:
        raise ValueError(f"g-net family {name!r} is already registered by {_FAMILIES[name].__name__}")
    _FAMILIES[name] = cls
    return cls


def family_class(name: str) -> type[Any]:
    """The bank class of a registered family, with an error that lists the known ones."""
    if name not in _FAMILIES:
        raise ValueError(f"unknown g-net family {name!r}; known: {sorted(_FAMILIES)}")
    return _FAMILIES[name]


def families() -> list[str]:
    """The names of the registered families, sorted."""
    return sorted(_FAMILIES)
