"""Files and the Hub: compressed checkpoints written and checked, downloaded and pushed, with their model card.

Bottom up: `checks` (what a checkpoint folder must hold, read from metadata and shapes alone), `model_card`,
`architecture` (the model a checkpoint describes), `checkpoint` (save and load a bottleneck's state), `download`,
`hub` (upload), `pretrained` (`GenomicBottleneck`, the engine's bottleneck with these methods, and
`load_compressed`) and `loader` (transformers' own ``from_pretrained`` and ``pipeline`` on compressed
checkpoints). Imports torch and the engine at import time; safetensors, transformers and huggingface_hub only inside
the functions that need them.
"""

from .pretrained import GenomicBottleneck, load_compressed

__all__ = ["GenomicBottleneck", "load_compressed"]
