"""`TrainStep`: the bottleneck's training step in a plain loop, one ``with`` block per micro-batch.

A step of a model with a bottleneck is four calls in a fixed order: ``predict_weights`` before the first forward,
``loss.backward()`` for every micro-batch, ``push_gradients`` after the last backward, then ``optimizer.step()``
and the gradients zeroed. `TrainStep` makes them around the user's forward and backward, in the spirit of
Accelerate's ``accelerator.accumulate(model)``: a window of ``accumulation_steps`` micro-batches is predicted once,
on its first, and pushed and stepped once, on its last. ``Bottleneck.step`` returns the one `TrainStep` of a
bottleneck, so a loop may call it afresh for every micro-batch.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

__all__ = ["TrainStep"]

logger = logging.getLogger(__name__)


class TrainStep:
    """Context manager of one micro-batch: predicts on the window's first, on its last pushes, clips, steps and
    zeroes the gradients; ``stepped`` says afterwards whether the optimizer step was taken.

    Args:
        gb: the bottleneck (`hf_gb.engine.Bottleneck`, e.g. a ``hf_gb.GenomicBottleneck``).
        optimizer: a ``torch.optim.Optimizer`` that holds every g-net parameter and no covered weight (build it
            over ``gb.trainable_parameters()``).
        accumulation_steps: micro-batches per optimizer step. Their gradients add up: divide each loss by it for
            the mean over the window.
        max_grad_norm: if given, the gradients of the optimizer's parameters are clipped to this total 2-norm
            after the push (``torch.nn.utils.clip_grad_norm_``; the norm before clipping is kept in ``grad_norm``).

    With ``GBConfig.skip_nonfinite`` (the default), a window whose g-net gradients are not finite takes no
    optimizer step (``stepped`` is False; step an lr scheduler only when it is True). An exception inside a block
    drops the whole window: every gradient it accumulated and the prediction kept for its push, so the next block
    starts a fresh window; an exception raised by ``optimizer.step()`` itself may leave some parameters updated.

    Example::

        >>> import torch
        >>> from hf_gb import GBConfig, GenomicBottleneck
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
        >>> gb = GenomicBottleneck(model, GBConfig(hidden_dim=8, tile_size=32))
        >>> optimizer = torch.optim.AdamW(gb.trainable_parameters(), lr=1e-3)
        >>> scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.9**step)
        >>> for x in torch.randn(6, 4, 64):
        ...     with gb.step(optimizer, accumulation_steps=3, max_grad_norm=1.0) as step:
        ...         loss = model(x).pow(2).mean() / 3
        ...         loss.backward()
        ...     if step.stepped:
        ...         scheduler.step()
        >>> step.steps, scheduler.last_epoch
        (2, 2)
    """

    def __init__(self, gb: nn.Module, optimizer: torch.optim.Optimizer, accumulation_steps: int = 1,
                 max_grad_norm: float | None = None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"TrainStep needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be a positive int, got {accumulation_steps=}")
        number = isinstance(max_grad_norm, (int, float)) and not isinstance(max_grad_norm, bool)
        if max_grad_norm is not None and not (number and math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a positive finite number or None, got {max_grad_norm=}")
        _check_optimizer(gb, optimizer)
        self.gb, self.optimizer = gb, optimizer
        self.accumulation_steps, self.max_grad_norm = accumulation_steps, max_grad_norm
        self.micro_batch = 0  # micro-batches of the current window done
        self.steps = 0  # optimizer steps taken
        self.stepped = False  # whether the last block took the optimizer step
        self.grad_norm: torch.Tensor | None = None  # total norm before the last clipping
        self._inside = False

    @classmethod
    def following(cls, previous: TrainStep | None, gb: nn.Module, optimizer: torch.optim.Optimizer,
                  accumulation_steps: int = 1, max_grad_norm: float | None = None) -> TrainStep:
        """``previous`` if it was made with the same arguments, else a new `TrainStep` (between windows only)."""
        args = (optimizer, accumulation_steps, max_grad_norm)
        if previous is not None and previous.gb is gb and previous._args() == args:
            return previous
        if previous is not None and (previous.micro_batch or previous._inside):
            raise RuntimeError(
                f"step() called with optimizer={type(optimizer).__name__}, accumulation_steps={accumulation_steps}, "
                f"max_grad_norm={max_grad_norm} while a window of accumulation_steps={previous.accumulation_steps}, "
                f"max_grad_norm={previous.max_grad_norm} (optimizer {type(previous.optimizer).__name__}) has done "
                f"{previous.micro_batch} micro-batches; pass the same arguments until its last micro-batch"
            )
        return cls(gb, optimizer, accumulation_steps, max_grad_norm)

    def _args(self) -> tuple[Any, ...]:
        return self.optimizer, self.accumulation_steps, self.max_grad_norm

    def __enter__(self) -> TrainStep:
        if self._inside:
            raise RuntimeError("TrainStep entered again inside its own block; use one `with` block per micro-batch")
        if self.micro_batch == 0:
            self.gb.predict_weights()  # raises (state unchanged) if covered weights hold unpushed gradients
        elif not self.gb.prediction_pending:
            self._abort()
            raise RuntimeError(
                f"the prediction of this accumulation window ({self.micro_batch} of {self.accumulation_steps} "
                "micro-batches done) was consumed or dropped between its micro-batches (push_gradients, "
                "predict_weights(keep_graph=False), rebind or a checkpoint load); the window is dropped"
            )
        self._inside = True
        self.stepped = False
        return self

    def __exit__(self, exc_type, exc, traceback) -> bool:
        self._inside = False
        if exc_type is not None:
            self._abort()
            return False
        self.micro_batch += 1
        if self.micro_batch == self.accumulation_steps:
            self.micro_batch = 0
            try:
                self.stepped = self._finish()
            except BaseException:
                self._abort()
                raise
        return False

    def _parameters(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _finish(self) -> bool:
        """Push, clip, step and zero; whether the optimizer step was taken."""
        gb, params = self.gb, self._parameters()
        if not any(t.param.grad is not None for t in gb.covered) and not any(p.grad is not None for p in params):
            raise RuntimeError(
                f"no gradient reached the model in this window of {self.accumulation_steps} micro-batches; call "
                "loss.backward() inside the `with gb.step(...)` block"
            )
        self.grad_norm = None
        kept = gb.push_gradients()
        if kept:
            if self.max_grad_norm is not None:
                self.grad_norm = nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            self.optimizer.step()
            self.steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        gb.zero_grad(set_to_none=True)
        return kept

    def _abort(self) -> None:
        """Drop the window: every gradient it accumulated and the prediction kept for its push."""
        self.micro_batch, self.stepped = 0, False
        self.gb.model.zero_grad(set_to_none=True)
        self.optimizer.zero_grad(set_to_none=True)
        self.gb.zero_grad(set_to_none=True)
        if self.gb.prediction_pending:  # the weights stay those of the unchanged g-nets; nothing is kept for a push
            self.gb.predict_weights(sample=False, keep_graph=False)
        logger.debug("TrainStep: window dropped")


def _check_optimizer(gb: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    gnets = [p for p in gb.parameters() if p.requires_grad]
    missing = sum(id(p) not in held for p in gnets)
    covered = [t.name for t in gb.covered if id(t.param) in held]
    if missing or covered:
        what = (f"lacks {missing} of the bottleneck's {len(gnets)} g-net parameters" if missing else
                f"holds {len(covered)} covered weights (e.g. {covered[0]}), which the g-nets predict")
        raise ValueError(f"the optimizer {what}; build it over gb.trainable_parameters()")
