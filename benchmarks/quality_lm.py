"""Validation loss of the causal LM of examples/train.py, plain against the genomic bottleneck at several compressions.

The corpus, tokenizer and model come from examples/train.py (`build_datasets`, `build_model`): the Python standard
library's own source files, byte-level tokens, a small Llama. Every run uses the same loop (AdamW, warm-up and
cosine decay, gradient clipping) and the same batches in the same order, so runs at equal steps have seen equal
tokens. With the bottleneck, every Linear (attention, MLP, lm_head) is covered; embeddings and norms stay dense.

Next to every GB point run the equal-storage baselines: random weight sharing (HashedNets: the family ``"hash"``
with ``center=False``, whole-tensor tiles, its compression picked so that its checkpoint stores the GB run's values
within 1%) of the same covered Linears, a narrower dense Llama (same layers, heads and vocabulary) whose stored
values are within 3% of the GB run's, and low-rank factors ``U @ V`` of every covered Linear at the same storage
(see benchmarks/baselines.py). Plain, random-sharing, narrow and low-rank runs take an LR grid of one LR for every
tensor, GB runs a g-net LR grid (their uncompressed tensors keep ``--lr``); the grid runs on the first seed,
further seeds at the LR the first seed found best (the same rule for every method); tables show the best, the
JSON keeps every run.

    python benchmarks/quality_lm.py            # full run, writes benchmarks/results/lm.{json,png}
    python benchmarks/quality_lm.py --quick    # a smoke run (tiny model, few steps) into out/benchmarks/
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from baselines import closest_size, hash_config, low_rank_, stored_values  # noqa: E402
from common import add_out_args, default_out, machine, publish, read_parts, storage_plot, train_step, warmup_cosine  # noqa: E402

from hf_gb import GBConfig, GenomicBottleneck  # noqa: E402

LR_GRID = (1e-3, 3e-3, 1e-2)
METHODS = ("plain", "gb", "hash", "narrow", "lowrank")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke run under 2 minutes")
    p.add_argument("--compressions", nargs="*", type=float, default=[5, 20, 50],
                   help="GBConfig.compression targets (covered); the real ratios are reported")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--hidden_dim", type=int, default=32, help="GBConfig.hidden_dim")
    p.add_argument("--family", default="mlp", help="GBConfig.family of the GB runs")
    p.add_argument("--second_hidden_dim", type=int, default=8, help="second_hidden_dim of family 'deep'")
    p.add_argument("--gains", default="none", choices=["none", "rows", "columns", "both"], help="GBConfig.gains")
    p.add_argument("--tile_size", nargs="+", type=int, default=None,
                   help="fixed GBConfig.tile_size (one int or rows cols); the compression then follows hidden_dim")
    p.add_argument("--target_modules", default=None,
                   help="GBConfig.target_modules of the GB runs, a regex over module names (default: every Linear); "
                   "e.g. '.*(proj|lm_head|embed_tokens)' also covers the input embedding")
    p.add_argument("--gb_label", default=None, help="method name of the GB runs in tables and plots")
    p.add_argument("--steps", nargs="+", type=int, default=[150],
                   help="training budgets (one run per budget: the cosine schedule spans the budget)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="model/data seeds; the first runs the LR grid")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--block_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW LR of the uncompressed tensors of GB runs")
    p.add_argument("--lrs", nargs="+", type=float, default=list(LR_GRID),
                   help="LR grid of plain, narrower dense and low-rank runs")
    p.add_argument("--gnet_lrs", nargs="+", type=float, default=list(LR_GRID), help="g-net LR grid of GB runs")
    p.add_argument("--one_lr", action="store_true",
                   help="GB runs: one LR for every tensor (the g-net grid's), as a user's own loop gives them, "
                   "instead of --lr for the uncompressed tensors")
    p.add_argument("--hash_lrs", nargs="+", type=float, default=list(LR_GRID),
                   help="LR grid of random-sharing runs (one LR for the shared values and the dense tensors)")
    p.add_argument("--init_active", type=float, default=None, help="GBConfig.init_active (sparse g-net init)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--gnet_warmup", type=int, default=None,
                   help="linear warm-up steps of the g-net LR of GB runs (default: --warmup, like every tensor)")
    p.add_argument("--eval_every", type=int, default=50)
    p.add_argument("--max_train_tokens", type=int, default=2_000_000)
    p.add_argument("--max_eval_tokens", type=int, default=32_768)
    p.add_argument("--hidden_size", type=int, default=128)
    p.add_argument("--num_layers", type=int, default=2)
    p.add_argument("--num_heads", type=int, default=4)
    p.add_argument("--intermediate_size", type=int, default=384)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the committed results were made so; other counts change the "
                   "floating-point reduction order and the last digits of the losses)")
    add_out_args(p, "lm", split="one per method")
    args = p.parse_args(argv)
    if args.quick:
        args.compressions, args.steps, args.batch_size, args.block_size = [20], [12], 8, 64
        args.warmup, args.eval_every, args.max_train_tokens, args.max_eval_tokens = 2, 6, 100_000, 4096
        args.hidden_size, args.num_layers, args.intermediate_size = 64, 2, 192
        args.lrs, args.gnet_lrs, args.hash_lrs = [3e-3, 1e-2], [1e-2], [3e-3, 1e-2]
    if args.tile_size is not None:  # one int: square tiles
        args.tile_size = args.tile_size[0] if len(args.tile_size) == 1 else args.tile_size
    args.out = args.out or default_out("lm", args.quick)
    return args


@torch.no_grad()
def evaluate(model, gb, validation, batch_size: int) -> float:
    """Mean next-token cross-entropy over the validation blocks (weights predicted fresh when ``gb``)."""
    if gb is not None:
        gb.predict_weights(sample=False, keep_graph=False)
    model.eval()
    total, count = 0.0, 0
    blocks = validation.blocks
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i : i + batch_size]
        total += model(input_ids=ids, labels=ids).loss.item() * len(ids)
        count += len(ids)
    model.train()
    return total / count


def batches(train, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """The input ids of each of ``steps`` training steps: the blocks in a random order of ``seed`` (the same batches,
    in the same order, in every run of a seed), ``batch_size`` at a time, from the start again when they run out."""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    for step in range(steps):
        yield train.blocks[order[(torch.arange(batch_size) + step * batch_size) % len(order)]]


def eval_every(args, steps: int) -> int:
    """Steps between two points of the validation curve: ``--eval_every``, times ``steps // 150`` for longer runs."""
    return args.eval_every * max(1, steps // 150)


def script_args(args, hidden: int | None = None, intermediate: int | None = None):
    from examples.train import ScriptArguments

    return ScriptArguments(block_size=args.block_size, hidden_size=hidden or args.hidden_size,
                           num_layers=args.num_layers, num_heads=args.num_heads,
                           intermediate_size=intermediate or args.intermediate_size)


def narrow_size(args, vocab: int, hidden: int, intermediate: int) -> int:
    """Stored values of the Llama of examples/train.py at (hidden, intermediate): untied embeddings and lm_head,
    per layer q/k/v/o, gate/up/down and two norms, a final norm (checked against the state_dict in the tests)."""
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    return 2 * vocab * hidden + args.num_layers * per_layer + hidden


def narrow_spec(args, vocab: int, target: int) -> tuple[tuple[int, int], int]:
    """(hidden, intermediate) within 3% of ``target`` stored values, intermediate / hidden nearest the model's.

    Hidden sizes are multiples of 2 * heads (an even head size for the rotary embedding)."""
    step, ratio = 2 * args.num_heads, args.intermediate_size / args.hidden_size
    cands = [(h, i) for h in range(step, args.hidden_size + 1, step) for i in range(1, args.intermediate_size + 1)]
    return closest_size(cands, lambda c: narrow_size(args, vocab, *c), target,
                        lambda c: abs(math.log(c[1] / (ratio * c[0]))))


def run(args, method: str, target: float | None, lr: float, steps: int, seed: int, train, validation,
        vocab: int) -> dict[str, Any]:
    """Train one model for ``steps`` steps; ``lr`` is the g-net LR of GB runs, else the LR of every tensor."""
    from examples.train import build_model

    label = method if method != "gb" or args.family == "mlp" else f"gb_{args.family}"  # a line per family
    if method == "gb" and args.gb_label:
        label = args.gb_label
    row: dict[str, Any] = {"method": label, "mode": label, "target": target, "lr": lr, "steps": steps,
                           "seed": seed}
    gb = None
    if method == "narrow":
        (hidden, inter), _ = narrow_spec(args, vocab, gb_budget(args, target, vocab))
        model = build_model(script_args(args, hidden, inter), vocab, seed=seed)
        row["widths"] = [hidden, inter]
    else:
        model = build_model(script_args(args), vocab, seed=seed)
    if method == "hash":  # random weight sharing of the covered Linears at the GB run's stored values
        cfg, _ = hash_match(args, target, vocab)
        gb = GenomicBottleneck(model, GBConfig.from_dict({**cfg.to_dict(), "seed": seed}))
        s = gb.stats()
        row |= {"covered_compression": s["covered_compression"], "hash_compression": cfg.compression,
                "stored": stored_values(gb), "covered_params": s["covered_params"], "gnet_params": s["gnet_params"]}
        groups = [{"params": gb.trainable_parameters(), "lr": lr}]
    elif method == "gb":
        gb = GenomicBottleneck(model, gb_config(args, target, seed=seed))
        s = gb.stats()
        row |= {k: s[k] for k in ("covered_compression", "overall_compression", "covered_params", "gnet_params",
                                  "uncompressed_params")}
        dense_lr = lr if args.one_lr else args.lr
        row |= {"gnet_lr": lr, "dense_lr": dense_lr, "stored": stored_values(gb),
                "family": args.family, "hidden_dim": args.hidden_dim, "target_modules": args.target_modules,
                "gains": args.gains, "init_active": args.init_active}
        groups = [{"params": list(gb.parameters()), "lr": lr},
                  {"params": gb.uncompressed_parameters(), "lr": dense_lr}]
    else:
        if method == "lowrank":
            probe = GenomicBottleneck(build_model(script_args(args), vocab, seed=seed),
                                      gb_config(args, target, kernel="eager"))
            info = low_rank_(model, [t.name.rpartition(".")[0] for t in probe.covered], stored_values(probe), seed)
            row["ranks"] = info["ranks"]
        row["stored"] = stored_values(model)
        groups = [{"params": list(model.parameters()), "lr": lr}]
    if target is not None:
        row["gb_stored"] = gb_budget(args, target, vocab)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)

    gnet_warmup = args.warmup if args.gnet_warmup is None else args.gnet_warmup
    lambdas = [warmup_cosine(gnet_warmup if method == "gb" and i == 0 else args.warmup, steps)
               for i in range(len(groups))]
    if method == "gb":
        row["gnet_warmup"] = gnet_warmup
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    curve, t0 = [], time.time()
    every = eval_every(args, steps)
    for step, ids in enumerate(batches(train, args.batch_size, steps, seed)):
        with train_step(gb, optimizer, max_grad_norm=1.0):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        scheduler.step()
        if (step + 1) % every == 0 or step + 1 == steps:
            val = evaluate(model, gb, validation, 32)
            curve.append({"step": step + 1, "tokens": (step + 1) * args.batch_size * args.block_size,
                          "train_loss": loss.item(), "val_loss": val})
    print(f"  {label:<7} target {target or '-':>4}  steps {steps:4d}  seed {seed}  lr {lr:<6g} stored "
          f"{row['stored']:7,d}  val {curve[-1]['val_loss']:.4f}  ({time.time() - t0:.0f}s)", flush=True)
    return row | {"val_loss": curve[-1]["val_loss"], "perplexity": math.exp(curve[-1]["val_loss"]),
                  "tokens": steps * args.batch_size * args.block_size, "wall_s": round(time.time() - t0, 1),
                  "curve": curve}


