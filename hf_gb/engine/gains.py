"""Learned output gains (`GBConfig.gains`): ``weight = diag(exp(r)) G diag(exp(c))`` over what the banks predict.

The log-gains live in the bottleneck's ``row_gains`` / ``col_gains`` (`nn.ParameterDict`, keyed by `gain_key`), so
they are saved with the g-nets. They are applied in place after every bank's prediction (`apply_gains`) and pushed
from the weights' gradients before the banks' push (`push_gains`: ``d log r_i = sum_j dW_ij W_ij``, likewise per
column, then ``dG = r dW c``), so every kernel and route (rows in place, tiles, FSDP2 shards) takes them unchanged.
Each function works on what it is passed: the covered tensors, the two dicts and the rows each rank holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .partitions import RowShard, local_rows
from .planning import CoveredTensor

__all__ = ["apply_gains", "gain_key", "make_gains", "push_gains"]


def gain_key(name: str) -> str:
    """The key of a covered tensor's gains in ``row_gains`` / ``col_gains`` (no dots allowed)."""
    return name.replace(".", "-")


def make_gains(covered: Iterable[CoveredTensor], gains: str) -> tuple[nn.ParameterDict, nn.ParameterDict]:
    """Log-gains at 0 (which predict what the banks do) for every covered tensor: (rows, columns)."""
    row_gains, col_gains = nn.ParameterDict(), nn.ParameterDict()
    for t in covered:
        key = gain_key(t.name)
        if key in row_gains or key in col_gains:
            raise ValueError(f"covered tensors {t.name!r} and another map to the same gain name {key!r}")
        if gains in ("rows", "both"):
            row_gains[key] = nn.Parameter(torch.zeros(t.shape[0]))
        if gains in ("columns", "both"):
            col_gains[key] = nn.Parameter(torch.zeros(t.shape[1]))
    return row_gains, col_gains


def _factors(t: CoveredTensor, row_gains: nn.ParameterDict, col_gains: nn.ParameterDict,
             shard: RowShard | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Tensor ``t``'s (rows, columns) gains, as (out, 1, 1) and (1, in, 1) factors of its local rows."""
    key = gain_key(t.name)
    rows = row_gains[key] if key in row_gains else None
    cols = col_gains[key] if key in col_gains else None
    if rows is not None and shard is not None:
        rows = rows[shard.start : shard.stop]
    return (None if rows is None else rows.detach().exp()[:, None, None],
            None if cols is None else cols.detach().exp()[None, :, None])


@torch.no_grad()
def apply_gains(covered: Iterable[CoveredTensor], row_gains: nn.ParameterDict, col_gains: nn.ParameterDict,
                shards: Mapping[str, RowShard]) -> None:
    """Weight = exp(rows) * G * exp(columns), in place over what the banks wrote."""
    for t in covered:
        shard = shards.get(t.name)
        w = local_rows(t.param, t.layout, shard)
        for gain in _factors(t, row_gains, col_gains, shard):
            if gain is not None:
                w.mul_(gain)


@torch.no_grad()
def push_gains(covered: Iterable[CoveredTensor], row_gains: nn.ParameterDict, col_gains: nn.ParameterDict,
               shards: Mapping[str, RowShard]) -> None:
    """The gains' gradients from the weights' (d log r_i = sum_j dW_ij W_ij, likewise per column), then the
    weights' gradients turned into the banks' output gradients (dG = r dW c), in place."""
    for t in covered:
        if t.param.grad is None:
            continue
        key = gain_key(t.name)
        shard = shards.get(t.name)
        grad = local_rows(t.param, t.layout, shard, "grad")
        dtype = (row_gains[key] if key in row_gains else col_gains[key]).dtype
        prod = grad.to(dtype) * local_rows(t.param, t.layout, shard).to(dtype)
        for gains, dims in ((row_gains, (1, 2)), (col_gains, (0, 2))):
            if key not in gains:
                continue
            g = prod.sum(dims)
            if dims == (1, 2) and shard is not None:  # this rank's rows; the sum over ranks fills the rest
                full = torch.zeros_like(gains[key])
                full[shard.start : shard.stop] = g
                g = full
            gains[key].grad = g if gains[key].grad is None else gains[key].grad.add_(g)
        del prod
        for gain in _factors(t, row_gains, col_gains, shard):
            if gain is not None:
                grad.mul_(gain)
