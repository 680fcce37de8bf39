"""hf_gb: the genomic bottleneck for the Hugging Face stack.

Small MLPs (g-nets) predict every covered weight of a model from a binary code of its position, so only the
g-nets are trained and stored. See README.md for the Trainer, Accelerate and checkpoint APIs.
"""

from importlib import import_module
from typing import Any

from . import families as _families  # noqa: F401  (registers the g-net families beyond "mlp")
from .bottleneck import GenomicBottleneck
from .config import GBConfig
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
    "GBPlugin": ".accelerate_plugin",
    "GBTrainer": ".trainer",
    "GBTrainingArguments": ".trainer",
    "load_compressed": ".checkpoint",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    if name == "metrics":  # `hf_gb.metrics.path("accuracy")` without importing the submodule first
        return import_module(".metrics", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
