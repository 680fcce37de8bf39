"""The g-net hot loop: ``W[n, i, j] = sum_h w2[n, h] * relu(A[n, i, h] + B[n, j, h]) + b2[n]`` and its backward.

``A`` (n, R, h) and ``B`` (n, C, h) are the first layer's pre-activations of the row and column codes (the first
layer is separable, so the (n, R, C, bits) code matrix never exists). Two implementations share one contract:

- ``eager``: plain PyTorch, chunked over tiles and rows so the (n, r, C, h) intermediate stays under a fixed budget.
- ``compiled``: the same arithmetic under ``torch.compile``; inductor fuses each reduction over ``h`` (forward) or
  over ``j`` / ``i`` (backward: two masked sums, from which ``dw2`` follows) into one loop that
  recomputes the ReLU, so memory is O(n R C), not O(n R C h).

``GNetFunction`` wraps either as an autograd Function; ``reference_forward`` is the unfused autograd reference.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

# Elements of the (tiles, rows, C, h) intermediate the eager path may hold at once (64 MiB of fp32).
_EAGER_BUDGET = 1 << 24
# Banks smaller than this many weights run eager under kernel="auto": compiling them costs more than it saves.
AUTO_COMPILE_MIN_NUMEL = 1 << 18


def reference_forward(A: torch.Tensor, B: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Unfused, fully differentiable reference; holds the (n, R, C, h) activation."""
    hidden = torch.relu(A[:, :, None, :] + B[:, None, :, :])  # (n, R, C, h)
    return torch.einsum("nrch,nh->nrc", hidden, w2) + b2[:, None, None]


