"""The callback every multi-process Trainer test script records its run with: float64 sums, after each optimizer
step, of the trainer's g-nets (and, when asked, of the covered weights and the uncompressed tensors), so that ranks
and runs can be compared exactly."""

import torch
from transformers import TrainerCallback


def sums(tensors) -> list[float]:
    return [float(t.double().sum()) for t in tensors]


class Checksums(TrainerCallback):
    """``steps``: one ``{"step", "gnet", *extra}`` row per optimizer step; ``extra`` names "weights" (the covered
    weights: not under FSDP2, where each rank holds other rows) and "uncompressed". Set ``trainer`` after building
    the trainer with this callback."""

    def __init__(self, *extra: str):
        self.trainer = None
        self.steps = []
        self.extra = extra

    def on_step_end(self, args, state, control, **kwargs):
        gb = self.trainer.gb
        with torch.no_grad():
            row = {"step": state.global_step, "gnet": sums(gb.parameters())}
            if "weights" in self.extra:
                row["weights"] = sums(t.param for t in gb.covered)
            if "uncompressed" in self.extra:
                row["uncompressed"] = sums(gb.uncompressed_parameters())
            self.steps.append(row)
