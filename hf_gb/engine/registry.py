"""The g-net families by name: what `GBConfig.family` may name and which `GNetBank` subclass builds its banks.

Families register themselves (`register_family`, usable as a decorator) when `hf_gb.engine.families` is imported,
which importing `hf_gb` does. The registry holds classes only: it imports nothing, so the config can check a name
without importing the banks.

A family's own settings (``GBConfig.family_options``) are declared on its class as ``options``, a dict of name ->
`FamilyOption`; `check_family_options` checks a config's against them. ``"auto"``, which picks one of
`AUTO_CHOICES` per tensor, takes the options of those families.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["AUTO_CHOICES", "AUTO_FAMILY", "DEPRECATED_OPTIONS", "FamilyOption", "adopt_deprecated_options",
           "check_family_options", "declared_options", "families", "family_class", "family_options", "legacy_options",
           "register_family"]


@dataclass(frozen=True)
class FamilyOption:
    """One setting of one family: its default, its help, and ``check(name, value)`` that returns the checked
    value or raises a ``ValueError`` naming ``name``."""

    default: Any
    help: str
    check: Callable[[str, Any], Any]

_FAMILIES: dict[str, type[Any]] = {}
# The `GBConfig.family` that picks a family per tensor (`hf_gb.engine.planning`) instead of naming one, and the
# families it picks from.
AUTO_FAMILY = "auto"
AUTO_CHOICES = ("coords", "hash")


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


def family_options(name: str) -> dict[str, FamilyOption]:
    """The options a registered family declares (empty for most); for ``"auto"``, those of `AUTO_CHOICES`."""
    if name == AUTO_FAMILY:
        return {k: v for choice in AUTO_CHOICES if choice in _FAMILIES for k, v in family_options(choice).items()}
    return dict(getattr(family_class(name), "options", {}))


def check_family_options(family: str, options: Any) -> dict[str, Any] | None:
    """``options`` (a dict, JSON text of one, or None) checked against what ``family`` declares (a name that is
    not a registered family declares none). Returns a new dict, or None for none."""
    if isinstance(options, str):  # from the command line or an environment variable
        try:
            options = json.loads(options)
        except json.JSONDecodeError as e:
            raise ValueError(f"family_options must be a JSON object, got {options!r:.80} ({e})") from None
    if options is None:
        return None
    if not isinstance(options, dict):
        raise ValueError(f"family_options must be an object of option name -> value, got family_options="
                         f"{options!r:.80}")
    declared = declared_options(family)
    out = {}
    for key, value in options.items():
        if key not in declared:
            takers = sorted(f for f, cls in _FAMILIES.items() if key in getattr(cls, "options", {}))
            where = f"; {' and '.join(map(repr, takers))} {'does' if len(takers) == 1 else 'do'}" if takers else ""
            known = f" (its options: {sorted(declared)})" if declared else " (it takes none)"
            raise ValueError(f"family_options: family {family!r} has no option {key!r}{known}{where}")
        out[key] = declared[key].check(f"family_options[{key!r}]", value)
    return out or None


# Family options that were top-level GBConfig fields once. They still are, deprecated, so that old code runs, and
# every gb_config.json of format <= 3 holds them.
DEPRECATED_OPTIONS = ("second_hidden_dim", "tile_gain")


def adopt_deprecated_options(family: str, options: dict[str, Any] | None, given: dict[str, Any]) -> Any:
    """``options`` with the deprecated top-level values of ``given`` (name -> value, None where unset) moved in,
    each with a ``DeprecationWarning``; one that ``family`` does not take was unused before too, and is dropped
    with the same warning. A value that contradicts ``options`` raises."""
    for name, value in given.items():
        if value is None:
            continue
        taken = name in declared_options(family)
        warnings.warn(f"GBConfig({name}=...) is deprecated: write family_options={{{name!r}: {value!r}}}"
                      + ("" if taken else f" (family {family!r} does not use it; dropped)"),
                      DeprecationWarning, stacklevel=4)
        if not taken:
            continue
        options = dict(options) if isinstance(options, dict) else {} if options is None else options
        if not isinstance(options, dict):
            continue  # not an object: check_family_options says so
        if name in options and options[name] != value:
            raise ValueError(f"{name}={value!r} and family_options[{name!r}]={options[name]!r} disagree; "
                             f"set only family_options")
        options[name] = value
    return options


def legacy_options(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict with the deprecated top-level family options moved into ``family_options`` where the family
    takes them and they differ from the default, dropped elsewhere (every file of format <= 3 holds both, whatever
    its writer set), without a warning: a file is not code its reader can change."""
    if not any(name in data for name in DEPRECATED_OPTIONS):
        return data
    data = dict(data)
    family = data.get("family", "auto")
    declared = declared_options(family)
    options = data.get("family_options")
    options = dict(options) if isinstance(options, dict) else options
    for name in DEPRECATED_OPTIONS:
        if name in data:
            value = data.pop(name)
            held = name in declared and value is not None and value != declared[name].default
            if held and isinstance(options, (dict, type(None))):
                options = {name: value, **(options or {})}
    if options is not None:
        data["family_options"] = options
    return data


def declared_options(family: Any) -> dict[str, FamilyOption]:
    """`family_options` of ``family``, or none where it is not a family name (a bad name is refused elsewhere)."""
    known = isinstance(family, str) and (family in _FAMILIES or family == AUTO_FAMILY)
    return family_options(family) if known else {}
