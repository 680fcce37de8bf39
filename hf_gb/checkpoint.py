"""Compressed checkpoints: save a `GenomicBottleneck`, load it back, or load the plain model it predicts.

A compressed checkpoint is a folder ``huggingface_hub`` can push as is:

- ``config.json``: the base model's transformers config (when the model has one);
- ``gb_config.json``: the `GBConfig`, the hf_gb version, and every covered tensor with its shape and tile;
- ``gb_model.safetensors``: g-net tensors (``gnet.<bank>.<name>``) and the uncompressed model tensors
  (``model.<name>``); its metadata names the format and the hf_gb version;
- tokenizer / processor files when known, and a model card ``README.md``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Union

import torch
from torch import nn

from .bottleneck import GenomicBottleneck
from .config import CONFIG_NAME, FORMAT_VERSION, GBConfig, read_config_json
from .version import __version__

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "gb_model.safetensors"
FORMAT_NAME = "hf_gb"
_GNET_PREFIX = "gnet."
_MODEL_PREFIX = "model."

PathLike = Union[str, os.PathLike]  # noqa: UP007 (a runtime alias)


# ----------------------------------------------------------------------------- atomic file writes
def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    _atomic(path, lambda tmp: open(tmp, "w", encoding="utf-8").write(text))


def _atomic(path: PathLike, write) -> None:
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=os.path.dirname(path) or ".")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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


def gb_config_payload(gb: GenomicBottleneck) -> dict[str, Any]:
    return {
        **gb.config.to_dict(),
        "hf_gb_version": __version__,
        "format_version": FORMAT_VERSION,
        "tensors": [t.to_json() for t in gb.covered],
    }


def save_compressed(
    gb: GenomicBottleneck,
    save_directory: PathLike,
    processing_class: Any = None,
    model_card: bool = True,
    model_card_kwargs: dict[str, Any] | None = None,
) -> str:
    """Write the compressed checkpoint of ``gb`` (and its model's config) into ``save_directory``.

    Files are staged in a temporary folder beside the target and moved in by rename, so an interrupted save never
    leaves a half-written file where a good one was. Returns the folder.
    """
    from safetensors.torch import save_file

    save_directory = os.fspath(save_directory)
    os.makedirs(save_directory, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-hf_gb-", dir=save_directory)
    try:
        metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "hf_gb_version": __version__}
        save_file(gb_state_tensors(gb), os.path.join(staging, WEIGHTS_NAME), metadata=metadata)
        with open(os.path.join(staging, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(gb_config_payload(gb), f, indent=2, sort_keys=True)
            f.write("\n")
        model_config = getattr(gb.model, "config", None)
        if model_config is not None and hasattr(model_config, "save_pretrained"):
            model_config = copy.deepcopy(model_config)
            model_config.architectures = [type(gb.model).__name__]  # what load_compressed rebuilds
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
        umask = os.umask(0)
        os.umask(umask)
        for name in sorted(os.listdir(staging), key=lambda n: n == WEIGHTS_NAME):  # weights last
            staged = os.path.join(staging, name)
            if os.path.isfile(staged):  # temporary files are private; the checkpoint is not
                os.chmod(staged, 0o666 & ~umask)
            os.replace(staged, os.path.join(save_directory, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return save_directory


# ----------------------------------------------------------------------------- load
# What a checkpoint repo may hold besides the model itself: training state, nested checkpoints, logs.
_HUB_IGNORE = [
    "optimizer.*", "scheduler.pt", "scaler.pt", "rng_state*", "training_args.bin", "runs/*", "checkpoint-*/*",
    "last-checkpoint/*",
]


def resolve_checkpoint(path_or_repo: PathLike, **hub_kwargs: Any) -> str:
    """A local folder, or a Hub repo id downloaded (and cached) through ``huggingface_hub``.

    ``revision`` (branch, tag or commit), ``token``, ``cache_dir``, ``local_files_only`` and ``force_download`` go
    to ``snapshot_download``, which honours ``HF_HUB_OFFLINE`` / ``HF_ENDPOINT`` and serves cached snapshots when the
    Hub cannot be reached; ``subfolder`` picks a folder inside the folder or repo (e.g. ``"last-checkpoint"``).
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
    patterns = {"allow_patterns": [f"{subfolder}/*"]} if subfolder else {"ignore_patterns": _HUB_IGNORE}
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


def read_tensors(directory: str) -> dict[str, torch.Tensor]:
    """Load the checkpoint's safetensors file, with errors that name it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} is not a compressed checkpoint: {WEIGHTS_NAME} is missing")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path} is corrupt or truncated: {e}") from e
    if metadata.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not an hf_gb checkpoint (metadata format={metadata.get('format')!r})")
    if int(metadata.get("format_version", FORMAT_VERSION)) > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version={metadata['format_version']} (hf_gb {metadata.get('hf_gb_version')}); "
            f"this hf_gb {__version__} reads <= {FORMAT_VERSION}; upgrade hf_gb"
        )
    return tensors


def _check_layout(gb: GenomicBottleneck, saved: list[dict[str, Any]] | None, directory: str) -> None:
    """The model rebuilt here must cover the same tensors, with the same shapes and tiles, as the saved one."""
    if saved is None:
        return
    current = {t.name: t.to_json() for t in gb.covered}
    names = {t["name"] for t in saved}
    missing, extra = sorted(names - current.keys()), sorted(current.keys() - names)
    if missing or extra:
        raise ValueError(
            f"{os.path.join(directory, CONFIG_NAME)} covers tensors this model does not "
            f"(checkpoint only: {missing[:5]}; model only: {extra[:5]}); is it a checkpoint for another architecture?"
        )
    for t in saved:
        now = current[t["name"]]
        for key in ("shape", "tile"):
            if list(t[key]) != now[key]:
                raise ValueError(
                    f"tensor {t['name']}: {key} in {CONFIG_NAME} is {list(t[key])} but this model gives {now[key]}"
                )


def load_state(gb: GenomicBottleneck, tensors: dict[str, torch.Tensor], directory: str) -> None:
    """Load g-net and uncompressed tensors into ``gb`` and its model, checking every name and shape."""
    where = os.path.join(directory, WEIGHTS_NAME)
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
    gb.load_state_dict(gnet)
    targets = gb.uncompressed_state_dict()
    by_id: dict[int, list[str]] = {}
    for name, value in targets.items():
        by_id.setdefault(id(value), []).append(name)
    with torch.no_grad():
        for names in by_id.values():
            name = next((n for n in names if n in plain), None)
            if name is None:
                raise ValueError(f"{where} lacks uncompressed tensor {names[0]!r}")
            value, target = plain[name], targets[name]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(
                    f"tensor {name!r}: {where} holds shape {tuple(value.shape)}, "
                    f"this model needs {tuple(target.shape)}"
                )
            target.copy_(value)
    gb.predict_weights(sample=False, keep_graph=False)


def _build_model(directory: str, device: str | torch.device | None, dtype: Any) -> nn.Module:
    """The architecture named in ``config.json``, with parameters allocated once and left uninitialised."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"{directory} has no config.json; pass `model=` to rebuild a model that is not a transformers model"
        )
    config = AutoConfig.from_pretrained(directory)
    model_class = _model_class(config)
    with init_empty_weights(include_buffers=False):
        model = model_class._from_config(config, **({"dtype": dtype} if dtype else {}))
    # Materialise meta parameters without initialising them; parameters shared by several modules stay shared.
    fresh: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in fresh:
                fresh[id(param)] = nn.Parameter(torch.empty_like(param, device=device or "cpu"), param.requires_grad)
            module._parameters[name] = fresh[id(param)]
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # ties declared in the config (e.g. lm_head to the input embedding)
    if device is not None:
        model.to(device)
    return model


