"""GBTrainer under DeepSpeed ZeRO-3 on 2 CPU processes (``torchrun --nproc_per_node 2``, ``DS_ACCELERATOR=cpu``), or
the same training in one process (``single``), recording what a ZeRO-3 run must reproduce.

The dataset is exactly one optimizer step (12 sequences: 2 ranks x 2 per device x 3 accumulation steps, or 4 x 3 in
one process), so every step sees the same examples whatever order the samplers give; plain SGD, clipping on.
Writes ``<report_dir>/rank<r>.pt``: after each optimizer step the g-nets and the uncompressed tensors (whole), and the
g-net gradients of that step's push (whole, before DeepSpeed takes them); the logits of a fixed batch at the end;
and, under ZeRO-3, the (start, stop, flat) of the rows each rank owns and how many tiles it predicts.
"""

import contextlib
import os
import sys

import torch
from accelerate import PartialState
from leave import leave_together
from tiny_llama import tiny_llama, token_rows
from transformers import TrainerCallback

from hf_gb import GBTrainer, GBTrainingArguments

IDS = torch.randint(0, 63, (2, 12), generator=torch.Generator().manual_seed(5))


def whole(params):
    """Flat float64 copy of ``params``, gathered when ZeRO-3 partitions them."""
    params = list(params)
    context = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        context = GatheredParameters([p for p in params if p.numel() == 0], modifier_rank=None)
    with context:
        return torch.cat([p.detach().double().reshape(-1) for p in params])


class Record(TrainerCallback):
    def __init__(self):
        self.trainer, self.steps, self.grads = None, [], []

    def on_step_end(self, args, state, control, **kwargs):
        gb = self.trainer.gb
        self.steps.append({"step": state.global_step, "gnet": whole(gb.parameters()),
                           "uncompressed": whole(gb.uncompressed_parameters()), "grad": self.grads[-1]})


def main(output_dir: str, report_dir: str, mode: str) -> None:
    """``mode``: "zero3" (2 processes) or "single"."""
    rank = int(os.environ.get("RANK", "0"))
    if mode == "single":
        PartialState(cpu=True)
    model, data = tiny_llama(100), token_rows(12)
    deepspeed = None
    if mode == "zero3":
        deepspeed = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                     "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                     "gradient_clipping": "auto", "train_batch_size": "auto"}
    args = GBTrainingArguments(output_dir, max_steps=3, per_device_train_batch_size=2 if mode == "zero3" else 4,
                               gradient_accumulation_steps=3, learning_rate=0.5, save_strategy="no",
                               report_to="none", disable_tqdm=True, use_cpu=True, seed=7, data_seed=7,
                               ddp_backend="gloo", optim="sgd", max_grad_norm=1.0, deepspeed=deepspeed,
                               accelerator_config={"use_configured_state": mode == "single"},
                               gb_hidden_dim=4, gb_tile_size=[16], gb_gains="rows",
                               gb_exclude_modules=["embed_tokens"])
    record = Record()
    trainer = GBTrainer(model=model, args=args, train_dataset=data, callbacks=[record])
    record.trainer = trainer
    push = trainer.gb.push_gradients

    def push_and_record(*a, **k):  # the g-net gradients of this step, whole, as the push leaves them
        kept = push(*a, **k)
        record.grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).double().reshape(-1)
                                       for p in trainer.gb.parameters()]))
        return kept

    trainer.gb.push_gradients = push_and_record
    trainer.train()
    trainer.save_model(os.path.join(output_dir, "final"))
    trainer.model.eval()  # training left the noise-free prediction in the weights
    with torch.no_grad():
        logits = trainer.model(input_ids=IDS).logits
    shards = {k: (s.start, s.stop, s.flat) for k, s in trainer.gb.row_shards.items()}
    gb = trainer.gb
    tiles = {"local": gb.local_tile_count, "all": sum(bank.n_tiles for bank in gb.banks.values())}
    torch.save({"steps": record.steps, "logits": logits, "shards": shards, "tiles": tiles,
                "wrapped": type(trainer.model_wrapped).__name__}, os.path.join(report_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:4])
    leave_together()
