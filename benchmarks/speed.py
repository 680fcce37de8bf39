"""Step time and peak memory of training through the genomic bottleneck, against plain training.

Llama-style causal LMs built from a config (3 sizes) at 2 batch sizes; each (size, batch, mode) runs in its own
child process so its peak RSS (``ru_maxrss``) is its own. A step is one optimizer step on random tokens: predict,
forward, backward, push, AdamW step (GB), or forward, backward, AdamW step (plain). The first steps (which include
``torch.compile`` of the g-net kernels) are reported separately as warm-up, not timed.

    python benchmarks/speed.py            # full run, writes benchmarks/results/speed.{json,png}
    python benchmarks/speed.py --quick    # one size, one batch size: a smoke run into out/benchmarks/

The engine's kernel micro-benchmarks are in benchmarks/bench_engine.py; this measures whole training steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_out_args, default_out, machine, panels, pyplot, save_figure, table, train_step, write_outputs  # noqa: E402

# name -> (hidden, layers, heads, intermediate)
SIZES = {
    "S": (64, 2, 2, 192),
    "M": (128, 4, 4, 384),  # the model of examples/train.py
    "L": (256, 4, 4, 768),
}
VOCAB = 257  # byte-level tokens + EOS, as examples/train.py


def child(size: str, batch: int, seq: int, mode: str, compression: float, hidden_dim: int, warmup: int,
          steps: int, threads: int, kernel: str) -> dict[str, Any]:
    """Measure in this process (called by the parent through a subprocess)."""
    import resource

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_gb import GBConfig, GenomicBottleneck

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hidden, layers, heads, inter = SIZES[size]
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=seq,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    gb, extra = None, {}
    if mode == "gb":
        gb = GenomicBottleneck(model, GBConfig(hidden_dim=hidden_dim, compression=compression, kernel=kernel))
        s = gb.stats()
        extra = {"covered_params": s["covered_params"], "covered_compression": s["covered_compression"],
                 "gnet_params": s["gnet_params"]}
        params = gb.trainable_parameters()
    else:
        params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(warmup + steps):
        ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
        t0 = time.perf_counter()
        with train_step(gb, optimizer):
            model(input_ids=ids, labels=ids).loss.backward()
        times.append(time.perf_counter() - t0)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"size": size, "batch": batch, "seq": seq, "mode": mode, "params": n_params,
            "warmup_s": sum(times[:warmup]), "step_s": statistics.median(times[warmup:]),
            "step_s_all": times[warmup:], "peak_rss_mb": peak_kb / 1024, **extra}


def run_child(**kw) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(kw)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child {kw} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="size S, batch 4, 2 timed steps: a smoke run")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--batches", nargs="+", type=int, default=[4, 16])
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--compression", type=float, default=20.0, help="GBConfig.compression (covered target)")
    p.add_argument("--hidden_dim", type=int, default=32, help="GBConfig.hidden_dim")
    p.add_argument("--kernel", default="auto", choices=["auto", "native", "compiled", "eager"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per child; 1 resists contention from other jobs (OpenMP spin-waits)")
    add_out_args(p, "speed")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.batches, args.warmup, args.steps = ["S"], [4], 1, 2
    args.out = args.out or default_out("speed", args.quick)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(**json.loads(args.child))))
        return {}
    t_start = time.time()
    load_before = machine()["load_average_1_5_15"]
    rows = []
    for size in args.sizes:
        for batch in args.batches:
            res = {}
            for mode in ("plain", "gb"):
                res[mode] = run_child(size=size, batch=batch, seq=args.seq, mode=mode, compression=args.compression,
                                      hidden_dim=args.hidden_dim, warmup=args.warmup, steps=args.steps,
                                      threads=args.threads, kernel=args.kernel)
            plain, gb = res["plain"], res["gb"]
            row = {"size": size, "params": plain["params"], "batch": batch, "seq": args.seq,
                   "covered_compression": gb["covered_compression"], "plain_step_s": plain["step_s"],
                   "gb_step_s": gb["step_s"], "step_ratio": gb["step_s"] / plain["step_s"],
                   "gb_warmup_s": gb["warmup_s"], "plain_peak_rss_mb": plain["peak_rss_mb"],
                   "gb_peak_rss_mb": gb["peak_rss_mb"], "rss_ratio": gb["peak_rss_mb"] / plain["peak_rss_mb"],
                   "plain_steps_s": plain["step_s_all"], "gb_steps_s": gb["step_s_all"]}
            rows.append(row)
            print(f"[{time.time() - t_start:5.0f}s] {size} batch {batch}: plain {row['plain_step_s']:.3f}s, "
                  f"GB {row['gb_step_s']:.3f}s ({row['step_ratio']:.2f}x), peak RSS {row['plain_peak_rss_mb']:.0f} "
                  f"-> {row['gb_peak_rss_mb']:.0f} MB", flush=True)
    print()
    print(table(rows, [("size", "size", ""), ("params", "params", ","), ("batch", "batch", "d"),
                       ("covered_compression", "covered x", ".1f"), ("plain_step_s", "plain s", ".3f"),
                       ("gb_step_s", "GB s", ".3f"), ("step_ratio", "GB/plain", ".2f"),
                       ("plain_peak_rss_mb", "plain MB", ".0f"), ("gb_peak_rss_mb", "GB MB", ".0f"),
                       ("rss_ratio", "MB ratio", ".2f")]))
    m = machine()
    m["load_average_before"] = load_before
    settings = {k: v for k, v in vars(args).items() if k != "child"}
    payload = {"benchmark": "speed", "quick": args.quick, "args": settings, "machine": m,
               "wall_s": round(time.time() - t_start, 1), "rows": rows}
    write_outputs(args.out, payload, lambda path: plot(rows, path))
    return payload


def plot(rows: list[dict[str, Any]], path: str) -> bool:
    plt = pyplot()
    fig, (ax1, ax2) = panels(2, width=5.5, height=4.2)
    for batch in sorted({r["batch"] for r in rows}):
        pts = sorted((r["params"], r["step_ratio"], r["rss_ratio"]) for r in rows if r["batch"] == batch)
        x, y, z = zip(*pts)
        ax1.plot(x, y, "o-", label=f"batch {batch}")
        ax2.plot(x, z, "o-", label=f"batch {batch}")
    for ax, label in ((ax1, "step time GB / plain"), (ax2, "peak RSS GB / plain")):
        ax.axhline(1.0, color="k", lw=1)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())  # the default minor labels overlap on this range
        ax.set_xlabel("model parameters")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_title("training step time (shared 2-core CPU)")
    ax2.set_title("peak memory (child-process RSS)")
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
