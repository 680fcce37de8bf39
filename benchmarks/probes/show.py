"""Print every MNIST / LM probe result as a sorted table: python benchmarks/probes/show.py [mnist|lm] [filter]"""
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
kind = sys.argv[1] if len(sys.argv) > 1 else "mnist"
filt = sys.argv[2] if len(sys.argv) > 2 else ""
rows = []
for p in glob.glob(os.path.join(HERE, "results", kind, "*.json")):
    r = json.load(open(p))
    if filt and filt not in r["tag"]:
        continue
    a = r["args"]
    if kind == "mnist":
        rows.append((a["compression"], r["tag"], a["epochs"], a["lr"], a["seed"], r["stored"], r["acc"]))
    else:
        rows.append((a["steps"], r["tag"], a["compression"], a["lr"], a["seed"], r["stored"], r["val_loss"]))
for row in sorted(rows):
    print("{:<6g} {:<34s} {:4d} lr {:<7g} s{:d} stored {:6d}  {:.4f}".format(*row))
