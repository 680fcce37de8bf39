"""GBPlugin in a custom Accelerate loop under FSDP2, 2 CPU processes (``torchrun --nproc_per_node 2``).

Accelerate's FSDP is forced on CPU (see force_fsdp.py). Every rank also trains a whole copy of the same model in
one process on the full global batches (no communication): after every optimizer step the plugin's g-nets must
equal that reference's. Gradient accumulation 3. Writes ``<out>/rank<r>.json`` and, from the main process, the
compressed checkpoint ``<out>/ckpt``.
"""

import json
import os
import sys

import torch
from force_fsdp import force_fsdp2
from leave import leave_together
from torch import nn

from hf_gb import GBConfig, GBPlugin, GenomicBottleneck
from hf_gb.engine.shards import is_dtensor

DIMS = [12, 19, 11, 5]
ACCUM, STEPS, PER_RANK = 3, 3, 2
X = torch.randn(3, 12, generator=torch.Generator().manual_seed(9))


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIMS[0], DIMS[1]), nn.Tanh(), nn.Linear(DIMS[1], DIMS[2]), nn.Tanh(),
                         nn.Linear(DIMS[2], DIMS[3]))


def main(out: str) -> None:
    wrap = {"auto_wrap_policy": "size_based_wrap", "min_num_params": 50}  # one FSDP unit per Linear
    accelerator = force_fsdp2(wrap, gradient_accumulation_steps=ACCUM)
    rank, world = accelerator.process_index, accelerator.num_processes
    config = GBConfig(hidden_dim=2, tile_size=8, seed=1)
    plugin = GBPlugin(gb_config=config)
    model, gb = plugin.prepare(accelerator, make_model())
    optimizer = torch.optim.SGD(plugin.trainable_parameters(), lr=0.2, momentum=0.9)
    model, optimizer = plugin.accelerator_prepare(model, optimizer)
    assert all(is_dtensor(t.param) for t in gb.covered), [type(t.param) for t in gb.covered]

    ref_model = make_model()
    ref = GenomicBottleneck(ref_model, config)
    # SGD: Adam divides by |grad|, so rounding-level differences of near-zero gradients become full-size steps.
    ref_opt = torch.optim.SGD([*ref.parameters(), *ref.uncompressed_parameters()], lr=0.2, momentum=0.9)
    gen = torch.Generator().manual_seed(2)
    diffs, grad_diffs = [], []
    for _step in range(STEPS):
        batches = [(torch.randn(world * PER_RANK, DIMS[0], generator=gen),
                    torch.randn(world * PER_RANK, DIMS[-1], generator=gen)) for _ in range(ACCUM)]
        ref.predict_weights()
        for x, y in batches:
            (nn.functional.mse_loss(ref_model(x), y) / ACCUM).backward()
        ref.push_gradients()
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        for x, y in batches:
            with accelerator.accumulate(model):
                plugin.before_step()
                accelerator.backward(nn.functional.mse_loss(model(x[mine]), y[mine]))
                plugin.after_backward()
                if accelerator.sync_gradients:
                    grad_diffs.append(max(float((p.grad - q.grad).abs().max())
                                          for p, q in zip(gb.parameters(), ref.parameters()) if q.grad is not None))
                optimizer.step()
                optimizer.zero_grad()
        ref_opt.step()
        ref_opt.zero_grad()
        ref.zero_grad()
        diffs.append(max(float((p - q).detach().abs().max()) for p, q in zip(gb.parameters(), ref.parameters())))
    plugin.update_weights()
    ref.predict_weights(sample=False)
    plugin.save_pretrained(os.path.join(out, "ckpt"))
    with torch.no_grad():
        logits = model(X)
    report = {"diffs": diffs, "grad_diffs": grad_diffs, "gnet": [float(p.double().sum()) for p in gb.parameters()],
              "logits": logits.tolist(), "ref_logits": ref_model(X).detach().tolist()}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1])
    leave_together()
