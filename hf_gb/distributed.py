"""Replicated g-nets across processes (DDP): one policy for `GBTrainer` and `GBPlugin`.

Every rank holds the same g-nets (docs/design.md §7): they start from rank 0's (`broadcast_gnets`; calibration reads
each rank's own random init, so the scales may differ before), every rank predicts the same weights, DDP averages
the weight gradients, and every rank pushes the same g-net gradient. `replica_checksums` is how a run checks that
this still holds. Noise of stochastic g-nets is seeded by the optimizer step (`GenomicBottleneck.noise_seed`), so
all ranks, and a resumed run, draw the same.
"""

from __future__ import annotations

import torch

from .bottleneck import GenomicBottleneck


def process_group_active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@torch.no_grad()
def broadcast_gnets(gb: GenomicBottleneck, src: int = 0) -> None:
    """Copy rank ``src``'s g-net state (parameters and saved buffers) to every rank, in place; no-op alone."""
    if not process_group_active() or torch.distributed.get_world_size() == 1:
        return
    for tensor in gb.state_dict().values():
        torch.distributed.broadcast(tensor, src=src)


@torch.no_grad()
def replica_checksums(gb: GenomicBottleneck) -> torch.Tensor:
    """float64 ``(3,)``: sum of every g-net tensor, sum and sum of squares of the covered weights (this rank)."""
    return torch.stack([
        torch.stack([p.detach().double().sum() for p in gb.parameters()]).sum(),
        torch.stack([t.param.detach().double().sum() for t in gb.covered]).sum(),
        torch.stack([t.param.detach().double().square().sum() for t in gb.covered]).sum(),
    ])


def check_replicas(gb: GenomicBottleneck, gather) -> None:
    """Raise ``RuntimeError`` unless every rank holds the same g-nets and predicted weights.

    ``gather`` maps a ``(1, 3)`` tensor to the ``(world, 3)`` stack of every rank's (e.g. ``accelerator.gather``).
    """
    if not gb.covered:
        return
    everyone = gather(replica_checksums(gb)[None]).cpu()
    if not torch.equal(everyone, everyone[:1].expand_as(everyone)):
        raise RuntimeError(f"Processes disagree on the g-nets or predicted weights; checksums by rank: {everyone}")
