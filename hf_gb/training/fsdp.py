"""FSDP2 overrides of `GBTrainer` (kept apart so trainer.py stays one concept): the optimizer around Accelerate's
FSDP2 ``prepare``, compressed saves that gather only the uncompressed tensors, and optimizer state rank by rank.

Accelerate's FSDP2 ``prepare`` maps every optimizer parameter to a model parameter, and the g-nets are none, so the
g-nets leave the optimizer for that call and come back right after (Trainer calls ``create_scheduler`` next); the
bottleneck is then bound to the DTensor shards (`Bottleneck.rebind`). Accelerate's FSDP checkpoint savers would
write the whole sharded model (covered weights included) and map optimizer state to model parameters; instead the
compressed checkpoint holds the g-nets and the gathered uncompressed tensors, and every rank writes its optimizer
state as safetensors (`hf_gb.training.distributed.save_optimizer_shard`).
"""

from __future__ import annotations

import logging
import os

import torch
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

from . import distributed

logger = logging.getLogger(__name__)


class FSDP2TrainerMixin:
    """Mixed into `GBTrainer` before ``Trainer``; every override defers to ``Trainer`` unless FSDP2 runs."""

    @property
    def _sharded(self) -> bool:
        return self._run_kind == "fsdp2"

    def _detach_for_fsdp2(self) -> None:
        # Accelerate's FSDP2 prepare maps each optimizer parameter to a model parameter; the g-nets are none.
        if self._sharded and self._detached_gnets is None and not self.gb.sharded:
            self._detached_gnets = distributed.detach_params(self.optimizer, self.gb.parameters())

    def _after_fsdp2_prepare(self) -> None:
        """The model is sharded now: give the g-nets back to the optimizer and bind them to the DTensors."""
        if self._detached_gnets is not None:
            distributed.reattach_params(getattr(self.optimizer, "optimizer", self.optimizer), self._detached_gnets)
            self._detached_gnets = None
        model = self.accelerator.unwrap_model(self.model)
        if self.gb.rebind(model):
            logger.info("Genomic bottleneck bound to the FSDP2 shards of %d covered weights", len(self.gb.row_shards))

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self._sharded:  # Trainer calls this right after accelerator.prepare(model, optimizer)
            self._after_fsdp2_prepare()
        return super().create_scheduler(num_training_steps, optimizer)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the compressed checkpoint from the main process (all processes must call it under FSDP2, where
        the uncompressed tensors are gathered; the covered weights never are)."""
        if not self._sharded:
            return super().save_model(output_dir, _internal_call)
        self._save(output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the compressed checkpoint (main process only) plus ``training_args.bin``."""
        if self._sharded:
            with self.gb.gathered():  # a collective: every rank enters, the main process writes
                self._save_compressed(output_dir, state_dict)
            self.accelerator.wait_for_everyone()
        else:
            self._save_compressed(output_dir, state_dict)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._sharded:
            return super()._save_optimizer_and_scheduler(output_dir)
        # Accelerate's FSDP savers write the whole sharded model (covered weights included) and map optimizer
        # state to model parameters, which the g-nets are not: each rank writes its own optimizer state instead.
        distributed.save_optimizer_shard(self.optimizer, output_dir, self.args.process_index, self.args.world_size)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
        self.accelerator.wait_for_everyone()

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if not self._sharded or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        rank, world = self.args.process_index, self.args.world_size
        shard = os.path.join(checkpoint, distributed.optimizer_shard_name(rank, world))
        if not os.path.isfile(shard) and os.path.isfile(os.path.join(checkpoint, OPTIMIZER_NAME)):
            raise ValueError(f"{checkpoint} holds a single-process optimizer state ({OPTIMIZER_NAME}), not the "
                             f"per-rank state FSDP2 runs write ({os.path.basename(shard)}); resume it without FSDP")
        distributed.load_optimizer_shard(self.optimizer, checkpoint, rank, world)
        scheduler = os.path.join(checkpoint, SCHEDULER_NAME)
        if os.path.isfile(scheduler):
            self.lr_scheduler.load_state_dict(torch.load(scheduler, weights_only=True))
