"""The files of a compressed checkpoint: their names, what never travels with them, and how they are written.

Every module that reads, writes, copies or uploads checkpoint files takes the names and patterns from here. Writes
go through a staging folder beside the target and `os.replace`, so an interrupted write never leaves a partial file
where a complete one was; `save_id` ties the two hf_gb files of one save together, so that a reader can tell a
folder whose save was interrupted between the two renames (see `hf_gb.io.checkpoint.read_tensors`).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable
from typing import Union

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]  # noqa: UP007 (a runtime alias)

CONFIG_NAME = "gb_config.json"
WEIGHTS_NAME = "gb_model.safetensors"
MODEL_CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
README_NAME = "README.md"
# What `GBPlugin` adds to an `accelerator.save_state()` folder: the g-nets, and the step count in the metadata.
PLUGIN_STATE_NAME = "hf_gb_plugin_state.safetensors"
# Written last by transformers' Trainer into every checkpoint-N folder.
TRAINER_STATE_NAME = "trainer_state.json"
FORMAT_NAME = "hf_gb"
# What a compressed checkpoint's config.json tells transformers (`hf_gb.io.loader`): `quantization_config` names
# the method hf_gb registers with transformers; `transformers_weights` holds this sentence instead of a file name, so
# that transformers without hf_gb refuses every load of the folder with an error that quotes it (hf_gb's loader puts
# WEIGHTS_NAME there before transformers looks for the weights). It must not end in ".safetensors".
QUANT_METHOD = "hf_gb"
TRANSFORMERS_WEIGHTS_NOTE = (
    "none: this is a compressed hf_gb checkpoint, whose weights the g-nets in gb_model.safetensors predict. "
    "Install hf_gb (pip install hf_gb) and `import hf_gb` before from_pretrained or pipeline, or load it with "
    "hf_gb.load_compressed"
)
STAGING_PREFIX = ".tmp-hf_gb-"

# The compressed model itself (what `hf-gb decompress` must not copy into a plain transformers folder).
GB_FILES = (WEIGHTS_NAME, CONFIG_NAME, MODEL_CONFIG_NAME, GENERATION_CONFIG_NAME, README_NAME)
# Files of a Trainer checkpoint that resume training but are not part of the compressed model.
TRAINING_STATE_PATTERNS = [
    "optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt", "rng_state*.pth", "training_args.bin",
    TRAINER_STATE_NAME, "gb_trainer_state.json",
]
# Never uploaded: partial saves, nested checkpoints and logs.
PUSH_IGNORED = [".tmp-*", "*/.tmp-*", "checkpoint-*", "last-checkpoint/*", "runs/*"]
# Left out when downloading a checkpoint repo: training state, nested checkpoints, logs.
DOWNLOAD_IGNORED = [
    "optimizer.*", "scheduler.pt", "scaler.pt", "rng_state*", "training_args.bin", "runs/*", "checkpoint-*/*",
    "last-checkpoint/*",
]
TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "tokenizer.model")


def new_save_id() -> str:
    """A fresh id written into both hf_gb files of one save."""
    return uuid.uuid4().hex


def is_training_state(name: str) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in TRAINING_STATE_PATTERNS)


def is_inside(path: str, root: str) -> bool:
    """Whether ``path``, with every symbolic link resolved, lies inside the folder ``root``.

    For a snapshot of the ``huggingface_hub`` cache (``.../snapshots/<revision>``), whose files are links into the
    repo's ``blobs`` folder, ``root`` is the repo's cache folder.
    """
    root = os.path.realpath(root)
    repo = os.path.dirname(os.path.dirname(root))
    if os.path.basename(os.path.dirname(root)) == "snapshots" and os.path.basename(repo).startswith(
            ("models--", "datasets--", "spaces--")) and os.path.isdir(os.path.join(repo, "blobs")):
        root = repo
    return os.path.realpath(path).startswith(root + os.sep)


def regular_files(directory: str) -> list[str]:
    """Names of the files directly in ``directory``; symbolic links out of it are left out (never followed)."""
    out = []
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if os.path.isfile(path) and (not os.path.islink(path) or is_inside(path, directory)):
            out.append(name)
    return sorted(out)


def file_sizes(directory: str) -> list[tuple[str, int]]:
    """``(name, bytes)`` of every file `regular_files` finds in ``directory``."""
    return [(n, os.path.getsize(os.path.join(directory, n))) for n in regular_files(directory)]


def has_tokenizer(model: str) -> bool:
    """Whether ``model`` (a folder; Hub ids are assumed to) has tokenizer files worth carrying along."""
    if not os.path.isdir(model):
        return True
    return any(os.path.isfile(os.path.join(model, n)) for n in TOKENIZER_NAMES)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and one rename.

    A symbolic link at ``path`` is replaced by the file, never written through.
    """
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` for a temporary path beside ``path``, then rename it onto ``path``."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=STAGING_PREFIX, suffix=os.path.basename(path),
                               dir=os.path.dirname(path) or ".")
    os.close(fd)
    try:
        write(tmp)
        _publish_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _publish_mode(path: str) -> None:
    """Temporary files are private (0600); the files they become get the usual mode (0666 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def make_staging(directory: str) -> str:
    """A new, empty staging folder inside ``directory`` (created if needed); stale ones are removed first."""
    os.makedirs(directory, exist_ok=True)
    remove_stale_staging(directory)
    return tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory)


def remove_stale_staging(directory: str) -> list[str]:
    """Delete the staging folders an interrupted hf_gb save left in ``directory``; returns their names.

    Only folders named ``.tmp-hf_gb-*`` are touched: they hold nothing but copies of a save that never finished.
    """
    removed = []
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        path = os.path.join(directory, name)
        if name.startswith(STAGING_PREFIX) and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    if removed:
        logger.info("Removed %d staging folder(s) of an interrupted save in %s", len(removed), directory)
    return removed


def publish(staging: str, directory: str, last: Iterable[str] = ()) -> None:
    """Move every file of ``staging`` into ``directory`` by rename (one `os.replace` each), ``last`` at the end.

    A symbolic link in ``directory`` with the name of a staged file is replaced, never written through.
    """
    last = list(last)
    names = sorted(os.listdir(staging), key=lambda n: (last.index(n) if n in last else -1, n))
    for name in names:
        staged = os.path.join(staging, name)
        if os.path.isfile(staged):
            _publish_mode(staged)
        target = os.path.join(directory, name)
        if os.path.isdir(target) and not os.path.islink(target):
            raise IsADirectoryError(f"Cannot write {name} into {directory}: a folder of that name is in the way")
        os.replace(staged, target)
