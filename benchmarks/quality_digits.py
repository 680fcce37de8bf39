"""Test accuracy against covered compression on scikit-learn's bundled digits (1,797 real 8x8 images, offline).

For an MLP (64-256-256-10) and a small CNN, each over several seeds:

- ``plain``: trained as usual (the baseline line of the plot);
- ``gb``: trained end to end through the genomic bottleneck at several covered compressions (the real ratio of each
  run comes from ``gb.stats()["covered_compression"]``);
- ``hash``, ``narrow``, ``lowrank``: the equal-storage baselines of each GB point: random weight sharing (HashedNets:
  family ``"hash"`` with ``center=False``, its compression picked so the checkpoint stores the GB run's values within
  1%), a narrower dense model of the same architecture and low-rank factors (benchmarks/baselines.py), each with
  its own LR grid (one LR for every tensor);
- ``innate``: the PNAS sense, no training of the predicted network at all: g-nets are fitted by regression (MSE,
  `hf_gb.compress.regression.fit_to_weights`) to a plainly trained network's weights and the predicted network is
  evaluated;
- ``alternating`` (MLP): the PNAS loop, ``rounds`` times: train the network plainly for a few epochs starting from
  the current weights, fit the g-nets to them, replace the weights by the g-nets' prediction; the accuracy of that
  last prediction is innate.

    python benchmarks/quality_digits.py            # full run, writes benchmarks/results/digits.{json,png}
    python benchmarks/quality_digits.py --quick    # a smoke run (one seed, few epochs) into out/benchmarks/
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from baselines import best_by, closest_size, hash_config, low_rank_, stored_values  # noqa: E402
from common import (  # noqa: E402
    accuracy,
    add_out_args,
    default_out,
    machine,
    mean_std,
    publish,
    read_parts,
    storage_plot,
    train_step,
    warmup_cosine,
)
from torch import nn  # noqa: E402

from hf_gb import GBConfig, GenomicBottleneck  # noqa: E402
from hf_gb.compress.regression import covered_weights, fit_to_weights  # noqa: E402

TARGETS = (10, 50, 300, 1000)
LR_GRID = (1e-3, 3e-3, 1e-2)
METHODS = ("plain", "gb", "hash", "narrow", "lowrank", "innate", "alternating")
HIDDEN_DIMS = (16, 12, 8, 6, 4, 3, 2, 1)  # g-net widths tried, widest first, when a target ratio is set


# ----------------------------------------------------------------------------- data and models
def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed, stratified 80/20 split of sklearn's digits; pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X / 16.0, y, test_size=0.2, random_state=0, stratify=y)
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return f(Xtr), torch.tensor(ytr), f(Xte), torch.tensor(yte)


def mlp(w1: int = 256, w2: int | None = None) -> nn.Module:
    w2 = w1 if w2 is None else w2
    return nn.Sequential(nn.Linear(64, w1), nn.ReLU(), nn.Linear(w1, w2), nn.ReLU(), nn.Linear(w2, 10))


class CNN(nn.Module):
    """conv 1->16 -> conv 16->32 -> pool -> conv 32->64 -> pool -> fc 256->128 -> fc 128->10 (3x3 kernels).

    ``channels`` and ``fc`` give the narrower dense baselines of the same architecture.
    """

    def __init__(self, channels: tuple[int, int, int] = (16, 32, 64), fc: int = 128):
        super().__init__()
        c1, c2, c3 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)  # 144 weights: left dense (a g-net would be about as large)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.fc1 = nn.Linear(c3 * 4, fc)
        self.fc2 = nn.Linear(fc, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, 8, 8)
        x = torch.relu(self.conv1(x))
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)  # (B, 32, 4, 4)
        x = torch.max_pool2d(torch.relu(self.conv3(x)), 2)  # (B, 64, 2, 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


MODELS: dict[str, tuple[Callable[..., nn.Module], list[str] | None]] = {
    "mlp": (mlp, None),
    "cnn": (CNN, ["conv1"]),
}


def narrow_size(name: str, spec: tuple) -> int:
    """Stored values of the narrower dense model ``spec`` (weights and biases; checked against the state_dict)."""
    if name == "mlp":
        w1, w2 = spec
        return 65 * w1 + (w1 + 1) * w2 + (w2 + 1) * 10
    (c1, c2, c3), f = spec
    return 10 * c1 + (9 * c1 + 1) * c2 + (9 * c2 + 1) * c3 + (4 * c3 + 1) * f + (f + 1) * 10


def narrow_spec(name: str, target: int) -> tuple[tuple, int]:
    """The narrower dense model of the same architecture whose storage is within 3% of ``target``: equal widths
    (MLP) or channel widths scaled together with fc about 2x the last channels (CNN) where the budget allows."""
    if name == "mlp":
        cands = [(a, b) for a in range(1, 257) for b in range(max(1, a - 16), min(256, a + 16) + 1)]
        return closest_size(cands, lambda c: narrow_size(name, c), target, lambda c: abs(c[0] - c[1]))
    cands = []
    for k in range(1, 65):
        ch = (max(1, round(16 * k / 64)), max(1, round(32 * k / 64)), k)
        cands += [(ch, f) for f in range(1, 129)]
    return closest_size(cands, lambda c: narrow_size(name, c), target,
                        lambda c: abs(math.log(c[1] / (2 * c[0][2]))))


# ----------------------------------------------------------------------------- configs
def pick_config(name: str, target: float, encoding: str, hidden_dims=HIDDEN_DIMS, closest: bool = False,
                **family: Any) -> tuple[GBConfig, float]:
    """The widest g-net whose covered compression lands within 25% of ``target`` (else, or with ``closest``, the
    one closest to it). ``family`` may hold ``tile_size`` (then the tile is fixed and only the width adapts)."""
    build, exclude = MODELS[name]
    best = None
    for h in hidden_dims:
        cfg = GBConfig(hidden_dim=h, compression=target, encoding=encoding, kernel="eager", exclude_modules=exclude,
                       **family)
        try:
            ratio = GenomicBottleneck(build(), cfg).stats()["covered_compression"]
        except ValueError:  # this width cannot reach the target (the engine refuses it): a narrower one may
            continue
        if 0.8 * target <= ratio <= 1.25 * target and not closest:
            return cfg, ratio
        score = abs(math.log(ratio / target))
        if best is None or score < best[0]:
            best = (score, cfg, ratio)
    return best[1], best[2]


# ----------------------------------------------------------------------------- training
def train(model: nn.Module, gb: GenomicBottleneck | None, data, epochs: int, lr: float, gnet_lr: float,
          batch_size: int, seed: int, warmup: float = 0.0, gnet_warmup: float | None = None) -> float:
    """Adam with cosine decay after a linear warm-up over the fraction ``warmup`` of the steps (``gnet_warmup``:
    the g-nets' own, default ``warmup``); with ``gb``, over the g-nets (``gnet_lr``) and the uncompressed tensors
    (``lr``)."""
    Xtr, ytr, Xte, yte = data
    if gb is None:
        groups = [{"params": list(model.parameters()), "lr": lr}]
    else:
        groups = [{"params": list(gb.parameters()), "lr": gnet_lr}, {"params": gb.uncompressed_parameters(), "lr": lr}]
    optimizer = torch.optim.Adam(groups)
    steps = epochs * math.ceil(len(Xtr) / batch_size)
    fractions = [warmup] if gb is None else [warmup if gnet_warmup is None else gnet_warmup, warmup]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [warmup_cosine(round(f * steps), steps)
                                                              for f in fractions])
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(Xtr), generator=gen)
        for i in range(0, len(Xtr), batch_size):
            idx = perm[i : i + batch_size]
            with train_step(gb, optimizer):
                nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
            scheduler.step()
    return accuracy(model, gb, Xte, yte)


def fresh(name: str, seed: int, spec: tuple = ()) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name][0](*spec)


def with_seed(cfg: GBConfig, seed: int) -> GBConfig:
    return GBConfig.from_dict({**cfg.to_dict(), "seed": seed})


def innate(model: nn.Module, cfg: GBConfig, steps: int, lr: float, data,
           gb: GenomicBottleneck | None = None) -> tuple[float, dict[str, float], GenomicBottleneck]:
    """Fit g-nets to ``model``'s current weights and return the accuracy of the predicted network (no training)."""
    targets = covered_weights(model)
    if gb is None:
        gb = GenomicBottleneck(model, cfg)  # overwrites the covered weights with its first prediction
    errors = fit_to_weights(gb, targets, steps=steps, lr=lr, progress=False)
    return accuracy(model, gb, data[2], data[3]), errors, gb


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one seed, few epochs: a smoke run under 2 minutes")
    p.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=sorted(MODELS))
    p.add_argument("--targets", nargs="+", type=float, default=list(TARGETS), help="covered compressions to aim at")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--warmup", type=float, default=0.0,
                   help="linear LR warm-up over this fraction of the steps, then cosine decay (every method)")
    p.add_argument("--gnet_warmup", type=float, default=None,
                   help="the g-nets' own warm-up fraction in GB runs (default: --warmup)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3,
                   help="Adam LR of the uncompressed tensors of GB runs and of the plain training that innate and "
                   "alternating fit to")
    p.add_argument("--lrs", nargs="+", type=float, default=list(LR_GRID),
                   help="LR grid of plain, narrower dense and low-rank runs (tables show the best)")
    p.add_argument("--gnet_lrs", nargs="+", type=float, default=list(LR_GRID),
                   help="g-net LR grid of GB runs (tables show the best)")
    p.add_argument("--hash_lrs", nargs="+", type=float, default=list(LR_GRID),
                   help="LR grid of random-sharing runs, one LR for every tensor (tables show the best)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                   help="methods to run (to split a run over processes; innate/alternating need no plain run)")
    p.add_argument("--encoding", default="gray", choices=["binary", "gray", "fourier"])
    p.add_argument("--family", default="mlp", help="GBConfig.family of the GB runs")
    p.add_argument("--second_hidden_dim", type=int, default=8, help="second_hidden_dim of family 'deep'")
    p.add_argument("--hidden_dims", nargs="+", type=int, default=list(HIDDEN_DIMS),
                   help="g-net widths to choose from per target (widest within 25%%, or the closest: --closest)")
    p.add_argument("--closest", action="store_true",
                   help="take the width whose covered compression is closest to each target")
    p.add_argument("--tile_size", nargs="+", type=int, default=None,
                   help="fixed GBConfig.tile_size (one int or rows cols) instead of the tile chosen per target")
    p.add_argument("--no_tile_gain", action="store_true", help="family_options tile_gain=False of family 'shared'")
    p.add_argument("--gains", default="none", choices=["none", "rows", "columns", "both"], help="GBConfig.gains")
    p.add_argument("--label", default=None,
                   help="name of this GB setting in tables and plot (runs of several settings can be combined)")
    p.add_argument("--init_active", type=float, default=None, help="GBConfig.init_active (sparse g-net init)")
    p.add_argument("--fit_steps", type=int, default=300, help="Adam steps of each regression fit")
    p.add_argument("--fit_lrs", nargs="+", type=float, default=[1e-2, 3e-2],
                   help="regression LRs tried on seed 0; the lowest relative error picks the one for all seeds")
    p.add_argument("--rounds", type=int, default=3, help="train/fit rounds of the alternating (PNAS) loop")
    p.add_argument("--round_epochs", type=int, default=5, help="plain epochs per alternating round")
    p.add_argument("--alt_seeds", type=int, default=3, help="seeds of the alternating loop")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the committed results)")
    add_out_args(p, "digits", split="one per --models")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.fit_steps, args.fit_lrs = 1, 4, 40, [1e-2]
        args.rounds, args.round_epochs, args.alt_seeds = 2, 2, 1
        args.targets, args.lrs, args.gnet_lrs, args.hash_lrs = [10, 300], [3e-3, 1e-2], [1e-2], [3e-3, 1e-2]
    if args.tile_size is not None:  # one int: square tiles
        args.tile_size = args.tile_size[0] if len(args.tile_size) == 1 else args.tile_size
    args.out = args.out or default_out("digits", args.quick)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.combine:
        return combine(args)
    torch.set_num_threads(args.threads)
    data = load_data()
    t_start = time.time()
    seeds = list(range(args.seeds))
    runs: list[dict[str, Any]] = []  # one row per (model, method, target, LR, seed)
    methods = set(args.methods)
    schedule = {"warmup": args.warmup, "gnet_warmup": args.gnet_warmup}

    def log(row: dict[str, Any]) -> None:
        row |= schedule
        runs.append(row)
        print(f"[{time.time() - t_start:6.0f}s] {row['model']} {row['method']:<11} target {row['target'] or '-':>5} "
              f"stored {row['stored']:6d}  lr {row.get('lr') or '-':<6} seed {row['seed']}  acc {row['accuracy']:.4f}",
              flush=True)

    for name in args.models:
        plain_states = {}
        for seed in seeds if methods & {"plain", "innate"} else []:
            for lr in args.lrs if "plain" in methods else []:
                model = fresh(name, seed)
                acc = train(model, None, data, args.epochs, lr, lr, args.batch_size, seed, **schedule)
                log({"model": name, "method": "plain", "target": None, "ratio": 1.0, "seed": seed, "lr": lr,
                     "accuracy": acc, "stored": stored_values(model)})
                if lr == args.lr:
                    plain_states[seed] = copy.deepcopy(model.state_dict())
            if "innate" in methods and seed not in plain_states:
                model = fresh(name, seed)
                train(model, None, data, args.epochs, args.lr, args.lr, args.batch_size, seed, **schedule)
                plain_states[seed] = copy.deepcopy(model.state_dict())
        for target in args.targets:
            extra = {} if args.tile_size is None else {"tile_size": args.tile_size}
            options = {"second_hidden_dim": args.second_hidden_dim} if args.family == "deep" else {}
            if args.no_tile_gain:
                options["tile_gain"] = False
            if args.gains != "none":
                extra["gains"] = args.gains
            if args.init_active is not None:
                extra["init_active"] = args.init_active
            cfg, ratio = pick_config(name, target, args.encoding, args.hidden_dims, args.closest, family=args.family,
                                     family_options=options or None, **extra)
            common = {"model": name, "target": target, "ratio": ratio, "hidden_dim": cfg.hidden_dim,
                      "family": cfg.family,
                      "second_hidden_dim": cfg.option("second_hidden_dim") if cfg.family == "deep" else None,
                      "init_active": cfg.init_active, "gains": cfg.gains}
            if args.label is not None:  # a named setting: its rows (GB and baselines) are grouped apart
                probe = GenomicBottleneck(fresh(name, 0), cfg)
                tiles = sorted({"x".join(map(str, t.geometry.key()[:2])) for t in probe.covered})
                common |= {"setting": args.label, "tiles": [t.n_tiles for t in probe.covered],
                           "tile_size": cfg.tile_size,
                           "tile_gain": cfg.option("tile_gain") if cfg.family == "shared" else None,
                           "geometries": tiles}
            probe = GenomicBottleneck(fresh(name, 0), cfg)
            budget, covered = stored_values(probe), [t.name.rpartition(".")[0] for t in probe.covered]
            common["gb_stored"] = budget
            for lr in args.gnet_lrs if "gb" in methods else []:
                for seed in seeds:
                    model = fresh(name, seed)
                    gb = GenomicBottleneck(model, with_seed(cfg, seed))
                    acc = train(model, gb, data, args.epochs, args.lr, lr, args.batch_size, seed, **schedule)
                    label = "gb" if cfg.family == "mlp" else f"gb_{cfg.family}"  # a line per family
                    log({**common, "method": label, "seed": seed, "lr": lr, "accuracy": acc,
                         "ratio": gb.stats()["covered_compression"], "stored": stored_values(gb)})
            if "hash" in methods:  # random weight sharing of the same tensors at the GB run's stored values
                hash_cfg, _ = hash_config(lambda name=name: fresh(name, 0), budget, exclude_modules=MODELS[name][1])
            for lr in args.hash_lrs if "hash" in methods else []:
                for seed in seeds:
                    model = fresh(name, seed)
                    gb = GenomicBottleneck(model, with_seed(hash_cfg, seed))
                    acc = train(model, gb, data, args.epochs, lr, lr, args.batch_size, seed, **schedule)
                    log({**common, "method": "hash", "family": "hash", "seed": seed, "lr": lr, "accuracy": acc,
                         "hash_compression": hash_cfg.compression, "ratio": gb.stats()["covered_compression"],
                         "stored": stored_values(gb)})
            spec, _ = narrow_spec(name, budget)
            for lr in args.lrs if "narrow" in methods else []:
                for seed in seeds:
                    model = fresh(name, seed, spec)
                    acc = train(model, None, data, args.epochs, lr, lr, args.batch_size, seed, **schedule)
                    log({**common, "method": "narrow", "seed": seed, "lr": lr, "accuracy": acc, "widths": spec,
                         "stored": stored_values(model)})
            for lr in args.lrs if "lowrank" in methods else []:
                for seed in seeds:
                    model = fresh(name, seed)
                    info = low_rank_(model, covered, budget, seed)
                    acc = train(model, None, data, args.epochs, lr, lr, args.batch_size, seed, **schedule)
                    log({**common, "method": "lowrank", "seed": seed, "lr": lr, "accuracy": acc,
                         "ranks": info["ranks"], "stored": info["stored_values"]})
            if "innate" not in methods and "alternating" not in methods:
                continue
            # innate: regression onto the plainly trained weights; seed 0 picks the fit LR by relative error
            fit_lr, best = args.fit_lrs[0], None
            for lr in args.fit_lrs if len(args.fit_lrs) > 1 else []:
                model = fresh(name, 0)
                if 0 in plain_states:
                    model.load_state_dict(plain_states[0])
                else:
                    train(model, None, data, args.epochs, args.lr, args.lr, args.batch_size, 0, **schedule)
                _, errors, _ = innate(model, with_seed(cfg, 0), args.fit_steps, lr, data)
                err = sum(errors.values()) / len(errors)
                print(f"    fit lr {lr:g}: mean relative error {err:.3f}", flush=True)
                if best is None or err < best:
                    fit_lr, best = lr, err
            for seed in seeds if "innate" in methods else []:
                model = fresh(name, seed)
                model.load_state_dict(plain_states[seed])
                acc, errors, gb = innate(model, with_seed(cfg, seed), args.fit_steps, fit_lr,
                                         data)
                log({**common, "method": "innate", "seed": seed, "accuracy": acc, "fit_lr": fit_lr,
                     "relative_errors": errors, "stored": stored_values(gb)})
            if name != "mlp" or "alternating" not in methods:
                continue
            for seed in range(args.alt_seeds):  # the PNAS train / fit / re-initialise loop
                model, gb, history = fresh(name, seed), None, []
                for r in range(args.rounds):
                    train(model, None, data, args.round_epochs, args.lr, args.lr, args.batch_size, seed + 100 * r,
                          **schedule)
                    acc, errors, gb = innate(model, with_seed(cfg, seed), args.fit_steps,
                                             fit_lr, data, gb)
                    model.zero_grad(set_to_none=True)
                    history.append(acc)
                log({**common, "method": "alternating", "seed": seed, "accuracy": history[-1], "fit_lr": fit_lr,
                     "history": history, "relative_errors": errors, "stored": stored_values(gb)})

    payload = {
        "benchmark": "digits",
        "quick": args.quick,
        "args": vars(args),
        "machine": machine(),
        "wall_s": round(time.time() - t_start, 1),
        "runs": runs,
    }
    return finish(payload, args.out)


