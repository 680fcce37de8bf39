"""Checks of a compressed checkpoint before (and while) it is loaded: the safetensors header, the save id, the
covered tensors' layout, the sizes a config asks for, non-finite g-nets, and whether a Trainer checkpoint is
complete. Everything here reads shapes and metadata only, so a crafted file fails before anything large is built.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import torch
from torch import nn

from ..engine.bottleneck import Bottleneck
from ..engine.config import FORMAT_VERSION, GBConfig, read_config_json
from ..engine.layers import find_targets
from ..engine.planning import plan_covered
from ..engine.registry import family_class
from ..engine.tiling import gain_values
from ..files import CONFIG_NAME, FORMAT_NAME, MODEL_CONFIG_NAME, TRAINER_STATE_NAME, WEIGHTS_NAME, PathLike
from ..version import __version__

logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_RE", "check_compressed_folder", "check_layout", "check_sizes", "checkpoint_problem",
           "last_complete_checkpoint", "read_header", "resume_checkpoint", "warn_non_finite"]

GNET_PREFIX = "gnet."
MODEL_PREFIX = "model."
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR folders

# GBConfig fields that change what the g-nets predict without changing any tensor's shape: also written into the
# safetensors metadata, so that a gb_config.json edited (or mixed up) after the save is caught, not loaded silently.
_SHAPELESS_FIELDS = ("encoding", "center", "init_noise")


def settings_json(config: GBConfig) -> str:
    return json.dumps({k: getattr(config, k) for k in _SHAPELESS_FIELDS if hasattr(config, k)}, sort_keys=True)


def warn_non_finite(tensors: dict[str, torch.Tensor], where: str) -> list[str]:
    """Log a warning naming the g-net tensors of ``tensors`` that hold NaN or Inf; returns their names."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        logger.warning("%s: g-net tensors hold NaN or Inf values (%s), so every weight they predict is non-finite; "
                       "an earlier training step probably diverged", where, ", ".join(bad[:5]))
    return bad


def read_header(directory: str, save_id: str | None = None, config: GBConfig | None = None,
                config_version: int | None = None, config_path: str | None = None) -> dict[str, Any]:
    """Check the safetensors file's header (format, version, save id) without reading its data.

    Returns ``{"metadata": ..., "shapes": {key: shape}, "dtypes": {key: dtype}}``. ``save_id`` is the one
    ``gb_config.json`` names: a file of another save means an interrupted save over an existing checkpoint.
    ``config`` (gb_config.json's) must agree with the settings the file was saved with. Save ids exist from
    format 2 on: when both files are format 1 (``config_version``, and the file's metadata) there is none to check.
    ``config_path`` names where ``save_id`` and ``config`` come from in errors (default: the folder's
    ``gb_config.json``).
    """
    config_path = config_path or os.path.join(directory, CONFIG_NAME)
    from safetensors import SafetensorError, safe_open

    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} is not a compressed checkpoint: {WEIGHTS_NAME} is missing")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            shapes, dtypes = {}, {}
            for key in f.keys():
                sl = f.get_slice(key)
                shapes[key], dtypes[key] = tuple(sl.get_shape()), sl.get_dtype()
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path} is corrupt or truncated: {e}") from e
    if metadata.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not an hf_gb checkpoint (metadata format={metadata.get('format')!r})")
    version = metadata.get("format_version", "1")
    if not version.isdigit() or not 1 <= int(version) <= FORMAT_VERSION:
        if version.isdigit() and int(version) > FORMAT_VERSION:
            raise ValueError(
                f"{path} has format_version={version} (hf_gb {metadata.get('hf_gb_version')}); "
                f"this hf_gb {__version__} reads <= {FORMAT_VERSION}; upgrade hf_gb"
            )
        raise ValueError(f"{path}: metadata format_version must be a positive int, got {version!r}")
    both_v1 = config_version == 1 and int(version) == 1
    if not both_v1 and metadata.get("save_id") != save_id:
        raise ValueError(
            f"{config_path} and {os.path.join(directory, WEIGHTS_NAME)} are of two different saves (save_id "
            f"{save_id!r} vs {metadata.get('save_id')!r}): a save over this checkpoint was interrupted between "
            "writing the two; save it again, or restore the folder from a copy"
        )
    if config is not None and "gb_settings" in metadata:
        try:
            saved = json.loads(metadata["gb_settings"])
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: metadata gb_settings is not valid JSON: {e}") from e
        for key, value in (saved.items() if isinstance(saved, dict) else []):
            if key in _SHAPELESS_FIELDS and getattr(config, key, value) != value:
                raise ValueError(
                    f"{config_path} has {key}={getattr(config, key)!r}, but the g-nets in "
                    f"{WEIGHTS_NAME} were trained with {key}={value!r}; they would predict other weights"
                )
    return {"metadata": metadata, "shapes": shapes, "dtypes": dtypes}


