"""Distillation: train a bottleneck-wrapped student to reproduce a frozen, pretrained teacher.

Regression to the teacher's weights (`hf_gb.compress.regression`) keeps little of what pretrained weights encode;
training the compressed model to reproduce the teacher's *outputs* does. `GBDistillationTrainer` is a `GBTrainer`
whose loss is

    kl_weight * T^2 * KL(softmax(teacher_logits / T) || softmax(student_logits / T))    (models with logits)
  + embedding_mse_weight * MSE(mean-pooled student, mean-pooled teacher)                 (last hidden state)
  + embedding_cosine_weight * (1 - cos(mean-pooled student, mean-pooled teacher))
  + hidden_weight * MSE over hidden states (student layer i against teacher layer round(i * L_t / L_s))
  + task_weight * the student's own loss (when the batch has labels)

averaged over the tokens the attention mask keeps. The teacher is frozen (``requires_grad=False``), in eval mode, on
the student's device and in its dtype, and runs under ``no_grad``; under DDP every rank holds its own copy.
The student starts as a copy of the teacher whose covered weights the g-nets then predict: from g-nets fitted to
the teacher's weights (``distill_init="regression"``, `hf_gb.compress.regression.fit_to_weights`) or freshly
calibrated ones (``"scratch"``); the uncompressed tensors (embeddings, norms, biases) start as the teacher's in both
cases.

Example::

    >>> import torch, transformers
    >>> from hf_gb.compress.distill import GBDistillationArguments, GBDistillationTrainer
    >>> teacher = transformers.BertModel(transformers.BertConfig(vocab_size=64, hidden_size=32,
    ...     num_hidden_layers=2, num_attention_heads=2, intermediate_size=64), add_pooling_layer=False)
    >>> args = GBDistillationArguments("out", report_to="none", use_cpu=True, gb_hidden_dim=4, gb_tile_size=[16],
    ...                                distill_regression_steps=2)
    >>> trainer = GBDistillationTrainer(teacher=teacher, args=args)
    >>> sorted(k for k, v in trainer.loss_weights.items() if v)
    ['embedding_cosine']
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.config import GBConfig
from ..io.model_card import write_model_card
from ..io.pretrained import GenomicBottleneck
from ..training.arguments import GBTrainingArguments
from ..training.trainer import GBTrainer
from .regression import covered_weights, fit_to_weights, relative_errors

logger = logging.getLogger(__name__)

__all__ = ["GBDistillationArguments", "GBDistillationTrainer", "build_student", "distillation_loss", "mean_pool"]

INITS = ("regression", "scratch")
LOSSES = ("kl", "embedding_mse", "embedding_cosine", "hidden", "task")


def _weight_field(default: float | None, help_text: str) -> Any:
    return field(default=default, metadata={"help": f"Distillation: {help_text}"})


@dataclass
class GBDistillationArguments(GBTrainingArguments):
    """`GBTrainingArguments` plus the distillation settings, each prefixed ``distill_``.

    Loss weights left at ``None`` are chosen from the model: KL on logits (weight 1) for models that return logits,
    else cosine on the mean-pooled last hidden state (weight 1); the others default to 0.

    Example::

        >>> from transformers import HfArgumentParser
        >>> from hf_gb.compress.distill import GBDistillationArguments
        >>> (args,) = HfArgumentParser(GBDistillationArguments).parse_args_into_dataclasses(
        ...     ["--output_dir", "out", "--distill_temperature", "4", "--distill_init", "scratch"])
        >>> args.distill_temperature, args.distill_init
        (4.0, 'scratch')
    """

    distill_temperature: float = _weight_field(2.0, "softmax temperature T of the KL on logits (scaled by T^2).")
    distill_kl_weight: float | None = _weight_field(
        None, "weight of the KL between teacher and student logits (default: 1 when the model returns logits).")
    distill_embedding_mse_weight: float = _weight_field(
        0.0, "weight of the MSE between mean-pooled last hidden states.")
    distill_embedding_cosine_weight: float | None = _weight_field(
        None, "weight of 1 - cosine between mean-pooled last hidden states (default: 1 for models without logits).")
    distill_hidden_weight: float = _weight_field(0.0, "weight of the MSE between hidden states, layer by layer.")
    distill_task_weight: float = _weight_field(0.0, "weight of the student's own loss (batches with labels).")
    distill_init: str = field(
        default="regression",
        metadata={"help": "Distillation: how the student's g-nets start: 'regression' (fitted to the teacher's "
                  "weights) or 'scratch' (calibrated to their scale only)."},
    )
    distill_regression_steps: int = _weight_field(100, "Adam steps of the regression fit (distill_init=regression).")
    distill_regression_lr: float = _weight_field(1e-2, "peak learning rate of the regression fit.")

    def __post_init__(self):
        super().__post_init__()
        if self.distill_init not in INITS:
            raise ValueError(f"distill_init must be one of {INITS}, got distill_init={self.distill_init!r}")
        if not (math.isfinite(self.distill_temperature) and self.distill_temperature > 0):
            raise ValueError(f"distill_temperature must be > 0, got distill_temperature={self.distill_temperature}")
        for name in LOSSES:
            value = getattr(self, f"distill_{name}_weight")
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"distill_{name}_weight must be >= 0, got distill_{name}_weight={value}")
        if self.distill_regression_steps < 0:
            raise ValueError(f"distill_regression_steps must be >= 0, got {self.distill_regression_steps}")

    def loss_weights(self) -> dict[str, float | None]:
        return {name: getattr(self, f"distill_{name}_weight") for name in LOSSES}


# ----------------------------------------------------------------------------- losses
def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the tokens the mask keeps: (B, T, H), (B, T) -> (B, H) (sentence-transformers' mean pooling)."""
    if attention_mask is None:
        return hidden.mean(1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def _last_hidden(outputs: Any) -> torch.Tensor | None:
    last = getattr(outputs, "last_hidden_state", None)
    if last is None and getattr(outputs, "hidden_states", None) is not None:
        last = outputs.hidden_states[-1]
    return last


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of (B, T) ``values`` over the positions ``mask`` keeps."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def distillation_loss(
    student: Any,
    teacher: Any,
    attention_mask: torch.Tensor | None,
    weights: dict[str, float],
    temperature: float = 2.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted distillation loss of one batch and its parts (detached floats, before weighting).

    ``student`` and ``teacher`` are model outputs (``logits``, ``last_hidden_state`` and/or ``hidden_states``;
    the student's ``loss`` for the task term); ``weights`` maps the names of `LOSSES` to weights (0 skips a term).
    A term with a positive weight whose inputs the outputs lack raises ``ValueError`` naming it.
    """
    total, parts = None, {}

    def add(name: str, value: torch.Tensor) -> None:
        nonlocal total
        parts[name] = float(value.detach())
        term = weights[name] * value
        total = term if total is None else total + term

    if weights.get("kl"):
        s, t = getattr(student, "logits", None), getattr(teacher, "logits", None)
        if s is None or t is None:
            raise ValueError("distill_kl_weight > 0 but the model returns no logits; use the embedding losses")
        log_p_s = F.log_softmax(s.float() / temperature, dim=-1)
        log_p_t = F.log_softmax(t.float() / temperature, dim=-1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # (B, T) or (B,)
        mask = attention_mask if kl.dim() == 2 else None
        add("kl", _masked_mean(kl, mask) * temperature**2)
    if weights.get("embedding_mse") or weights.get("embedding_cosine"):
        s, t = _last_hidden(student), _last_hidden(teacher)
        if s is None or t is None:
            raise ValueError("the embedding losses need last_hidden_state or hidden_states in the model outputs")
        ps, pt = mean_pool(s.float(), attention_mask), mean_pool(t.float(), attention_mask)
        if weights.get("embedding_mse"):
            add("embedding_mse", F.mse_loss(ps, pt))
        if weights.get("embedding_cosine"):
            add("embedding_cosine", 1 - F.cosine_similarity(ps, pt, dim=-1).mean())
    if weights.get("hidden"):
        hs, ht = getattr(student, "hidden_states", None), getattr(teacher, "hidden_states", None)
        if hs is None or ht is None:
            raise ValueError("distill_hidden_weight > 0 but the outputs lack hidden_states")
        pairs = [(hs[i], ht[round(i * (len(ht) - 1) / max(1, len(hs) - 1))]) for i in range(len(hs))]
        if any(a.shape != b.shape for a, b in pairs):
            raise ValueError(f"hidden states of student {tuple(hs[-1].shape)} and teacher {tuple(ht[-1].shape)} "
                             "differ in shape; set distill_hidden_weight=0 for a narrower student")
        mse = [_masked_mean((a.float() - b.float()).pow(2).mean(-1), attention_mask) for a, b in pairs]
        add("hidden", torch.stack(mse).mean())
    if weights.get("task"):
        task = getattr(student, "loss", None)
        if task is None:
            raise ValueError("distill_task_weight > 0 but the batch has no labels (the student returned no loss)")
        add("task", task)
    if total is None:
        raise ValueError(f"every distillation loss weight is 0: {weights}")
    return total, parts


def resolve_weights(weights: dict[str, float | None], has_logits: bool) -> dict[str, float]:
    """Fill the ``None`` weights: KL for models with logits, else cosine on pooled embeddings."""
    out = {k: (0.0 if v is None else float(v)) for k, v in weights.items()}
    if weights.get("kl") is None:
        out["kl"] = 1.0 if has_logits else 0.0
    if weights.get("embedding_cosine") is None:
        out["embedding_cosine"] = 0.0 if has_logits else 1.0
    return out


def _has_logits(model: nn.Module) -> bool:
    """Whether ``model`` returns logits: a transformers head class (``XForY``) or a model with output embeddings."""
    get_head = getattr(model, "get_output_embeddings", None)
    return "For" in type(model).__name__ or (callable(get_head) and get_head() is not None)


# ----------------------------------------------------------------------------- student
def build_student(
    teacher: nn.Module,
    config: GBConfig | None = None,
    init: str = "regression",
    regression_steps: int = 100,
    regression_lr: float = 1e-2,
    progress: bool = False,
) -> tuple[nn.Module, GenomicBottleneck, dict[str, float]]:
    """A copy of ``teacher`` with g-nets attached: fitted to its weights (``"regression"``) or calibrated only.

    Returns ``(student, gb, relative weight errors per covered tensor)``; the teacher is not changed.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got init={init!r}")
    student = copy.deepcopy(teacher)
    student.requires_grad_(True)
    targets = covered_weights(student)
    gb = GenomicBottleneck(student, config)
    if init == "regression" and regression_steps > 0:
        errors = fit_to_weights(gb, targets, steps=regression_steps, lr=regression_lr, progress=progress)
    else:
        errors = relative_errors(gb, targets)
    return student, gb, errors


# ----------------------------------------------------------------------------- trainer
class GBDistillationTrainer(GBTrainer):
    """`GBTrainer` that trains the student's g-nets to reproduce a frozen ``teacher`` (see the module docstring).

    Takes every `GBTrainer` argument plus ``teacher``. Without ``model`` (and ``gb``) the student is built from the
    teacher with `build_student` as ``args`` say (``distill_init``, ``distill_regression_*``; `GBDistillationArguments`
    or defaults). ``trainer.loss_weights`` holds the weights in use; ``trainer.last_losses`` the parts of the last
    training batch; `distillation_scores` the held-out agreement with the teacher.
    """

    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean; Trainer divides it by the GA steps

    def __init__(
        self,
        model: nn.Module | None = None,
        args: GBTrainingArguments | None = None,
        *trainer_args: Any,
        teacher: nn.Module | None = None,
        gb: GenomicBottleneck | None = None,
        gb_config: GBConfig | None = None,
        **trainer_kwargs: Any,
    ):
        if teacher is None:
            raise ValueError("GBDistillationTrainer needs `teacher=`, the pretrained model to distil")
        if args is None:
            raise ValueError("GBDistillationTrainer needs `args` (GBDistillationArguments)")
        self.regression_errors: dict[str, float] | None = None
        if model is None and gb is None:
            config = gb_config or (args.to_gb_config() if isinstance(args, GBTrainingArguments) else GBConfig())
            model, gb, self.regression_errors = build_student(
                teacher, config, init=getattr(args, "distill_init", "regression"),
                regression_steps=getattr(args, "distill_regression_steps", 100),
                regression_lr=getattr(args, "distill_regression_lr", 1e-2),
            )
            gb_config = None
        super().__init__(model, args, *trainer_args, gb=gb, gb_config=gb_config, **trainer_kwargs)
        self.model_accepts_loss_kwargs = False
        first = next(self.model.parameters())
        self.teacher = teacher.to(device=first.device, dtype=first.dtype).eval().requires_grad_(False)
        weights = args.loss_weights() if isinstance(args, GBDistillationArguments) else {}
        self.loss_weights = resolve_weights({k: weights.get(k) for k in LOSSES}, _has_logits(self.model))
        self.temperature = getattr(args, "distill_temperature", 2.0)
        self.last_losses: dict[str, float] = {}

    def _forward_both(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[Any, Any, torch.Tensor | None]:
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        hidden = bool(self.loss_weights["hidden"])
        extra = {"output_hidden_states": True} if hidden else {}
        student_inputs = {**inputs, **({"labels": labels} if labels is not None and self.loss_weights["task"] else {})}
        student = model(**student_inputs, **extra)
        with torch.no_grad():
            teacher = self.teacher(**inputs, **extra)
        return student, teacher, inputs.get("attention_mask")

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        student, teacher, mask = self._forward_both(model, inputs)
        loss, parts = distillation_loss(student, teacher, mask, self.loss_weights, self.temperature)
        if model.training:
            self.last_losses = {**parts, "loss": float(loss.detach())}
        return (loss, student) if return_outputs else loss

    def describe_loss(self) -> str:
        """The loss in use, e.g. ``"1 * kl (temperature 2)"``, for logs and model cards."""
        used = " + ".join(f"{w:g} * {k}" for k, w in self.loss_weights.items() if w)
        return used + (f" (temperature {self.temperature:g})" if self.loss_weights["kl"] else "")

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The compressed checkpoint of `GBTrainer`, its model card also naming the teacher, loss and init."""
        super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        name = getattr(getattr(self.teacher, "config", None), "_name_or_path", None) or None
        rows = {"method": f"distillation from {name or type(self.teacher).__name__}",
                "distillation_loss": self.describe_loss(), "student_init": getattr(self.args, "distill_init", "given")}
        write_model_card(self.gb, output_dir if output_dir is not None else self.args.output_dir,
                         trainer_state=self.state, training_args=self.args, training=rows, base_model=name)

    @torch.no_grad()
    def distillation_scores(self, dataset: Any = None) -> dict[str, float]:
        """Agreement with the teacher on ``dataset`` (default ``eval_dataset``): the mean distillation loss and its
        parts, and for the embedding terms the mean and minimum cosine between pooled embeddings."""
        loader = self.get_eval_dataloader(dataset)
        was_training = self.model.training
        self.model.eval()
        sums: dict[str, float] = {}
        cosines: list[torch.Tensor] = []
        batches = 0
        try:
            for inputs in loader:
                inputs = self._prepare_inputs(inputs)
                student, teacher, mask = self._forward_both(self.model, inputs)
                loss, parts = distillation_loss(student, teacher, mask, self.loss_weights, self.temperature)
                for k, v in {"loss": float(loss), **parts}.items():
                    sums[k] = sums.get(k, 0.0) + v
                batches += 1
                s, t = _last_hidden(student), _last_hidden(teacher)
                if s is not None and t is not None and s.shape == t.shape and not self.loss_weights["kl"]:
                    cosines.append(F.cosine_similarity(mean_pool(s.float(), mask), mean_pool(t.float(), mask), -1))
        finally:
            self.model.train(was_training)
        if not batches:
            raise ValueError("distillation_scores: the evaluation dataset is empty")
        out = {k: v / batches for k, v in sums.items()}
        if cosines:
            c = torch.cat(cosines)
            out.update(cosine_mean=float(c.mean()), cosine_min=float(c.min()))
        return out


# ----------------------------------------------------------------------------- one call (the CLI's)
class _ProgressBar:
    """A tqdm bar over optimizer steps showing the running (exponential mean) distillation loss."""

    def __init__(self, trainer: GBDistillationTrainer, total: int):
        from tqdm.auto import tqdm
        from transformers import TrainerCallback

        bar = tqdm(total=total, desc="distilling", unit="step")
        running: list[float] = []

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                loss = trainer.last_losses.get("loss")
                if loss is not None:
                    running[:] = [loss if not running else 0.9 * running[0] + 0.1 * loss]
                    bar.set_postfix(loss=f"{running[0]:.4f}")
                bar.update(1)

            def on_train_end(self, args, state, control, **kwargs):
                bar.close()

        self.callback = Callback()


def compress_by_distillation(
    teacher: nn.Module,
    train_dataset: Any,
    eval_dataset: Any,
    args: GBDistillationArguments,
    data_collator: Any = None,
    processing_class: Any = None,
    progress: bool = True,
) -> tuple[GBDistillationTrainer, dict[str, float], dict[str, float]]:
    """Build a student from ``teacher``, distil it for ``args.max_steps`` and score it on ``eval_dataset``.

    Returns ``(trainer, held-out scores of the untrained student, held-out scores after distillation)``; the
    bottleneck is ``trainer.gb`` (save it with ``trainer.gb.save_pretrained``).
    """
    trainer = GBDistillationTrainer(teacher=teacher, args=args, train_dataset=train_dataset,
                                    eval_dataset=eval_dataset, data_collator=data_collator,
                                    processing_class=processing_class)
    before = trainer.distillation_scores()
    if progress and args.max_steps > 0:
        trainer.add_callback(_ProgressBar(trainer, args.max_steps).callback)
    trainer.train()
    return trainer, before, trainer.distillation_scores()
