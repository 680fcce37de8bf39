"""transformers' own loaders on compressed checkpoints.

After ``import hf_gb``, ``AutoModel*.from_pretrained``, a model class's ``from_pretrained`` and ``pipeline`` load a
compressed checkpoint (a folder or a Hub repo id) as the model its g-nets predict, with the logits of
`hf_gb.load_compressed`; that model's ``save_pretrained`` and ``push_to_hub`` write the compressed format again.

How the files make it so (`hf_gb.io.checkpoint` writes them): the checkpoint's ``config.json`` holds

- ``quantization_config``: ``{"quant_method": "hf_gb", ...}`` with what ``gb_config.json`` holds. transformers hands
  it to the quantizer registered for ``"hf_gb"`` (``transformers.quantizers.register_quantizer``), `GBQuantizer`;
- ``transformers_weights``: a sentence instead of a file name. transformers without hf_gb skips the unknown
  quantization method with a warning and then refuses that value with a ``ValueError`` quoting it (install and
  import hf_gb), for every loading route and before any model is built: never a model with random covered weights.
  `GBQuantizer` names ``gb_model.safetensors`` there before transformers looks for the weights.

transformers then builds the model on the meta device; the quantizer checks every shape against the files
(`hf_gb.io.checks.check_sizes`) before anything is allocated, and lets transformers load the uncompressed tensors
(``model.<name>`` in the file, renamed to ``<name>``; the covered weights, which the file does not hold, are
allocated and not reported missing). After loading it attaches a `GenomicBottleneck`, loads the g-nets and the
uncompressed tensors with every check of `hf_gb.load_compressed` and predicts the covered weights. The bottleneck is
``model.hf_quantizer.bottleneck``; ``model.dequantize()`` drops it and leaves the plain model, whose
``save_pretrained`` writes dense weights.

Registration (`install`, called by ``hf_gb/__init__.py``) happens at once when ``transformers.quantizers`` is
imported already, else right after transformers first imports it, so ``import hf_gb`` does not import transformers.
"""

from __future__ import annotations

import importlib.abc
import logging
import os
import re
import sys
import types
from typing import Any

import torch
from torch import nn

from ..engine.config import parse_config_json
from ..files import MODEL_CONFIG_NAME, QUANT_METHOD, WEIGHTS_NAME
from .checkpoint import load_checkpoint_state
from .checks import check_sizes, read_header
from .pretrained import GenomicBottleneck

logger = logging.getLogger(__name__)

__all__ = ["install", "register"]

_TARGET = "transformers.quantizers.auto"  # the module whose mappings `register` adds to
_WHERE = f"{MODEL_CONFIG_NAME} (quantization_config)"
_CLASSES: dict[str, type] = {}
# transformers' dense save_pretrained arguments that mean nothing for one compressed file, accepted and unused
_UNUSED_SAVE_ARGS = ("max_shard_size", "safe_serialization", "save_peft_format", "save_original_format")


def install() -> None:
    """Register hf_gb with transformers' loaders now if transformers' quantizers are imported, else on their import."""
    if _TARGET in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


def register() -> bool:
    """Register `GBQuantizationConfig` and `GBQuantizer` for ``quant_method="hf_gb"`` (once; imports transformers).

    Returns False, with a warning, when this transformers lacks the quantizer hook the loader needs."""
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer
    from transformers.quantizers.base import HfQuantizer

    if not hasattr(HfQuantizer, "update_attn_implementation"):
        import transformers

        logger.warning("transformers %s has no HfQuantizer.update_attn_implementation, which hf_gb needs to load "
                       "compressed checkpoints through from_pretrained and pipeline; hf_gb.load_compressed works",
                       transformers.__version__)
        return False
    if not _CLASSES:
        _CLASSES.update(_define())
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not _CLASSES["GBQuantizer"]:
        register_quantization_config(QUANT_METHOD)(_CLASSES["GBQuantizationConfig"])
        register_quantizer(QUANT_METHOD)(_CLASSES["GBQuantizer"])
    return True


