"""Engine benchmark: g-net predict+push speed, and the cost of a genomic bottleneck in a real training step.

Two parts, both printed as tables and written to JSON (default ``benchmarks/results/engine.json``):

1. ``predict_weights() + push_gradients()`` in milliseconds per million covered weights, for hidden widths
   16, 32 and 64, on the eager reference kernels and on the fast (``torch.compile``) path; then for each g-net
   family at compression 20 with its default kernel choice, next to an estimate of its flops per weight.
2. One AdamW training step of a Llama-style causal LM built from a config (hidden 512, intermediate 1536, 4 layers,
   8 heads, vocab 8192, untied embeddings) at batch 8 x 128, plain and with a bottleneck. Step times are measured in
   one process, plain and GB steps interleaved after warm-up, and compared by their medians; peak RSS (VmHWM) is
   measured for each in its own child process so neither sees the other's memory. The GB step is the step helper
   (``with gb.step(optimizer)``).
3. ``--loops`` (alone): the same model and step as plain, as README's four plain calls and as the step helper, each
   for the configs of ``LOOP_CONFIGS`` (the defaults, the defaults at 20x, family "mlp" at 20x), one step of each
   per round in a rotating order; medians, ratios to plain, each round's ratios and the load average per round.

Usage::

    python benchmarks/bench_engine.py            # full run (several minutes on a 2-core CPU)
    python benchmarks/bench_engine.py --quick    # smoke run: small sizes, few repeats
    python benchmarks/bench_engine.py --json out.json
    python benchmarks/bench_engine.py --loops --threads 2   # plain / four plain calls / step helper side by side

Timings on a shared machine are noisy: compare only numbers taken side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from common import dump_json  # noqa: E402

from hf_gb import GBConfig, GenomicBottleneck  # noqa: E402

DEFAULT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "engine.json")
LOOPS_JSON = os.path.join(os.path.dirname(DEFAULT_JSON), "engine_loops.json")
LOOPS_QUICK_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "out", "benchmarks",
                                "engine_loops_quick.json")  # smoke runs never write over results/

LLAMA = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=8192, tie_word_embeddings=False, max_position_embeddings=256)
LLAMA_QUICK = dict(LLAMA, num_hidden_layers=2, vocab_size=2048)


def _median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


# ----------------------------------------------------------------------------- part 1: predict + push
def _time_predict_push(gb: GenomicBottleneck, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds of ``predict_weights()`` and of ``push_gradients()`` in each of ``repeats`` rounds after a warm-up
    round (which also compiles); random weight gradients stand in for a backward pass."""
    grads = [torch.randn_like(t.param) for t in gb.covered]
    predict, push = [], []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        gb.predict_weights()
        t1 = time.perf_counter()
        for t, g in zip(gb.covered, grads):
            t.param.grad = g.clone()
        t2 = time.perf_counter()
        gb.push_gradients()
        t3 = time.perf_counter()
        gb.zero_grad(set_to_none=True)
        if i:
            predict.append(t1 - t0)
            push.append(t3 - t2)
    return predict, push


