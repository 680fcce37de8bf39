"""`GBConfig`'s fields as the fields of other dataclasses: ``gb_*`` training arguments and `GBPlugin`'s settings.

One source: a new `GBConfig` field appears in `GBTrainingArguments` (``--gb_<name>``) and in `GBPlugin`
(``HF_GB_<NAME>``) with its type, default and help, without another edit. Types that argparse cannot parse as
they are (``int | list[int]``, ``str | list[str]``) get the command-line form of `_CLI_TYPES`.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..engine.config import GBConfig

# Command-line forms of union types: lists on the command line, a single value still accepted from JSON/YAML.
_CLI_TYPES: dict[str, Any] = {
    "tile_size": list[int] | None,
    "target_modules": list[str] | None,
    "exclude_modules": list[str] | None,
    "input_shapes": str | None,
    "family_options": str | None,
}
# Extra help for those forms.
_CLI_HELP = {
    "tile_size": " On the command line: one or two ints.",
    "target_modules": " On the command line: name suffixes; a single regex string from JSON/YAML.",
    "exclude_modules": " On the command line: name suffixes; a single regex string from JSON/YAML.",
    "input_shapes": " On the command line: a JSON object, e.g. '{\"fc1\": [28, 28]}'.",
    "family_options": " On the command line: a JSON object, e.g. '{\"second_hidden_dim\": 16}'.",
}


@dataclass(frozen=True)
class Setting:
    """One `GBConfig` field as other dataclasses declare it."""

    name: str
    type: Any  # a type HfArgumentParser can parse
    default: Any
    help: str
    parse_env: Callable[[str], Any]  # reads the value of an environment variable


def _parse_tile_size(value: str) -> int | list[int]:
    match = re.fullmatch(r"\s*(\d+)\s*(?:[,x]\s*(\d+)\s*)?", value)
    if match is None:
        raise ValueError("expected an int or 'rows,cols'")
    rows, cols = match.groups()
    return int(rows) if cols is None else [int(rows), int(cols)]


def _parse_modules(value: str) -> str | list[str]:
    # A comma-separated value is a list of name suffixes; anything else is a regex over the full module name.
    return [p.strip() for p in value.split(",") if p.strip()] if "," in value else value


def _parse_bool(value: str) -> bool:
    if value.strip().lower() in ("1", "true", "yes", "on", "y", "t"):
        return True
    if value.strip().lower() in ("0", "false", "no", "off", "n", "f"):
        return False
    raise ValueError("expected true/false, yes/no, on/off or 1/0")


def _parse_float(value: str) -> float | None:
    return None if value.strip().lower() == "none" else float(value)


_ENV_PARSERS: dict[str, Callable[[str], Any]] = {"tile_size": _parse_tile_size, "target_modules": _parse_modules,
                                                 "exclude_modules": _parse_modules}
_SCALAR_PARSERS: dict[Any, Callable[[str], Any]] = {int: int, float: _parse_float, str: str, bool: _parse_bool}


def settings() -> list[Setting]:
    """Every `GBConfig` field, in declaration order."""
    hints = typing.get_type_hints(GBConfig)
    out = []
    for f in dataclasses.fields(GBConfig):
        cli_type = _CLI_TYPES.get(f.name, hints[f.name])
        scalar = next((a for a in typing.get_args(cli_type) if a is not type(None)), cli_type)
        parse = _ENV_PARSERS.get(f.name) or _SCALAR_PARSERS.get(scalar)
        if parse is None:
            raise TypeError(f"GBConfig.{f.name} has type {cli_type}; add its command-line form to "
                            "hf_gb.training.settings")
        out.append(Setting(f.name, cli_type, f.default, f.metadata.get("help", "") + _CLI_HELP.get(f.name, ""), parse))
    return out


def add_config_fields(
    prefix: str, *, optional: bool, help_format: str = "{help}", overrides: dict[str, dict[str, Any]] | None = None
) -> Callable[[type], type]:
    """Class decorator (put it *under* ``@dataclass``): declare every `GBConfig` field as ``<prefix><name>``.

    ``optional`` makes every field ``X | None = None`` (for settings that fall back to the environment);
    ``help_format`` may use ``{help}``, ``{name}`` and ``{env}`` (``HF_GB_<NAME>``); ``overrides`` maps a field
    name to ``type`` / ``default`` / ``help_suffix`` replacements. Fields the class declares itself are kept.
    """
    overrides = overrides or {}

    def decorate(cls: type) -> type:
        own = dict(cls.__dict__.get("__annotations__", {}))
        annotations = {}
        for s in settings():
            name = prefix + s.name
            if name in own:  # declared by the class itself: keep it, in GBConfig's order
                annotations[name] = own.pop(name)
                continue
            extra = overrides.get(s.name, {})
            kind = extra.get("type", s.type | None if optional else s.type)
            default = extra.get("default", None if optional else s.default)
            text = help_format.format(help=s.help, name=s.name, env="HF_GB_" + s.name.upper())
            annotations[name] = kind
            setattr(cls, name, dataclasses.field(default=default, metadata={"help": text + extra.get("help", "")}))
        cls.__annotations__ = {**annotations, **own}
        return cls

    return decorate


def config_from(values: dict[str, Any], base: GBConfig | None = None) -> GBConfig:
    """A `GBConfig` from command-line-form values (``None`` = take ``base``'s or the default)."""
    kwargs = {}
    for s in settings():
        value = values.get(s.name)
        if value is None:
            continue
        if s.name == "tile_size" and isinstance(value, (list, tuple)) and len(value) == 1:
            value = value[0]
        kwargs[s.name] = value
    return dataclasses.replace(base, **kwargs) if base is not None else GBConfig(**kwargs)
