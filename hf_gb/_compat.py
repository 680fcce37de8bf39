"""Module paths of the flat layout before the layers (``hf_gb.bank``, ``hf_gb.trainer``, ...), kept working.

`MOVED` is the one table: each old module and the new modules its names now live in (searched in order), with
`RENAMED` for the few names that moved under another name. Importing an old module gives a stand-in whose names are
looked up in the new modules on first use, each with one ``DeprecationWarning`` that names the new path; the objects
are the new ones (``hf_gb.bank.MLPBank is hf_gb.engine.families.MLPBank``). Assigning to a stand-in does not reach
the new module: patch the new one. `install` puts the finder on ``sys.meta_path``; ``hf_gb/__init__.py`` calls it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings
from typing import Any

# old module (under hf_gb) -> new modules (under hf_gb), searched in this order for each name
MOVED: dict[str, tuple[str, ...]] = {
    "accelerate_plugin": ("training.plugin",),
    "bank": ("engine.bank", "engine.registry", "engine.families", "engine.families.separable"),
    "bottleneck": ("io.pretrained", "engine.bottleneck", "engine.planning", "engine.gains"),
    "checkpoint": ("files", "io.checkpoint", "io.pretrained", "io.architecture", "io.checks", "io.download",
                   "engine.config"),
    "checkpoint_checks": ("io.checks",),
    "config": ("engine.config",),
    "distill": ("compress.distill",),
    "distill_data": ("compress.data",),
    "distributed": ("training.distributed",),
    "families": ("engine.families", "engine.families.mlp", "engine.families.deep", "engine.families.shared"),
    "hub": ("files", "io.hub", "io.download", "io.checks"),
    "kernels": ("engine.kernels",),
    "layers": ("engine.layers",),
    "model_card": ("io.model_card",),
    "native": ("engine.native",),
    "regression": ("compress.regression",),
    "settings": ("training.settings",),
    "sharding": ("engine.shards",),
    "tiling": ("engine.tiling", "engine.codes"),
    "trainer": ("training.trainer", "training.arguments", "io.checks"),
    "trainer_deepspeed": ("training.deepspeed",),
    "trainer_fsdp": ("training.fsdp",),
}
# old module -> {name: "new module:dotted name there"} for the names not found under their old name
RENAMED: dict[str, dict[str, str]] = {
    "bank": {"_pick": "engine.bank:pick", "_randn": "engine.bank:randn_parameter", "_scatter": "engine.bank:scatter"},
    "bottleneck": {"_local": "engine.shards:local_part"},
    "checkpoint": {"_GNET_PREFIX": "io.checks:GNET_PREFIX", "_MODEL_PREFIX": "io.checks:MODEL_PREFIX",
                   "_build_model": "io.architecture:build_model", "_check_layout": "io.checks:check_layout",
                   "_model_class": "io.architecture:model_class_for", "built_class": "engine.shards:model_class"},
    "sharding": {"gathered": "engine.bottleneck:Bottleneck.gathered", "rebind": "engine.bottleneck:Bottleneck.rebind"},
    "trainer": {"_CHECKPOINT_RE": "io.checks:CHECKPOINT_RE"},
}
_PACKAGE = "hf_gb"


def _new(module: str) -> types.ModuleType:
    return importlib.import_module(f"{_PACKAGE}.{module}")


def _lookup(module: str, dotted: str) -> Any:
    value: Any = _new(module)
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


class _MovedModule(types.ModuleType):
    """Stand-in for an old module: each name is found in the new modules on first use, with one warning."""

    def __getattr__(self, name: str) -> Any:
        old = self.__name__[len(_PACKAGE) + 1 :]
        if name == "__all__":  # `from <old> import *`: what the new modules export
            return sorted({n for m in MOVED[old] for n in getattr(_new(m), "__all__", [])})
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        if name in RENAMED.get(old, {}):
            module, dotted = RENAMED[old][name].split(":")
            value = _lookup(module, dotted)
        else:
            for module in MOVED[old]:
                new = _new(module)
                if hasattr(new, name):
                    value, dotted = getattr(new, name), name
                    break
            else:
                raise AttributeError(f"module {self.__name__!r} has no attribute {name!r} (it moved: see "
                                     f"{', '.join(f'{_PACKAGE}.{m}' for m in MOVED[old])})")
            home = getattr(value, "__module__", None)  # a class or function: name the module that defines it
            if getattr(value, "__name__", None) == name and isinstance(home, str) and home.startswith(_PACKAGE + "."):
                module = home[len(_PACKAGE) + 1 :]
        warnings.warn(f"{self.__name__}.{name} is deprecated; use {_PACKAGE}.{module}.{dotted}", DeprecationWarning,
                      stacklevel=2)
        setattr(self, name, value)  # found once: later uses do not come here (or warn) again
        return value

    def __dir__(self) -> list[str]:
        old = self.__name__[len(_PACKAGE) + 1 :]
        names = {n for m in MOVED[old] for n in dir(_new(m))}
        return sorted(names | set(RENAMED.get(old, {})))


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old module paths of `MOVED` and loads each as a `_MovedModule`."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname.startswith(_PACKAGE + ".") and fullname[len(_PACKAGE) + 1 :] in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        new = ", ".join(f"{_PACKAGE}.{m}" for m in MOVED[spec.name[len(_PACKAGE) + 1 :]])
        return _MovedModule(spec.name, f"Deprecated path; its names now live in {new}.")

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def install() -> None:
    """Put the finder of the old module paths first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
