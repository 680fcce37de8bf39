"""Compressed checkpoint files: save a bottleneck (`save_compressed`) and load their state back into one
(`load_checkpoint_state`); `hf_gb.io.pretrained` builds the model and bottleneck to load into.

A compressed checkpoint is a folder ``huggingface_hub`` can push as is:

- ``config.json``: the base model's transformers config (when the model has one), with the model's ``dtype``, and
  what transformers' own loaders read (`hf_gb.io.loader`): a ``quantization_config`` with what ``gb_config.json``
  holds, and a ``transformers_weights`` sentence that makes transformers without hf_gb refuse the folder;
- ``gb_config.json``: the `GBConfig`, the hf_gb version, every covered tensor with its shape and tile, and the id
  of the save;
- ``gb_model.safetensors``: g-net tensors (``gnet.<bank>.<name>``) and the uncompressed model tensors
  (``model.<name>``); its metadata names the format and version, the hf_gb version and the same save id;
- tokenizer / processor files when known, and a model card ``README.md``.

Saving stages every file in a ``.tmp-hf_gb-*`` folder beside the target and renames them in, the two hf_gb files
last, so no file is ever half written. A save over an existing checkpoint that is killed between those two renames
leaves files of two saves; loading detects that (the save ids differ) and says so instead of loading a mix.

Loading checks the names and shapes of every g-net tensor against the bottleneck, and loads the uncompressed ones
through the model's own ``load_state_dict`` (its hooks and overrides run; it checks their shapes), after checking
that none is missing (the checks before anything large is allocated are `hf_gb.io.pretrained`'s). Tensors in the
file that the model has no place for are an error; g-net tensors of another dtype than the bank's, and non-finite
g-net values, are loaded with a warning.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from typing import Any

import torch
from torch import nn

from ..engine.bottleneck import Bottleneck
from ..engine.config import config_json, file_format, read_config_json
from ..engine.shards import distribute_like, model_class
from ..files import (
    CONFIG_NAME,
    FORMAT_NAME,
    MODEL_CONFIG_NAME,
    QUANT_METHOD,
    TRANSFORMERS_WEIGHTS_NOTE,
    WEIGHTS_NAME,
    PathLike,
    make_staging,
    new_save_id,
    publish,
)
from ..version import __version__
from .checks import GNET_PREFIX, MODEL_PREFIX, check_layout, read_header, settings_json, warn_non_finite
from .model_card import write_model_card

logger = logging.getLogger(__name__)

__all__ = ["gb_state_tensors", "load_checkpoint_state", "load_state", "model_dtype", "read_tensors",
           "save_compressed"]


# ----------------------------------------------------------------------------- save
def gb_state_tensors(gb: Bottleneck) -> dict[str, torch.Tensor]:
    """Everything the checkpoint's safetensors file holds: g-net tensors and uncompressed model tensors."""
    tensors = {GNET_PREFIX + k: v for k, v in gb.state_dict().items()}
    seen: dict[int, str] = {}
    for name, value in gb.uncompressed_state_dict().items():
        if id(value) in seen:  # tied tensors are stored once; loading re-ties them through the model
            continue
        seen[id(value)] = name
        tensors[MODEL_PREFIX + name] = value
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's floating-point parameters (the first one's), as transformers records it."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def save_compressed(
    gb: Bottleneck,
    save_directory: PathLike,
    processing_class: Any = None,
    model_card: bool = True,
    model_card_kwargs: dict[str, Any] | None = None,
) -> str:
    """Write the compressed checkpoint of ``gb`` (and its model's config) into ``save_directory``.

    Files are staged in a temporary folder beside the target and moved in by rename, the two hf_gb files last, so
    an interrupted save never leaves a half-written file where a good one was, and a folder holding files of two
    saves is refused on load (see the module docstring). Staging folders of earlier interrupted saves are removed.
    Returns the folder.
    """
    from safetensors.torch import save_file

    save_directory = os.fspath(save_directory)
    staging = make_staging(save_directory)
    try:
        save_id = new_save_id()
        tensors = gb_state_tensors(gb)
        warn_non_finite({k: v for k, v in tensors.items() if k.startswith(GNET_PREFIX)}, save_directory)
        metadata = {"format": FORMAT_NAME, "format_version": str(file_format(gb.config)), "hf_gb_version": __version__,
                    "save_id": save_id, "gb_settings": settings_json(gb.config)}
        save_file(tensors, os.path.join(staging, WEIGHTS_NAME), metadata=metadata)
        gb_config = config_json(gb.config, [t.to_json() for t in gb.covered], save_id)
        with open(os.path.join(staging, CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(gb_config)
        model_config = getattr(gb.model, "config", None)
        if model_config is not None and hasattr(model_config, "save_pretrained"):
            model_config = copy.deepcopy(model_config)
            model_config.architectures = [model_class(gb.model).__name__]  # what load_compressed rebuilds
            dtype = model_dtype(gb.model)
            if dtype is not None:
                model_config.dtype = dtype  # what load_compressed restores, as transformers' save_pretrained does
            model_config.save_pretrained(staging)
            _note_for_transformers(os.path.join(staging, MODEL_CONFIG_NAME), gb_config)
        generation_config = getattr(gb.model, "generation_config", None)
        if generation_config is not None and hasattr(generation_config, "save_pretrained"):
            try:
                generation_config.save_pretrained(staging)
            except Exception as e:  # an invalid generation config must not cost the user the checkpoint
                logger.warning("Not saving generation_config.json: %s", e)
        if processing_class is not None:
            processing_class.save_pretrained(staging)
        if model_card:
            write_model_card(gb, staging, target_directory=save_directory, **(model_card_kwargs or {}))
        publish(staging, save_directory, last=(CONFIG_NAME, WEIGHTS_NAME))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return save_directory


def _note_for_transformers(path: str, gb_config: str) -> None:
    """Add to the model's ``config.json`` what transformers' loaders need to know (see `hf_gb.io.loader`): a
    ``quantization_config`` for hf_gb's registered quantizer, holding what ``gb_config.json`` holds, and the
    ``transformers_weights`` sentence that makes transformers without hf_gb refuse the folder loudly."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    data["quantization_config"] = {"quant_method": QUANT_METHOD, **json.loads(gb_config)}
    data["transformers_weights"] = TRANSFORMERS_WEIGHTS_NOTE
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- load
def read_tensors(directory: str) -> dict[str, torch.Tensor]:
    """Load the checkpoint's safetensors file, with errors that name it (no save-id check; see `read_header`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} is not a compressed checkpoint: {WEIGHTS_NAME} is missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path} is corrupt or truncated: {e}") from e


def load_checkpoint_state(gb: Bottleneck, directory: str, info: dict[str, Any] | None = None) -> None:
    """Load the g-net and uncompressed tensors of the checkpoint in ``directory`` into ``gb`` and its model (in
    place: an optimizer keeps its parameters), checking names, shapes and the save id; then predict the weights."""
    info = info if info is not None else read_config_json(os.path.join(directory, CONFIG_NAME))
    read_header(directory, info["save_id"], info["gb_config"], info["format_version"], info.get("path"))
    check_layout(gb, info["tensors"], directory, info.get("path"))
    tensors = read_tensors(directory)
    if gb.sharded:  # FSDP2: each rank loads its own rows of the sharded uncompressed tensors
        distribute_like(gb.uncompressed_state_dict(), tensors, prefix=MODEL_PREFIX)
    load_state(gb, tensors, directory)


def load_state(gb: Bottleneck, tensors: dict[str, torch.Tensor], directory: str) -> None:
    """Load g-net and uncompressed tensors into ``gb`` and its model: the g-nets checked name by name and shape by
    shape, the uncompressed tensors through the model's own ``load_state_dict`` (see `_load_uncompressed`)."""
    where = os.path.join(directory, WEIGHTS_NAME)
    unknown = sorted(k for k in tensors if not k.startswith((GNET_PREFIX, MODEL_PREFIX)))
    if unknown:
        raise ValueError(f"{where} holds tensors that are neither g-net nor model tensors: {unknown[:5]}")
    gnet = {k[len(GNET_PREFIX) :]: v for k, v in tensors.items() if k.startswith(GNET_PREFIX)}
    plain = {k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    own = gb.state_dict()
    # Format 1 stored a frozen, always-zero b2 for centred banks; format 2 has none (centring removes it).
    gnet = {k: v for k, v in gnet.items() if k in own or not (k.endswith(".b2") and gb.config.center)}
    for name, value in own.items():
        if name not in gnet:
            raise ValueError(f"{where} lacks g-net tensor {name!r}; is it a checkpoint for another architecture?")
        if tuple(gnet[name].shape) != tuple(value.shape):
            raise ValueError(
                f"g-net tensor {name!r}: {where} holds shape {tuple(gnet[name].shape)}, "
                f"this model needs {tuple(value.shape)}"
            )
    unexpected = sorted(set(gnet) - own.keys())
    if unexpected:
        raise ValueError(f"{where} holds g-net tensors this model has no place for: {unexpected[:5]}")
    cast = sorted(f"{k} ({gnet[k].dtype} -> {v.dtype})" for k, v in own.items() if gnet[k].dtype != v.dtype)
    if cast:
        logger.warning("%s: g-net tensors stored in another dtype than the g-nets use are cast: %s", where,
                       ", ".join(cast[:5]) + (f" and {len(cast) - 5} more" if len(cast) > 5 else ""))
    warn_non_finite(gnet, where)
    gb.load_state_dict(gnet)
    _load_uncompressed(gb, plain, where)
    gb.predict_weights(sample=False, keep_graph=False)


def _load_uncompressed(gb: Bottleneck, plain: dict[str, torch.Tensor], where: str) -> None:
    """The uncompressed tensors through the model's own ``load_state_dict``, as Trainer loads a model: its overrides
    and load hooks run (e.g. a buffer that takes the saved shape, a renamed key). Every uncompressed tensor must be in
    the file (tied ones once), and every model tensor of the file must have a place in the model."""
    targets = gb.uncompressed_state_dict()
    by_id: dict[int, list[str]] = {}
    for name, value in targets.items():
        by_id.setdefault(id(value), []).append(name)
    for names in by_id.values():
        if not any(n in plain for n in names):
            raise ValueError(f"{where} lacks uncompressed tensor {names[0]!r}")
    extra = sorted(set(plain) - targets.keys())
    if extra:
        raise ValueError(f"{where} holds model tensors this model has no place for: {extra[:5]}")
    try:
        result = gb.model.load_state_dict(plain, strict=False)  # the covered weights are missing: predicted below
    except RuntimeError as e:  # e.g. "size mismatch for norm.weight: copying a param with shape ..."
        raise ValueError(f"{where}: {type(gb.model).__name__} cannot load its uncompressed tensors: {e}") from e
    unexpected = sorted(getattr(result, "unexpected_keys", None) or [])
    if unexpected:
        raise ValueError(f"{where} holds model tensors this model has no place for: {unexpected[:5]}")
