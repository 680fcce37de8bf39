"""DeepSpeed ZeRO stage 1/2 overrides of `GBTrainer` (kept apart so trainer.py stays one concept).

Under ZeRO 1/2 the parameters stay replicated, as under DDP, so every rank predicts every covered weight. Two things
differ from DDP (docs/design.md §8), each done by the DeepSpeed glue of `hf_gb.training.distributed`, which `GBPlugin`
shares:

- **The optimizer.** DeepSpeed maps every optimizer parameter to a named parameter of the model it wraps, and the
  g-nets are not in the model: they join it (`join_model`) for the one ``accelerator.prepare`` call that builds the
  engine (Trainer calls ``create_optimizer`` just before it and ``create_scheduler`` just after) and leave it right
  after, so the engine's ZeRO optimizer holds them and the model's own ``state_dict`` never does. The covered
  weights are in no optimizer, so DeepSpeed neither reduces nor steps them.
- **The step** runs inside Accelerate's ``backward``: the engine's ``step`` is wrapped (`wrap_engine_step`) to push
  this rank's weight gradients and hand the averaged g-net gradients to DeepSpeed just before it steps. DeepSpeed
  then clips (over the g-nets and the uncompressed tensors together, as under DDP), steps and zeroes.

Checkpoints: Trainer's DeepSpeed checkpoint (``global_step*/``, DeepSpeed's own format and loader) holds the engine's
optimizer state, the g-nets' included; the compressed files next to it hold the g-nets and scales, loaded again
after DeepSpeed's loader on resume.
"""

from __future__ import annotations

import torch

from . import distributed


class DeepSpeedTrainerMixin:
    """Mixed into `GBTrainer` before ``Trainer``; every override defers to ``Trainer`` unless DeepSpeed runs."""

    @property
    def _deepspeed(self) -> bool:
        return self._run_kind == "deepspeed"

    def _join_model_for_deepspeed(self) -> None:
        if self._deepspeed and self.model is not None:
            distributed.join_model(self.model, self.gb)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self._deepspeed:  # Trainer calls this right after accelerator.prepare built the engine
            if self.model is not None:
                distributed.leave_model(self.model)
            wrapped = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
            if wrapped is not None:
                distributed.wrap_engine_step(wrapped.engine, self.gb)
        return super().create_scheduler(num_training_steps, optimizer)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if self._deepspeed and checkpoint is not None:
            # DeepSpeed's loader restored the engine's parameters and optimizer state, the g-nets' included; the
            # output scales (buffers) and the check that the files belong to these g-nets come from the
            # compressed files, loaded in place into the engine's tensors.
            self.load_compressed_state(checkpoint)