def __getattr__(name: str) -> Any:
    if name in ("GBQuantizationConfig", "GBQuantizer"):  # defined on first use: they subclass transformers' classes
        register()
        if name in _CLASSES:
            return _CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds `_TARGET` with the other finders and registers hf_gb right after the module has run."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader):
        self.inner = inner

    def create_module(self, spec: Any) -> types.ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self.inner.exec_module(module)
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterOnImport)]
        try:
            register()
        except Exception as e:  # never break `import transformers`; loading a compressed folder then fails loudly
            logger.warning("hf_gb could not register its loader with transformers (%s: %s); compressed checkpoints "
                           "load with hf_gb.load_compressed", type(e).__name__, e)

    def __getattr__(self, name: str) -> Any:  # get_source, is_package, ... of the real loader
        return getattr(self.inner, name)


def _checksums(gb: GenomicBottleneck) -> torch.Tensor:
    """float64 sum and sum of squares of every covered weight: what `save_pretrained` compares with the load."""
    with torch.no_grad():
        return torch.stack([torch.stack([(w := t.param.detach().double()).sum(), w.square().sum()]).cpu()
                            for t in gb.covered]) if gb.covered else torch.zeros(0, 2, dtype=torch.float64)


def _bottleneck(model: nn.Module) -> GenomicBottleneck:
    quantizer = getattr(model, "hf_quantizer", None)
    gb = getattr(quantizer, "bottleneck", None)
    if gb is None:
        raise ValueError(f"this {type(model).__name__} has no hf_gb bottleneck any more (dequantize() dropped it)")
    if not torch.equal(_checksums(gb), quantizer.loaded_checksums):
        raise ValueError(
            f"the covered weights of this {type(model).__name__} changed after hf_gb predicted them at load, and the "
            "compressed format stores only the g-nets, which predict the weights as loaded. Save the dense weights "
            "with model.dequantize() then model.save_pretrained(...), or train the g-nets themselves "
            "(GBTrainer(gb=GenomicBottleneck.from_pretrained(folder), ...)) and save those"
        )
    return gb


def _save_pretrained(model: nn.Module, save_directory: str | os.PathLike, is_main_process: bool = True,
                     state_dict: dict | None = None, push_to_hub: bool = False, variant: str | None = None,
                     token: str | bool | None = None, distributed_checkpoint: bool = False, **kwargs: Any) -> None:
    """``model.save_pretrained`` of a model loaded through transformers' loaders: the compressed checkpoint."""
    for name, value in (("state_dict", state_dict), ("variant", variant),
                        ("distributed_checkpoint", distributed_checkpoint or None)):
        if value is not None:
            raise ValueError(f"save_pretrained of an hf_gb model writes one compressed checkpoint; {name} is not "
                             "supported (model.dequantize() gives the plain model and its save_pretrained)")
    for name in _UNUSED_SAVE_ARGS:
        kwargs.pop(name, None)
    gb = _bottleneck(model)
    if is_main_process:
        gb.save_pretrained(os.fspath(save_directory))
    if push_to_hub:
        repo_id = kwargs.pop("repo_id", os.path.basename(os.path.normpath(os.fspath(save_directory))))
        _push_to_hub(model, repo_id, token=token, **kwargs)


def _push_to_hub(model: nn.Module, repo_id: str, *, token: str | bool | None = None, **kwargs: Any) -> Any:
    """``model.push_to_hub`` of a model loaded through transformers' loaders: see `hf_gb.io.hub.push_to_hub`."""
    for name in (*_UNUSED_SAVE_ARGS, "tags", "use_temp_dir"):
        kwargs.pop(name, None)
    return _bottleneck(model).push_to_hub(repo_id, token=token, **kwargs)


