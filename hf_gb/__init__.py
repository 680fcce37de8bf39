"""hf_gb: the genomic bottleneck for the Hugging Face stack.

Small MLPs (g-nets) predict every covered weight of a model from a binary code of its position, so only the
g-nets are trained and stored. See README.md for the Trainer, Accelerate and checkpoint APIs, and docs/design.md
(Layout) for the subpackages: `hf_gb.engine` (the g-nets, torch only), `hf_gb.io` (checkpoint files and the Hub),
`hf_gb.training` (Trainer, Accelerate, distributed runs) and `hf_gb.compress` (regression and distillation).
"""

from importlib import import_module
from typing import Any

from . import _compat
from .engine.config import GBConfig
from .io import loader as _loader
from .io.pretrained import GenomicBottleneck
from .version import __version__

__all__ = [
    "GBConfig",
    "GBPlugin",
    "GBTrainer",
    "GBTrainingArguments",
    "GenomicBottleneck",
    "__version__",
    "load_compressed",
]

# Names whose modules import transformers or accelerate; loaded on first use so the core stays light.
_LAZY = {
    "GBPlugin": ".training.plugin",
    "GBTrainer": ".training.trainer",
    "GBTrainingArguments": ".training.arguments",
    "load_compressed": ".io.pretrained",
}

_compat.install()  # the module paths of the flat layout (hf_gb.bank, hf_gb.trainer, ...) keep working
_loader.install()  # transformers' from_pretrained and pipeline load compressed checkpoints (hf_gb.io.loader)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    if name == "metrics":  # `hf_gb.metrics.path("accuracy")` without importing the submodule first
        return import_module(".metrics", __name__)
    if name in _compat.MOVED:  # `hf_gb.config.GBConfig` after `import hf_gb`, as when the package imported them
        return import_module("." + name, __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
