"""DeepSpeed ZeRO overrides of `GBTrainer` (kept apart so trainer.py stays one concept).

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

Under ZeRO-3 every parameter is a flat partition, the g-nets' too. Each rank predicts only the elements of each
covered weight it owns and writes them into ``ds_tensor``, and pushes its own elements of the rank-averaged weight
gradients (`hf_gb.engine.shards`, bound by `distributed.bind_zero3`); the g-nets are gathered whole from each
prediction to its push (`distributed.GatheredGnets`), since DeepSpeed gathers a parameter only inside its module's
forward. Compressed saves gather the g-nets and the uncompressed tensors on every rank; the main process writes.

Checkpoints: Trainer's DeepSpeed checkpoint (``global_step*/``, DeepSpeed's own format and loader) holds the engine's
optimizer state, the g-nets' included; the compressed files next to it hold the g-nets and scales, loaded again
after DeepSpeed's loader on resume.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from . import distributed


class DeepSpeedTrainerMixin:
    """Mixed into `GBTrainer` before ``Trainer``; every override defers to ``Trainer`` unless DeepSpeed runs."""

    @property
    def _deepspeed(self) -> bool:
        return self._run_kind == "deepspeed"

    @property
    def _zero3(self) -> bool:
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None) if self._deepspeed else None
        return getattr(plugin, "zero_stage", None) == 3

    @contextlib.contextmanager
    def _gnets_for_prediction(self, keep_graph: bool) -> Iterator[None]:
        """Around every prediction: under ZeRO-3 the g-nets are gathered, and stay so until the push when the
        prediction keeps its graph for one."""
        gathered = getattr(self, "_gathered_gnets", None)
        if gathered is not None:
            gathered.gather()
        try:
            yield
        finally:
            if gathered is not None and not keep_graph:
                gathered.release()

    def _join_model_for_deepspeed(self) -> None:
        if self._deepspeed and self.model is not None:
            distributed.join_model(self.model, self.gb)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self._deepspeed:  # Trainer calls this right after accelerator.prepare built the engine
            if self.model is not None:
                distributed.leave_model(self.model)
            wrapped = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
            if self._zero3 and self.model is not None:
                distributed.bind_zero3(self.model, self.gb)
                self._gathered_gnets = distributed.GatheredGnets(self.gb)
            if wrapped is not None:
                distributed.wrap_engine_step(wrapped.engine, self.gb, getattr(self, "_gathered_gnets", None))
        return super().create_scheduler(num_training_steps, optimizer)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under ZeRO-3 every rank gathers the g-nets and uncompressed tensors, the main process writes."""
        gathered = getattr(self, "_gathered_gnets", None)
        if not self._zero3 or gathered is None:  # (before the engine is built nothing is partitioned)
            return super().save_model(output_dir, _internal_call)
        params = [*([] if gathered.held else self.gb.parameters()), *self.gb.uncompressed_parameters()]
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        with GatheredParameters(params, modifier_rank=None):
            self._save_compressed(output_dir, None)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if self._zero3 and checkpoint is not None:
            raise NotImplementedError(
                "GBTrainer cannot resume a DeepSpeed ZeRO-3 run yet (the g-nets would be loaded into their "
                f"partitions); {checkpoint} holds the compressed model, which hf_gb.load_compressed loads. Resume "
                "under ZeRO stage 1 or 2, DDP or FSDP2, or start a new run from GenomicBottleneck.from_pretrained"
            )
        super()._load_optimizer_and_scheduler(checkpoint)
        if self._deepspeed and checkpoint is not None:
            # DeepSpeed's loader restored the engine's parameters and optimizer state, the g-nets' included; the
            # output scales (buffers) and the check that the files belong to these g-nets come from the
            # compressed files, loaded in place into the engine's tensors.
            self.load_compressed_state(checkpoint)
