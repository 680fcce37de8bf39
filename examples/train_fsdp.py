"""Train a small Llama sharded with FSDP2 (``fully_shard``) through a genomic bottleneck.

Each rank holds only a shard of every weight (rows split like ``torch.chunk``). The g-nets are replicated; each rank
predicts only the whole tiles that intersect its rows, writes its rows into its shard, pushes its shard of the
weight gradient, and the g-net gradients are summed over ranks, so no full covered weight ever exists anywhere.
The compressed checkpoint (g-nets plus the gathered uncompressed tensors) is written by rank 0 and reloaded there in
one process with `hf_gb.load_compressed`, which must give the sharded model's logits.

    torchrun --nproc_per_node 2 examples/train_fsdp.py                  # CPU: gloo; one GPU per rank: nccl
    torchrun --nproc_per_node 2 examples/train_fsdp.py --steps 60 --output_dir out/fsdp-long

The data is this file's own bytes (vocabulary 256), so the example needs no download.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

from hf_gb import GBConfig, GenomicBottleneck, load_compressed


def batch(data: torch.Tensor, step: int, size: int, seq: int) -> torch.Tensor:
    """The same ``(size, seq)`` windows on every rank for a given step."""
    g = torch.Generator().manual_seed(step)
    starts = torch.randint(0, len(data) - seq, (size,), generator=g)
    return torch.stack([data[s : s + seq] for s in starts.tolist()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--batch", type=int, default=8, help="global micro-batch, split across ranks")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--output_dir", default="out/fsdp")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be divisible by the number of processes ({world})")

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=args.seq,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(device)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)  # every parameter is now a DTensor sharded on dim 0
    gb = GenomicBottleneck(model, GBConfig(hidden_dim=16, tile_size=32, exclude_modules=["embed_tokens"]))
    mine = gb.local_tile_count
    everyone = sum(bank.n_tiles for bank in gb.banks.values())
    print(f"rank {rank}: predicts {mine} of {everyone} tiles")
    if rank == 0:
        print(gb.summary(per_tensor=False))
    optimizer = torch.optim.AdamW([{"params": list(gb.parameters()), "lr": 1e-2, "weight_decay": 0.0},
                                   {"params": gb.uncompressed_parameters(), "lr": 1e-3}])

    with open(__file__, "rb") as f:
        data = torch.tensor(list(f.read()), dtype=torch.long)
    per_rank = args.batch // world
    for step in range(args.steps):
        total = torch.zeros((), device=device)
        for micro in range(args.accum):
            ids = batch(data, step * args.accum + micro, args.batch, args.seq)[rank * per_rank : (rank + 1) * per_rank]
            # The first micro-batch predicts this rank's rows of every covered weight; the last pushes the local
            # gradient rows into the g-net gradients (summed over ranks) and steps.
            with gb.step(optimizer, accumulation_steps=args.accum):
                model.set_requires_gradient_sync(micro == args.accum - 1)  # reduce-scatter on the last micro-batch
                loss = model(input_ids=ids.to(device), labels=ids.to(device)).loss / args.accum
                loss.backward()
            total += loss.detach()
        dist.all_reduce(total)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {total.item() / world:.3f}")

    gb.predict_weights(sample=False, keep_graph=False)
    with gb.gathered():  # every rank gathers the uncompressed tensors; the covered weights are never gathered
        if rank == 0:
            gb.save_pretrained(args.output_dir)
    dist.barrier()
    probe = batch(data, 10_000, 2, args.seq).to(device)
    with torch.no_grad():
        logits = model(input_ids=probe).logits
    if rank == 0:
        reloaded = load_compressed(args.output_dir).to(device)
        with torch.no_grad():
            diff = (reloaded(input_ids=probe).logits - logits).abs().max().item()
        print(f"wrote {args.output_dir}; reloaded in one process: max |logit difference| {diff:.2e}")
    dist.barrier()  # leave together: a rank that tears the process group down early can abort the other's exit
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