_BUDGETS: dict[tuple, int] = {}


def gb_config(args, target: float, **kwargs: Any) -> GBConfig:
    return GBConfig(hidden_dim=args.hidden_dim, compression=target, family=args.family,
                    family_options={"second_hidden_dim": args.second_hidden_dim} if args.family == "deep" else None,
                    tile_size=args.tile_size,
                    target_modules=args.target_modules, gains=args.gains, init_active=args.init_active, **kwargs)


def gb_budget(args, target: float, vocab: int) -> int:
    """Stored values of the GB checkpoint at ``target`` (the same for every seed: only values change)."""
    from examples.train import build_model

    key = (target, args.hidden_size, args.num_layers, args.intermediate_size, args.hidden_dim, args.family,
           args.second_hidden_dim, str(args.tile_size), args.target_modules, args.gains, vocab)
    if key not in _BUDGETS:
        model = build_model(script_args(args), vocab, seed=0)
        _BUDGETS[key] = stored_values(GenomicBottleneck(model, gb_config(args, target, kernel="eager")))
    return _BUDGETS[key]


_HASH: dict[tuple, tuple[GBConfig, int]] = {}


def hash_match(args, target: float, vocab: int) -> tuple[GBConfig, int]:
    """The random-sharing config whose checkpoint stores what the GB run's at ``target`` stores (and that count)."""
    from examples.train import build_model

    budget = gb_budget(args, target, vocab)
    key = (budget, args.hidden_size, args.num_layers, args.intermediate_size, args.target_modules, vocab)
    if key not in _HASH:
        _HASH[key] = hash_config(lambda: build_model(script_args(args), vocab, seed=0), budget,
                                 target_modules=args.target_modules)
    return _HASH[key]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.combine:
        return combine(args)
    torch.set_num_threads(args.threads)
    from examples.train import ScriptArguments, build_datasets

    t_start = time.time()
    data_args = ScriptArguments(block_size=args.block_size, max_train_tokens=args.max_train_tokens,
                                max_eval_tokens=args.max_eval_tokens)
    train, validation, tokenizer = build_datasets(data_args)
    vocab = len(tokenizer)
    print(f"stdlib corpus: {len(train) * args.block_size:,} training tokens, "
          f"{len(validation) * args.block_size:,} validation tokens, vocabulary {vocab}")
    runs = []
    for steps in args.steps:
        settings = [("plain", None)] if "plain" in args.methods else []
        settings += [(m, c) for c in args.compressions for m in METHODS[1:] if m in args.methods]
        for method, target in settings:
            grid = {"gb": args.gnet_lrs, "hash": args.hash_lrs}.get(method, args.lrs)
            first = [run(args, method, target, lr, steps, args.seeds[0], train, validation, vocab) for lr in grid]
            runs += first
            best = min(first, key=lambda r: r["val_loss"])["lr"]
            runs += [run(args, method, target, best, steps, s, train, validation, vocab) for s in args.seeds[1:]]
    payload = {"benchmark": "lm", "quick": args.quick, "args": vars(args), "machine": machine(),
               "wall_s": round(time.time() - t_start, 1), "train_tokens_available": len(train) * args.block_size,
               "validation_tokens": len(validation) * args.block_size, "runs": runs}
    return finish(payload, args.out)