def _model_class(config: Any) -> type:
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    from transformers import AutoModel

    return AutoModel._model_mapping[type(config)]


def bottleneck_from_pretrained(
    path_or_repo: PathLike,
    model: nn.Module | None = None,
    device: str | torch.device | None = None,
    dtype: Any = None,
    **hub_kwargs: Any,
) -> GenomicBottleneck:
    """Rebuild the bottleneck (and, without ``model``, the model from ``config.json``) from a checkpoint.

    ``torch_dtype`` is accepted as the older name of ``dtype``, as in transformers.
    """
    dtype = hub_kwargs.pop("torch_dtype", None) if dtype is None else dtype
    directory = resolve_checkpoint(path_or_repo, **hub_kwargs)
    info = read_config_json(os.path.join(directory, CONFIG_NAME))
    config = GBConfig.from_dict(info["config"])
    tensors = read_tensors(directory)
    if model is None:
        model = _build_model(directory, device, dtype)
    gb = GenomicBottleneck(model, config, init_gnets=False)  # the checkpoint's state replaces the init
    _check_layout(gb, info["tensors"], directory)
    load_state(gb, tensors, directory)
    return gb


def load_compressed(path_or_repo: PathLike, **kwargs: Any) -> nn.Module:
    """Load a compressed checkpoint as a plain model (e.g. a transformers ``PreTrainedModel``) in eval mode.

    ``path_or_repo`` is a local folder or a Hub repo id; ``revision``, ``token``, ``cache_dir`` and
    ``local_files_only`` go to ``huggingface_hub``; ``device``, ``dtype`` and ``model`` (an instance
    to load into instead of building one from ``config.json``) are honoured too.

    Example::

        >>> import hf_gb
        >>> model = hf_gb.load_compressed("out/final")  # doctest: +SKIP
        >>> model(**inputs).logits  # doctest: +SKIP
    """
    gb = bottleneck_from_pretrained(path_or_repo, **kwargs)
    model = gb.model
    model.eval()
    return model
