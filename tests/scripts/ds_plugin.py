"""GBPlugin in a custom Accelerate loop under DeepSpeed ZeRO-2, ZeRO-3 or DDP, 2 CPU processes (``torchrun``).

DeepSpeed runs on CPU with ``DS_ACCELERATOR=cpu``; the gloo backend is passed explicitly. Every rank starts from its
own random model on purpose (DeepSpeed ZeRO-2 and DDP broadcast rank 0's parameters, the plugin its g-nets), except
under ZeRO-3, which partitions each rank's own copy: there every rank builds rank 0's model. Plain SGD, so the modes
must give the same state step by step (see ds_trainer.py). Writes ``OUT/rank<r>.pt``; under ZeRO-3 without the
save_state / load_state part, which the plugin refuses there (recorded).
"""

import os
import sys

import torch
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.utils import InitProcessGroupKwargs
from accelerate_ddp import GLOBAL_BATCH, GRAD_ACCUM, STEPS, make_model, make_plugin, snapshot, train
from leave import leave_together


def main(out_dir: str, mode: str) -> None:
    gloo = [InitProcessGroupKwargs(backend="gloo")]
    if mode in ("zero2", "zero3"):
        zero = {"stage": 2} if mode == "zero2" else {"stage": 3, "stage3_param_persistence_threshold": 0}
        config = {"zero_optimization": zero, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // 2,
                  "gradient_accumulation_steps": GRAD_ACCUM, "train_batch_size": GLOBAL_BATCH * GRAD_ACCUM,
                  "gradient_clipping": 1.0, "zero_allow_untested_optimizer": True}
        accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config), kwargs_handlers=gloo,
                                  gradient_accumulation_steps=GRAD_ACCUM)
    else:
        accelerator = Accelerator(cpu=True, kwargs_handlers=gloo, gradient_accumulation_steps=GRAD_ACCUM)
    assert accelerator.num_processes == 2, accelerator.num_processes
    rank = accelerator.process_index
    plugin = make_plugin()
    model, _ = plugin.prepare(accelerator, make_model(100 + (rank if mode != "zero3" else 0)))
    optimizer = torch.optim.SGD(plugin.trainable_parameters(), lr=0.1)
    model, optimizer = plugin.accelerator_prepare(model, optimizer)
    losses = train(accelerator, plugin, model, optimizer, STEPS)
    if mode == "zero3":
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        params = [*accelerator.unwrap_model(model).parameters(), *plugin.bottleneck.parameters()]
        with GatheredParameters(params, modifier_rank=None):
            state = snapshot(accelerator, plugin, model)
        plugin.save_pretrained(os.path.join(out_dir, "ckpt"))
        try:
            accelerator.save_state(os.path.join(out_dir, "state"))
            refused = ""
        except NotImplementedError as e:
            refused = str(e)
        torch.save({"losses": losses, "state": state, "wrapped": type(model).__name__, "refused": refused,
                    "tiles": plugin.bottleneck.local_tile_count}, os.path.join(out_dir, f"rank{rank}.pt"))
        return
    state = snapshot(accelerator, plugin, model)
    plugin.save_pretrained(os.path.join(out_dir, "ckpt"))
    # save_state, two more steps; load_state, the same two steps again: the same end state.
    accelerator.save_state(os.path.join(out_dir, "state"))
    train(accelerator, plugin, model, optimizer, 2, start=STEPS)
    continued = snapshot(accelerator, plugin, model)
    accelerator.load_state(os.path.join(out_dir, "state"))
    train(accelerator, plugin, model, optimizer, 2, start=STEPS)
    resumed = snapshot(accelerator, plugin, model)
    torch.save({"losses": losses, "state": state, "wrapped": type(model).__name__, "continued": continued,
                "resumed": resumed, "keys": [k for k in accelerator.unwrap_model(model).state_dict()
                                             if k.startswith("hf_gb")]},
               os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    leave_together()
