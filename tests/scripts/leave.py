"""The last call of every multi-process test script: the ranks wait for each other, then leave at once.

A gloo process group torn down while, or after, the interpreter destroys the objects that still refer to it (FSDP2's
device mesh, DTensors, Accelerate's state) can abort a finished run at exit ("terminate called without an active
exception", SIGABRT: a C++ thread destroyed while joinable) and fail a test whose work was done and checked. Once
every rank has passed the barrier nobody talks any more, so each process flushes its output and exits with
``os._exit(0)``, which runs no exit-time destructors. Everything a test reads was written and closed before."""

import os
import sys

import torch.distributed as dist


def leave_together() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