def _define() -> dict[str, type]:
    """The two classes transformers' registries take (they subclass transformers' own, hence defined on demand)."""
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class GBQuantizationConfig(QuantizationConfigMixin):
        """``quantization_config`` of a compressed checkpoint's ``config.json``: ``quant_method="hf_gb"`` plus what
        its ``gb_config.json`` holds (config, covered tensors, save id, versions), as attributes."""

        def __init__(self, quant_method: str = QUANT_METHOD, **gb_config: Any):
            if quant_method != QUANT_METHOD:
                raise ValueError(f"{_WHERE}: quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
            self.quant_method = QUANT_METHOD
            self.__dict__.update(gb_config)

        def gb_config(self) -> dict[str, Any]:
            return {k: v for k, v in self.to_dict().items() if k != "quant_method"}

    class GBQuantizer(HfQuantizer):
        """Loads a compressed checkpoint for transformers' ``from_pretrained`` (see the module docstring)."""

        requires_calibration = True  # only checkpoints hf_gb wrote: nothing is compressed while loading

        def __init__(self, quantization_config: GBQuantizationConfig, **kwargs: Any):
            super().__init__(quantization_config, **kwargs)
            self.info = parse_config_json(quantization_config.gb_config(), _WHERE)
            if self.info["tensors"] is None:
                raise ValueError(f"{_WHERE} has no 'tensors' list; it describes a config, not a checkpoint")
            self.directory: str | None = None
            self.bottleneck: GenomicBottleneck | None = None
            self.loaded_checksums: torch.Tensor | None = None
            self._ignored: dict[str, Any] = {}

        def update_attn_implementation(self, config: Any) -> Any:
            # Runs before transformers resolves the weight files: our file instead of the sentence of the note.
            config.transformers_weights = WEIGHTS_NAME
            return super().update_attn_implementation(config)

        def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: Any = None,
                                                 **kwargs: Any) -> nn.Module:
            files = list(checkpoint_files or [])
            if len(files) != 1 or os.path.basename(files[0]) != WEIGHTS_NAME:
                raise ValueError(f"an hf_gb checkpoint loads from its one {WEIGHTS_NAME}, got {files}")
            self.directory = os.path.dirname(files[0])
            info = self.info
            info["path"] = f"{os.path.join(self.directory, MODEL_CONFIG_NAME)} (quantization_config)"
            header = read_header(self.directory, info["save_id"], info["gb_config"], info["format_version"],
                                 info["path"])
            # On the meta device, before anything is allocated; transformers ties the weights only after loading.
            check_sizes(model, info, header, self.directory, tied=getattr(model, "all_tied_weights_keys", None))
            # transformers finds none of the model's tensors in the file (hf_gb's prefixes): no report of missing
            # and unexpected keys; the bottleneck loads and checks every one of them afterwards.
            covered = {"^" + re.escape(t["name"]) + "$" for t in info["tensors"]}
            for name, patterns in (("_keys_to_ignore_on_load_missing", covered),
                                   ("_keys_to_ignore_on_load_unexpected", {r"^gnet\."})):
                self._ignored[name] = model.__dict__.get(name, self._ignored)
                setattr(model, name, set(getattr(model, name, None) or ()) | patterns)
            return model

        def get_weight_conversions(self) -> list:
            # The file's uncompressed tensors are "model.<name>": transformers loads them under "<name>".
            from transformers.core_model_loading import WeightRenaming

            return [WeightRenaming(source_patterns=r"^model\.", target_patterns="")]

        def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
            for name, value in self._ignored.items():
                if value is self._ignored:
                    model.__dict__.pop(name, None)
                else:
                    setattr(model, name, value)
            devices = {t.device for t in model.parameters()}
            if len(devices) != 1 or torch.device("meta") in devices:
                raise ValueError(f"hf_gb predicts the covered weights in place on one device; this device_map puts "
                                 f"the model on {sorted(map(str, devices))}: load it onto one device")
            gb = GenomicBottleneck(model, self.info["gb_config"], init_gnets=False)
            load_checkpoint_state(gb, self.directory, self.info)
            self.bottleneck, self.loaded_checksums = gb, _checksums(gb)
            model.save_pretrained = types.MethodType(_save_pretrained, model)
            model.push_to_hub = types.MethodType(_push_to_hub, model)
            return model

        def _dequantize(self, model: nn.Module, dtype: Any = None) -> nn.Module:
            # The weights are dense already: drop the g-nets and the compressed save.
            if self.bottleneck is not None:
                self.bottleneck.detach_model()
            self.bottleneck = None
            model.__dict__.pop("save_pretrained", None)
            model.__dict__.pop("push_to_hub", None)
            return model

        def is_serializable(self) -> bool:
            return False  # transformers' dense save is refused; the model's own save_pretrained writes hf_gb's

        @property
        def is_trainable(self) -> bool:
            return False  # the weights are predictions: train the g-nets (GBTrainer, GBPlugin), not these

    classes = {"GBQuantizationConfig": GBQuantizationConfig, "GBQuantizer": GBQuantizer}
    for name, cls in classes.items():  # picklable by name, through this module's __getattr__
        cls.__module__, cls.__qualname__ = __name__, name
    return classes
