"""Emit the seed-1 and seed-2 commands of every (tag, compression, budget) group whose seed-0 LR grid is in results/:
at the seed-0 best LR (accuracy up / loss down; ties -> the smaller LR), plus at --also_lr for tags in --one_lr.

    python benchmarks/probes/seed_jobs.py mnist --tags hash narrow fam_x --one_lr fam_x --also_lr 3e-3
"""
import argparse
import glob
import json
import os
import shlex

HERE = os.path.dirname(os.path.abspath(__file__))
p = argparse.ArgumentParser()
p.add_argument("kind")
p.add_argument("--tags", nargs="+")
p.add_argument("--one_lr", nargs="*", default=[])
p.add_argument("--also_lr", type=float, default=3e-3)
p.add_argument("--steps", type=int, default=None)
a = p.parse_args()
groups = {}
for f in glob.glob(os.path.join(HERE, "results", a.kind, "*.json")):
    r = json.load(open(f))
    if r["tag"] not in a.tags:
        continue
    ar = r["args"]
    budget = ar.get("epochs", ar.get("steps"))
    if a.steps and budget != a.steps:
        continue
    groups.setdefault((r["tag"], ar["compression"], budget), []).append(r)
script = "mnist_probe.py" if a.kind == "mnist" else "lm_probe.py"
for key, rows in sorted(groups.items()):
    s0 = [r for r in rows if r["args"]["seed"] == 0]
    if not s0:
        continue
    if a.kind == "mnist":
        best = max(s0, key=lambda r: (r["acc"], -r["args"]["lr"]))
    else:
        best = min(s0, key=lambda r: (r["val_loss"], r["args"]["lr"]))
    lrs = {best["args"]["lr"]}
    if key[0] in a.one_lr:
        lrs.add(a.also_lr)
    have = {(r["args"]["lr"], r["args"]["seed"]) for r in rows}
    for lr in sorted(lrs):
        src = next((r for r in s0 if r["args"]["lr"] == lr), None)
        if src is None:
            continue
        for seed in (1, 2):
            if (lr, seed) in have:
                continue
            args = dict(src["args"], seed=seed)
            cmd = [".venv/bin/python", f"benchmarks/probes/{script}"]
            for k, v in args.items():
                if v is None or v is False or k == "force":
                    continue
                cmd += [f"--{k}"] if v is True else [f"--{k}", str(v)]
            print(" ".join(shlex.quote(c) for c in cmd))
