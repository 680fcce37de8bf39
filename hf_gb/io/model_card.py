"""Model cards for compressed checkpoints, generated through ``huggingface_hub.ModelCard`` / ``ModelCardData``.

The card is rendered from ``hf_gb/templates/model_card.md`` (a Jinja template; ``model_cards/model_card.md`` at the
top of the repository is the same file for readers). Everything hf_gb writes into the body sits between
`SECTION_START` and `SECTION_END`, so a ``README.md`` the user already has is updated in place: our section is
replaced (or appended), their text is kept, and their metadata is merged with ours (tags are unioned).

Example::

    >>> import tempfile, torch
    >>> from hf_gb import GBConfig, GenomicBottleneck
    >>> from hf_gb.io.model_card import load_card
    >>> gb = GenomicBottleneck(torch.nn.Sequential(torch.nn.Linear(64, 64)), GBConfig(hidden_dim=4, tile_size=32))
    >>> folder = gb.save_pretrained(tempfile.mkdtemp())
    >>> load_card(folder).data.library_name
    'hf_gb'
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
from importlib import resources
from typing import Any

from ..engine.shards import model_class
from ..files import README_NAME, TRAINING_STATE_PATTERNS, atomic_write_text
from ..version import __version__

logger = logging.getLogger(__name__)

__all__ = ["SECTION_END", "SECTION_START", "TEMPLATE_NAME", "dense_size", "is_hub_model_id", "load_card",
           "write_model_card"]

TEMPLATE_NAME = "model_card.md"
SECTION_START = "<!-- hf_gb:model-card:start -->"
SECTION_END = "<!-- hf_gb:model-card:end -->"
TAGS = ["hf_gb", "genomic-bottleneck", "compressed"]
# Rows of the per-tensor table before it is cut short (a card for a 100-layer model stays readable).
MAX_TENSOR_ROWS = 64
# Trainer metrics that describe the run, not the model.
_RUN_METRICS = ("runtime", "samples_per_second", "steps_per_second", "epoch", "step")
_TRAINING_FIELDS = (
    "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps",
    "optim", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "seed", "fp16", "bf16",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def template_path() -> str:
    """Path of the packaged Jinja template."""
    return str(resources.files("hf_gb").joinpath("templates", TEMPLATE_NAME))


def is_hub_model_id(name: Any) -> bool:
    """Whether ``name`` looks like a Hub repo id (``"gpt2"``, ``"user/model"``) and is not a local path."""
    if not isinstance(name, str) or not _HUB_ID.match(name) or ".." in name or name.endswith((".", "-")):
        return False
    return not os.path.exists(os.path.expanduser(name))


def _name_or_path(model: Any) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def _results(trainer_state: Any, metrics: dict[str, Any] | None) -> dict[str, Any]:
    """Final evaluation metrics (``eval_`` prefix dropped) and the final training loss, from a Trainer state."""
    out: dict[str, Any] = {}
    history = (_get(trainer_state, "log_history") or []) if trainer_state is not None else []
    for entry in history:
        for k, v in entry.items():
            if k.startswith("eval_") and not k.endswith(_RUN_METRICS) and isinstance(v, (int, float)):
                out[k[len("eval_"):]] = v
        if isinstance(entry.get("train_loss"), (int, float)):
            out["train_loss"] = entry["train_loss"]
    out.update(metrics or {})
    return {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in out.items()}


def _training(training_args: Any, trainer_state: Any) -> dict[str, Any]:
    out = {}
    if training_args is not None:
        for key in _TRAINING_FIELDS:
            value = _get(training_args, key)
            if value is not None and value is not False and not (key == "max_steps" and value == -1):
                out[key] = getattr(value, "value", value)  # enums (optim, scheduler) by their value
    if trainer_state is not None:
        for key in ("global_step", "epoch"):
            value = _get(trainer_state, key)
            if value:
                out[key] = round(value, 3) if isinstance(value, float) else value
    return out


def _files(directory: str) -> list[dict[str, Any]]:
    """The model's files in ``directory`` (top level; not the card, temporary files or training state)."""
    rows = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        skip = name == README_NAME or name.startswith((".", "_")) or os.path.islink(path) or not os.path.isfile(path)
        if not skip and not any(fnmatch.fnmatch(name, p) for p in TRAINING_STATE_PATTERNS):
            rows.append({"name": name, "size": os.path.getsize(path)})
    return rows