def combine(args: argparse.Namespace) -> dict[str, Any]:
    parts = read_parts(args.combine)
    runs = [r for p in parts for r in p["runs"]]
    payload = {**parts[0], "wall_s": max(p["wall_s"] for p in parts), "runs": runs,
               "quick": any(p["quick"] for p in parts),
               "parts": [{"args": p["args"], "machine": p["machine"], "wall_s": p["wall_s"]} for p in parts]}
    return finish(payload, args.out)


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (steps, method, target): the LR of the lowest first-seed loss, with the mean over its seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["steps"], r["method"], r["target"]), []).append(r)
    out = []
    for (steps, method, target), rows in groups.items():
        first_seed = min(r["seed"] for r in rows)
        best = min((r for r in rows if r["seed"] == first_seed), key=lambda r: r["val_loss"])
        at_best = [r for r in rows if r["lr"] == best["lr"]]
        losses = [r["val_loss"] for r in at_best]
        mean = sum(losses) / len(losses)
        size = "-"
        if method == "narrow":
            size = "{}/{}".format(*best["widths"])
        elif method == "lowrank":
            size = "r=" + ",".join(str(r) for r in sorted(set(best["ranks"].values())))
        elif method.startswith("gb") or method == "hash":
            size = f"{best['covered_compression']:.1f}x"
        out.append({"steps": steps, "method": method, "target": target, "lr": best["lr"], "seeds": len(at_best),
                    "stored": best["stored"], "gb_stored": best.get("gb_stored"),
                    "stored_vs_gb": best["stored"] / best["gb_stored"] - 1 if best.get("gb_stored") else None,
                    "size": size, "tokens": best["tokens"], "val_loss": mean,
                    "val_loss_seeds": losses, "spread": max(losses) - min(losses)})
    out.sort(key=lambda r: (r["steps"], r["target"] or 0, order(r["method"])))
    for r in out:
        plain = [p for p in out if p["method"] == "plain" and p["steps"] == r["steps"]]
        r["loss_vs_plain"] = r["val_loss"] / plain[0]["val_loss"] - 1 if plain else None
    return out