def combine(args: argparse.Namespace) -> dict[str, Any]:
    parts = read_parts(args.combine)
    payload = {"benchmark": "digits", "quick": any(p["quick"] for p in parts), "args": parts[0]["args"],
               "machine": parts[0]["machine"], "wall_s": max(p["wall_s"] for p in parts),
               "parts": [{"args": p["args"], "machine": p["machine"], "wall_s": p["wall_s"]} for p in parts],
               "runs": [r for p in parts for r in p["runs"]]}
    payload["args"] = {**payload["args"], "models": sorted({m for p in parts for m in p["args"]["models"]})}
    return finish(payload, args.out)


TABLE = [("model", "model", ""), ("method", "method", ""), ("setting", "setting", ""), ("target", "target", "g"),
         ("ratio", "covered x", ".1f"), ("stored", "stored", ",.0f"), ("stored_vs_gb", "vs GB", "+.1%"),
         ("size", "h / widths / ranks", ""), ("lr", "LR", "g"), ("n", "seeds", "d"), ("mean", "test acc", ".4f"),
         ("std", "+-", ".4f")]


def finish(payload: dict[str, Any], out: str) -> dict[str, Any]:
    grid = summarise(payload["runs"])
    summary = best_of_grid(grid)
    return publish(payload, out, summary, TABLE, plot, grid=grid)


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, method, target, LR): mean, std, min and max over seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["model"], r["method"], r["target"], r.get("setting"), r.get("lr")), []).append(r)
    out = []
    for (name, method, target, setting, lr), rows in groups.items():
        mean, std = mean_std([r["accuracy"] for r in rows])
        stored = mean_std([r["stored"] for r in rows])[0]
        first = rows[0]
        size = {"gb_deep": f"h={first.get('hidden_dim')},{first.get('second_hidden_dim')}", "plain": "-",
                "narrow": "-".join(map(str, _flat(first.get("widths", ())))),
                "lowrank": "r=" + ",".join(map(str, (first.get("ranks") or {}).values())),
                "hash": f"C={first.get('hash_compression', 0):.1f}"}.get(
                    method, f"h={first.get('hidden_dim')}")
        if method.startswith("gb") and first.get("tiles"):
            size += f", tiles {'/'.join(map(str, first['tiles']))}"
        out.append({"model": name, "method": method, "target": target, "setting": setting, "lr": lr,
                    "ratio": mean_std([r["ratio"] for r in rows if "ratio" in r])[0] if method != "narrow" else None,
                    "stored": stored, "gb_stored": first.get("gb_stored"),
                    "stored_vs_gb": stored / first["gb_stored"] - 1 if first.get("gb_stored") else None,
                    "hidden_dim": first.get("hidden_dim"), "size": size, "n": len(rows), "mean": mean, "std": std,
                    "min": min(r["accuracy"] for r in rows), "max": max(r["accuracy"] for r in rows)})
    return out


