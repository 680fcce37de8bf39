"""DeepSpeed ZeRO stage 1/2 overrides of `GBTrainer` (kept apart so trainer.py stays one concept).

Under ZeRO 1/2 the parameters stay replicated, as under DDP, so every rank predicts every covered weight. Two things
differ from DDP, and each has one override here:

- **The optimizer.** DeepSpeed maps every optimizer parameter to a named parameter of the model it wraps, and the
  g-nets are not in the model. They join it as the submodule ``hf_gb`` for the one ``accelerator.prepare`` call that
  builds the engine (Trainer calls ``create_optimizer`` just before it and ``create_scheduler`` just after), so the
  engine's ZeRO optimizer holds them (partitioned, like every other parameter, with fp32 master copies under
  bf16/fp16); the model's own ``state_dict`` never includes them. The covered weights are in no optimizer, so
  DeepSpeed neither reduces nor steps them.
- **The step.** Accelerate's ``backward`` runs DeepSpeed's ``engine.backward`` and then ``engine.step()``; the g-net
  gradients exist only after the weight gradients are complete. The engine's ``step`` is wrapped (on this one engine
  object): at a gradient-accumulation boundary it first pushes this rank's weight gradients
  (`GenomicBottleneck.push_gradients` with ``average_replicas``: the g-net gradients are averaged over the ranks, as
  DDP would have averaged the weight gradients) and hands them to the ZeRO optimizer with DeepSpeed's own
  ``safe_set_full_grad``. DeepSpeed then clips (over the g-nets and the uncompressed tensors together, as under DDP),
  steps and zeroes as usual.

Checkpoints: Trainer's DeepSpeed checkpoint (``global_step*/``, DeepSpeed's own format and loader) holds the engine's
optimizer state, the g-nets' included; the compressed files next to it hold the g-nets and scales, loaded again
after DeepSpeed's loader on resume.
"""

from __future__ import annotations

import logging
import types

import torch

logger = logging.getLogger(__name__)

GNET_MODULE = "hf_gb"  # the g-nets' name inside the model while DeepSpeed builds its engine


class DeepSpeedTrainerMixin:
    """Mixed into `GBTrainer` before ``Trainer``; every override defers to ``Trainer`` unless DeepSpeed runs."""

    @property
    def _deepspeed(self) -> bool:
        return self._run_kind == "deepspeed"

    def _join_model_for_deepspeed(self) -> None:
        """Make the g-nets a submodule of the model for the ``prepare`` that builds the DeepSpeed engine."""
        if self._deepspeed and self.model is not None and GNET_MODULE not in self.model._modules:
            self.model.add_module(GNET_MODULE, self.gb)

    def _leave_model_after_deepspeed(self) -> None:
        if self.model is not None and GNET_MODULE in self.model._modules:
            del self.model._modules[GNET_MODULE]

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self._deepspeed:  # Trainer calls this right after accelerator.prepare built the engine
            self._leave_model_after_deepspeed()
            self._wrap_engine_step()
        return super().create_scheduler(num_training_steps, optimizer)

    def _wrap_engine_step(self) -> None:
        wrapped = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
        engine = getattr(wrapped, "engine", None)
        if engine is None or getattr(engine, "_hf_gb_step", None) is not None:
            return
        unlinked = [n for n, p in self.gb.named_parameters() if not hasattr(p, "_hp_mapping")]
        if unlinked:  # ZeRO 1/2 link every parameter they optimize to its partition (None when another rank's)
            raise RuntimeError(f"DeepSpeed's ZeRO optimizer does not hold the g-net parameter {unlinked[0]!r}; "
                               f"GBTrainer runs ZeRO stages 1 and 2 with the optimizer Trainer builds")
        step = engine.step
        trainer = self

        def step_with_push(self, *args, **kwargs):
            if self.is_gradient_accumulation_boundary():
                trainer._push_into_deepspeed()
            return step(*args, **kwargs)

        engine._hf_gb_step = step
        engine.step = types.MethodType(step_with_push, engine)

    def _push_into_deepspeed(self) -> None:
        """This rank's weight gradients -> averaged g-net gradients -> the ZeRO optimizer's gradient partitions."""
        from deepspeed.utils import safe_set_full_grad

        gb = self.gb
        kept = gb.push_gradients(average_replicas=True)
        for p in gb.parameters():
            grad, p.grad = p.grad, None  # DeepSpeed writes .grad when one exists, its partitions otherwise
            if grad is None:
                grad = torch.zeros_like(p)  # skipped step or unused g-net: DeepSpeed's own rules step the rest
            safe_set_full_grad(p, grad)
        if not kept:
            logger.warning("Under DeepSpeed the uncompressed tensors of the skipped step are still stepped by "
                           "DeepSpeed's own rules (its fp16 loss scaler skips overflowing steps; bf16 and fp32 "
                           "do not)")

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if self._deepspeed and checkpoint is not None:
            # DeepSpeed's loader restored the engine's parameters and optimizer state, the g-nets' included; the
            # output scales (buffers) and the check that the files belong to these g-nets come from the
            # compressed files, loaded in place into the engine's tensors.
            self.load_compressed_state(checkpoint)
