"""Two-process GBDistillationTrainer run for tests/test_distill.py (``accelerate launch --num_processes 2``).

Each rank builds its own teacher (the same seed) and student, distils for 3 steps on its share of the batches and
writes ``<report_dir>/rank<r>.json``: g-net checksums after every step and facts about its teacher.
"""

import json
import os
import sys

import torch
from checksums import Checksums
from datasets import Dataset
from leave import leave_together
from transformers import LlamaConfig, LlamaForCausalLM

from hf_gb.compress.distill import GBDistillationArguments, GBDistillationTrainer


def main(output_dir: str, report_dir: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))
    before = float(sum(p.double().sum() for p in teacher.parameters()))
    ids = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(0)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 16] * 32})
    args = GBDistillationArguments(output_dir, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                                   save_strategy="no", report_to="none", disable_tqdm=True, ddp_backend="gloo",
                                   use_cpu=True, gb_hidden_dim=8, gb_tile_size=[16], distill_regression_steps=5)
    checksums = Checksums()
    trainer = GBDistillationTrainer(teacher=teacher, args=args, train_dataset=data, callbacks=[checksums])
    checksums.trainer = trainer
    trainer.train()
    trainer.check_replicas()
    after = float(sum(p.double().sum() for p in trainer.teacher.parameters()))
    os.makedirs(report_dir, exist_ok=True)
    report = {"world_size": trainer.accelerator.num_processes, "steps": checksums.steps,
              "wrapped": type(trainer.model_wrapped).__name__, "teacher_type": type(trainer.teacher).__name__,
              "teacher_unchanged": before == after, "teacher_training": trainer.teacher.training,
              "teacher_requires_grad": any(p.requires_grad for p in trainer.teacher.parameters())}
    with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    leave_together()
