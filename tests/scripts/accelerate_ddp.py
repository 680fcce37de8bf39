"""Shared by tests/test_accelerate_plugin.py: a tiny GBPlugin training loop, and its DDP run.

Run as a script under ``accelerate launch --multi_gpu --num_processes 2 tests/scripts/accelerate_ddp.py OUT_DIR``,
every process trains on its share of the same global batches and saves what it ends with to ``OUT_DIR/rank<r>.pt``.
Each process starts from a different random model on purpose: `GBPlugin.prepare` and DDP must make them agree.
"""

import os
import sys

import torch
from accelerate import Accelerator
from torch import nn

from hf_gb import GBPlugin

IN, HIDDEN, OUT = 16, 64, 4
GLOBAL_BATCH = 8
GRAD_ACCUM = 2
STEPS = 4


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT)]
    return nn.Sequential(*layers)


def make_plugin(**kwargs) -> GBPlugin:
    # GB_TEST_KERNEL: tests/test_native.py runs the same loop on the native kernels (rows written in place).
    kernel = os.environ.get("GB_TEST_KERNEL", "eager")
    return GBPlugin(**{"family": "mlp", "hidden_dim": 8, "tile_size": 16, "kernel": kernel, **kwargs})


def global_batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same (inputs, labels) on every process for a given optimizer step and micro-batch."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    x = torch.randn(GLOBAL_BATCH, IN, generator=g)
    return x, (x[:, :OUT] * 2).argmax(-1)  # a learnable rule


def setup(accelerator: Accelerator, plugin: GBPlugin, seed: int, lr: float = 1e-2):
    model, _ = plugin.prepare(accelerator, make_model(seed))
    optimizer = torch.optim.Adam(plugin.trainable_parameters(), lr=lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer


def train(accelerator: Accelerator, plugin: GBPlugin, model, optimizer, steps: int, start: int = 0) -> list[float]:
    """``steps`` optimizer steps; each process takes rows ``rank::world`` of every global micro-batch."""
    rank, world = accelerator.process_index, accelerator.num_processes
    losses = []
    for step in range(start, start + steps):
        for micro in range(accelerator.gradient_accumulation_steps):
            x, y = global_batch(step, micro)
            x, y = x[rank::world].to(accelerator.device), y[rank::world].to(accelerator.device)
            with accelerator.accumulate(model):
                plugin.before_step()
                loss = nn.functional.cross_entropy(model(x), y)
                accelerator.backward(loss)
                plugin.after_backward()
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(plugin.trainable_parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.item())
    plugin.update_weights()
    return losses


def snapshot(accelerator: Accelerator, plugin: GBPlugin, model) -> dict[str, torch.Tensor]:
    """Every tensor that defines the trained state: model (predicted and uncompressed) and g-nets."""
    state = {"model." + k: v for k, v in accelerator.unwrap_model(model).state_dict().items()}
    state.update({"gnet." + k: v for k, v in plugin.bottleneck.state_dict().items()})
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def main(out_dir: str) -> None:
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=GRAD_ACCUM)
    assert accelerator.num_processes == 2, accelerator.num_processes
    rank = accelerator.process_index
    result = {}
    for name, kwargs in (("plain", {}), ("stochastic", {"stochastic": True})):
        plugin = make_plugin(**kwargs)
        model, optimizer = setup(accelerator, plugin, seed=100 + rank)  # different on purpose
        result[name + "_losses"] = train(accelerator, plugin, model, optimizer, STEPS)
        result[name] = snapshot(accelerator, plugin, model)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    from leave import leave_together  # here: the tests import this file as a module

    main(sys.argv[1])
    leave_together()