def check_layout(gb: Bottleneck, saved: list[dict[str, Any]] | None, directory: str,
                 config_path: str | None = None) -> None:
    """The model rebuilt here must cover the same tensors, with the same shapes and tiles, as the saved one
    (``config_path``, default the folder's ``gb_config.json``, names the saved list in errors)."""
    if saved is None:
        return
    config_path = config_path or os.path.join(directory, CONFIG_NAME)
    current = {t.name: t.to_json() for t in gb.covered}
    names = {t["name"] for t in saved}
    missing, extra = sorted(names - current.keys()), sorted(current.keys() - names)
    if missing or extra:
        raise ValueError(
            f"{config_path} covers tensors this model does not "
            f"(checkpoint only: {missing[:5]}; model only: {extra[:5]}); is it a checkpoint for another architecture?"
        )
    for t in saved:
        now = current[t["name"]]
        for key in ("shape", "tile"):
            if list(t[key]) != now[key]:
                raise ValueError(
                    f"tensor {t['name']}: {key} in {config_path} is {list(t[key])} but this model gives {now[key]}"
                )


def check_sizes(model: nn.Module, info: dict[str, Any], header: dict[str, Any], directory: str,
                tied: dict[str, str] | None = None) -> None:
    """Before anything large is allocated: every model tensor is covered or stored with its shape, and the g-nets
    the config asks for are no larger than the ones the file holds.

    Tensors that are one tensor of the model are checked once; ``tied`` (``{name: name it will be tied to}``) names
    ties the model does not hold yet (transformers' ``from_pretrained`` ties after loading)."""

    config_path = info.get("path") or os.path.join(directory, CONFIG_NAME)
    entries = info["tensors"]
    if entries is None:
        raise ValueError(f"{config_path} has no 'tensors' list; it describes a config, not a checkpoint")
    covered = {e["name"]: e for e in entries}
    stored = {k[len(MODEL_PREFIX):]: v for k, v in header["shapes"].items() if k.startswith(MODEL_PREFIX)}
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, entry in covered.items():
        if name not in params:
            raise ValueError(f"{config_path} covers tensor {name!r}, which this model does not have; "
                             "is it a checkpoint for another architecture?")
        if list(params[name].shape) != entry["shape"]:
            raise ValueError(f"tensor {name}: shape in {config_path} is {entry['shape']} but this model gives "
                             f"{list(params[name].shape)}")
    state = model.state_dict(keep_vars=True)
    # Buffers may take the saved shape in the model's own load_state_dict (e.g. a record that grows in training);
    # that load checks them. Parameters are checked here, before they are allocated.
    buffers = {n for n, _ in model.named_buffers(remove_duplicate=False)}
    groups: dict[int, list[str]] = {}
    tied = {k: v for k, v in (tied or {}).items() if k in state and v in state}
    for name in state:
        groups.setdefault(id(state[tied.get(name, name)]), []).append(name)
    for names in groups.values():
        if any(n in covered for n in names):
            continue
        name = next((n for n in names if n in stored), None)
        shape = tuple(state[names[0]].shape)
        if name is None:
            where = MODEL_CONFIG_NAME if os.path.isfile(os.path.join(directory, MODEL_CONFIG_NAME)) else "the model"
            raise ValueError(
                f"{os.path.join(directory, WEIGHTS_NAME)} lacks uncompressed tensor {names[0]!r} of shape {shape} "
                f"that {where} describes, and {config_path} does not cover it"
            )
        if stored[name] != shape and name not in buffers:
            raise ValueError(f"tensor {name!r}: {os.path.join(directory, WEIGHTS_NAME)} holds shape {stored[name]}, "
                             f"this model needs {shape}")
    try:
        wanted = _gnet_values_wanted(model, info["gb_config"])
    except ValueError as e:  # e.g. target_modules that match no module of this model
        raise ValueError(f"{config_path}: {e}") from e
    held = sum(_prod(s) for k, s in header["shapes"].items() if k.startswith(GNET_PREFIX))
    if wanted > 2 * held + 1024:
        raise ValueError(
            f"{config_path}: hidden_dim={info['gb_config'].hidden_dim} with these tiles calls for {wanted:,} g-net "
            f"values, but {WEIGHTS_NAME} holds {held:,}; the two files do not belong together"
        )


