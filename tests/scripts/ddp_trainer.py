"""Two-process GBTrainer run for tests/test_trainer.py (``accelerate launch --multi_gpu --num_processes 2``).

Each rank writes ``<report_dir>/rank<r>.json``: checksums of its g-nets and predicted weights after every optimizer
step, and how many times it wrote a compressed checkpoint. Models start from rank-dependent random weights, so the
ranks agree only if the trainer replicates the g-nets from rank 0 and DDP averages the weight gradients.
"""

import json
import os
import sys

import torch
from checksums import Checksums
from datasets import Dataset
from leave import leave_together
from transformers import LlamaConfig, LlamaForCausalLM

from hf_gb import GBTrainer, GBTrainingArguments, GenomicBottleneck


def main(output_dir: str, report_dir: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(100 + rank)  # different initial weights per rank on purpose
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(0)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = GBTrainingArguments(output_dir, max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                               learning_rate=1e-2, save_steps=2, report_to="none", disable_tqdm=True,
                               ddp_backend="gloo", use_cpu=True, gb_hidden_dim=8, gb_tile_size=[16])
    writes = []
    original = GenomicBottleneck.save_pretrained

    def counting_save(self, *a, **k):
        writes.append(str(a[0]) if a else "")
        return original(self, *a, **k)

    GenomicBottleneck.save_pretrained = counting_save
    checksums = Checksums("weights", "uncompressed")
    trainer = GBTrainer(model=model, args=args, train_dataset=data, callbacks=[checksums])
    checksums.trainer = trainer
    trainer.train()
    trainer.check_replicas()
    trainer.save_model(os.path.join(output_dir, "final"))
    os.makedirs(report_dir, exist_ok=True)
    report = {"rank": rank, "world_size": trainer.accelerator.num_processes, "writes": writes,
              "steps": checksums.steps, "wrapped": type(trainer.model_wrapped).__name__}
    with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    leave_together()
