"""Shared helpers of the quality and speed benchmarks: paths, machine info, tables, JSON and plots."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")  # committed full runs
QUICK_RESULTS = os.path.join(ROOT, "out", "benchmarks")  # smoke runs (git-ignored): never over the committed ones
if ROOT not in sys.path:  # run as `python benchmarks/x.py` from a checkout without `pip install -e .`
    sys.path.insert(0, ROOT)

import torch  # noqa: E402


def machine() -> dict[str, Any]:
    """What the numbers were measured on; the load average matters on a shared machine."""
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": [round(x, 2) for x in load] if load else None,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def default_out(name: str, quick: bool) -> str:
    """Default path prefix of a benchmark's .json and .png: committed results, or a separate folder for --quick."""
    return os.path.join(QUICK_RESULTS, name + "_quick") if quick else os.path.join(RESULTS, name)


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A fixed-width text table; ``columns`` are (key, header, format spec)."""
    cells = [[format(r[k], f) if r.get(k) is not None else "-" for k, _, f in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h, _) in enumerate(columns)]
    lines = ["  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_json(name: str, payload: dict[str, Any], out_dir: str = RESULTS) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_parts(paths: list[str]) -> list[dict[str, Any]]:
    """The JSON payloads of benchmark runs split over processes, for ``--combine``."""
    parts = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            parts.append(json.load(f))
    return parts


@contextmanager
def train_step(gb, optimizer: torch.optim.Optimizer, max_grad_norm: float | None = None) -> Iterator[None]:
    """One optimizer step around the block's backward: ``gb.step`` with a bottleneck (yields its `TrainStep`),
    the same plain calls (clip, step, zero) without one (yields None)."""
    if gb is not None:
        with gb.step(optimizer, max_grad_norm=max_grad_norm) as step:
            yield step
        return
    yield None
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def warmup_cosine(warmup: int, steps: int):
    """LR factor of step ``s`` (for ``LambdaLR``): linear warm-up over ``warmup`` steps, then cosine decay to 0."""
    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))

    return factor


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