def _gnet_values_wanted(model: nn.Module, config: GBConfig) -> int:
    """How many values the g-nets of ``config`` over ``model`` hold, from the shapes alone: the plan a bottleneck
    would be built from (`hf_gb.engine.planning.plan_covered`), counted by each bank's family:
    `GNetBank.params_per_tile` per tile, `GNetBank.bank_params` once per bank, and the tensors' gains."""
    groups, _ = plan_covered(find_targets(model, config)[0], config)
    total = 0
    for spec, group in groups.items():
        family, bank_config = family_class(spec.family), spec.bank_config(config)
        for t in group:
            total += t.n_tiles * family.params_per_tile(spec.geometry, bank_config) + gain_values(t.shape,
                                                                                                 config.gains)
        total += family.bank_params(spec.geometry, bank_config)
    return round(total)


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def check_compressed_folder(folder: PathLike) -> str:
    """``folder`` as a string, or ``FileNotFoundError`` / ``ValueError`` if it is not a compressed checkpoint."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"No such folder: {folder}")
    missing = [n for n in (WEIGHTS_NAME, CONFIG_NAME) if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise ValueError(f"{folder} is not a compressed hf_gb checkpoint: {' and '.join(missing)} missing")
    return folder


def checkpoint_problem(folder: str) -> str | None:
    """Why ``folder`` cannot be resumed from (a missing or mismatched file), or None when it is complete.

    Complete: Trainer's ``trainer_state.json`` (written last) and both hf_gb files, from the same save.
    """
    if not os.path.isdir(folder):
        return "no such folder"
    for name in (CONFIG_NAME, WEIGHTS_NAME, TRAINER_STATE_NAME):
        if not os.path.isfile(os.path.join(folder, name)):
            return f"{name} is missing"
    try:
        info = read_config_json(os.path.join(folder, CONFIG_NAME))
        read_header(folder, info["save_id"], info["gb_config"], info["format_version"])
    except (OSError, ValueError) as e:
        return str(e)
    return None


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest ``checkpoint-N`` folder of ``output_dir`` that `checkpoint_problem` finds complete, or None.

    Newer incomplete ones (a save that was killed) are skipped with a warning and left in place: they are the
    user's files, and Trainer's ``save_total_limit`` rotation removes them in time.
    """
    if not os.path.isdir(output_dir):
        return None
    steps = sorted(((int(m[1]), name) for name in os.listdir(output_dir) if (m := CHECKPOINT_RE.match(name))
                    and os.path.isdir(os.path.join(output_dir, name))), reverse=True)
    for _, name in steps:
        folder = os.path.join(output_dir, name)
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        logger.warning("Not resuming from %s, which is incomplete (%s); trying an older checkpoint", folder, problem)
    return None


def resume_checkpoint(resume: str | os.PathLike | bool | None, output_dir: str) -> str | bool | None:
    """The folder ``Trainer.train(resume_from_checkpoint=resume)`` resumes from: the newest complete checkpoint of
    ``output_dir`` for True, else ``resume`` itself once `checkpoint_problem` finds it complete (False and None as
    they are). Raises ``ValueError`` with Trainer's wording first (code and people look for it), the reason after."""
    if isinstance(resume, bool):
        found = last_complete_checkpoint(output_dir) if resume else False
        if found is None:
            raise ValueError(f"No valid checkpoint found in output directory ({output_dir}): resuming needs a "
                             "complete compressed checkpoint (gb_config.json, gb_model.safetensors and "
                             "trainer_state.json of one save)")
        return found
    if resume is None:
        return None
    folder = os.fspath(resume)
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise ValueError(f"Can't find a valid checkpoint at {folder}: {problem}")
    return folder