def dense_size(gb: Any, stats: dict[str, Any] | None = None) -> tuple[int, str]:
    """Bytes the model of ``gb`` would take uncompressed, and the dtype they are counted in (the covered weights'
    dtype, else the model's first parameter's; float32 for a model without parameters). ``stats``: ``gb.stats()``
    when the caller has it."""
    stats = stats if stats is not None else gb.stats()
    first = gb.covered[0].param if gb.covered else next(iter(gb.model.parameters()), None)
    element = first.element_size() if first is not None else 4
    dtype = str(first.dtype).replace("torch.", "") if first is not None else "float32"
    return (stats["covered_params"] + stats["uncompressed_params"]) * element, dtype


def _card_data(gb: Any, kwargs: dict[str, Any], base_model: str | None, results: dict[str, Any]):
    from huggingface_hub import ModelCardData

    datasets = kwargs.get("datasets") or kwargs.get("dataset")
    if isinstance(datasets, str):
        datasets = [datasets]
    extra_tags = kwargs.get("tags") or []
    return ModelCardData(
        library_name="hf_gb",
        tags=[*TAGS, *([extra_tags] if isinstance(extra_tags, str) else extra_tags)],
        base_model=base_model,
        datasets=datasets or None,
        metrics=sorted(k for k in results if k not in ("loss", "train_loss")) or None,
        language=kwargs.get("language"),
        license=kwargs.get("license"),
        pipeline_tag=kwargs.get("pipeline_tag"),
        model_name=kwargs.get("model_name"),
    )


def render_card(gb: Any, directory: str, **kwargs: Any):
    """The card for the checkpoint files in ``directory`` as a fresh ``ModelCard`` (not yet merged or written).

    Keyword arguments: ``repo_id`` (used in the load snippet), ``base_model`` / ``finetuned_from``, ``datasets``,
    ``language``, ``license``, ``tags``, ``model_name``, ``pipeline_tag``, ``metrics`` (a dict of results),
    ``trainer_state`` and ``training_args`` (a Trainer's, or dicts), ``training`` (extra rows for the training setup
    table), ``load_path`` (what the snippet loads; default the repo id or the folder). Unknown keys are ignored, so
    the keyword arguments of ``Trainer.create_model_card`` can be passed on.
    """
    from huggingface_hub import ModelCard

    stats = gb.stats()
    base_model = kwargs.get("base_model") or kwargs.get("finetuned_from") or _name_or_path(gb.model)
    base_model = base_model if is_hub_model_id(base_model) else None
    state = kwargs.get("trainer_state")
    evaluated = _results(state, None)  # only the Trainer's evaluation metrics name Hub metrics in the metadata
    results = _results(state, kwargs.get("metrics"))
    data = _card_data(gb, kwargs, base_model, evaluated)
    files = _files(directory)
    dense_bytes, dense_dtype = dense_size(gb, stats)
    load_path = kwargs.get("load_path") or kwargs.get("repo_id") or kwargs.get("target_directory") or directory
    model_name = kwargs.get("model_name") or (
        str(kwargs["repo_id"]).split("/")[-1] if kwargs.get("repo_id") else f"{model_class(gb.model).__name__} (hf_gb)"
    )
    tensors = stats["tensors"]
    template_vars = dict(
        model_name=model_name,
        hf_gb_version=__version__,
        base_model=base_model,
        gb_config=gb.config.to_dict(),
        n_covered=len(tensors),
        n_banks=len(gb.banks),
        n_uncompressed=len(gb.uncompressed_state_dict()),
        covered_params=stats["covered_params"],
        gnet_params=stats["gnet_params"],
        uncompressed_params=stats["uncompressed_params"],
        covered_compression=stats["covered_compression"],
        overall_compression=stats["overall_compression"],
        tensors=tensors[:MAX_TENSOR_ROWS],
        tensors_left_out=max(0, len(tensors) - MAX_TENSOR_ROWS),
        skipped=stats["skipped"],
        files=files,
        total_bytes=sum(f["size"] for f in files),
        dense_dtype=dense_dtype,
        dense_bytes=dense_bytes,
        training={**_training(kwargs.get("training_args"), state), **(kwargs.get("training") or {})},
        results=results,
        load_path=str(load_path).replace("\\", "/"),
        has_tokenizer=any(f["name"].startswith(("tokenizer", "vocab", "merges", "spiece")) for f in files),
    )
    return ModelCard.from_template(data, template_path=template_path(), **template_vars)