TABLE = [("steps", "steps", "d"), ("method", "method", ""), ("target", "target", "g"), ("stored", "stored", ",d"),
         ("stored_vs_gb", "vs GB", "+.1%"), ("size", "covered x / widths / ranks", ""), ("lr", "LR", "g"),
         ("seeds", "seeds", "d"), ("val_loss", "val loss", ".4f"), ("spread", "seed spread", ".4f"),
         ("loss_vs_plain", "vs plain", "+.1%")]


def finish(payload: dict[str, Any], out: str) -> dict[str, Any]:
    return publish(payload, out, summarise(payload["runs"]), TABLE, plot)


STYLES = {"gb": ("o-", "GB (g-nets h=32)"), "hash": ("^-", "random sharing (HashedNets)"),
          "narrow": ("D-", "narrower dense Llama"),
          "lowrank": ("v-", "low-rank U @ V"), "gb_deep": ("s--", "GB, 'deep' g-nets")}


def order(method: str) -> int:
    return METHODS.index(method) if method in METHODS else len(METHODS)


def plot(summary: list[dict[str, Any]], path: str) -> bool:
    """Validation loss against stored values, a panel per step budget, a line per method; False if nothing to
    plot (no plain run and no compressed runs)."""
    budgets = sorted({r["steps"] for r in summary})
    if not budgets:
        return False

    def draw(ax, rows: list[dict[str, Any]]) -> None:
        for r in (r for r in rows if r["method"] == "plain"):
            ax.axhline(r["val_loss"] * 1.05, color="k", lw=1, ls=":", label="plain + 5%")
        others = sorted({r["method"] for r in rows} - set(STYLES) - {"plain"})  # e.g. a --gb_label: its name
        for method, (style, label) in [*STYLES.items(), *((m, ("x--", f"GB, {m}")) for m in others)]:
            pts = sorted((r["stored"], r["val_loss"]) for r in rows if r["method"] == method)
            if pts:
                ax.plot(*zip(*pts), style, ms=4, label=label)

    by_steps = {steps: [r for r in summary if r["steps"] == steps] for steps in budgets}
    return storage_plot(path, [(f"stdlib causal LM, {steps} steps ({rows[0]['tokens']:,} tokens)", rows)
                               for steps, rows in by_steps.items()],
                        "val_loss", draw, ylabel="validation loss (nats / byte), best LR")


if __name__ == "__main__":
    main()
