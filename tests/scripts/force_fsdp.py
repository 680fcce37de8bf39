"""Accelerate's FSDP2 on CPU, for tests: Accelerate never enables FSDP on CPU-only machines (``AcceleratorState``
switches to it only for GPU-like distributed types, DESIGN.md §9), so this sets the distributed state by hand: a
gloo ``PartialState``, then both states' ``distributed_type`` and ``AcceleratorState().fsdp_plugin``
(``fsdp_version=2``). Accelerate's own FSDP2 code (``fully_shard``) then wraps the model in ``prepare``, as on GPUs.
"""

from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

LLAMA_WRAP = {"auto_wrap_policy": "transformer_based_wrap", "transformer_cls_names_to_wrap": ["LlamaDecoderLayer"]}


def force_fsdp2(wrap: dict | None = None, **accelerator_kwargs) -> Accelerator:
    PartialState(cpu=True, backend="gloo")
    accelerator = Accelerator(cpu=True, **accelerator_kwargs)  # AcceleratorState is built only by an Accelerator
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                            state_dict_type="SHARDED_STATE_DICT", **(wrap or LLAMA_WRAP))
    state = AcceleratorState()
    PartialState().distributed_type = DistributedType.FSDP  # both, or prepare reverts it (DESIGN.md §9)
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    return accelerator