def _merge(card, existing_path: str):
    """Put ``card``'s hf_gb section and metadata into the README at ``existing_path``; returns the merged card."""
    import yaml
    from huggingface_hub import ModelCard

    ours = card.text
    section = ours[ours.index(SECTION_START) : ours.index(SECTION_END) + len(SECTION_END)]
    try:
        existing = ModelCard.load(existing_path)
        text, metadata = existing.text, existing.data.to_dict()
    except (ValueError, yaml.YAMLError) as e:  # keep the user's file as text rather than fail the save
        logger.warning("%s has metadata hf_gb cannot parse (%s); keeping it as text", existing_path, e)
        with open(existing_path, encoding="utf-8") as f:
            text, metadata = "\n" + f.read(), {}
    if SECTION_START in text and SECTION_END in text:
        start, end = text.index(SECTION_START), text.index(SECTION_END) + len(SECTION_END)
        text = text[:start] + section + text[end:]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    for key, value in card.data.to_dict().items():
        if key == "tags":
            theirs = metadata.get("tags") or []
            value = list(dict.fromkeys([*([theirs] if isinstance(theirs, str) else theirs), *value]))
        if value is not None:
            metadata[key] = value
    data = type(card.data)(**metadata)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{text if text.startswith(chr(10)) else chr(10) + text}")


def load_card(path: str):
    """Read and check a checkpoint's card: it must parse as a ``ModelCard`` whose metadata is valid hf_gb metadata.

    ``path`` is the README or its folder. Raises ``ValueError`` naming the problem; returns the ``ModelCard``.
    (``ModelCard.validate`` needs the Hub; this check runs offline.)
    """
    from huggingface_hub import ModelCard, ModelCardData
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.isdir(path):
        path = os.path.join(path, README_NAME)
    card = ModelCard.load(path)
    data = card.data
    if not isinstance(data, ModelCardData):
        raise ValueError(f"{path}: metadata did not parse as ModelCardData")
    if data.library_name != "hf_gb" or "genomic-bottleneck" not in (data.tags or []):
        raise ValueError(f"{path}: metadata lacks library_name: hf_gb or the genomic-bottleneck tag")
    for base in [data.base_model] if isinstance(data.base_model, str) else (data.base_model or []):
        try:
            validate_repo_id(base)
        except HFValidationError as e:
            raise ValueError(f"{path}: base_model {base!r} is not a Hub repo id: {e}") from e
    roundtrip = ModelCardData(**data.to_dict())
    if roundtrip.to_dict() != data.to_dict():
        raise ValueError(f"{path}: metadata does not round-trip through ModelCardData")
    if card.text.count(SECTION_START) != 1 or card.text.count(SECTION_END) != 1:
        raise ValueError(f"{path}: expected exactly one hf_gb section")
    return card


def write_model_card(gb: Any, directory: str, target_directory: str | None = None, **kwargs: Any) -> str:
    """Write ``README.md`` describing the compressed checkpoint of ``gb`` into ``directory``.

    ``directory`` holds the checkpoint files (sizes are read from it); when ``target_directory`` (the folder the
    files will end up in) already has a ``README.md``, that README is updated instead: our section replaced or
    appended, its metadata merged. See `render_card` for the keyword arguments.
    """
    card = render_card(gb, directory, target_directory=target_directory, **kwargs)
    existing = os.path.join(target_directory or directory, README_NAME)
    if os.path.islink(existing):  # never read (and later upload) whatever a link points at
        logger.warning("%s is a symbolic link; it is replaced by the new card, not merged into it", existing)
    elif os.path.isfile(existing):
        card = _merge(card, existing)
    path = os.path.join(directory, README_NAME)
    atomic_write_text(path, str(card))  # replaces a link at `path` instead of writing through it
    load_card(path)  # the card must parse back as valid metadata; fails loudly here rather than on the Hub
    return path