def _chunks(n: int, rows: int, cols: int, hidden: int):
    """Yield (tile slice, row slice) blocks whose (tiles, rows, cols, hidden) product fits the eager budget."""
    per_row = max(1, cols * hidden)
    rows_per_chunk = max(1, min(rows, _EAGER_BUDGET // per_row))
    tiles_per_chunk = max(1, _EAGER_BUDGET // (per_row * rows_per_chunk)) if rows_per_chunk == rows else 1
    for t0 in range(0, n, tiles_per_chunk):
        for r0 in range(0, rows, rows_per_chunk):
            yield slice(t0, t0 + tiles_per_chunk), slice(r0, r0 + rows_per_chunk)


def _eager_forward(A, B, w2, b2):
    n, R, h = A.shape
    out = torch.empty(n, R, B.shape[1], dtype=A.dtype, device=A.device)
    for ts, rs in _chunks(n, R, B.shape[1], h):
        hidden = torch.relu(A[ts, rs, None, :] + B[ts, None, :, :])  # (t, r, C, h)
        out[ts, rs] = torch.matmul(hidden, w2[ts, None, :, None]).squeeze(-1) + b2[ts, None, None]
    return out


def _eager_backward(A, B, w2, G):
    n, R, h = A.shape
    dA = torch.empty_like(A)
    dB = torch.zeros_like(B)
    dw2 = torch.zeros_like(w2)
    for ts, rs in _chunks(n, R, B.shape[1], h):
        pre = A[ts, rs, None, :] + B[ts, None, :, :]  # (t, r, C, h)
        g = G[ts, rs, :, None]  # (t, r, C, 1)
        dw2[ts] += (torch.relu(pre) * g).sum((1, 2))
        gm = (pre > 0) * g  # (t, r, C, h): dL/d(hidden pre-activation) / w2
        dA[ts, rs] = gm.sum(2) * w2[ts, None, :]
        dB[ts] += gm.sum(1) * w2[ts, None, :]
    return dA, dB, dw2, G.sum((1, 2))


def _fused_forward(A, Bt, w2, b2):
    # Bt is B transposed, (n, h, C): the reduction over h is then an outer loop and the vector loop runs over
    # contiguous j, with no horizontal sum per output (about 2x faster on CPU than reducing over a last axis h).
    return (torch.relu(A[:, :, :, None] + Bt[:, None, :, :]) * w2[:, None, :, None]).sum(2) + b2[:, None, None]


def _masked_rows(A, B, w2, G):
    # M_A[n, i, h] = sum_j G[n, i, j] * [A[n, i, h] + B[n, j, h] > 0]: one pass over (i, j, h) reducing over j.
    # Returns dA = M_A * w2 and the row half of dw2 (see fused_backward), fused into the same compiled call.
    mA = ((A[:, :, None, :] + B[:, None, :, :] > 0) * G[..., None]).sum(2)
    return mA * w2[:, None, :], (A * mA).sum(1)


def _masked_cols(A, B, w2, G):
    # M_B[n, j, h] = sum_i G[n, i, j] * [A[n, i, h] + B[n, j, h] > 0]: the same mask, reduced over i.
    mB = ((A[:, :, None, :] + B[:, None, :, :] > 0) * G[..., None]).sum(1)
    return mB * w2[:, None, :], (B * mB).sum(1)


_compiled: dict[str, Callable] = {}
_compile_failed = False


def _compile(name: str, fn: Callable) -> Callable | None:
    global _compile_failed
    if _compile_failed:
        return None
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=None, fullgraph=True)
    return _compiled[name]


def _run_compiled(name: str, fn: Callable, *args):
    """Run ``fn`` compiled; on a missing compiler fall back to None after one warning."""
    global _compile_failed
    compiled = _compile(name, fn)
    if compiled is not None:
        try:
            return compiled(*args)
        except Exception as e:  # inductor raises many types when no C++ compiler / Triton is available
            _compile_failed = True
            logger.warning("torch.compile is unavailable (%s: %s); using the eager g-net kernels", type(e).__name__, e)
    return None


def use_compiled(kernel: str, numel: int) -> bool:
    """Whether a bank of ``numel`` weights takes the compiled path under ``kernel`` ('auto'|'compiled'|'eager')."""
    if kernel == "eager" or _compile_failed or os.environ.get("HF_GB_DISABLE_COMPILE", "0") == "1":
        return False
    return kernel == "compiled" or numel >= AUTO_COMPILE_MIN_NUMEL


def fused_forward(A, B, w2, b2, compiled: bool = False) -> torch.Tensor:
    """Predicted tiles (n, R, C) from the row table A (n, R, h), column table B (n, C, h), w2 (n, h), b2 (n,)."""
    if compiled:
        out = _run_compiled("forward", _fused_forward, A, B.transpose(1, 2).contiguous(), w2, b2)
        if out is not None:
            return out
    return _eager_forward(A, B, w2, b2)


def fused_backward(A, B, w2, G, compiled: bool = False):
    """Gradients (dA, dB, dw2, db2) of ``sum(G * fused_forward(A, B, w2, b2))``; nothing of size N x h is kept."""
    if compiled:
        # Only the two masked sums touch (i, j, h). dw2 needs no third pass: relu(p) = p * [p > 0] and
        # p = A[i] + B[j], so sum_ij relu(p) G = sum_i A[i] M_A[i] + sum_j B[j] M_B[j].
        rows = _run_compiled("rows", _masked_rows, A, B, w2, G)  # dA (n, R, h), sum_i A M_A (n, h)
        cols = _run_compiled("cols", _masked_cols, A, B, w2, G) if rows is not None else None
        if cols is not None:
            return rows[0], cols[0], rows[1] + cols[1], G.sum((1, 2))
    return _eager_backward(A, B, w2, G)


class GNetFunction(torch.autograd.Function):
    """Autograd wrapper of the fused kernels: saves only A, B and w2, recomputes the ReLU in backward."""

    @staticmethod
    def forward(ctx, A, B, w2, b2, compiled: bool):
        ctx.save_for_backward(A, B, w2)
        ctx.compiled = compiled
        return fused_forward(A, B, w2, b2, compiled)

    @staticmethod
    def backward(ctx, G):
        A, B, w2 = ctx.saved_tensors
        dA, dB, dw2, db2 = fused_backward(A, B, w2, G.contiguous(), ctx.compiled)
        return dA, dB, dw2, db2, None


def center_tiles(x: torch.Tensor) -> torch.Tensor:
    """Double centering of (n, R, C) tiles: every row and every column of each tile sums to zero.

    ``relu(A[i] + B[j])`` is half linear, so a raw g-net output carries an additive part ``f(i) + g(j)``: rows of a
    predicted matrix come out nearly parallel, its top singular value is large, and a network built from it starts
    with exploding logits and dies in a few steps. Removing row and column means leaves the interaction part, which
    looks like a random matrix. The operator is a symmetric projection, so its backward is itself.
    """
    x = x - x.mean(2, keepdim=True)
    return x - x.mean(1, keepdim=True)


def center_tiles_(x: torch.Tensor) -> torch.Tensor:
    """In-place `center_tiles`."""
    x.sub_(x.mean(2, keepdim=True))
    return x.sub_(x.mean(1, keepdim=True))

