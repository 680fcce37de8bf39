"""Compress the causal LM of examples/train.py 20x by distillation, against GB from scratch and a smaller dense LM.

The teacher is `examples.train.build_model` (a Llama of width 128, 4 layers, byte-level vocabulary) trained plainly on
`examples.train.build_datasets` (the stdlib's sources, split by file) with the example's defaults. Then, with the
same batches in the same order and the same number of steps (equal tokens), we train:

- ``gb_distill``: the teacher's architecture, every Linear predicted by g-nets at the target covered compression,
  trained on KL(teacher || student) of the next-token distributions (`hf_gb.compress.distill.distillation_loss`);
  g-nets fitted to the teacher's weights first (``regression``) or only calibrated (``scratch``); the uncompressed
  tensors (embeddings, norms) start as the teacher's;
- ``gb_scratch``: the same bottleneck on a freshly initialised model, trained on the task loss alone (no teacher);
- ``dense_distill``: a narrower Llama of the same depth, as wide as the GB student's stored values allow (every
  tensor counted, embeddings and head included), randomly initialised (no tensor has the teacher's shape), distilled
  with the same KL.

Validation: mean next-token cross-entropy on the example's held-out tokens.

    OMP_NUM_THREADS=1 python benchmarks/distill_lm.py           # benchmarks/results/distill_lm.{json,png}
    python benchmarks/distill_lm.py --quick                     # smoke run, writes under /tmp by default
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import math
import multiprocessing
import os
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from common import RESULTS, ROOT, machine, panels, save_figure, table, train_step, write_outputs  # noqa: E402

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke run")
    p.add_argument("--compression", type=float, default=20.0, help="GB covered compression target")
    p.add_argument("--hidden_dim", type=int, default=32, help="g-net hidden width")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of the teacher and of every student")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW LR of dense tensors")
    p.add_argument("--gnet_lr", type=float, default=1e-2, help="AdamW LR of the g-nets")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--regression_steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--max_train_tokens", type=int, default=None)
    p.add_argument("--max_eval_tokens", type=int, default=32_768)
    p.add_argument("--hidden_size", type=int, default=128)
    p.add_argument("--num_layers", type=int, default=4)
    p.add_argument("--intermediate_size", type=int, default=384)
    p.add_argument("--jobs", type=int, default=2, help="students trained at once (one torch thread each)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="path prefix of .json/.png (default results/distill_lm, or a "
                   "temporary folder with --quick)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.block_size, args.warmup, args.regression_steps = 20, 8, 64, 2, 10
        args.hidden_size, args.num_layers, args.intermediate_size = 64, 2, 192
        args.max_train_tokens, args.max_eval_tokens = 100_000, 4096
        if args.out is None:
            args.out = os.path.join(tempfile.gettempdir(), "hf_gb_quick", "distill_lm")
    if args.out is None:
        args.out = os.path.join(RESULTS, "distill_lm")
    return args


def data(args):
    from examples.train import ScriptArguments, build_datasets

    script = ScriptArguments(block_size=args.block_size, max_train_tokens=args.max_train_tokens,
                             max_eval_tokens=args.max_eval_tokens)
    return build_datasets(script)


def llama(args, vocab: int, hidden: int, intermediate: int, seed: int):
    from examples.train import ScriptArguments, build_model

    script = ScriptArguments(block_size=args.block_size, hidden_size=hidden, num_layers=args.num_layers,
                             intermediate_size=intermediate, num_heads=4)
    return build_model(script, vocab, seed=seed)


def stored_values(model) -> int:
    return sum({(v.data_ptr(), v.shape): v.numel() for v in model.state_dict().values()}.values())


@torch.no_grad()
def evaluate(model, validation, batch_size: int = 32) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(validation.blocks), batch_size):
        ids = validation.blocks[i : i + batch_size]
        total += model(input_ids=ids, labels=ids).loss.item() * len(ids)
        count += len(ids)
    model.train()
    return total / count


def train(args, model, gb, train_data, teacher=None) -> list[float]:
    """The shared loop: AdamW, linear warm-up then cosine decay, clipping at 1, the same batches for every run."""
    from hf_gb.compress.distill import distillation_loss

    if gb is not None:
        groups = [{"params": list(gb.parameters()), "lr": args.gnet_lr},
                  {"params": gb.uncompressed_parameters(), "lr": args.lr}]
    else:
        groups = [{"params": list(model.parameters()), "lr": args.lr}]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)

    def lr_lambda(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, args.steps - args.warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(args.seed))
    losses = []
    model.train()
    for step in range(args.steps):
        ids = train_data.blocks[order[(torch.arange(args.batch_size) + step * args.batch_size) % len(order)]]
        with train_step(gb, optimizer, max_grad_norm=1.0):
            if teacher is None:
                loss = model(input_ids=ids, labels=ids).loss
            else:
                with torch.no_grad():
                    t_out = teacher(input_ids=ids)
                loss, _ = distillation_loss(model(input_ids=ids), t_out, None, {"kl": 1.0}, args.temperature)
            loss.backward()
        scheduler.step()
        losses.append(loss.item())
    if gb is not None:
        gb.predict_weights(sample=False)
    return losses


def run(job: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(job["threads"])
    args = argparse.Namespace(**job["args"])
    from hf_gb import GBConfig, GenomicBottleneck
    from hf_gb.compress.distill import build_student

    train_data, validation, tokenizer = data(args)
    vocab = len(tokenizer)
    kind, t0 = job["kind"], time.time()
    config = GBConfig(hidden_dim=args.hidden_dim, compression=args.compression, seed=args.seed)
    teacher = None
    if kind != "teacher" and kind != "gb_scratch":
        teacher = llama(args, vocab, args.hidden_size, args.intermediate_size, args.seed)
        teacher.load_state_dict(job["teacher_state"])
        teacher.eval().requires_grad_(False)
    gb = None
    row: dict[str, Any] = {"run": kind, "init": job.get("init")}
    if kind == "teacher":
        model = llama(args, vocab, args.hidden_size, args.intermediate_size, args.seed)
    elif kind == "gb_distill":
        model, gb, errors = build_student(teacher, config, init=job["init"], regression_steps=args.regression_steps)
        row["regression_mean_relative_error"] = sum(errors.values()) / len(errors)
    elif kind == "gb_scratch":
        model = llama(args, vocab, args.hidden_size, args.intermediate_size, args.seed)
        gb = GenomicBottleneck(model, config)
    else:
        width, intermediate = job["dense_shape"]
        model = llama(args, vocab, width, intermediate, args.seed)
        row.update(dense_hidden_size=width, dense_intermediate_size=intermediate)
    if gb is not None:
        from hf_gb.io.checkpoint import gb_state_tensors

        s = gb.stats()
        row.update(covered_compression=s["covered_compression"],
                   stored_values=sum(t.numel() for t in gb_state_tensors(gb).values()))
    else:
        row["stored_values"] = stored_values(model)
    row["val_loss_before"] = evaluate(model, validation)
    losses = train(args, model, gb, train_data, teacher)
    row.update(val_loss=evaluate(model, validation), final_train_loss=sum(losses[-10:]) / len(losses[-10:]),
               tokens=args.steps * args.batch_size * args.block_size, wall_s=round(time.time() - t0, 1))
    print(f"done: {kind} {job.get('init') or ''}: val {row['val_loss']:.4f} ({row['wall_s']:.0f}s)",
          file=sys.stderr, flush=True)
    if kind == "teacher":
        row["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    return row


def dense_width(args, vocab: int, budget: int) -> tuple[int, int]:
    """The widest Llama of the teacher's depth (4 heads, width a multiple of 8, MLP 3x wide) within ``budget``,
    then its MLP widened to fill what is left: ``(width, intermediate)``."""
    width = 8
    while stored_values(llama(args, vocab, width + 8, 3 * (width + 8), 0)) <= budget:
        width += 8
    intermediate = 3 * width
    while stored_values(llama(args, vocab, width, intermediate + 1, 0)) <= budget:
        intermediate += 1
    return width, intermediate


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    from hf_gb import GBConfig, GenomicBottleneck
    from hf_gb.io.checkpoint import gb_state_tensors

    _, _, tokenizer = data(args)
    vocab = len(tokenizer)
    common = {"args": vars(args), "threads": args.threads}
    teacher_row = run({**common, "kind": "teacher"})
    state = teacher_row.pop("state")
    probe = GenomicBottleneck(llama(args, vocab, args.hidden_size, args.intermediate_size, args.seed),
                              GBConfig(hidden_dim=args.hidden_dim, compression=args.compression, seed=args.seed))
    budget = sum(t.numel() for t in gb_state_tensors(probe).values())
    shape = dense_width(args, vocab, budget)
    jobs = [{**common, "kind": "gb_distill", "init": "regression", "teacher_state": state},
            {**common, "kind": "gb_distill", "init": "scratch", "teacher_state": state},
            {**common, "kind": "gb_scratch"},
            {**common, "kind": "dense_distill", "dense_shape": shape, "teacher_state": state}]
    with futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = [teacher_row, *pool.map(run, jobs)]
    for r in rows:
        r["overall_compression"] = rows[0]["stored_values"] / r["stored_values"]
        r["vs_teacher"] = r["val_loss"] / rows[0]["val_loss"] - 1
    print(f"\ncausal LM of examples/train.py: {args.steps} steps x {args.batch_size} x {args.block_size} tokens, "
          f"GB target {args.compression:g}x covered")
    print(table(rows, [("run", "run", ""), ("init", "init", ""), ("covered_compression", "covered", ".1f"),
                       ("overall_compression", "overall", ".2f"), ("stored_values", "stored", ","),
                       ("val_loss_before", "val before", ".3f"), ("val_loss", "val loss", ".4f"),
                       ("vs_teacher", "vs teacher", "+.1%")]))
    payload = {"quick": args.quick, "machine": machine(), "args": vars(args),
               "wall_s": round(time.time() - t_start, 1), "rows": rows}
    write_outputs(args.out, payload, lambda path: plot(rows, args.compression, path))
    return payload


def plot(rows: list[dict[str, Any]], compression: float, path: str) -> bool:
    """Validation loss of each run (the teacher first), a bar each."""
    fig, (ax,) = panels(1, width=7, height=4)
    labels = [f"{r['run']}" + (f"\n({r['init']})" if r["init"] else "") for r in rows]
    ax.bar(range(len(rows)), [r["val_loss"] for r in rows], color=["gray", "C0", "C0", "C1", "C2"][: len(rows)])
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("validation loss (nats / byte)")
    ax.set_title(f"LM distilled at {compression:g}x covered, {rows[0]['tokens']:,} tokens each")
    return save_figure(fig, path, dpi=100)


if __name__ == "__main__":
    main()
