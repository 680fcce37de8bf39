"""Validation loss of the causal LM of examples/train.py, plain against the genomic bottleneck at several compressions.

The corpus, tokenizer and model come from examples/train.py (`build_datasets`, `build_model`): the Python standard
library's own source files, byte-level tokens, a small Llama. Every run uses the same loop (AdamW, warm-up and
cosine decay, gradient clipping) and the same batches in the same order, so runs at equal steps have seen equal
tokens. With the bottleneck, every Linear (attention, MLP, lm_head) is covered; embeddings and norms stay dense.

    python benchmarks/quality_lm.py            # full run, writes benchmarks/results/lm.{json,png}
    python benchmarks/quality_lm.py --quick    # a smoke run (tiny model, few steps), under 2 minutes
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from common import RESULTS, machine, pyplot, read_parts, sparse_gnet_init, table, write_json  # noqa: E402

from hf_gb import GBConfig, GenomicBottleneck  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke run under 2 minutes")
    p.add_argument("--compressions", nargs="*", type=float, default=[5, 20, 50],
                   help="GBConfig.compression targets (covered); the real ratios are reported")
    p.add_argument("--hidden_dim", type=int, default=32, help="GBConfig.hidden_dim")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--block_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW LR of plain weights and uncompressed tensors")
    p.add_argument("--gnet_lr", type=float, default=3e-3, help="AdamW LR of the g-nets")
    p.add_argument("--gnet_bias_shift", type=float, default=0.0,
                   help="hidden-bias shift of the sparse g-net init (0: the library's default init)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--eval_every", type=int, default=50)
    p.add_argument("--max_train_tokens", type=int, default=2_000_000)
    p.add_argument("--max_eval_tokens", type=int, default=32_768)
    p.add_argument("--hidden_size", type=int, default=128)
    p.add_argument("--num_layers", type=int, default=2)
    p.add_argument("--intermediate_size", type=int, default=384)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(RESULTS, "lm"), help="path prefix of the .json and .png")
    p.add_argument("--skip_plain", action="store_true", help="only the GB runs (to split a run over processes)")
    p.add_argument("--combine", nargs="+", metavar="JSON",
                   help="merge the runs of these result files (one with the plain run) into --out")
    args = p.parse_args(argv)
    if args.quick:
        args.compressions, args.steps, args.batch_size, args.block_size = [20], 12, 8, 64
        args.warmup, args.eval_every, args.max_train_tokens, args.max_eval_tokens = 2, 6, 100_000, 4096
        args.hidden_size, args.num_layers, args.intermediate_size = 64, 2, 192
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


def run(args, mode: str, compression: float | None, train, validation, vocab: int) -> dict[str, Any]:
    from examples.train import ScriptArguments, build_model

    script = ScriptArguments(block_size=args.block_size, hidden_size=args.hidden_size, num_layers=args.num_layers,
                             intermediate_size=args.intermediate_size)
    model = build_model(script, vocab, seed=args.seed)
    gb, info = None, {"covered_compression": 1.0, "overall_compression": 1.0}
    if mode == "gb":
        gb = GenomicBottleneck(model, GBConfig(hidden_dim=args.hidden_dim, compression=compression, seed=args.seed))
        sparse_gnet_init(gb, args.gnet_bias_shift)
        s = gb.stats()
        info = {k: s[k] for k in ("covered_compression", "overall_compression", "covered_params", "gnet_params",
                                  "uncompressed_params")}
        groups = [{"params": list(gb.parameters()), "lr": args.gnet_lr},
                  {"params": gb.uncompressed_parameters(), "lr": args.lr}]
        clip_params = [p for g in groups for p in g["params"]]
    else:
        groups = [{"params": list(model.parameters()), "lr": args.lr}]
        clip_params = groups[0]["params"]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)

    def lr_lambda(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, args.steps - args.warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    gen = torch.Generator().manual_seed(args.seed)  # same batches, same order, in every run
    order = torch.randperm(len(train), generator=gen)
    curve, t0 = [], time.time()
    for step in range(args.steps):
        idx = order[(torch.arange(args.batch_size) + step * args.batch_size) % len(order)]
        ids = train.blocks[idx]
        if gb is not None:
            gb.predict_weights()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if gb is not None:
            gb.push_gradients()
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if gb is not None:
            gb.zero_grad(set_to_none=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val = evaluate(model, gb, validation, 32)
            curve.append({"step": step + 1, "tokens": (step + 1) * args.batch_size * args.block_size,
                          "train_loss": loss.item(), "val_loss": val})
            print(f"  {mode} {compression or '':>5} step {step + 1:4d}  train {loss.item():.4f}  val {val:.4f}  "
                  f"({time.time() - t0:.0f}s)", flush=True)
    return {"mode": mode, "target": compression, **info, "gnet_lr": args.gnet_lr if gb else None,
            "gnet_bias_shift": args.gnet_bias_shift if gb else None, "val_loss": curve[-1]["val_loss"],
            "perplexity": math.exp(curve[-1]["val_loss"]), "tokens": args.steps * args.batch_size * args.block_size,
            "wall_s": round(time.time() - t0, 1), "curve": curve}


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
    runs = [] if args.skip_plain else [run(args, "plain", None, train, validation, vocab)]
    for c in args.compressions:
        runs.append(run(args, "gb", c, train, validation, vocab))
    payload = {"benchmark": "lm", "quick": args.quick, "args": vars(args), "machine": machine(),
               "wall_s": round(time.time() - t_start, 1), "train_tokens_available": len(train) * args.block_size,
               "validation_tokens": len(validation) * args.block_size, "runs": runs}
    return finish(payload, args.out)


def combine(args: argparse.Namespace) -> dict[str, Any]:
    parts = read_parts(args.combine)
    for p in parts:  # parts written before these fields were recorded per run
        for r in p["runs"]:
            if r["mode"] == "gb":
                r.setdefault("gnet_lr", p["args"]["gnet_lr"])
                r.setdefault("gnet_bias_shift", p["args"].get("gnet_bias_shift", 0.0))
    runs = sorted((r for p in parts for r in p["runs"]),
                  key=lambda r: (r["mode"] != "plain", setting(r), r["target"] or 0))
    payload = {**parts[0], "wall_s": max(p["wall_s"] for p in parts), "runs": runs,
               "parts": [{"args": p["args"], "machine": p["machine"], "wall_s": p["wall_s"]} for p in parts]}
    return finish(payload, args.out)


def finish(payload: dict[str, Any], out: str) -> dict[str, Any]:
    runs = payload["runs"]
    if runs and runs[0]["mode"] == "plain":
        plain = runs[0]["val_loss"]
        for r in runs:
            r["loss_vs_plain"] = r["val_loss"] / plain - 1
    print()
    print(table(runs, [("mode", "mode", ""), ("target", "target", "g"), ("covered_compression", "covered x", ".1f"),
                       ("overall_compression", "overall x", ".2f"), ("gnet_lr", "g-net LR", "g"),
                       ("gnet_bias_shift", "bias shift", "g"), ("tokens", "tokens", ","),
                       ("val_loss", "val loss", ".4f"), ("perplexity", "ppl", ".3f"),
                       ("loss_vs_plain", "vs plain", "+.1%"), ("wall_s", "wall s", ".0f")]))
    path = write_json(os.path.basename(out) + ".json", payload, os.path.dirname(out))
    if runs and runs[0]["mode"] == "plain":
        plot(runs, out + ".png")
    print(f"wrote {path} and {out}.png")
    return payload


def setting(r: dict[str, Any]) -> tuple[float, float]:
    """(g-net LR, hidden-bias shift) of a GB run: the g-net training setting that the plot separates."""
    return (r.get("gnet_lr") or 0.0, r.get("gnet_bias_shift") or 0.0)


def label(key: tuple[float, float]) -> str:
    return f"g-net LR {key[0]:g}, " + (f"sparse init (shift {key[1]:g})" if key[1] else "default init")


def plot(runs: list[dict[str, Any]], path: str) -> None:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    plain = runs[0]
    ax1.axhline(plain["val_loss"], color="k", lw=1, label=f"plain {plain['val_loss']:.3f}")
    ax1.axhline(plain["val_loss"] * 1.05, color="k", lw=1, ls=":", label="plain + 5%")
    for key in sorted({setting(r) for r in runs if r["mode"] == "gb"}):
        gbs = sorted((r for r in runs if r["mode"] == "gb" and setting(r) == key),
                     key=lambda r: r["covered_compression"])
        x, y = [r["covered_compression"] for r in gbs], [r["val_loss"] for r in gbs]
        ax1.plot(x, y, "o-", label=f"GB, {label(key)}")
    ax1.set_xscale("log")
    ax1.set_xlabel("covered compression (weights / g-net parameters)")
    ax1.set_ylabel("validation loss (nats / byte)")
    ax1.set_title(f"stdlib causal LM, {plain['tokens']:,} training tokens each")
    for r in runs:
        name = "plain" if r["mode"] == "plain" else f"GB {r['covered_compression']:.0f}x, {label(setting(r))}"
        ax2.plot([c["tokens"] for c in r["curve"]], [c["val_loss"] for c in r["curve"]], "o-", ms=3, label=name)
    ax2.set_xlabel("training tokens")
    ax2.set_ylabel("validation loss")
    ax2.set_title("validation loss during training")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=6.5, loc="upper right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
