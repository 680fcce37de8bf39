"""Text for distillation: a text file, a folder of text files, or a saved ``datasets`` dataset, split for held-out.

`load_texts` returns ``(train, held_out)`` lists of strings; `tokenize` turns a list into a ``datasets.Dataset`` of
``input_ids`` / ``attention_mask`` rows that ``DataCollatorWithPadding`` batches. Splits are stable: by a hash of
each file's relative path for folders (no file contributes to both sides), by a hash of the line for a single file.

Example::

    >>> import os, tempfile
    >>> from hf_gb.compress.data import load_texts
    >>> path = os.path.join(tempfile.mkdtemp(), "a.txt")
    >>> _ = open(path, "w").write("\\n".join(f"sentence number {i}" for i in range(100)))
    >>> train, held_out = load_texts(path, held_out_fraction=0.1)
    >>> len(train) + len(held_out), 0 < len(held_out) < 30
    (100, True)
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["load_texts", "tokenize"]

# Files of a folder that are read as text; others are skipped with a log line.
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".py", ".jsonl", ".csv", ".tsv", "")


def _bucket(key: str) -> float:
    """A stable number in [0, 1) for ``key`` (the same on every machine and Python)."""
    return int(hashlib.md5(key.encode("utf-8")).hexdigest()[:8], 16) / 16**8


def _lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _split(items: list[Any], keys: list[str], fraction: float) -> tuple[list[Any], list[Any]]:
    held = [i for i, k in enumerate(keys) if _bucket(k) < fraction]
    if not held and len(items) > 1:  # too few items for the hash to pick one: hold out the last
        held = [len(items) - 1]
    chosen = set(held)
    return [x for i, x in enumerate(items) if i not in chosen], [items[i] for i in held]


def _dataset_texts(dataset: Any, path: str) -> list[str]:
    columns = dataset.column_names
    if "text" in columns:
        column = "text"
    else:
        strings = [c for c, f in dataset.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
        if len(strings) != 1:
            raise ValueError(f"{path}: expected a 'text' column or exactly one string column, found {columns}")
        column = strings[0]
    return [t.strip() for t in dataset[column] if isinstance(t, str) and t.strip()]


def load_texts(path: str, held_out_fraction: float = 0.05) -> tuple[list[str], list[str]]:
    """``(train, held_out)`` texts from ``path``: one text per non-empty line of a text file or of every text file
    under a folder, or the ``text`` column of a dataset saved with ``save_to_disk`` (a ``DatasetDict`` uses its
    ``validation`` or ``test`` split as held-out when it has one)."""
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in (0, 1), got held_out_fraction={held_out_fraction}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no distillation data at {path}")
    if os.path.isfile(path):
        lines = _lines(path)
        train, held_out = _split(lines, [f"{i}:{t}" for i, t in enumerate(lines)], held_out_fraction)
    elif any(os.path.isfile(os.path.join(path, n)) for n in ("dataset_info.json", "dataset_dict.json")):
        train, held_out = _from_disk(path, held_out_fraction)
    else:
        files = []
        for directory, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                if name.startswith("."):
                    continue
                if os.path.splitext(name)[1].lower() not in TEXT_SUFFIXES:
                    logger.info("distillation data: skipping %s (not a text file suffix)", name)
                    continue
                files.append(os.path.relpath(os.path.join(directory, name), path))
        if not files:
            raise ValueError(f"{path} holds no text files ({', '.join(s or 'no suffix' for s in TEXT_SUFFIXES)})")
        if len(files) == 1:
            return load_texts(os.path.join(path, files[0]), held_out_fraction)
        train_files, held_files = _split(files, [f.replace(os.sep, "/") for f in files], held_out_fraction)
        train = [t for f in train_files for t in _lines(os.path.join(path, f))]
        held_out = [t for f in held_files for t in _lines(os.path.join(path, f))]
    if not train or not held_out:
        raise ValueError(f"{path}: need texts for both training and held-out, got {len(train)} and {len(held_out)}")
    return train, held_out


def _from_disk(path: str, fraction: float) -> tuple[list[str], list[str]]:
    from datasets import DatasetDict, load_from_disk

    data = load_from_disk(path)
    if isinstance(data, DatasetDict):
        if "train" not in data:
            raise ValueError(f"{path}: a DatasetDict needs a 'train' split, found {list(data)}")
        held = next((s for s in ("validation", "test") if s in data), None)
        if held is not None:
            return _dataset_texts(data["train"], path), _dataset_texts(data[held], path)
        data = data["train"]
    texts = _dataset_texts(data, path)
    return _split(texts, [f"{i}:{t}" for i, t in enumerate(texts)], fraction)


def tokenize(texts: list[str], tokenizer: Any, max_length: int = 128) -> Any:
    """A ``datasets.Dataset`` of the tokenized ``texts`` (truncated to ``max_length``, not padded)."""
    from datasets import Dataset

    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    keep = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
    return Dataset.from_dict({k: encoded[k] for k in keep})
