"""Confirmation tables: per (tag, compression, budget) the seed-0 best LR and the mean over seeds 0-2 at it, and
the same at a fixed LR (--at, for the one-LR rows).  python benchmarks/probes/summary.py mnist|lm [--at 3e-3]"""
import argparse
import glob
import json
import os
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))
p = argparse.ArgumentParser()
p.add_argument("kind")
p.add_argument("--at", type=float, default=None)
p.add_argument("--tags", nargs="*", default=None)
a = p.parse_args()
metric = "acc" if a.kind == "mnist" else "val_loss"
groups = {}
for f in glob.glob(os.path.join(HERE, "results", a.kind, "*.json")):
    r = json.load(open(f))
    ar = r["args"]
    if a.tags and r["tag"] not in a.tags:
        continue
    groups.setdefault((ar["compression"], ar.get("epochs", ar.get("steps")), r["tag"]), []).append(r)
out = []
for (c, b, tag), rows in sorted(groups.items()):
    s0 = [r for r in rows if r["args"]["seed"] == 0]
    if not s0:
        continue
    sign = 1 if metric == "acc" else -1
    best = max(s0, key=lambda r: (sign * r[metric], -r["args"]["lr"]))
    for label, lr in (("best", best["args"]["lr"]),) + ((("at", a.at),) if a.at else ()):
        at = sorted((r for r in rows if abs(r["args"]["lr"] - lr) < 1e-12), key=lambda r: r["args"]["seed"])
        if not at or (label == "at" and lr == best["args"]["lr"]):
            continue
        vals = [r[metric] for r in at]
        grid = sorted({r["args"]["lr"] for r in s0})
        print(f"{c:<6g} {b:<4} {tag:<22} {label:<4} lr {lr:<7g} stored {at[0]['stored']:6d} "
              f"({at[0].get('covered_compression', 0):5.0f}x)  mean {statistics.fmean(vals):.4f}  seeds "
              + " ".join(f"{v:.4f}" for v in vals) + f"   grid {grid}")
