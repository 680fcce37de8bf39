"""The model a compressed checkpoint describes: its transformers class (`model_class_for`) and an instance with
uninitialised parameters (`build_model`), checked on the meta device before anything large is allocated.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..files import MODEL_CONFIG_NAME, QUANT_METHOD, TRANSFORMERS_WEIGHTS_NOTE

__all__ = ["build_model", "model_class_for"]


def build_model(directory: str, device: str | torch.device | None, dtype: Any, check=None) -> nn.Module:
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
    for key, ours in (("quantization_config", lambda v: isinstance(v, dict) and v.get("quant_method") == QUANT_METHOD),
                      ("transformers_weights", lambda v: v == TRANSFORMERS_WEIGHTS_NOTE)):
        if ours(getattr(config, key, None)):  # hf_gb's notes to transformers' loaders, not part of the model
            delattr(config, key)
    model_class = model_class_for(config, config_path)
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


def _registered_class(config: Any, arch: Any) -> type | None:
    """The model class named ``arch`` that code of this process registered for ``type(config)`` with an Auto class
    (``AutoModelForImageClassification.register(MyConfig, MyModel)``, as transformers' custom-model guide does);
    nothing is imported or run from the checkpoint."""
    from transformers.models.auto import modeling_auto

    for name in dir(modeling_auto):
        if not (name.startswith("MODEL_") and name.endswith("_MAPPING")):
            continue
        try:
            cls = getattr(modeling_auto, name)[type(config)]
        except (KeyError, TypeError, ValueError):
            continue
        if getattr(cls, "__name__", None) == arch:
            return cls
    return None


def model_class_for(config: Any, config_path: str = MODEL_CONFIG_NAME) -> type:
    """The class named in ``architectures`` (a transformers model class), else the base model of the config."""
    import transformers
    from transformers import MODEL_MAPPING, PreTrainedModel

    architectures = getattr(config, "architectures", None) or []
    if not isinstance(architectures, (list, tuple)):
        raise ValueError(f"{config_path}: architectures must be a list of class names, got {architectures!r:.80}")
    for arch in architectures:
        cls = getattr(transformers, arch, None) if isinstance(arch, str) and arch.isidentifier() else None
        if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
            cls = _registered_class(config, arch)
        if cls is not None:
            return cls
        raise ValueError(f"{config_path}: architectures names {arch!r:.80}, which is neither a transformers model "
                         "class nor one registered with the Auto classes (AutoModel*.register) in this process")
    try:
        return MODEL_MAPPING[type(config)]
    except KeyError:
        raise ValueError(f"{config_path}: no transformers model class for {type(config).__name__}; "
                         "name one in `architectures`") from None