def bench_kernels(hidden_dims: list[int], side: int, layers: int, repeats: int) -> list[dict]:
    """ms per million weights of predict+push on ``layers`` bias-free ``side x side`` Linear layers."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(side, side, bias=False) for _ in range(layers)])
    numel = layers * side * side
    rows = []
    for h in hidden_dims:
        for kernel in ("eager", "compiled", "native"):
            gb = GenomicBottleneck(model, GBConfig(hidden_dim=h, kernel=kernel, tile_size=128))
            predict, push = _time_predict_push(gb, repeats)
            scale = 1e6 / numel
            row = {"hidden_dim": h, "kernel": kernel, "numel": numel,
                   "predict_ms_per_M": _median_ms(predict) * scale, "push_ms_per_M": _median_ms(push) * scale}
            row["total_ms_per_M"] = row["predict_ms_per_M"] + row["push_ms_per_M"]
            # The fastest round: on a loaded machine the median mostly measures waiting for a core.
            row["best_total_ms_per_M"] = min(a + b for a, b in zip(predict, push)) * 1e3 * scale
            rows.append(row)
            gb.detach_model()  # the next setting attaches its own bottleneck to the same model
            print(f"  h={h:<3} {kernel:<8} predict {row['predict_ms_per_M']:8.2f}  push {row['push_ms_per_M']:8.2f}"
                  f"  total {row['total_ms_per_M']:8.2f}  best {row['best_total_ms_per_M']:8.2f} ms per 1M weights",
                  flush=True)
    return rows


def flops_per_weight(config: GBConfig) -> float:
    """Estimated flops per predicted weight of predict + push (forward once, backward about twice the forward).

    mlp: ``relu(A[i] + B[j]) . w2`` is about 3h flops per weight forward. deep: the same first layer (2 h1), the
    second layer (2 h1 h2 + 2 h2) and the output (2 h2); its backward recomputes the forward in chunks.
    """
    h = config.hidden_dim
    if config.family in ("mlp", "shared"):  # shared: the same kernels over tables expanded from one g-net per bank
        return 3 * h * 3
    if config.family == "deep":
        h2 = config.option("second_hidden_dim")
        return (2 * h + 2 * h * h2 + 4 * h2) * 4  # forward, recomputed forward, two backward halves
    return float("nan")


def bench_families(configs: list[GBConfig], side: int, layers: int, repeats: int) -> list[dict]:
    """ms per million weights of predict+push for each g-net family at its `GBConfig`, with flop estimates.

    The row header says "at compression 20": mlp and deep get ``compression=20``; shared gets the tile and width of
    the LM benchmark instead (about 20x), because ``compression`` alone makes it pick the smallest tiles that reach
    the ratio (2 x 384 at h = 32), the opposite of what the family is for."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(side, side, bias=False) for _ in range(layers)])
    numel = layers * side * side
    rows = []
    for config in configs:
        gb = GenomicBottleneck(model, config)
        predict, push = _time_predict_push(gb, repeats)
        totals = [a + b for a, b in zip(predict, push)]
        row = {"family": config.family, "hidden_dim": config.hidden_dim, "gains": config.gains,
               "second_hidden_dim": config.option("second_hidden_dim") if config.family == "deep" else None,
               "covered_compression": gb.stats()["covered_compression"], "numel": numel,
               "flops_per_weight": flops_per_weight(config),
               "total_ms_per_M": _median_ms(totals) * 1e6 / numel,
               "best_total_ms_per_M": min(totals) * 1e3 * 1e6 / numel}
        rows.append(row)
        gb.detach_model()  # the next family attaches its own bottleneck to the same layers
        print(f"  {config.family:<5} gains={config.gains:<4} h={config.hidden_dim:<3} "
              f"{row['covered_compression']:6.1f}x  "
              f"~{row['flops_per_weight']:.0f} flops/weight  predict+push {row['total_ms_per_M']:8.2f}  "
              f"best {row['best_total_ms_per_M']:8.2f} ms per 1M weights", flush=True)
    return rows


# ----------------------------------------------------------------------------- part 2: a training step
# The GB configs of the loops mode: the defaults (random sharing on this Llama, 128 x 128 tiles), the defaults at
# 20x, and the position-coded g-nets of family 'mlp' at 20x (what a tensor with ordered axes gets).
LOOP_CONFIGS = {"default": {}, "20x": {"compression": 20}, "mlp20x": {"family": "mlp", "compression": 20}}


