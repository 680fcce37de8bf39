"""Shared helpers of the benchmarks and probes: paths, machine info, arguments, tables, JSON, evaluation and plots."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
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


def dump_json(path: str, payload: dict[str, Any], indent: int = 2) -> None:
    """Write ``payload`` to ``path`` (a ``--json`` file; its folder made) and say so."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=indent)
    print(f"wrote {path}")


def write_outputs(out: str, payload: dict[str, Any], plot: Callable[[str], bool]) -> None:
    """Write ``out``.json and, where ``plot(out + ".png")`` draws one (True), ``out``.png; print what was written."""
    written = [write_json(os.path.basename(out) + ".json", payload, os.path.dirname(out))]
    if plot(out + ".png"):
        written.append(out + ".png")
    print("wrote " + " and ".join(written))


def add_out_args(p: argparse.ArgumentParser, name: str, split: str | None = None) -> None:
    """``--out`` (the path prefix of the benchmark ``name``'s results, see `default_out`) and, with ``split`` (how
    a run is split over processes, for the help), ``--combine`` (merge the results of those processes)."""
    p.add_argument("--out", default=None,
                   help=f"path prefix of the .json and .png (default benchmarks/results/{name}; with --quick "
                   f"out/benchmarks/{name}_quick, so a smoke run never replaces the committed results)")
    if split is not None:
        p.add_argument("--combine", nargs="+", metavar="JSON",
                       help=f"merge the runs of these result files (e.g. {split}, run in parallel) into --out")


def publish(payload: dict[str, Any], out: str, summary: list[dict[str, Any]], columns: list[tuple[str, str, str]],
            plot: Callable[[list[dict[str, Any]], str], bool], **extra: Any) -> dict[str, Any]:
    """The end of a quality benchmark: print ``summary`` as a table, write the payload with ``summary``, ``extra``
    and ``runs`` as its last keys (in that order) to ``out``.json and ``plot(summary, path)`` to ``out``.png;
    returns that payload."""
    print()
    print(table(summary, columns))
    last = {"summary": summary, **extra, "runs": payload["runs"]}
    payload = {k: v for k, v in payload.items() if k not in last} | last
    write_outputs(out, payload, lambda path: plot(summary, path))
    return payload


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


@torch.no_grad()
def accuracy(model: torch.nn.Module, gb, X: torch.Tensor, y: torch.Tensor) -> float:
    """The fraction of ``X`` a classifier labels ``y``, in eval mode (weights predicted fresh, without sampling,
    when ``gb``)."""
    if gb is not None:
        gb.predict_weights(sample=False, keep_graph=False)
    model.eval()
    acc = (model(X).argmax(1) == y).float().mean().item()
    model.train()
    return acc


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


def panels(n: int, width: float = 6, height: float = 4.5):
    """A figure of ``n`` plots side by side, ``width`` x ``height`` inches each, and the list of their axes."""
    fig, axes = pyplot().subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, path: str, dpi: int = 110) -> bool:
    """Lay out ``fig``, write it to ``path`` and close it; True (a plot was written)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return True


def storage_plot(path: str, by_title: list[tuple[str, list[dict[str, Any]]]], y: str,
                 draw: Callable[[Any, list[dict[str, Any]]], None], ylabel: str | None = None, span: bool = True,
                 width: float = 6) -> bool:
    """A quality benchmark's plot of the summary rows' ``y`` against their stored values (log scale), written to
    ``path``: a panel per (title, rows), side by side, each with plain's value as a black line and the lines that
    ``draw(ax, rows)`` draws. ``span``: the x axis from the smallest model to plain (so that it reads as a ratio),
    plain's point starred. ``ylabel=None``: test accuracy, from 0 to 1 with the legend at the lower right."""
    fig, axes = panels(len(by_title), width=width)
    for ax, (title, rows) in zip(axes, by_title):
        plain = [r for r in rows if r["method"] == "plain"]
        for r in plain:
            ax.axhline(r[y], color="k", lw=1, label=f"plain {r[y]:.3f} ({r['stored']:,.0f} values)")
        draw(ax, rows)
        ax.set_xscale("log")
        if span:
            xs = [r["stored"] for r in rows if r.get("stored")]
            if xs:
                ax.set_xlim(min(xs) / 1.5, max(xs) * 1.5)
            for r in plain:
                ax.plot([r["stored"]], [r[y]], "k*", ms=9)
        if ylabel is None:
            ax.set_ylim(0, 1.02)
        ax.set_xlabel("stored values (every tensor the checkpoint holds)")
        ax.set_ylabel(ylabel or "test accuracy (mean of seeds, best LR)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7.5, loc="lower right" if ylabel is None else None)
    return save_figure(fig, path)
