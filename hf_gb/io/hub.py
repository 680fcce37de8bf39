"""Compressed checkpoints to the Hugging Face Hub: `push_folder` uploads a checkpoint folder, `push_to_hub` saves
a bottleneck and uploads it (the download side is `hf_gb.io.download`).

Only the compressed files travel: ``gb_model.safetensors``, ``gb_config.json``, the base model's configs, tokenizer
files and the model card; optimizer, scheduler and RNG state of a training checkpoint stay local unless asked for.
The endpoint, token and cache are ``huggingface_hub``'s own settings (``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HOME``).

Example (needs a Hub token and network)::

    >>> import hf_gb
    >>> gb = hf_gb.GenomicBottleneck(model, hf_gb.GBConfig(compression=50))  # doctest: +SKIP
    >>> gb.push_to_hub("me/tiny-bert-gb")  # doctest: +SKIP
    >>> model = hf_gb.load_compressed("me/tiny-bert-gb")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from typing import Any

from ..files import PUSH_IGNORED, README_NAME, TRAINING_STATE_PATTERNS, PathLike, is_inside
from .checkpoint import save_compressed
from .checks import check_compressed_folder
from .model_card import SECTION_END, SECTION_START

logger = logging.getLogger(__name__)

__all__ = ["push_folder", "push_to_hub"]

ALWAYS_IGNORED = PUSH_IGNORED  # the name of earlier versions


def _skip_outside_links(root: str):
    """A ``shutil.copytree`` ignore function: symbolic links that lead out of ``root`` are never followed."""
    def ignore(directory: str, names: list[str]) -> set[str]:
        out = set()
        for name in names:
            path = os.path.join(directory, name)
            if os.path.islink(path) and not is_inside(path, root):
                logger.warning("Not copying %s: a symbolic link to %s, outside %s", path, os.path.realpath(path),
                               root)
                out.add(name)
        return out

    return ignore


def _card_for_repo(readme: str, repo_id: str) -> str:
    """The README with the load snippets in our section pointing at ``repo_id`` instead of a local folder."""
    if SECTION_START not in readme or SECTION_END not in readme:
        return readme
    start, end = readme.index(SECTION_START), readme.index(SECTION_END)
    section = readme[start:end]
    section = re.sub(r'(load_compressed\(|from_pretrained\()"[^"]*"', lambda m: f'{m[1]}"{repo_id}"', section)
    section = re.sub(r"(hf-gb decompress )\S+", lambda m: f"{m[1]}{repo_id}", section)
    return readme[:start] + section + readme[end:]


def push_folder(
    folder: PathLike,
    repo_id: str,
    *,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    path_in_repo: str | None = None,
    include_training_state: bool = False,
    ignore_patterns: list[str] | None = None,
):
    """Upload a compressed checkpoint folder to ``repo_id`` (created if needed) and return the ``CommitInfo``.

    The card's load snippet is pointed at ``repo_id``. ``revision`` names a branch (created from ``main`` if it is
    missing); training state (`TRAINING_STATE_PATTERNS`) is left out unless ``include_training_state``.
    """
    from huggingface_hub import HfApi

    folder = check_compressed_folder(folder)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision not in (None, "main"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    ignore = [*ALWAYS_IGNORED, *(ignore_patterns or [])]
    if not include_training_state:
        ignore += TRAINING_STATE_PATTERNS
    with tempfile.TemporaryDirectory(prefix="hf_gb-push-") as stage:
        # A linked copy of the folder whose README loads from the repo rather than from this machine's path.
        patterns, links = shutil.ignore_patterns(".tmp-*", "checkpoint-*", "runs"), _skip_outside_links(folder)
        shutil.copytree(folder, stage, dirs_exist_ok=True, copy_function=_link_or_copy,
                        ignore=lambda d, names: patterns(d, names) | links(d, names))
        readme = os.path.join(stage, README_NAME)
        if os.path.isfile(readme):
            with open(readme, encoding="utf-8") as f:
                text = f.read()
            os.remove(readme)  # a hard link: write a new file, never through the link into the user's README
            with open(readme, "w", encoding="utf-8") as f:
                f.write(_card_for_repo(text, repo_id))
        logger.info("Pushing %s to %s", folder, repo_id)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=stage,
            path_in_repo=path_in_repo,
            commit_message=commit_message or "Upload compressed model (hf_gb)",
            revision=revision,
            create_pr=create_pr,
            ignore_patterns=ignore,
        )


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(os.path.realpath(src), dst)  # a hard link to the file itself, never to a symbolic link
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _remote_readme(repo_id: str, revision: str | None, token: Any, into: str) -> None:
    """Download the repo's README into ``into`` (so ours updates it) when there is one."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    try:
        path = hf_hub_download(repo_id, README_NAME, revision=revision, token=token,
                               cache_dir=os.path.join(into, ".tmp-cache"))
    except (EntryNotFoundError, RevisionNotFoundError):
        return
    shutil.copyfile(path, os.path.join(into, README_NAME))
    shutil.rmtree(os.path.join(into, ".tmp-cache"), ignore_errors=True)


def push_to_hub(
    gb: Any,
    repo_id: str,
    *,
    processing_class: Any = None,
    model_card_kwargs: dict[str, Any] | None = None,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
):
    """Save the compressed checkpoint of ``gb`` to a temporary folder and push it to ``repo_id``.

    A README already in the repo is updated (our section replaced, its text and metadata kept), not overwritten.
    Returns the ``CommitInfo``.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision not in (None, "main"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hf_gb-push-") as folder:
        _remote_readme(repo_id, revision, token, folder)
        card_kwargs = {"repo_id": repo_id, **(model_card_kwargs or {})}
        save_compressed(gb, folder, processing_class=processing_class, model_card_kwargs=card_kwargs)
        return push_folder(folder, repo_id, commit_message=commit_message, token=token, revision=revision,
                           create_pr=create_pr)
