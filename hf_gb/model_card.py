"""Model cards for compressed checkpoints, generated through ``huggingface_hub.ModelCard``."""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)


def write_model_card(gb, directory: str, target_directory: str | None = None, **kwargs: Any) -> str:
    """Write ``README.md`` describing the compressed checkpoint of ``gb`` into ``directory``."""
    from huggingface_hub import ModelCard, ModelCardData

    stats = gb.stats()
    data = ModelCardData(library_name="hf_gb", tags=["genomic-bottleneck", "hf_gb"])
    text = (
        f"---\n{data.to_yaml()}\n---\n\n# Compressed with hf_gb\n\n"
        f"Covered compression: {stats['covered_compression']:.1f}x; "
        f"overall compression: {stats['overall_compression']:.2f}x.\n"
    )
    card = ModelCard(text)
    path = os.path.join(directory, "README.md")
    card.save(path)
    return path
