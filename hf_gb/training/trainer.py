"""`GBTrainer` and `GBTrainingArguments`: train a transformers model through its genomic bottleneck.

Where the bottleneck hooks into ``transformers.Trainer`` (docs/design.md §2), per optimizer step:

- ``training_step`` (every micro-batch): Trainer's forward and backward; the covered weights' ``.grad`` accumulate
  (and DDP averages them on the sync micro-batch). On the sync micro-batch only, `GenomicBottleneck.push_gradients`
  turns them into g-net gradients, before Trainer clips them.
- ``_clip_grad_norm`` / ``_get_grad_norm``: over the optimizer's parameters (g-nets and uncompressed tensors), not
  ``model.parameters()``, which do not hold the g-nets.
- ``on_optimizer_step`` (a callback that runs before every other callback): zero the g-net gradients (Trainer zeroes
  only the model's) and predict the weights of the new g-nets, so that evaluation, checkpoints and callbacks see them.

Checkpoints (``save_model``, ``save_steps``, ``load_best_model_at_end``, ``resume_from_checkpoint``) hold the
compressed format of `hf_gb.io.checkpoint`; after every load the weights are predicted again.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import HubStrategy
from transformers.training_args import ParallelMode

from ..engine.bottleneck import Bottleneck
from ..engine.config import GBConfig, read_config_json
from ..files import (
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    MODEL_CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_write,
    remove_stale_staging,
)
from ..io.checkpoint import load_checkpoint_state
from ..io.checks import CHECKPOINT_RE, resume_checkpoint
from ..io.model_card import write_model_card
from ..io.pretrained import GenomicBottleneck
from . import distributed
from .arguments import GBTrainingArguments
from .deepspeed import DeepSpeedTrainerMixin
from .distributed import broadcast_gnets, check_replicas
from .fsdp import FSDP2TrainerMixin

logger = logging.getLogger(__name__)

__all__ = ["GBTrainer"]

# GBConfig fields whose disagreement between a checkpoint and the trainer makes the checkpoint unusable.
_IGNORED_ON_LOAD = ("kernel", "seed", "skip_nonfinite")


class _BottleneckCallback(TrainerCallback):
    """Keeps the model's covered weights equal to the prediction of the current g-nets."""

    def __init__(self, trainer: GBTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._begin_training()

    def on_optimizer_step(self, args, state, control, **kwargs):
        gb = self.trainer.gb
        gb.zero_grad(set_to_none=True)  # Trainer's model.zero_grad() never reaches the g-nets
        self.trainer._predict_weights(train=True, completed_steps=state.global_step + 1)  # counted after this hook

    def on_train_end(self, args, state, control, **kwargs):
        if self.trainer.gb.config.stochastic:
            self.trainer._predict_weights(train=False)  # leave the noise-free mean in the model
        try:
            self.trainer.check_replicas()
        except RuntimeError as e:  # e.g. non-deterministic kernels; do not cost the user the trained model
            logger.warning("%s; the main process's g-nets are the ones saved", e)


class GBTrainer(FSDP2TrainerMixin, DeepSpeedTrainerMixin, Trainer):
    """`transformers.Trainer` that trains the g-nets of a genomic bottleneck instead of the model's weights.

    Takes every ``Trainer`` argument plus ``gb_config`` (default: ``args.to_gb_config()`` for
    `GBTrainingArguments`, else ``GBConfig()``) or ``gb``, a `GenomicBottleneck` already attached to ``model``
    (e.g. from ``GenomicBottleneck.from_pretrained`` to continue training). The bottleneck is ``trainer.gb``. A
    model that already has one attached (by an earlier GBTrainer: a re-run notebook cell, a resume with other
    arguments) keeps it, g-nets as they are, as Trainer keeps a model's weights; settings that differ from its
    config raise ``ValueError`` naming them (``gb.detach_model()`` first to start new g-nets).
    The optimizer holds the g-net parameters and the uncompressed model parameters only; an optimizer passed in
    ``optimizers`` must hold all of ``trainer.gb.parameters()``. ``save_model`` and checkpoints write the compressed
    format, loadable with `hf_gb.load_compressed`. Under DDP every rank keeps the same g-nets and predicts the same
    weights; under FSDP2 (``fsdp_version=2``) every rank keeps the same g-nets and predicts only the tiles of its own
    rows (`hf_gb.engine.shards`); under DeepSpeed ZeRO stage 1 or 2 as under DDP, with the g-net gradients handed to
    DeepSpeed's optimizer (`hf_gb.training.deepspeed`); under ZeRO stage 3 each rank predicts only its own
    partitions. FSDP1 is refused at start (`hf_gb.training.distributed.check_setup`).

    Example::

        >>> from transformers import AutoModelForCausalLM, LlamaConfig
        >>> from hf_gb import GBConfig, GBTrainer, GBTrainingArguments
        >>> model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=32,
        ...     intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4))
        >>> trainer = GBTrainer(model=model, args=GBTrainingArguments("out", report_to="none", use_cpu=True),
        ...                     gb_config=GBConfig(hidden_dim=8, tile_size=32))
        >>> trainer.gb.stats()["covered_compression"] > 1
        True
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        *trainer_args: Any,
        gb_config: GBConfig | None = None,
        gb: GenomicBottleneck | None = None,
        **trainer_kwargs: Any,
    ):
        if args is not None:
            distributed.check_arguments(args, "GBTrainer")
        if gb is not None:
            if model is None:
                model = gb.model
            elif gb.model is not model:
                raise ValueError("`gb` is attached to another model than `model`; pass the model `gb.model`")
            if gb_config is not None and gb_config != gb.config:
                raise ValueError(f"`gb_config` ({gb_config}) disagrees with `gb.config` ({gb.config}); pass one")
            gb_config = gb.config
        elif gb_config is None and isinstance(args, GBTrainingArguments):
            gb_config = args.to_gb_config()
        self._settings_given = gb_config is not None  # else an attached bottleneck's settings are taken as they are
        self.gb_config = gb_config if gb_config is not None else GBConfig()
        self.gb: GenomicBottleneck | None = gb
        self._detached_gnets: list | None = None  # g-net groups kept out of Accelerate's FSDP2 prepare
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        distributed.check_launch(self.accelerator.num_processes, "GBTrainer", "pass use_cpu=True (--use_cpu)")
        self._run_kind = distributed.check_setup(self.accelerator, *distributed.requested(self.args), "GBTrainer")
        if self.accelerator.num_processes > 1 and self.args.parallel_mode != ParallelMode.DISTRIBUTED:
            raise RuntimeError(
                f"{self.accelerator.num_processes} processes were launched but Trainer will not wrap the model in "
                f"DistributedDataParallel (parallel_mode={self.args.parallel_mode.value}), so the ranks' g-nets would "
                "drift apart; on a machine without GPUs pass use_cpu=True (--use_cpu) to train over gloo"
            )
        self._check_trainable(self._ensure_bottleneck())
        if self.optimizer is not None:
            self._check_optimizer(self.optimizer)
            self._detach_for_fsdp2()
            self._join_model_for_deepspeed()
        # First in line, so that every other callback's on_optimizer_step / on_step_end sees the new weights.
        self.callback_handler.callbacks.insert(0, _BottleneckCallback(self))
        logger.info("Genomic bottleneck:\n%s", self.gb.summary(per_tensor=False))

    # ----------------------------------------------------------------- the bottleneck
    def _ensure_bottleneck(self) -> GenomicBottleneck:
        """Attach g-nets to ``self.model`` (again, when ``model_init`` replaced it) on the model's device."""
        if self.gb is None or self.gb.model is not self.model:
            if self.model is None:
                raise ValueError("GBTrainer needs a model (or model_init) to attach the genomic bottleneck to")
            self.gb = self._attached() or GenomicBottleneck(self.model, self.gb_config)
        device = next((t.param.device for t in self.gb.covered), None)
        first = next(iter(self.gb.parameters()), None)
        if device is not None and first is not None and first.device != device:
            self.gb.to(device)
        return self.gb

    def _attached(self) -> GenomicBottleneck | None:
        """The bottleneck already attached to ``self.model``, if any, checked against this trainer's settings."""
        gb = Bottleneck.attached_to(self.model)
        if gb is None:
            return None
        name = type(self.model).__name__
        if not isinstance(gb, GenomicBottleneck):
            raise TypeError(f"{name} has an engine Bottleneck attached; GBTrainer trains and saves a "
                            "hf_gb.GenomicBottleneck: build that one, or call detach_model() on this one first")
        differ = self.gb_config.differences(gb.config) if self._settings_given else []
        if differ:
            listed = ", ".join(f"{n}={theirs!r} attached, {mine!r} asked for" for n, mine, theirs in differ)
            raise ValueError(
                f"{name} already has a GenomicBottleneck attached, with other settings than this GBTrainer's "
                f"({listed}); train it with its own settings (or gb=that bottleneck), or call its detach_model() "
                "first to start new g-nets"
            )
        logger.info("GBTrainer: training the GenomicBottleneck already attached to %s, its g-nets as they are", name)
        self.gb_config = gb.config
        return gb

    @staticmethod
    def _check_trainable(gb: GenomicBottleneck) -> None:
        frozen = [t.name for t in gb.covered if not t.param.requires_grad]
        if frozen:
            raise ValueError(
                f"{len(frozen)} covered weights have requires_grad=False (e.g. {frozen[0]}), so no gradient would "
                "reach their g-nets; unfreeze them (model.requires_grad_(True)) or leave them out of the "
                "bottleneck (gb_exclude_modules)"
            )
        if not gb.covered and not gb.uncompressed_parameters():
            raise ValueError("Nothing to train: the bottleneck covers no weight and no model parameter requires grad")

    def _predict_weights(self, train: bool, completed_steps: int | None = None) -> None:
        """Predict the covered weights; in training with ``stochastic``, noise seeded by the optimizer steps done.

        The seed makes every rank draw the same noise, a resumed run draw the noise of the uninterrupted one, and
        a re-prediction within one step (after evaluation) reproduce the prediction its gradients will be pushed to.
        """
        gb = self._ensure_bottleneck()
        with self._gnets_for_prediction(keep_graph=train):  # ZeRO-3: the g-nets gathered (hf_gb.training.deepspeed)
            if not (train and gb.config.stochastic):
                gb.predict_weights(sample=False, keep_graph=train)
                return
            step = self.state.global_step if completed_steps is None else completed_steps
            gb.predict_weights(sample=True, step=step)

    def _begin_training(self) -> None:
        gb = self._ensure_bottleneck()
        gb.zero_grad(set_to_none=True)  # e.g. of a step that auto_find_batch_size abandoned (out of memory)
        if self._sharded and not gb.sharded:
            raise RuntimeError("GBTrainer runs under FSDP2 but the covered weights are not sharded DTensors")
        if self.accelerator.num_processes > 1:
            # DDP has already broadcast the uncompressed parameters; the g-nets follow rank 0's too.
            broadcast_gnets(gb)
        self._predict_weights(train=True)
        self.check_replicas()

    def check_replicas(self) -> None:
        """Raise ``RuntimeError`` unless every process holds the same g-nets and predicted weights.

        Compares float64 checksums of the g-net tensors (and output scales) and, under DDP, of the covered weights
        across processes (under FSDP2 each rank holds other rows, predicted from the same g-nets); a no-op in a
        single process.
        """
        if self.accelerator.num_processes <= 1:
            return
        check_replicas(self.gb, lambda x: self.accelerator.gather(x.to(self.args.device)))

    # ----------------------------------------------------------------- the step
    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Last micro-batch: W.grad is complete (and all-reduced under DDP). DeepSpeed stepped inside backward;
        # its engine pushed just before (`hf_gb.training.deepspeed`).
        if self.accelerator.sync_gradients and not self._deepspeed:
            self.gb.push_gradients()
        return loss

    def _optimized_parameters(self) -> list[nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _clip_grad_norm(self, model: nn.Module):
        return self.accelerator.clip_grad_norm_(self._optimized_parameters(), self.args.max_grad_norm)

    def _get_grad_norm(self, model: nn.Module, grad_norm=None):
        if grad_norm is None:
            grad_norm = self.accelerator.clip_grad_norm_(self._optimized_parameters(), float("inf"))
        return grad_norm

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """AdamW (or ``args.optim``) over three groups: g-nets (``gb_weight_decay``, default 0, and
        ``gb_learning_rate`` when set), then the uncompressed parameters with and without ``weight_decay`` by
        Trainer's rule (no decay for biases and norms)."""
        gb = self._ensure_bottleneck()
        if self.optimizer is not None:
            self._check_optimizer(self.optimizer)
            return self.optimizer
        uncompressed = {id(p) for p in gb.uncompressed_parameters()}
        named = [(n, p) for n, p in self.model.named_parameters() if id(p) in uncompressed]
        decay = set(self.get_decay_parameter_names(self.model))
        groups = [
            {"params": list(gb.parameters()), "weight_decay": getattr(self.args, "gb_weight_decay", 0.0)},
            {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        gnet_lr = getattr(self.args, "gb_learning_rate", None)
        if gnet_lr is not None:
            groups[0]["lr"] = gnet_lr
        groups = [g for g in groups if g["params"]]
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        own_groups = {"params", "model", "optimizer_dict"} & set(optimizer_kwargs)
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)) or own_groups:
            raise ValueError(
                f"optim={self.args.optim!r} builds its optimizer from the model's own parameters, which GBTrainer "
                "does not train; use a standard optimizer (e.g. adamw_torch) or pass `optimizers=` built over "
                "trainer.gb.parameters() and trainer.gb.uncompressed_parameters()"
            )
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        self._detach_for_fsdp2()
        self._join_model_for_deepspeed()
        return self.optimizer

    def _check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, p in self.gb.named_parameters() if id(p) not in held]
        if missing:
            raise ValueError(
                f"The optimizer does not hold {len(missing)} g-net parameters (e.g. {missing[0]!r}); build it over "
                "[*gb.parameters(), *gb.uncompressed_parameters()]"
            )
        covered = {id(t.param): t.name for t in self.gb.covered}
        trained = [covered[i] for i in held if i in covered]
        if trained:
            raise ValueError(f"The optimizer holds predicted weights (e.g. {trained[0]!r}); the g-nets overwrite them")

    def evaluation_loop(self, *args: Any, **kwargs: Any):
        if not self.gb.config.stochastic:
            return super().evaluation_loop(*args, **kwargs)  # the weights are already the current prediction
        self._predict_weights(train=False)  # evaluate the mean, not one noise sample
        try:
            return super().evaluation_loop(*args, **kwargs)
        finally:
            if self.is_in_train:
                self._predict_weights(train=True)  # same seed: the sample this step's gradients belong to

    # ----------------------------------------------------------------- checkpoints
    def _save_compressed(self, output_dir: str | None, state_dict: dict | None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        if state_dict is not None and not self._deepspeed:  # under DeepSpeed, Trainer's save_model always passes one
            logger.warning("GBTrainer saves the g-nets and uncompressed tensors; ignoring the given state_dict")
        os.makedirs(output_dir, exist_ok=True)
        logger.info("Saving compressed checkpoint to %s", output_dir)
        if CHECKPOINT_RE.match(os.path.basename(os.path.normpath(output_dir))):
            # Staging folders left by saves that were killed in sibling checkpoints (this one cleans its own).
            run_dir = os.path.dirname(os.path.normpath(output_dir))
            for name in os.listdir(run_dir):
                if CHECKPOINT_RE.match(name) and os.path.isdir(os.path.join(run_dir, name)):
                    remove_stale_staging(os.path.join(run_dir, name))
        processing_class = self.processing_class
        if processing_class is None:
            processing_class = getattr(self.data_collator, "tokenizer", None)
        card = {"trainer_state": self.state, "training_args": self.args}
        self.gb.save_pretrained(output_dir, processing_class=processing_class, model_card_kwargs=card)
        atomic_write(os.path.join(output_dir, TRAINING_ARGS_NAME), lambda tmp: torch.save(self.args, tmp))

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """`Trainer.train`; ``resume_from_checkpoint=True`` picks the newest *complete* checkpoint of ``output_dir``
        (see `last_complete_checkpoint`), skipping incomplete ones with a warning; a folder that holds none raises
        Trainer's error, with the reason after it (`resume_checkpoint`)."""
        resume_from_checkpoint = resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def load_compressed_state(self, checkpoint: str) -> None:
        """Load the g-nets and uncompressed tensors of a compressed checkpoint folder into ``trainer.gb`` (and the
        model), in place (the optimizer keeps its parameters), and predict the weights."""
        gb = self._ensure_bottleneck()
        info = read_config_json(os.path.join(checkpoint, CONFIG_NAME))
        for name, ours, theirs in gb.config.differences(info["gb_config"], ignore=_IGNORED_ON_LOAD):
            raise ValueError(f"{os.path.join(checkpoint, CONFIG_NAME)} has {name}={theirs!r}, but this trainer's "
                             f"g-nets have {name}={ours!r}")
        load_checkpoint_state(gb, checkpoint, info)  # predicts (noise-free); training predicts again on_train_begin

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        logger.info("Loading compressed checkpoint from %s", resume_from_checkpoint)
        self.load_compressed_state(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        logger.info("Loading best model from %s (score: %s)", best, self.state.best_metric)
        self.load_compressed_state(best)

    # ----------------------------------------------------------------- hub (minimal; see hf_gb.io.model_card)
    def create_model_card(self, **kwargs: Any) -> None:
        """Write the hf_gb model card ``README.md`` into ``args.output_dir`` (main process only)."""
        if not self.is_world_process_zero():
            return
        os.makedirs(self.args.output_dir, exist_ok=True)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if getattr(self, "hub_model_id", None):
            kwargs.setdefault("repo_id", self.hub_model_id)  # the card's load snippet names the Hub repo
        write_model_card(self.gb, self.args.output_dir, trainer_state=self.state, training_args=self.args, **kwargs)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Copy the compressed files of ``checkpoint_folder`` to ``output_dir``, then let Trainer upload it."""
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        in_progress = getattr(self, "push_in_progress", None)
        if not self.args.hub_always_push and in_progress is not None and not in_progress.is_done():
            return
        for name in (MODEL_CONFIG_NAME, GENERATION_CONFIG_NAME, CONFIG_NAME, WEIGHTS_NAME):  # the hf_gb pair last
            source = os.path.join(checkpoint_folder, name)
            if os.path.isfile(source) and not os.path.islink(source):
                target = os.path.join(self.args.output_dir, name)
                atomic_write(target, lambda tmp, source=source: shutil.copyfile(source, tmp))
        self.create_model_card()  # updates a README the user keeps in output_dir instead of copying over it
        super()._push_from_checkpoint(checkpoint_folder)