def _flat(spec) -> list[int]:
    return [x for s in spec for x in (_flat(s) if isinstance(s, (list, tuple)) else [s])]


def best_of_grid(grid: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, method, target): the LR of the best mean test accuracy (the same rule for every method)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for g in grid:
        groups.setdefault((g["model"], g["method"], g["target"], g.get("setting")), []).append(g)
    best = [best_by(rows, "lr", "mean", higher=True)[0] for rows in groups.values()]
    return sorted(best, key=lambda g: (g["model"], order(g["method"]), g["target"] or 0, g.get("setting") or ""))


def order(method: str) -> int:
    return METHODS.index(method) if method in METHODS else len(METHODS)


STYLES = {"gb": ("o-", "GB, trained end to end"), "hash": ("^-", "random sharing (HashedNets)"),
          "narrow": ("D-", "narrower dense model"),
          "lowrank": ("v-", "low-rank U @ V"), "gb_deep": ("s-", "GB, 'deep' g-nets"),
          "gb_shared": ("P-", "GB, 'shared' g-nets (best setting per target)"),
          "innate": ("s--", "GB innate (regression)"),
          "alternating": ("^:", "GB innate (PNAS alternating)")}


def plot(summary: list[dict[str, Any]], path: str) -> bool:
    """Accuracy against stored values, a panel per model, one line per method (best LR each); False when there is
    nothing to plot."""
    names = sorted({s["model"] for s in summary})
    if not names:
        return False

    def draw(ax, rows: list[dict[str, Any]]) -> None:
        ax.axhline(0.1, color="gray", lw=1, ls=":", label="chance 0.1")
        for method, (style, label) in STYLES.items():
            best = {}  # per (target): the best setting, so that a line joins one point per target
            for s in rows:
                if s["method"] == method and (s["target"] not in best or s["mean"] > best[s["target"]]["mean"]):
                    best[s["target"]] = s
            pts = sorted((s["stored"], s["mean"], s["std"]) for s in best.values())
            settings = sorted({s["setting"] for s in best.values() if s.get("setting")})
            if settings:  # named settings: say which ones the line joins
                label += f" [{', '.join(settings)}]"
            if not pts:
                continue
            x, y, e = zip(*pts)
            color = ax.errorbar(x, y, yerr=e, fmt=style, capsize=3, ms=4, label=label)[0].get_color()
            others = [s for s in rows if s["method"] == method and s not in best.values()]
            if others:  # the other settings, as faint markers
                ax.plot([s["stored"] for s in others], [s["mean"] for s in others], style[0], color=color,
                        alpha=0.35, ms=4)

    by_model = [(f"digits {name.upper()}", [s for s in summary if s["model"] == name]) for name in names]
    return storage_plot(path, by_model, "mean", draw)


if __name__ == "__main__":
    main()
