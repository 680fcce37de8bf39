"""Compressed checkpoints: save a `GenomicBottleneck`, load it back, or load the plain model it predicts.

A compressed checkpoint is a folder ``huggingface_hub`` can push as is:

- ``config.json``: the base model's transformers config (when the model has one), with the model's ``dtype``;
- ``gb_config.json``: the `GBConfig`, the hf_gb version, every covered tensor with its shape and tile, and the id
  of the save;
- ``gb_model.safetensors``: g-net tensors (``gnet.<bank>.<name>``) and the uncompressed model tensors
  (``model.<name>``); its metadata names the format and version, the hf_gb version and the same save id;
- tokenizer / processor files when known, and a model card ``README.md``.

Saving stages every file in a ``.tmp-hf_gb-*`` folder beside the target and renames them in, the two hf_gb files
last, so no file is ever half written. A save over an existing checkpoint that is killed between those two renames
leaves files of two saves; loading detects that (the save ids differ) and says so instead of loading a mix.

Loading reads and checks ``gb_config.json`` and the safetensors header first, builds the model on the meta device
and checks every tensor's shape against what the files hold, before anything large is allocated. Tensors in the
file that the model has no place for are an error; g-net tensors of another dtype than the bank's, and non-finite
g-net values, are loaded with a warning.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from typing import Any

import torch
from torch import nn

from .bottleneck import GenomicBottleneck
from .checkpoint_checks import (
    GNET_PREFIX,
    MODEL_PREFIX,
    check_layout,
    check_sizes,
    read_header,
    settings_json,
    warn_non_finite,
)
from .config import FORMAT_VERSION, config_json, read_config_json
from .files import (
    CONFIG_NAME,
    FORMAT_NAME,
    MODEL_CONFIG_NAME,
    WEIGHTS_NAME,
    PathLike,
    atomic_write_text,
    make_staging,
    new_save_id,
    publish,
)
from .hub import resolve_checkpoint
from .sharding import model_class as built_class
from .version import __version__

logger = logging.getLogger(__name__)

__all__ = ["bottleneck_from_pretrained", "load_checkpoint_state", "load_compressed", "read_header",
           "save_compressed"]

_GNET_PREFIX, _MODEL_PREFIX = GNET_PREFIX, MODEL_PREFIX
_check_layout = check_layout
# Kept importable from here for code written against earlier versions (new code imports them from hf_gb.files).
_COMPAT = (atomic_write_text, resolve_checkpoint, FORMAT_NAME, read_header)


# ----------------------------------------------------------------------------- save
def gb_state_tensors(gb: GenomicBottleneck) -> dict[str, torch.Tensor]:
    """Everything the checkpoint's safetensors file holds: g-net tensors and uncompressed model tensors."""
    tensors = {_GNET_PREFIX + k: v for k, v in gb.state_dict().items()}
    seen: dict[int, str] = {}
    for name, value in gb.uncompressed_state_dict().items():
        if id(value) in seen:  # tied tensors are stored once; loading re-ties them through the model
            continue
        seen[id(value)] = name
        tensors[_MODEL_PREFIX + name] = value
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's floating-point parameters (the first one's), as transformers records it."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def save_compressed(
    gb: GenomicBottleneck,
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
        warn_non_finite({k: v for k, v in tensors.items() if k.startswith(_GNET_PREFIX)}, save_directory)
        metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "hf_gb_version": __version__,
                    "save_id": save_id, "gb_settings": settings_json(gb.config)}
        save_file(tensors, os.path.join(staging, WEIGHTS_NAME), metadata=metadata)
        with open(os.path.join(staging, CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(config_json(gb.config, [t.to_json() for t in gb.covered], save_id))
        model_config = getattr(gb.model, "config", None)
        if model_config is not None and hasattr(model_config, "save_pretrained"):
            model_config = copy.deepcopy(model_config)
            model_config.architectures = [built_class(gb.model).__name__]  # what load_compressed rebuilds
            dtype = model_dtype(gb.model)
            if dtype is not None:
                model_config.dtype = dtype  # what load_compressed restores, as transformers' save_pretrained does
            model_config.save_pretrained(staging)
        generation_config = getattr(gb.model, "generation_config", None)
        if generation_config is not None and hasattr(generation_config, "save_pretrained"):
            try:
                generation_config.save_pretrained(staging)
            except Exception as e:  # an invalid generation config must not cost the user the checkpoint
                logger.warning("Not saving generation_config.json: %s", e)
        if processing_class is not None:
            processing_class.save_pretrained(staging)
        if model_card:
            from .model_card import write_model_card

            write_model_card(gb, staging, target_directory=save_directory, **(model_card_kwargs or {}))
        publish(staging, save_directory, last=(CONFIG_NAME, WEIGHTS_NAME))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return save_directory


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


def load_checkpoint_state(gb: GenomicBottleneck, directory: str, info: dict[str, Any] | None = None) -> None:
    """Load the g-net and uncompressed tensors of the checkpoint in ``directory`` into ``gb`` and its model (in
    place: an optimizer keeps its parameters), checking names, shapes and the save id; then predict the weights."""
    info = info if info is not None else read_config_json(os.path.join(directory, CONFIG_NAME))
    read_header(directory, info["save_id"], info["gb_config"], info["format_version"])
    check_layout(gb, info["tensors"], directory)
    tensors = read_tensors(directory)
    if gb._shards:  # FSDP2: each rank loads its own rows of the sharded uncompressed tensors
        from .sharding import distribute_like

        distribute_like(gb.uncompressed_state_dict(), tensors, prefix=_MODEL_PREFIX)
    load_state(gb, tensors, directory)


def load_state(gb: GenomicBottleneck, tensors: dict[str, torch.Tensor], directory: str) -> None:
    """Load g-net and uncompressed tensors into ``gb`` and its model, checking every name and shape."""
    where = os.path.join(directory, WEIGHTS_NAME)
    unknown = sorted(k for k in tensors if not k.startswith((_GNET_PREFIX, _MODEL_PREFIX)))
    if unknown:
        raise ValueError(f"{where} holds tensors that are neither g-net nor model tensors: {unknown[:5]}")
    gnet = {k[len(_GNET_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_GNET_PREFIX)}
    plain = {k[len(_MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_MODEL_PREFIX)}
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
    targets = gb.uncompressed_state_dict()
    by_id: dict[int, list[str]] = {}
    for name, value in targets.items():
        by_id.setdefault(id(value), []).append(name)
    placed = set()
    with torch.no_grad():
        for names in by_id.values():
            name = next((n for n in names if n in plain), None)
            if name is None:
                raise ValueError(f"{where} lacks uncompressed tensor {names[0]!r}")
            placed.update(n for n in names if n in plain)
            value, target = plain[name], targets[name]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(
                    f"tensor {name!r}: {where} holds shape {tuple(value.shape)}, "
                    f"this model needs {tuple(target.shape)}"
                )
            target.copy_(value)
    extra = sorted(set(plain) - placed)
    if extra:
        raise ValueError(f"{where} holds model tensors this model has no place for: {extra[:5]}")
    gb.predict_weights(sample=False, keep_graph=False)


def _build_model(directory: str, device: str | torch.device | None, dtype: Any, check=None) -> nn.Module:
    """The architecture named in ``config.json``, with parameters allocated once and left uninitialised.

    ``check(model)`` runs on the meta-device model, before any parameter is allocated.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config_path = os.path.join(directory, MODEL_CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"{directory} has no config.json; pass `model=` to rebuild a model that is not a transformers model"
        )
    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{config_path} is not a valid transformers config: {_first_line(e)}") from e
    model_class = _model_class(config, config_path)
    if dtype is None:
        dtype = _config_dtype(config, config_path)
    try:
        with init_empty_weights(include_buffers=False):
            model = model_class._from_config(config, **({"dtype": dtype} if dtype else {}))
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RuntimeError) as e:
        raise ValueError(f"{config_path}: {model_class.__name__} cannot be built from it: {_first_line(e)}") from e
    if check is not None:
        if hasattr(model, "tie_weights"):
            model.tie_weights()  # ties declared in the config, so that tied tensors are checked once
        check(model)
    # Materialise meta parameters without initialising them; parameters shared by several modules stay shared.
    fresh: dict[int, nn.Parameter] = {}
    try:
        for module in model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if not param.is_meta:
                    continue
                if id(param) not in fresh:
                    fresh[id(param)] = nn.Parameter(torch.empty_like(param, device=device or "cpu"),
                                                    param.requires_grad)
                module.register_parameter(name, fresh[id(param)])
    except (RuntimeError, MemoryError) as e:  # e.g. a config.json asking for more memory than there is
        raise ValueError(f"{config_path}: the model it describes cannot be allocated: {_first_line(e)}") from e
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # ties declared in the config (e.g. lm_head to the input embedding)
    if device is not None:
        model.to(device)
    return model


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _config_dtype(config: Any, config_path: str) -> torch.dtype | None:
    """The ``dtype`` recorded in ``config.json`` (as transformers writes it), or None."""
    dtype = getattr(config, "dtype", None)
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).replace("torch.", ""), None) if isinstance(dtype, str) else None
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"{config_path}: dtype must name a torch floating-point dtype, got dtype={dtype!r}")
    return value


def _model_class(config: Any, config_path: str = MODEL_CONFIG_NAME) -> type:
    """The class named in ``architectures`` (a transformers model class), else the base model of the config."""
    import transformers
    from transformers import MODEL_MAPPING, PreTrainedModel

    architectures = getattr(config, "architectures", None) or []
    if not isinstance(architectures, (list, tuple)):
        raise ValueError(f"{config_path}: architectures must be a list of class names, got {architectures!r:.80}")
    for arch in architectures:
        cls = getattr(transformers, arch, None) if isinstance(arch, str) and arch.isidentifier() else None
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
        raise ValueError(f"{config_path}: architectures names {arch!r:.80}, which is not a transformers model class")
    try:
        return MODEL_MAPPING[type(config)]
    except KeyError:
        raise ValueError(f"{config_path}: no transformers model class for {type(config).__name__}; "
                         "name one in `architectures`") from None


def bottleneck_from_pretrained(
    path_or_repo: PathLike,
    model: nn.Module | None = None,
    device: str | torch.device | None = None,
    dtype: Any = None,
    **hub_kwargs: Any,
) -> GenomicBottleneck:
    """Rebuild the bottleneck (and, without ``model``, the model from ``config.json``) from a checkpoint.

    ``dtype`` defaults to the one ``config.json`` records (the saved model's); ``torch_dtype`` is accepted as the
    older name of ``dtype``, as in transformers.
    """
    dtype = hub_kwargs.pop("torch_dtype", None) if dtype is None else dtype
    directory = resolve_checkpoint(path_or_repo, **hub_kwargs)
    info = read_config_json(os.path.join(directory, CONFIG_NAME))
    header = read_header(directory, info["save_id"], info["gb_config"], info["format_version"])

    def check(m: nn.Module) -> None:
        check_sizes(m, info, header, directory)

    if model is None:
        model = _build_model(directory, device, dtype, check=check)
    else:
        check(model)
    gb = GenomicBottleneck(model, info["gb_config"], init_gnets=False)  # the checkpoint replaces the init
    check_layout(gb, info["tensors"], directory)
    tensors = read_tensors(directory)
    if gb._shards:  # FSDP2: each rank loads its own rows of the sharded uncompressed tensors
        from .sharding import distribute_like

        distribute_like(gb.uncompressed_state_dict(), tensors, prefix=_MODEL_PREFIX)
    load_state(gb, tensors, directory)
    return gb


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
    gb = bottleneck_from_pretrained(path_or_repo, **kwargs)
    model = gb.model
    model.eval()
    return model
