"""The LM benchmark of benchmarks/quality_lm.py (2-layer Llama, hidden 128, byte-level stdlib corpus, batch 8 x 64,
AdamW, warm-up 20 + cosine, clip 1.0) with weight generators of the probes on every Linear (q/k/v/o, gate/up/down,
lm_head); embeddings and norms dense. The budget is the stored values of the engine's GB checkpoint at
``--compression`` (quality_lm.gb_budget, default g-net settings), so every row matches quality_lm's GB rows.

    python benchmarks/probes/lm_probe.py --method hash --lr 3e-3 --steps 150 --seed 0
    python benchmarks/probes/lm_probe.py --method qlm:gb --lr 1e-2 --gb_init_active 0.003   # quality_lm's own run()

Methods: ``hash`` (HashedNets per tensor, budget by numel), ``hash2`` (two hashes summed), ``hashpool`` (one pool
shared by every covered tensor), ``hashgain`` (hash times learned row and column gains, paid from the budget),
``fam`` (FamilyWeight per tensor, --spec JSON; rows and columns hashed), ``qlm:<method>`` (quality_lm.run itself:
plain, gb, narrow, lowrank).
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
import quality_lm as qlm  # noqa: E402
import torch  # noqa: E402
from common import train_step, warmup_cosine  # noqa: E402
from probe_lib import FamilyWeight, HashedWeight, hash_index, result_path, save_result  # noqa: E402
from torch import nn  # noqa: E402

OUT = os.path.join(HERE, "results", "lm")


class MultiHash(nn.Module):
    """W = (s1 v[h1] + s2 v[h2]) / sqrt(2)."""

    def __init__(self, shape, buckets, seed, std, gen):
        super().__init__()
        self.shape = tuple(shape)
        n = math.prod(shape)
        i1, s1 = hash_index(n, buckets, seed)
        i2, s2 = hash_index(n, buckets, seed + 50_000)
        for k, t in (("i1", i1), ("s1", s1), ("i2", i2), ("s2", s2)):
            self.register_buffer(k, t, persistent=False)
        self.v = nn.Parameter((torch.rand(buckets, generator=gen) * 2 - 1) * math.sqrt(3) * std)

    def stored(self):
        return self.v.numel()

    def forward(self):
        return ((self.s1 * self.v[self.i1] + self.s2 * self.v[self.i2]) / math.sqrt(2)).view(self.shape)


class PoolHash(nn.Module):
    """A tensor's weights hashed into a pool shared by every covered tensor (the pool is counted once)."""

    def __init__(self, shape, pool: nn.Parameter, seed):
        super().__init__()
        self.shape = tuple(shape)
        idx, sign = hash_index(math.prod(shape), pool.numel(), seed)
        self.register_buffer("idx", idx, persistent=False)
        self.register_buffer("sign", sign, persistent=False)
        self.pool = [pool]  # not a submodule parameter: counted once by the caller

    def stored(self):
        return 0

    def forward(self):
        return (self.sign * self.pool[0][self.idx]).view(self.shape)


class GainHash(nn.Module):
    """W = exp(r_i) exp(c_j) s(i, j) v[h(i, j)] with learned log-gains r (rows), c (columns)."""

    def __init__(self, shape, buckets, seed, std, gen):
        super().__init__()
        self.h = HashedWeight(shape, buckets, seed, std, gen)
        self.r = nn.Parameter(torch.zeros(shape[0]))
        self.c = nn.Parameter(torch.zeros(shape[1]))

    def stored(self):
        return self.h.stored() + self.r.numel() + self.c.numel()

    def forward(self):
        return self.h() * self.r.exp()[:, None] * self.c.exp()[None, :]


def attach(linear: nn.Linear, gen_module: nn.Module) -> None:
    """Replace ``linear.weight`` by ``gen_module()``, regenerated before every forward."""
    del linear.weight
    linear.weight_gen = gen_module
    linear.weight = gen_module()

    def hook(mod, inputs):
        mod.weight = mod.weight_gen()

    linear.register_forward_pre_hook(hook)


