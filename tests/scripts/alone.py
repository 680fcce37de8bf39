"""Launched in 2 processes without use_cpu / cpu=True (tests/test_trainer_conventions.py): GBTrainer or GBPlugin must
refuse at start, before anything is trained or written. Prints ``REFUSED rank<r>: <message>`` and exits 0 (so that
the launcher does not stop the other process before it prints too), or prints ``TRAINED`` and exits 1."""

import os
import sys

import torch
from torch import nn


def main(mode: str, output_dir: str) -> None:
    rank = os.environ.get("RANK", "?")
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    try:
        if mode == "trainer":
            from datasets import Dataset

            from hf_gb import GBTrainer, GBTrainingArguments

            class Regression(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.net = model

                def forward(self, x, labels):
                    return {"loss": nn.functional.mse_loss(self.net(torch.tensor(x)), torch.tensor(labels))}

            data = Dataset.from_dict({"x": torch.randn(8, 32).tolist(), "labels": torch.randn(8, 4).tolist()})
            args = GBTrainingArguments(output_dir, max_steps=1, save_steps=1, report_to="none", disable_tqdm=True,
                                       per_device_train_batch_size=4, gb_hidden_dim=4, gb_tile_size=[16])
            GBTrainer(model=Regression(), args=args, train_dataset=data).train()
        else:
            from accelerate import Accelerator

            from hf_gb import GBPlugin

            GBPlugin(hidden_dim=4, tile_size=16).prepare(Accelerator(), model)
    except RuntimeError as e:
        print(f"REFUSED rank{rank}: {e}", flush=True)
        return
    print("TRAINED", flush=True)
    sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
