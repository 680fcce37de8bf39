"""Equal-storage baselines of the quality benchmarks: stored values, low-rank factors and narrower dense models.

Every method is charged what its checkpoint writes, counted the same way:

- plain, narrower dense and low-rank models: the numel of every tensor in the model's ``state_dict`` (tensors that
  share storage counted once), which is what ``save_pretrained`` / safetensors writes;
- the genomic bottleneck: the numel of every tensor in ``gb_model.safetensors``
  (`hf_gb.io.checkpoint.gb_state_tensors`: g-net tensors, their per-tile output scales and the uncompressed model
  tensors).

Random weight sharing (HashedNets, Chen et al. 2015): the engine's family ``"hash"`` with ``center=False``,
whole-tensor tiles of ``ceil(numel / C)`` shared values each; `hash_config` picks the compression ``C`` whose
checkpoint stores the budget (within 1% where the step sizes allow).

Low-rank: each covered weight ``W`` (out, in) becomes ``U @ V`` with ``U`` (out, r) and ``V`` (r, in); a conv weight
(out, in, k, k) becomes a k x k conv into r channels followed by a 1 x 1 conv to ``out``. Biases and every tensor the
bottleneck leaves uncompressed stay dense in both. Ranks are equal across tensors where the budget allows
(`allocate_ranks`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from hf_gb import GBConfig, GenomicBottleneck
from hf_gb.io.checkpoint import gb_state_tensors

TOLERANCE = 0.03  # a narrower dense model's storage must lie within 3% of the GB run's


def stored_values(obj: nn.Module) -> int:
    """Values a checkpoint of ``obj`` holds: a `GenomicBottleneck`'s safetensors file, or a model's state_dict."""
    if isinstance(obj, GenomicBottleneck):
        return sum(t.numel() for t in gb_state_tensors(obj).values())
    seen, total = set(), 0
    for t in obj.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel()
    return total


class LowRankLinear(nn.Module):
    """``y = x @ (U @ V).T + b`` without forming ``U @ V``; factors initialised to the replaced weight's std."""

    def __init__(self, linear: nn.Linear, rank: int, generator: torch.Generator):
        super().__init__()
        out_f, in_f = linear.weight.shape
        std = math.sqrt(float(linear.weight.detach().std()) / math.sqrt(rank))  # std(U @ V) = that of the weight
        self.U = nn.Parameter(torch.randn(out_f, rank, generator=generator) * std)
        self.V = nn.Parameter(torch.randn(rank, in_f, generator=generator) * std)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.V.t()) @ self.U.t()
        return y if self.bias is None else y + self.bias


class LowRankConv2d(nn.Module):
    """A k x k conv into ``rank`` channels, then a 1 x 1 conv to the output channels (with the original bias)."""

    def __init__(self, conv: nn.Conv2d, rank: int, generator: torch.Generator):
        super().__init__()
        out_c, in_c, kh, kw = conv.weight.shape
        std = math.sqrt(float(conv.weight.detach().std()) / math.sqrt(rank))
        self.down = nn.Conv2d(in_c, rank, (kh, kw), stride=conv.stride, padding=conv.padding, bias=False)
        self.up = nn.Conv2d(rank, out_c, 1, bias=conv.bias is not None)
        with torch.no_grad():
            self.down.weight.copy_(torch.randn(self.down.weight.shape, generator=generator) * std)
            self.up.weight.copy_(torch.randn(self.up.weight.shape, generator=generator) * std)
            if conv.bias is not None:
                self.up.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def _factor_shape(module: nn.Module) -> tuple[int, int]:
    """(rows, cols) of the matrix a module's weight is factorised as; its rank costs rows + cols per unit."""
    w = module.weight
    return w.shape[0], w[0].numel()