class _Trainer:
    """One model, its optimizer and (optionally) its bottleneck; ``step()`` runs one full AdamW step.

    ``loop``: how a GB step is written, ``"helper"`` (``with gb.step(optimizer)``, what users get) or ``"four"``
    (README's four plain calls: ``predict_weights``, backward, ``push_gradients``, ``optimizer.step`` and both
    ``zero_grad``)."""

    def __init__(self, use_gb: bool, llama: dict, batch: int, seq: int, seed: int = 0, kernel: str = "auto",
                 loop: str = "helper", config: dict | None = None):
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        self.model = LlamaForCausalLM(LlamaConfig(**llama))
        self.model.train()
        self.gb = GenomicBottleneck(self.model, GBConfig(kernel=kernel, **(config or {}))) if use_gb else None
        self.loop = loop
        params = self.gb.trainable_parameters() if self.gb is not None else list(self.model.parameters())
        self.trained_params = sum(p.numel() for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        gen = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(0, llama["vocab_size"], (batch, seq), generator=gen)

    def _backward(self) -> None:
        self.model(input_ids=self.input_ids, labels=self.input_ids).loss.backward()

    def step(self) -> float:
        t0 = time.perf_counter()
        if self.gb is None:
            self._backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        elif self.loop == "helper":
            with self.gb.step(self.optimizer):
                self._backward()
        else:  # README's four plain calls, as written there
            self.gb.predict_weights()
            self._backward()
            self.gb.push_gradients()
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.gb.zero_grad()
        return time.perf_counter() - t0


def bench_step(llama: dict, batch: int, seq: int, warmup: int, steps: int, kernel: str = "auto") -> dict:
    """Interleaved plain / GB step times in one process; medians and their ratio."""
    plain, gb = _Trainer(False, llama, batch, seq), _Trainer(True, llama, batch, seq, kernel=kernel)
    times = {"plain": [], "gb": []}
    for i in range(warmup + steps):
        # Alternate which goes first so a slow phase of the machine hits both alike.
        order = [("plain", plain), ("gb", gb)] if i % 2 == 0 else [("gb", gb), ("plain", plain)]
        for name, trainer in order:
            dt = trainer.step()
            if i >= warmup:
                times[name].append(dt)
    stats = gb.gb.stats()
    result = {
        "plain_step_ms": _median_ms(times["plain"]),
        "gb_step_ms": _median_ms(times["gb"]),
        "plain_steps_ms": [t * 1e3 for t in times["plain"]],
        "gb_steps_ms": [t * 1e3 for t in times["gb"]],
        "model_params": sum(p.numel() for p in plain.model.parameters()),
        "covered_params": stats["covered_params"],
        "gnet_params": stats["gnet_params"],
        "optimizer_params_plain": plain.trained_params,
        "optimizer_params_gb": gb.trained_params,
    }
    result["step_ratio"] = result["gb_step_ms"] / result["plain_step_ms"]
    return result


def bench_loops(llama: dict, batch: int, seq: int, warmup: int, rounds: int, kernel: str = "auto") -> dict:
    """plain, README's four plain calls and the step helper, for each config of `LOOP_CONFIGS`, in one process:
    every round runs one step of each, in an order rotated by the round; medians, ratios to plain, and the load
    average before every round (a ratio measured under load says little)."""
    variants = {"plain": _Trainer(False, llama, batch, seq)}
    for name, config in LOOP_CONFIGS.items():
        for loop in ("four", "helper"):
            variants[f"{loop}/{name}"] = _Trainer(True, llama, batch, seq, kernel=kernel, loop=loop, config=config)
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    loads = []
    for r in range(warmup + rounds):
        if r >= warmup:
            loads.append(os.getloadavg())
        for name in names[r % len(names):] + names[: r % len(names)]:
            dt = variants[name].step()
            if r >= warmup:
                times[name].append(dt)
    plain = _median_ms(times["plain"])
    rows = {}
    for name in names:
        gb = variants[name].gb
        rows[name] = {"step_ms": _median_ms(times[name]), "ratio": _median_ms(times[name]) / plain,
                      "steps_ms": [t * 1e3 for t in times[name]],
                      "covered_compression": gb.stats()["covered_compression"] if gb is not None else None,
                      "optimizer_params": variants[name].trained_params}
        # Each round's own ratio: the rounds' spread shows how much the load moved the medians.
        rows[name]["round_ratios"] = [t / p for t, p in zip(times[name], times["plain"])]
    return {"variants": rows, "configs": LOOP_CONFIGS, "load_avg_per_round": loads, "llama": llama,
            "batch": batch, "seq": seq, "warmup": warmup, "rounds": rounds, "kernel": kernel}


def _vm_hwm_mb() -> float:
    """Peak RSS of this process in MB. VmHWM, unlike ru_maxrss, is not inherited from the parent over exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: KiB on most systems


def _child(mode: str, llama: dict, batch: int, seq: int, steps: int, kernel: str) -> None:
    """Run in a fresh process: build, train ``steps`` steps, report peak RSS (before and after training)."""
    trainer = _Trainer(mode == "gb", llama, batch, seq, kernel=kernel)
    built = _vm_hwm_mb()
    for _ in range(steps):
        trainer.step()
    print(json.dumps({"built_rss_mb": built, "peak_rss_mb": _vm_hwm_mb()}))


def bench_memory(args: argparse.Namespace, steps: int) -> dict:
    out = {}
    for mode in ("plain", "gb"):
        cmd = [sys.executable, os.path.abspath(__file__), "--_child", mode, "--_steps", str(steps),
               "--kernel", args.kernel]
        if args.quick:
            cmd.append("--quick")
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def run_loops(args: argparse.Namespace, llama: dict, batch: int, seq: int) -> None:
    warmup, rounds = (1, args.rounds or 2) if args.quick else (3, args.rounds or 15)
    start = os.getloadavg()
    print(f"loops: Llama {llama['num_hidden_layers']} layers, batch {batch} x {seq}, AdamW, "
          f"{torch.get_num_threads()} threads, {warmup} warm-up + {rounds} rounds; load average {start}", flush=True)
    result = bench_loops(llama, batch, seq, warmup, rounds, kernel=args.kernel)
    result.update(load_avg_at_start=start, load_avg_at_end=os.getloadavg(), quick=args.quick,
                  torch_threads=torch.get_num_threads(), torch=torch.__version__, cpus=os.cpu_count(),
                  command=" ".join([os.path.basename(sys.executable)] + sys.argv))
    print("| loop | config | step ms (median) | / plain | rounds' ratios (min-max) | covered x |")
    print("|---|---|---|---|---|---|")
    for name, row in result["variants"].items():
        loop, _, config = name.partition("/")
        spread = f"{min(row['round_ratios']):.3f}-{max(row['round_ratios']):.3f}"
        covered = f"{row['covered_compression']:.1f}" if row["covered_compression"] else "-"
        print(f"| {loop} | {config or '-'} | {row['step_ms']:.0f} | {row['ratio']:.3f} | {spread} | {covered} |")
    print(f"load average start {start}, end {result['load_avg_at_end']} (trust the ratios only when it is near 0)")
    path = args.json if args.json != DEFAULT_JSON else LOOPS_QUICK_JSON if args.quick else LOOPS_JSON
    dump_json(os.path.abspath(path), result)


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke run)")
    parser.add_argument("--json", default=DEFAULT_JSON, help="where to write the results (default: %(default)s)")
    parser.add_argument("--skip-kernels", action="store_true", help="skip part 1 (predict+push)")
    parser.add_argument("--skip-step", action="store_true", help="skip part 2 (training step and memory)")
    parser.add_argument("--skip-families", action="store_true", help="skip the per-family predict+push at 20x")
    parser.add_argument("--loops", action="store_true",
                        help="only the loops mode: plain / README's four plain calls / the step helper side by "
                             "side on the step's Llama, for the benchmark's GBConfig and README's (JSON: "
                             "results/engine_loops.json, --quick: out/benchmarks/engine_loops_quick.json)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the loops mode (default 15, quick 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--kernel", default="auto", choices=("auto", "native", "compiled", "eager"),
                        help="GBConfig.kernel of the training step (part 2; default: %(default)s)")
    parser.add_argument("--_child", choices=("plain", "gb"), help=argparse.SUPPRESS)
    parser.add_argument("--_steps", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    llama = LLAMA_QUICK if args.quick else LLAMA
    batch, seq = (2, 32) if args.quick else (8, 128)
    if args._child:
        _child(args._child, llama, batch, seq, args._steps, args.kernel)
        return

    if args.loops:
        run_loops(args, llama, batch, seq)
        return

    results: dict = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "load_avg_at_start": os.getloadavg()},
        "quick": args.quick,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    if not args.skip_kernels:
        print("predict + push, ms per million weights (median)", flush=True)
        hidden_dims = [32] if args.quick else [16, 32, 64]
        side, layers, repeats = (512, 1, 2) if args.quick else (1024, 2, 7)
        results["kernels"] = bench_kernels(hidden_dims, side, layers, repeats)
    if not args.skip_families:
        print("predict + push per g-net family at compression 20, ms per million weights (median)", flush=True)
        side, layers, repeats = (512, 1, 2) if args.quick else (1024, 2, 7)
        configs = [GBConfig(family="mlp", hidden_dim=32, compression=20),
                   GBConfig(family="mlp", hidden_dim=32, compression=20, gains="both"),
                   GBConfig(family="deep", hidden_dim=16, family_options={"second_hidden_dim": 8}, compression=20),
                   # "shared" as the LM benchmark runs it: 128 x 128 tiles, h sized for ~20x (quality_lm.py)
                   GBConfig(family="shared", hidden_dim=510, tile_size=128)]
        results["families"] = bench_families(configs, side, layers, repeats)
    if not args.skip_step:
        warmup, steps = (1, 2) if args.quick else (3, 7)
        print(f"training step, Llama {llama['num_hidden_layers']} layers, batch {batch} x {seq}, AdamW "
              f"({warmup} warm-up + {steps} interleaved steps each)", flush=True)
        memory = bench_memory(args, steps=2 if args.quick else 4)  # first, while this process is still small
        step = bench_step(llama, batch, seq, warmup, steps, kernel=args.kernel)
        step["memory"] = memory
        step.update(llama=llama, batch=batch, seq=seq, kernel=args.kernel)
        results["step"] = step
    results["machine"]["load_avg_at_end"] = os.getloadavg()

    print()
    if "kernels" in results:
        print("| h | kernel | predict ms/M | push ms/M | predict+push ms/M | best round ms/M |")
        print("|---|---|---|---|---|---|")
        for r in results["kernels"]:
            print(f"| {r['hidden_dim']} | {r['kernel']} | {r['predict_ms_per_M']:.2f} | {r['push_ms_per_M']:.2f} | "
                  f"{r['total_ms_per_M']:.2f} | {r['best_total_ms_per_M']:.2f} |")
    if "families" in results:
        print()
        print("| family | h | covered x | flops/weight (est.) | predict+push ms/M | best round ms/M |")
        print("|---|---|---|---|---|---|")
        for r in results["families"]:
            h = f"{r['hidden_dim']}" + (f", {r['second_hidden_dim']}" if r["second_hidden_dim"] else "")
            family = r["family"] + ("" if r.get("gains", "none") == "none" else f", gains={r['gains']}")
            print(f"| {family} | {h} | {r['covered_compression']:.1f} | {r['flops_per_weight']:.0f} | "
                  f"{r['total_ms_per_M']:.2f} | {r['best_total_ms_per_M']:.2f} |")
    if "step" in results:
        s, m = results["step"], results["step"]["memory"]
        print()
        print("| | step ms (median) | peak RSS MB | RSS after build MB | optimizer params |")
        print("|---|---|---|---|---|")
        print(f"| plain | {s['plain_step_ms']:.0f} | {m['plain']['peak_rss_mb']:.0f} | "
              f"{m['plain']['built_rss_mb']:.0f} | {s['optimizer_params_plain']:,} |")
        print(f"| GB | {s['gb_step_ms']:.0f} | {m['gb']['peak_rss_mb']:.0f} | {m['gb']['built_rss_mb']:.0f} | "
              f"{s['optimizer_params_gb']:,} |")
        print(f"GB / plain step time: {s['step_ratio']:.3f}x; peak RSS GB / plain: "
              f"{m['gb']['peak_rss_mb'] / m['plain']['peak_rss_mb']:.3f}x "
              f"(covered {s['covered_params']:,} of {s['model_params']:,} weights by "
              f"{s['gnet_params']:,} g-net params)")
    print(f"load average start {results['machine']['load_avg_at_start']}, end {results['machine']['load_avg_at_end']}")
    if args.json:
        dump_json(args.json, results)


if __name__ == "__main__":
    main()
