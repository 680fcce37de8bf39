"""GBTrainer under DeepSpeed ZeRO (stage 1 or 2) or DDP on 2 CPU processes (``torchrun --nproc_per_node 2``).

DeepSpeed runs on CPU with ``DS_ACCELERATOR=cpu`` and the gloo backend, which Accelerate uses only when the
distributed state is built first (``PartialState(backend="gloo")`` and ``accelerator_config={"use_configured_state":
True}``); otherwise its batch-size check counts one process. Both modes start every rank from the same weights and
train with plain SGD, so DeepSpeed and DDP must give the same g-nets step by step (Adam would turn rounding-level
differences of near-zero gradients into full-size steps).

Writes ``<report_dir>/rank<r>.json``: g-net checksums after each optimizer step and the logits of a fixed batch.
"""

import json
import os
import sys

import torch
from accelerate import PartialState
from checksums import Checksums
from leave import leave_together
from tiny_llama import tiny_llama, token_rows

from hf_gb import GBTrainer, GBTrainingArguments

IDS = torch.randint(0, 63, (2, 12), generator=torch.Generator().manual_seed(5))


def main(output_dir: str, report_dir: str, max_steps: str, resume: str, mode: str) -> None:
    """``mode``: "zero1", "zero2" or "ddp"."""
    if mode == "ddp":
        PartialState(cpu=True, backend="gloo")
    rank = int(os.environ.get("RANK", "0"))
    model, data = tiny_llama(100), token_rows(32)
    deepspeed = None
    if mode.startswith("zero"):
        deepspeed = {"zero_optimization": {"stage": int(mode[-1])}, "train_micro_batch_size_per_gpu": "auto",
                     "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto"}
    args = GBTrainingArguments(output_dir, max_steps=int(max_steps), per_device_train_batch_size=2,
                               gradient_accumulation_steps=3, learning_rate=0.5, save_steps=2, report_to="none",
                               disable_tqdm=True, use_cpu=True, seed=7, data_seed=7, ddp_backend="gloo", optim="sgd",
                               max_grad_norm=1.0, deepspeed=deepspeed,
                               accelerator_config={"use_configured_state": mode == "ddp"},
                               gb_hidden_dim=4, gb_tile_size=[16], gb_exclude_modules=["embed_tokens"])
    checksums = Checksums("uncompressed")
    trainer = GBTrainer(model=model, args=args, train_dataset=data, callbacks=[checksums])
    checksums.trainer = trainer
    trainer.train(resume_from_checkpoint=resume or None)
    trainer.check_replicas()
    trainer.save_model(os.path.join(output_dir, "final"))
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model(input_ids=IDS).logits
    report = {"steps": checksums.steps, "logits": logits.tolist(), "wrapped": type(trainer.model_wrapped).__name__,
              "state_keys": [k for k in trainer.model.state_dict() if k.startswith("hf_gb")]}
    with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(*sys.argv[1:6])
    leave_together()
