"""Regression: fit the g-nets to weights a model already has (docs/design.md §5, as in the PNAS paper).

The loss is the mean over covered tensors of ``||W_pred - W_target||^2 / ||W_target||^2``; its gradient with
respect to each predicted weight is set as that weight's ``.grad`` and pushed into the g-nets by
`GenomicBottleneck.push_gradients`, so the fit uses the same fused kernels (and memory) as training.

Pretrained weights look close to random, so a small g-net reproduces them only roughly: expect relative errors
near 1 at high compression. Regression is a starting point for training through the task loss, not a substitute.

Example::

    >>> import torch
    >>> from hf_gb import GBConfig
    >>> from hf_gb.compress.regression import compress_by_regression
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    >>> gb, errors = compress_by_regression(model, GBConfig(hidden_dim=8, tile_size=16), steps=5, progress=False)
    >>> sorted(errors)
    ['0.weight', '2.weight']
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
from torch import nn

from ..engine.bottleneck import Bottleneck
from ..engine.config import GBConfig
from ..io.pretrained import GenomicBottleneck

logger = logging.getLogger(__name__)

__all__ = ["compress_by_regression", "covered_weights", "fit_to_weights", "relative_errors"]


def covered_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every tensor of ``model`` a bottleneck could cover (dim >= 2), under each of its names.

    Take it *before* building the bottleneck: construction overwrites the covered weights with predictions.
    """
    return {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False) if p.dim() >= 2}


@torch.no_grad()
def relative_errors(gb: Bottleneck, targets: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """``||W - W_target|| / ||W_target||`` per covered tensor, for the weights currently in the model."""
    out = {}
    for t in gb.covered:
        target = targets[t.name].to(t.param.device, torch.float32)
        denom = target.norm().item()
        diff = (t.param.detach().float() - target).norm().item()
        out[t.name] = diff / denom if denom > 0 else diff
    return out


def fit_to_weights(
    gb: Bottleneck,
    targets: Mapping[str, torch.Tensor],
    steps: int = 500,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    schedule: str = "cosine",
    progress: bool = True,
    log_every: int = 0,
) -> dict[str, float]:
    """Fit the g-nets of ``gb`` so that the weights they predict match ``targets`` (name -> tensor).

    Args:
        gb: the bottleneck; its covered tensors' names must all be in ``targets``.
        targets: the weights to reproduce, e.g. from `covered_weights` taken before ``gb`` was built.
        steps: Adam steps (each is one prediction and one push of every bank).
        lr: Adam's learning rate (peak, when ``schedule="cosine"``).
        weight_decay: AdamW weight decay on the g-net parameters.
        schedule: ``"cosine"`` (decay to 0) or ``"constant"``.
        progress: show a tqdm progress bar.
        log_every: log the loss every this many steps (0: never).

    Returns:
        The relative error ``||W - W_target|| / ||W_target||`` of each covered tensor after the fit; the model holds
        the fitted prediction.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got steps={steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got lr={lr!r}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got schedule={schedule!r}")
    missing = [t.name for t in gb.covered if t.name not in targets]
    if missing:
        raise ValueError(f"targets lack {len(missing)} covered tensors, e.g. {missing[0]!r}")
    for t in gb.covered:
        if tuple(targets[t.name].shape) != tuple(t.param_shape):
            raise ValueError(
                f"target {t.name!r} has shape {tuple(targets[t.name].shape)}, the model's {tuple(t.param_shape)}"
            )

    # loss = mean_t ||W_t - T_t||^2 / ||T_t||^2, so dloss/dW_t = coef_t * (W_t - T_t) with coef_t = 2 / (n ||T_t||^2)
    fixed = []
    for t in gb.covered:
        target = targets[t.name].detach().to(t.param.device, t.param.dtype)
        norm2 = target.float().pow(2).sum().clamp_min(1e-12)
        fixed.append((t.param, target, 2.0 / (norm2 * len(gb.covered))))

    params = [p for p in gb.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = (
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        if schedule == "cosine" and steps > 0
        else None
    )
    bar = None
    if progress and steps > 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="fitting g-nets", unit="step")
    was_training = gb.training
    gb.train(False)  # no sampled noise: fit the mean prediction
    try:
        for step in range(steps):
            with gb.step(optimizer):  # predicts without noise (gb.train(False)), pushes the gradients set here, steps
                loss = 0.0
                with torch.no_grad():
                    for param, target, coef in fixed:
                        diff = param.detach() - target
                        loss += float(diff.float().pow(2).sum() * coef / 2)
                        param.grad = (diff * coef).to(param.dtype)
            if scheduler is not None:
                scheduler.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(rel_mse=f"{loss:.4f}")
            if log_every and (step + 1) % log_every == 0:
                logger.info("regression step %d/%d: mean relative squared error %.5f", step + 1, steps, loss)
    finally:
        if bar is not None:
            bar.close()
        gb.train(was_training)
    gb.predict_weights(sample=False, keep_graph=False)
    return relative_errors(gb, targets)


def compress_by_regression(
    model: nn.Module, config: GBConfig | None = None, steps: int = 500, lr: float = 1e-2, **fit_kwargs
) -> tuple[GenomicBottleneck, dict[str, float]]:
    """Snapshot ``model``'s coverable weights, attach a bottleneck calibrated to them, and fit it by regression.

    Returns ``(gb, per-tensor relative errors)``; ``model`` then holds the predicted weights.
    """
    targets = covered_weights(model)
    gb = GenomicBottleneck(model, config)
    return gb, fit_to_weights(gb, targets, steps=steps, lr=lr, **fit_kwargs)
