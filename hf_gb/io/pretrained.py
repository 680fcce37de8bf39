"""`GenomicBottleneck`, the bottleneck users build: the engine's `Bottleneck` plus its checkpoint and Hub methods,
and `load_compressed`, which loads a compressed checkpoint as the plain model it predicts.

Loading reads and checks ``gb_config.json`` and the safetensors header first, builds the model on the meta device
(`hf_gb.io.architecture`) and checks every tensor's shape against what the files hold (`hf_gb.io.checks`), before
anything large is allocated; then the bottleneck is built without an init and the files' state is loaded into it
(`hf_gb.io.checkpoint`).
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import torch
from torch import nn

from ..engine.bottleneck import Bottleneck
from ..engine.config import read_config_json
from ..files import (
    CONFIG_NAME,
    GB_FILES,
    PathLike,
    is_inside,
    is_training_state,
    make_staging,
    publish,
    regular_files,
)
from .architecture import build_model
from .checkpoint import load_checkpoint_state, save_compressed
from .checks import check_sizes, read_header
from .download import resolve_checkpoint
from .hub import push_to_hub

logger = logging.getLogger(__name__)

__all__ = ["GenomicBottleneck", "bottleneck_from_pretrained", "decompress", "load_compressed"]


class GenomicBottleneck(Bottleneck):
    """g-nets that predict the covered weights of ``model``, with compressed checkpoints and the Hub.

    Everything of `hf_gb.engine.Bottleneck` (``predict_weights``, ``push_gradients``, ``stats``, ...; its docstring
    has the optimizer step), plus `save_pretrained`, `from_pretrained` and `push_to_hub`. The model is referenced,
    not registered: ``parameters()`` and ``state_dict()`` of the bottleneck are exactly the g-net parameters (and
    their output scales).

    Example::

        >>> import tempfile, torch
        >>> from hf_gb import GBConfig, GenomicBottleneck
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
        >>> gb = GenomicBottleneck(model, GBConfig(hidden_dim=8, tile_size=32))
        >>> gb.stats()["covered_params"]
        9472
        >>> folder = gb.save_pretrained(tempfile.mkdtemp())
        >>> fresh = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
        >>> GenomicBottleneck.from_pretrained(folder, model=fresh).stats()["covered_params"]
        9472
    """

    def save_pretrained(self, save_directory: str, processing_class: Any = None, **kwargs: Any) -> str:
        """Write the compressed checkpoint (see `hf_gb.io.checkpoint.save_compressed`); loadable with
        `hf_gb.load_compressed`."""
        return save_compressed(self, save_directory, processing_class=processing_class, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: PathLike,
        model: nn.Module | None = None,
        device: str | torch.device | None = None,
        dtype: Any = None,
        **hub_kwargs: Any,
    ) -> GenomicBottleneck:
        """Restore a bottleneck from a compressed checkpoint (a folder or a Hub repo id), onto ``model`` or a model
        built from its ``config.json``.

        ``dtype`` defaults to the one ``config.json`` records (the saved model's); ``torch_dtype`` is accepted as
        the older name of ``dtype``, as in transformers. ``revision``, ``token``, ``cache_dir``,
        ``local_files_only`` and ``subfolder`` go to `hf_gb.io.download.resolve_checkpoint`.
        """
        dtype = hub_kwargs.pop("torch_dtype", None) if dtype is None else dtype
        directory = resolve_checkpoint(path_or_repo, **hub_kwargs)
        info = read_config_json(os.path.join(directory, CONFIG_NAME))
        header = read_header(directory, info["save_id"], info["gb_config"], info["format_version"])

        def check(m: nn.Module) -> None:
            check_sizes(m, info, header, directory)

        if model is None:
            model = build_model(directory, device, dtype, check=check)
        else:
            check(model)
        gb = cls(model, info["gb_config"], init_gnets=False)  # the checkpoint replaces the init
        load_checkpoint_state(gb, directory, info)
        return gb

    def push_to_hub(self, repo_id: str, processing_class: Any = None, **kwargs: Any) -> Any:
        """Push the compressed checkpoint (with its model card) to the Hub repo ``repo_id``; see
        `hf_gb.io.hub.push_to_hub`."""
        return push_to_hub(self, repo_id, processing_class=processing_class, **kwargs)


def bottleneck_from_pretrained(path_or_repo: PathLike, **kwargs: Any) -> GenomicBottleneck:
    """`GenomicBottleneck.from_pretrained` as a function."""
    return GenomicBottleneck.from_pretrained(path_or_repo, **kwargs)


def load_compressed(path_or_repo: PathLike, **kwargs: Any) -> nn.Module:
    """Load a compressed checkpoint as a plain model (e.g. a transformers ``PreTrainedModel``) in eval mode.

    ``path_or_repo`` is a local folder or a Hub repo id; ``revision``, ``token``, ``cache_dir`` and
    ``local_files_only`` go to ``huggingface_hub``; ``device``, ``dtype`` (default: the saved model's) and
    ``model`` (an instance to load into instead of building one from ``config.json``) are honoured too.

    Example::

        >>> import hf_gb
        >>> model = hf_gb.load_compressed("out/final")  # doctest: +SKIP
        >>> model(**inputs).logits  # doctest: +SKIP
    """
    gb = GenomicBottleneck.from_pretrained(path_or_repo, **kwargs)
    model = gb.model
    model.eval()
    return model


def decompress(path_or_repo: PathLike, out_dir: PathLike, **hub_kwargs: Any) -> nn.Module:
    """Write the model a compressed checkpoint (a folder or a Hub repo id) predicts into ``out_dir`` as a standard
    transformers folder (which ``AutoModel.from_pretrained`` loads without hf_gb), with the checkpoint's tokenizer
    and processor files; returns the model. ``hub_kwargs`` go to `hf_gb.io.download.resolve_checkpoint`.

    Everything is written into a staging folder and renamed in, weights last: a crash leaves each file of the
    folder either the old or the new one, never a partial one. Weight files of an earlier save in ``out_dir``
    that this one does not replace are removed.
    """
    directory = resolve_checkpoint(path_or_repo, **hub_kwargs)
    out_dir = os.fspath(out_dir)
    model = load_compressed(directory)
    if not hasattr(model, "save_pretrained"):
        raise ValueError(f"{directory} holds a {type(model).__name__}, which has no save_pretrained")
    staging = make_staging(out_dir)
    try:
        model.save_pretrained(staging)
        for name in os.listdir(directory):  # tokenizer / processor files travel with the model
            src = os.path.join(directory, name)
            if name in GB_FILES or is_training_state(name) or name.startswith(".") or not os.path.isfile(src):
                continue
            if os.path.islink(src) and not is_inside(src, directory):
                logger.warning("Not copying %s: a symbolic link to %s, outside %s", src, os.path.realpath(src),
                               directory)
                continue
            shutil.copyfile(src, os.path.join(staging, name))
        written = set(os.listdir(staging))
        weights = sorted(n for n in written if n.startswith("model") and ".safetensors" in n)
        publish(staging, out_dir, last=weights)
        for name in regular_files(out_dir):  # weight files of an earlier save that this one does not replace
            if name.startswith("model") and name.endswith((".safetensors", ".safetensors.index.json", ".bin")) \
                    and name not in written:
                os.remove(os.path.join(out_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model
