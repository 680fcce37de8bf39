"""Sharded-engine benchmark: per-rank predict+push time and peak memory with FSDP2, 1 vs 2 processes.

The model is the engine benchmark's Llama (hidden 512, intermediate 1536, 4 layers, vocab 8192, untied; about 22M
covered weights, see bench_engine.py), each decoder layer and the root wrapped by ``fully_shard`` over gloo. For
each world size the script launches ``torch.distributed.run`` and every rank reports:

- how many tiles it predicts (the whole tiles intersecting its rows) out of all tiles, and its covered rows;
- ``predict_weights()`` and ``push_gradients()`` (push includes the all-reduce of the g-net gradients) in ms, median
  and fastest of ``--repeats`` rounds after one warm-up round, from gradients set on the local shards;
- peak RSS (VmHWM) in MB: what building the bottleneck added to the sharded model's peak (calibration still
  predicts every tile once on every rank), and the peak of the predict+push rounds above the RSS before them
  (VmHWM is reset in between through ``/proc/self/clear_refs``).

A plain run (no FSDP, one process, the unsharded engine) is measured the same way as the baseline. With 2 ranks
each should need about half the time and added memory of 1 rank (tiles that straddle the row boundary are
predicted by both). Results go to ``benchmarks/results/sharded.json`` (or ``--json``).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_sharded.py --threads 1          # full run
    OMP_NUM_THREADS=1 python benchmarks/bench_sharded.py --threads 1 --quick  # smoke run (small model)

Timings on a shared machine are noisy: compare only numbers taken side by side in one run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_engine import LLAMA, LLAMA_QUICK  # noqa: E402
from common import dump_json  # noqa: E402

from hf_gb import GBConfig, GenomicBottleneck  # noqa: E402

DEFAULT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "sharded.json")


def _vm_mb(field: str = "VmHWM") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next peak belongs to what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _build(llama: dict, sharded: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**llama))
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    return model


def _set_grads(gb: GenomicBottleneck) -> None:
    from hf_gb.engine.shards import is_dtensor

    gen = torch.Generator().manual_seed(1)
    for t in gb.covered:
        if is_dtensor(t.param):
            from torch.distributed.tensor import DTensor

            local = torch.randn(t.param.to_local().shape, generator=gen)
            t.param.grad = DTensor.from_local(local, t.param.device_mesh, t.param.placements, run_check=False,
                                              shape=t.param.shape, stride=t.param.stride())
        else:
            t.param.grad = torch.randn(t.param.shape, generator=gen)


def worker(args: argparse.Namespace) -> None:
    sharded = args.mode == "fsdp"
    if sharded:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    llama = LLAMA_QUICK if args.quick else LLAMA
    model = _build(llama, sharded)
    hwm_model = _vm_mb()
    gb = GenomicBottleneck(model, GBConfig(hidden_dim=args.hidden_dim, tile_size=args.tile, kernel=args.kernel,
                                           exclude_modules=["embed_tokens"]))
    hwm_built = _vm_mb()
    reset = _reset_peak()
    rss_before_steps = _vm_mb("VmRSS")
    predict, push = [], []
    for i in range(args.repeats + 1):  # round 0 warms up (and compiles)
        t0 = time.perf_counter()
        gb.predict_weights()
        t1 = time.perf_counter()
        _set_grads(gb)
        t2 = time.perf_counter()
        gb.push_gradients()
        t3 = time.perf_counter()
        gb.zero_grad(set_to_none=True)
        if i:
            predict.append((t1 - t0) * 1e3)
            push.append((t3 - t2) * 1e3)
    all_tiles = sum(b.n_tiles for b in gb.banks.values())
    mine = gb.local_tile_count
    shards = gb.row_shards
    rows = sum(s.local_rows for s in shards.values()) if shards else sum(t.shape[0] for t in gb.covered)
    report = {
        "mode": args.mode, "world_size": world, "rank": rank, "tiles": mine, "all_tiles": all_tiles,
        "covered_rows": rows, "covered_params": gb.stats()["covered_params"],
        "predict_ms_median": statistics.median(predict), "predict_ms_min": min(predict),
        "push_ms_median": statistics.median(push), "push_ms_min": min(push),
        "peak_rss_model_mb": hwm_model, "peak_rss_built_mb": hwm_built,
        # Peak RSS during the predict+push rounds above the RSS before them (needs the VmHWM reset).
        "step_peak_added_mb": _vm_mb() - rss_before_steps if reset else float("nan"),
    }
    report["build_added_mb"] = hwm_built - hwm_model
    with open(os.path.join(args.out, f"{args.mode}-w{world}-rank{rank}.json"), "w") as f:
        json.dump(report, f)
    if sharded:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model, few repeats (a smoke run)")
    parser.add_argument("--json", default=DEFAULT_JSON, help="where to write the results (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads per process")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round")
    parser.add_argument("--hidden_dim", type=int, default=32)
    parser.add_argument("--tile", type=int, default=128, help="square tile side")
    parser.add_argument("--kernel", default="auto", choices=("auto", "eager", "compiled"))
    parser.add_argument("--worlds", default="1,2", help="FSDP world sizes to run (default: %(default)s)")
    parser.add_argument("--_worker", dest="mode", choices=("plain", "fsdp"), help=argparse.SUPPRESS)
    parser.add_argument("--_out", dest="out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        return worker(args)
    if args.quick:
        args.repeats = min(args.repeats, 2)
    passthrough = ["--repeats", str(args.repeats), "--hidden_dim", str(args.hidden_dim), "--tile", str(args.tile),
                   "--kernel", args.kernel] + (["--quick"] if args.quick else [])
    if args.threads:
        passthrough += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    script = os.path.abspath(__file__)
    with tempfile.TemporaryDirectory() as out:
        runs = [[sys.executable, script, "--_worker", "plain", "--_out", out, *passthrough]]
        for world in [int(w) for w in args.worlds.split(",")]:
            runs.append([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                         "--master_port", str(_free_port()), script, "--_worker", "fsdp", "--_out", out,
                         *passthrough])
        for command in runs:  # one at a time: the runs must not compete for cores
            subprocess.run(command, env=env, check=True)
        reports = [json.load(open(os.path.join(out, name))) for name in sorted(os.listdir(out))]
    print(f"{'run':<10} {'rank':>4} {'tiles':>13} {'rows':>7} {'predict ms':>11} {'push ms':>9} "
          f"{'build MB':>9} {'step MB':>8}")
    for r in reports:
        run = "plain" if r["mode"] == "plain" else f"fsdp x{r['world_size']}"
        print(f"{run:<10} {r['rank']:>4} {r['tiles']:>6}/{r['all_tiles']:<6} {r['covered_rows']:>7} "
              f"{r['predict_ms_median']:>11.1f} {r['push_ms_median']:>9.1f} {r['build_added_mb']:>9.0f} "
              f"{r['step_peak_added_mb']:>8.0f}")
    result = {"llama": LLAMA_QUICK if args.quick else LLAMA, "hidden_dim": args.hidden_dim, "tile": args.tile,
              "kernel": args.kernel, "threads": args.threads, "repeats": args.repeats, "runs": reports}
    dump_json(args.json, result, indent=1)


if __name__ == "__main__":
    main()