def allocate_ranks(shapes: dict[str, tuple[int, int]], budget: int) -> dict[str, int]:
    """Ranks (>= 1 each) whose factor storage ``sum r * (rows + cols)`` is as close to ``budget`` as it gets.

    Equal ranks where the budget allows: starting from rank 1 everywhere (which may already exceed the budget: the
    caller reports the real storage), each step raises the lowest rank that still fits, up to the rank where
    factors stop saving storage (``r * (rows + cols) < rows * cols``). At the end, one more rank goes to the tensor
    whose step lands closest to the budget, if that is closer than stopping.
    """
    ranks = {n: 1 for n in shapes}
    cost = {n: r + c for n, (r, c) in shapes.items()}
    cap = {n: max(1, (r * c - 1) // (r + c)) for n, (r, c) in shapes.items()}
    used = sum(cost.values())
    while True:
        open_ = sorted((n for n in shapes if ranks[n] < cap[n]), key=lambda n: (ranks[n], n))
        fits = [n for n in open_ if used + cost[n] <= budget]
        if not fits:
            over = min(open_, key=lambda n: abs(used + cost[n] - budget), default=None)
            if over is not None and abs(used + cost[over] - budget) < abs(budget - used):
                ranks[over] += 1
            return ranks
        ranks[fits[0]] += 1
        used += cost[fits[0]]


def low_rank_(model: nn.Module, names: Iterable[str], total_budget: int, seed: int) -> dict[str, Any]:
    """Replace the modules ``names`` of ``model`` by low-rank factors so the model stores about ``total_budget``.

    Returns the ranks and the model's real stored values.
    """
    names = list(names)
    modules = dict(model.named_modules())
    dense = stored_values(model) - sum(modules[n].weight.numel() for n in names)
    shapes = {n: _factor_shape(modules[n]) for n in names}
    ranks = allocate_ranks(shapes, total_budget - dense)
    gen = torch.Generator().manual_seed(seed + 12345)
    for n in names:
        parent_name, _, child = n.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        old = modules[n]
        if isinstance(old, nn.Linear):
            new = LowRankLinear(old, ranks[n], gen)
        elif isinstance(old, nn.Conv2d):
            new = LowRankConv2d(old, ranks[n], gen)
        else:
            raise TypeError(f"low-rank baseline supports Linear and Conv2d, got {type(old).__name__} at {n!r}")
        setattr(parent, child, new)
    return {"ranks": ranks, "stored_values": stored_values(model)}


def hash_config(build: Callable[[], nn.Module], budget: int, **config: Any) -> tuple[GBConfig, int]:
    """``GBConfig(family="hash", center=False, compression=C, **config)`` whose bottleneck on ``build()`` stores the
    value closest to ``budget``, and what it stores.

    Stored values fall as ``C`` grows (``ceil(numel / C)`` per covered tensor), in steps: the search halves a log
    interval of ``C`` until the two ends are neighbours in stored values, then keeps the closer end.
    """
    def stored(compression: float) -> int:
        cfg = GBConfig(family="hash", center=False, compression=compression, **config)
        model = build()
        gb = GenomicBottleneck(model, cfg, init_gnets=False)  # counting only: no calibration, no prediction
        n = stored_values(gb)
        gb.detach_model()
        return n

    def reachable(compression: float) -> int | None:  # None: the engine refuses a target no tiling can reach
        try:
            return stored(compression)
        except ValueError:
            return None

    largest = max(p.numel() for p in build().parameters())
    lo, hi = 1.0, float(largest)  # stored(lo) is the most, stored(hi) the least the family can store
    s_lo, s_hi = stored(lo), reachable(hi)
    if s_hi is None:  # the largest target the engine accepts (small tensors cap what one value per tensor gives)
        ok = lo
        for _ in range(40):
            mid = math.sqrt(ok * hi)
            if reachable(mid) is None:
                hi = mid
            else:
                ok = mid
        hi, s_hi = ok, stored(ok)
    for _ in range(60):
        if s_hi >= budget or s_lo <= budget or hi / lo < 1 + 1e-9:
            break
        mid = math.sqrt(lo * hi)
        s_mid = stored(mid)
        if s_mid > budget:
            lo, s_lo = mid, s_mid
        else:
            hi, s_hi = mid, s_mid
    compression, value = min(((lo, s_lo), (hi, s_hi)), key=lambda cs: abs(cs[1] - budget))
    return GBConfig(family="hash", center=False, compression=compression, **config), value


def closest_size(candidates: Iterable[Any], size: Callable[[Any], int], target: int,
                 prefer: Callable[[Any], float] = lambda c: 0.0) -> tuple[Any, int]:
    """The candidate of the lowest ``prefer`` score among those whose stored values lie within 1% of ``target``
    (else within `TOLERANCE`, else the closest one), and its stored values."""
    scored = [(c, size(c)) for c in candidates]
    for tol in (0.01, TOLERANCE):
        within = [(c, s) for c, s in scored if abs(s / target - 1) <= tol]
        if within:
            return min(within, key=lambda cs: (prefer(cs[0]), abs(cs[1] / target - 1)))
    return min(scored, key=lambda cs: abs(cs[1] / target - 1))


def best_by(rows: Sequence[dict[str, Any]], key: str, metric: str, higher: bool) -> list[dict[str, Any]]:
    """Of rows that differ only in ``key`` (e.g. the LR), those of the ``key`` value with the best mean ``metric``."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r)
    sign = 1 if higher else -1
    best = max(groups, key=lambda k: sign * sum(r[metric] for r in groups[k]) / len(groups[k]))
    return groups[best]
