"""Compressed checkpoints from the Hugging Face Hub: `resolve_checkpoint` turns a local folder or a Hub repo id
into a local folder (used by `hf_gb.load_compressed`), with Hub errors translated into clear ones.

Only the compressed files are downloaded: optimizer, scheduler and RNG state of a training checkpoint, nested
checkpoints and logs stay on the Hub (`hf_gb.files.DOWNLOAD_IGNORED`). The endpoint, token and cache are
``huggingface_hub``'s own settings (``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HOME``).
"""

from __future__ import annotations

import os
from typing import Any

from ..files import DOWNLOAD_IGNORED, WEIGHTS_NAME, PathLike

__all__ = ["resolve_checkpoint"]


def resolve_checkpoint(path_or_repo: PathLike, **hub_kwargs: Any) -> str:
    """A local folder, or a Hub repo id downloaded (and cached) through ``huggingface_hub``.

    ``revision`` (branch, tag or commit), ``token``, ``cache_dir``, ``local_files_only`` and ``force_download`` go
    to ``snapshot_download``, which honours ``HF_HUB_OFFLINE`` / ``HF_ENDPOINT`` and serves cached snapshots when the
    Hub cannot be reached; ``subfolder`` picks a folder inside the folder or repo (e.g. ``"last-checkpoint"``).
    Hub errors become ``FileNotFoundError`` naming the repo and revision.
    """
    path = os.fspath(path_or_repo)
    subfolder = (hub_kwargs.get("subfolder") or "").strip("/")
    if os.path.isdir(path):
        return os.path.join(path, subfolder) if subfolder else path
    if os.path.exists(path):
        raise ValueError(f"{path} is a file; a compressed checkpoint is a folder holding {WEIGHTS_NAME}")
    looks_like_repo = path.count("/") <= 1 and not path.startswith((".", "/", "~")) and path.strip() == path
    if not looks_like_repo or not path:
        raise FileNotFoundError(f"No compressed checkpoint folder at {path}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    allowed = ("revision", "token", "cache_dir", "local_files_only", "force_download")
    kwargs = {k: v for k, v in hub_kwargs.items() if k in allowed and v is not None}
    revision = kwargs.get("revision")
    where = f"Hub repo {path}" + (f" at revision {revision!r}" if revision else "")
    patterns = {"allow_patterns": [f"{subfolder}/*"]} if subfolder else {"ignore_patterns": DOWNLOAD_IGNORED}
    try:
        snapshot = snapshot_download(path, **kwargs, **patterns)
    except HFValidationError as e:
        raise FileNotFoundError(f"No compressed checkpoint folder at {path} (and it is not a Hub repo id)") from e
    except RevisionNotFoundError as e:
        raise FileNotFoundError(f"{where}: no such revision") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(
            f"No local folder {path} and no {where} you can access (private repos need token= or `hf auth login`)"
        ) from e
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"No local folder {path}, and the {where} is neither in the cache nor reachable "
            "(offline: HF_HUB_OFFLINE / local_files_only, or no connection)"
        ) from e
    except EntryNotFoundError as e:
        raise FileNotFoundError(f"{where}: {e}") from e
    if subfolder:
        snapshot = os.path.join(snapshot, subfolder)
        if not os.path.isdir(snapshot):
            raise FileNotFoundError(f"{where} has no folder {subfolder!r}")
    return snapshot
