"""GBTrainer under Accelerate's FSDP2 on 2 CPU processes (``torchrun --nproc_per_node 2``).

Accelerate's FSDP does not engage on CPU, so the distributed state is set to FSDP2 by hand (see force_fsdp.py) and
Trainer uses that state (``accelerator_config={"use_configured_state": True}``); Trainer then wraps the model with
Accelerate's own FSDP2 code (``fully_shard``), as it would on GPUs.

Writes ``<report_dir>/rank<r>.json``: placements of the covered weights, g-net checksums after each optimizer step,
and the logits of a fixed batch from the sharded model after training.
"""

import json
import os
import sys

import torch
from checksums import Checksums
from force_fsdp import force_fsdp2
from leave import leave_together
from tiny_llama import tiny_llama, token_rows

from hf_gb import GBTrainer, GBTrainingArguments
from hf_gb.engine.shards import is_dtensor

IDS = torch.randint(0, 63, (2, 12), generator=torch.Generator().manual_seed(5))


def main(output_dir: str, report_dir: str, max_steps: str, resume: str, mode: str = "fsdp") -> None:
    """``mode``: "fsdp" (AdamW, rank-dependent initial weights), or "fsdp-sgd" / "ddp-sgd" (plain SGD, the same
    initial weights on every rank) for comparing FSDP2 with DDP: Adam would turn rounding-level differences of
    near-zero gradients into full-size steps, and FSDP2 does not broadcast the uncompressed tensors as DDP does."""
    if mode.startswith("fsdp"):
        force_fsdp2()
    rank = int(os.environ.get("RANK", "0"))
    # Different initial weights per rank in "fsdp": the trainer must replicate the g-nets.
    model, data = tiny_llama(100 + (rank if mode == "fsdp" else 0)), token_rows(32)
    args = GBTrainingArguments(output_dir, max_steps=int(max_steps), per_device_train_batch_size=2,
                               gradient_accumulation_steps=3, learning_rate=1e-2, save_steps=2, report_to="none",
                               disable_tqdm=True, use_cpu=True, seed=7, data_seed=7, ddp_backend="gloo",
                               optim="adamw_torch" if mode == "fsdp" else "sgd",
                               accelerator_config={"use_configured_state": mode.startswith("fsdp")},
                               gb_hidden_dim=4, gb_tile_size=[16], gb_exclude_modules=["embed_tokens"])
    checksums = Checksums()
    trainer = GBTrainer(model=model, args=args, train_dataset=data, callbacks=[checksums])
    checksums.trainer = trainer
    assert trainer.is_fsdp_enabled == mode.startswith("fsdp")
    trainer.train(resume_from_checkpoint=resume or None)
    trainer.check_replicas()
    gb = trainer.gb
    placements = {t.name: [str(p) for p in t.param.placements] for t in gb.covered if is_dtensor(t.param)}
    trainer.save_model(os.path.join(output_dir, "final"))
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model(input_ids=IDS).logits
    report = {"placements": placements, "n_covered": len(gb.covered), "steps": checksums.steps,
              "logits": logits.tolist(), "fsdp_model": type(trainer.model).__name__}
    with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(*sys.argv[1:6])
    leave_together()
