"""The last call of every multi-process test script: the ranks wait for each other, then tear the process group
down. A rank that exits while the other still talks to it, or a gloo process group left to the interpreter's exit,
can abort a finished run ("terminate called without an active exception", SIGABRT) and fail a test that passed."""

import torch.distributed as dist


def leave_together() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