def covered_linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def build(args, qargs, vocab, seed):
    from examples.train import build_model

    model = build_model(qlm.script_args(qargs), vocab, seed=seed)
    total = qlm.gb_budget(qargs, args.compression, vocab)
    lins = covered_linears(model)
    dense = sum(p.numel() for p in model.parameters()) - sum(m.weight.numel() for _, m in lins)
    cov_budget = total - dense
    sizes = [m.weight.numel() for _, m in lins]
    N = sum(sizes)
    gen = torch.Generator().manual_seed(seed + 1000)
    info = {"budget_total": total, "dense": dense, "covered_budget": cov_budget, "covered": N}
    gens, extra = [], []
    if args.method == "hashpool":
        std = float(lins[0][1].weight.detach().std())
        pool = nn.Parameter((torch.rand(cov_budget, generator=gen) * 2 - 1) * math.sqrt(3) * std)
        extra.append(pool)
    for k, ((_name, lin), n) in enumerate(zip(lins, sizes)):
        std = float(lin.weight.detach().std())
        b = max(1, round(cov_budget * n / N))
        shape = tuple(lin.weight.shape)
        if args.method == "hash":
            g = HashedWeight(shape, b, seed * 100 + k, std, gen, args.hash_m)
        elif args.method == "hash2":
            g = MultiHash(shape, b, seed * 100 + k, std, gen)
        elif args.method == "hashgain":
            g = GainHash(shape, b - sum(shape), seed * 100 + k, std, gen)
        elif args.method == "hashpool":
            g = PoolHash(shape, pool, seed * 100 + k)
        elif args.method == "fam":
            spec = dict(json.loads(args.spec))
            spec.setdefault("row", "hash")
            spec.setdefault("col", "hash")
            fixed = FamilyWeight.fixed_cost(*shape, spec)
            rest = b - fixed
            f = spec.get("pool_frac", 0.5)  # of the rest: row pool, column pool (and hash term)
            if spec.get("hash_term"):
                spec["row_pool"] = max(1, round(rest * f / 2))
                spec["col_pool"] = max(1, round(rest * f / 2))
                spec["hash_values"] = rest - spec["row_pool"] - spec["col_pool"]
            else:
                spec["row_pool"] = max(1, round(rest / 2))
                spec["col_pool"] = rest - spec["row_pool"]
            g = FamilyWeight(shape, spec, std, seed * 100 + k, gen)
        else:
            raise ValueError(args.method)
        gens.append(g)
        attach(lin, g)
    stored = dense + sum(g.stored() for g in gens) + sum(p.numel() for p in extra)
    params = list(model.parameters()) + extra
    return model, params, info | {"stored": stored, "covered_compression": N / (stored - dense)}


def run(args, qargs, train, validation, vocab):
    seed, steps = args.seed, args.steps
    model, params, info = build(args, qargs, vocab, seed)
    optimizer = torch.optim.AdamW([{"params": params, "lr": args.lr}], weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(qargs.warmup, steps))
    curve, t0 = [], time.time()
    every = qlm.eval_every(qargs, steps)
    for step, ids in enumerate(qlm.batches(train, qargs.batch_size, steps, seed)):  # the batches of quality_lm.run
        with train_step(None, optimizer, max_grad_norm=1.0):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        scheduler.step()
        if (step + 1) % every == 0 or step + 1 == steps:
            curve.append({"step": step + 1, "train_loss": loss.item(),
                          "val_loss": qlm.evaluate(model, None, validation, 32)})
    return info | {"val_loss": curve[-1]["val_loss"], "curve": curve, "wall_s": round(time.time() - t0, 1)}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--method", required=True)
    p.add_argument("--compression", type=float, default=20)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dense_lr", type=float, default=3e-3, help="qlm:gb only: LR of the uncompressed tensors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--spec", default=None)
    p.add_argument("--hash_m", type=float, default=1.0, help="hash: values stored as v/m, used as m*stored")
    p.add_argument("--gb_init_active", type=float, default=None)
    p.add_argument("--tag", default=None)
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    tag = args.tag or args.method.replace(":", "_")
    path = result_path(OUT, args, f"{tag}_c{args.compression:g}_lr{args.lr:g}_s{args.seed}_st{args.steps}")
    if path is None:
        return
    qargs = qlm.parse_args(["--lr", str(args.dense_lr)] + (["--init_active", str(args.gb_init_active)]
                                                           if args.gb_init_active else []))
    from examples.train import ScriptArguments, build_datasets

    data_args = ScriptArguments(block_size=qargs.block_size, max_train_tokens=qargs.max_train_tokens,
                                max_eval_tokens=qargs.max_eval_tokens)
    train, validation, tokenizer = build_datasets(data_args)
    vocab = len(tokenizer)
    if args.method.startswith("qlm:"):
        method = args.method[4:]
        res = qlm.run(qargs, method, None if method == "plain" else args.compression, args.lr, args.steps,
                      args.seed, train, validation, vocab)
    else:
        res = run(args, qargs, train, validation, vocab)
    save_result(path, {"tag": tag, "args": vars(args)} | res)
    print(f"{tag:<24} c{args.compression:g} lr {args.lr:<7g} s{args.seed} steps {args.steps} stored "
          f"{res['stored']:6d}  val {res['val_loss']:.4f} ({res['wall_s']:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
