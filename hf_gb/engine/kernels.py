"""The g-net hot loop: ``W[n, i, j] = sum_h w2[n, h] * relu(A[n, i, h] + B[n, j, h]) + b2[n]`` and its backward.

``A`` (n, R, h) and ``B`` (n, C, h) are the first layer's pre-activations of the row and column codes (the first
layer is separable, so the (n, R, C, bits) code matrix never exists). Two implementations share one contract:

- ``eager``: plain PyTorch, chunked over tiles and rows so the (n, r, C, h) intermediate stays under a fixed budget.
- ``compiled``: the same arithmetic under ``torch.compile``; inductor fuses the reduction over ``h`` (forward) and
  the two masked sums of the backward (over ``j`` and over ``i``, from which ``dw2`` follows) into loops that
  recompute the ReLU, so memory is O(n R C), not O(n R C h).
- ``native``: a C++ kernel for float32 on CPU (`hf_gb.engine.native`, ``csrc/gnet_cpu.cpp``): the forward with the
  double centring inside, and the backward (from the two masked sums, as the compiled path).

`hf_gb.engine.bank` wraps either in an autograd Function; ``reference_forward`` is the unfused autograd reference.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Callable, Iterator

import torch

from . import native
from .tiling import TileRows

logger = logging.getLogger(__name__)

# Elements of the (tiles, rows, C, h) intermediate the eager path may hold at once: 1 MiB of fp32, so that each pass
# over a chunk runs from cache (2.5x faster than 64 MiB chunks on the 2-core CPU for 128 x 128 tiles at h = 32).
_EAGER_BUDGET = 1 << 18
# Banks smaller than this many weights run eager under kernel="auto": compiling them costs more than it saves.
AUTO_COMPILE_MIN_NUMEL = 1 << 18


def reference_forward(
    A: torch.Tensor, B: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor | None = None
) -> torch.Tensor:
    """Unfused, fully differentiable reference; holds the (n, R, C, h) activation."""
    hidden = torch.relu(A[:, :, None, :] + B[:, None, :, :])  # (n, R, C, h)
    out = torch.einsum("nrch,nh->nrc", hidden, w2)
    return out if b2 is None else out + b2[:, None, None]


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
        hidden = torch.relu_(A[ts, rs, None, :] + B[ts, None, :, :])  # (t, r, C, h), the one buffer of the chunk
        out[ts, rs] = torch.matmul(hidden, w2[ts, None, :, None]).squeeze(-1)
    return out if b2 is None else out.add_(b2[:, None, None])


def _eager_backward(A, B, w2, G):
    n, R, h = A.shape
    dA = torch.empty_like(A)
    dB = torch.zeros_like(B)
    dw2 = torch.zeros_like(w2)
    for ts, rs in _chunks(n, R, B.shape[1], h):
        # One (t, r, C, h) buffer, reused in place: pre-activation, then its mask, then the masked gradient
        # m = G [A + B > 0] (dL/d(hidden pre-activation) / w2). dw2 needs no pass of its own: relu(p) = p [p > 0]
        # with p = A[i] + B[j], so sum_ij relu(p) G = sum_i A[i] sum_j m + sum_j B[j] sum_i m (as the compiled path).
        m = A[ts, rs, None, :] + B[ts, None, :, :]
        m.gt_(0).mul_(G[ts, rs, :, None])
        mA, mB = m.sum(2), m.sum(1)  # (t, r, h), (t, C, h)
        dw2[ts] += (A[ts, rs] * mA).sum(1) + (B[ts] * mB).sum(1)
        dA[ts, rs] = mA * w2[ts, None, :]
        dB[ts] += mB * w2[ts, None, :]
    return dA, dB, dw2, G.sum((1, 2))


def _fused_forward(A, Bt, w2):
    # Bt is B transposed, (n, h, C): the reduction over h is then an outer loop and the vector loop runs over
    # contiguous j, with no horizontal sum per output (about 2x faster on CPU than reducing over a last axis h).
    return (torch.relu(A[:, :, :, None] + Bt[:, None, :, :]) * w2[:, None, :, None]).sum(2)


def _masked_sums(A, Bt, w2, G):
    # One pass over (i, h, j) with j, the contiguous axis of G and Bt, innermost: the mask
    # m[n, i, h, j] = G[n, i, j] * [A[n, i, h] + B[n, j, h] > 0] is reduced over j (M_A, for dA) and over i (M_B, for
    # dB) in the same loop, and recomputed rather than stored. dw2 needs no third pass: relu(p) = p [p > 0] with
    # p = A[i] + B[j], so sum_ij relu(p) G = sum_i A[i] M_A[i] + sum_j B[j] M_B[j].
    # (Two separate compiled sums, over j then over i with h innermost, measured about 2.5x slower on CPU.)
    m = (A[:, :, :, None] + Bt[:, None, :, :] > 0) * G[:, :, None, :]  # (n, R, h, C), never materialised
    mA, mBt = m.sum(3), m.sum(1)  # (n, R, h), (n, h, C)
    dw2 = (A * mA).sum(1) + (Bt * mBt).sum(2)
    return mA * w2[:, None, :], (mBt * w2[:, :, None]).transpose(1, 2), dw2


def _fused_forward_centered(A, Bt, w2):
    # The double centring inside the compiled graph: its row and column means are reductions of the output the
    # loop has just written, and no separate pass of Python-level kernels reads and writes the tiles again.
    return center_tiles(_fused_forward(A, Bt, w2))


_prediction_only = contextvars.ContextVar("hf_gb_prediction_only", default=False)
_eager_instead_of_build = False  # said once: a prediction without gradients ran eager rather than build the kernel


@contextlib.contextmanager
def prediction_only() -> Iterator[None]:
    """Within it, `kernel_path` never waits for a kernel to be built: predictions that no gradient follows (after a
    load, for evaluation or export) take the native kernel only if it is built already, else the eager kernels,
    which give the same values. `GNetBank.predict(keep_graph=False)` and the bottleneck's enter it."""
    token = _prediction_only.set(True)
    try:
        yield
    finally:
        _prediction_only.reset(token)


_compiled: dict[str, Callable] = {}
_compile_failed = False
_native_refused = False  # kernel='native' was asked for a bank it cannot run (warned once)


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


def kernel_path(kernel: str, numel: int, device: torch.device, dtype: torch.dtype) -> str:
    """The kernels a bank of ``numel`` weights runs: 'native', 'compiled' or 'eager'.

    ``kernel`` is `GBConfig.kernel`. 'auto' and 'native' take the native kernel for float32 on CPU, at any bank
    size (it has no per-shape compile cost; `hf_gb.engine.native` warns once if it cannot be built); elsewhere 'auto'
    compiles banks of at least `AUTO_COMPILE_MIN_NUMEL` weights and runs smaller ones eager.
    ``HF_GB_DISABLE_COMPILE=1`` turns every built kernel off. Within `prediction_only`, a float32 CPU bank whose
    native kernel is not built yet runs eager (same values) instead of building it, or compiling (which on a CPU is
    a C++ build too)."""
    global _native_refused, _eager_instead_of_build
    if kernel == "eager" or os.environ.get("HF_GB_DISABLE_COMPILE", "0") == "1":
        return "eager"
    if kernel != "compiled":
        if device.type == "cpu" and dtype == torch.float32:
            if _prediction_only.get():
                if native.ready() is not None:
                    return "native"
                if not _eager_instead_of_build:
                    _eager_instead_of_build = True
                    logger.info("hf_gb: the native g-net kernel is not built yet; predicting without gradients on "
                                "the eager kernels (the same values) instead of building it first")
                return "eager"
            if native.get() is not None:
                return "native"
        elif kernel == "native" and not _native_refused:
            _native_refused = True
            logger.warning("GBConfig.kernel='native' runs float32 banks on CPU only; this bank (%s, %s) runs the "
                           "compiled kernels", device.type, dtype)
    if _compile_failed or (kernel == "auto" and numel < AUTO_COMPILE_MIN_NUMEL):
        return "eager"
    return "compiled"


def _path(compiled: bool | str) -> str:
    if isinstance(compiled, str):
        if compiled not in ("native", "compiled", "eager"):
            raise ValueError(f"kernel path must be 'native', 'compiled' or 'eager', got {compiled!r}")
        return compiled
    return "compiled" if compiled else "eager"


def fused_forward(A, B, w2, b2=None, compiled: bool | str = False, center: bool = False) -> torch.Tensor:
    """Tiles (n, R, C) from the row table A (n, R, h), column table B (n, C, h), w2 (n, h) and b2 (n,) or None;
    ``center``: double-centred (`center_tiles`; b2 is then irrelevant and must be None). ``compiled``: a path of
    `kernel_path`, or True for 'compiled' and False for 'eager'."""
    assert not (center and b2 is not None), "a centred tile has no constant"
    path = _path(compiled)
    if path == "native":
        out = native.get().forward(A, B, w2, center)
        return out if b2 is None else out.add_(b2[:, None, None])
    if path == "compiled":
        name, fn = ("forward_centered", _fused_forward_centered) if center else ("forward", _fused_forward)
        out = _run_compiled(name, fn, A, B.transpose(1, 2).contiguous(), w2)
        if out is not None:
            return out if b2 is None else out.add_(b2[:, None, None])
    out = _eager_forward(A, B, w2, b2)
    return center_tiles_(out) if center else out


def fused_backward(A, B, w2, G, compiled: bool | str = False, bias: bool = True):
    """Gradients (dA, dB, dw2, db2) of ``sum(G * fused_forward(A, B, w2, b2))``; nothing of size N x h is kept.

    Of a centred forward, pass the centred ``G`` (the centring is symmetric: its backward is itself). Inside the
    compiled graph that centring measured 8x slower on CPU: inductor no longer runs the masked sums as one pass."""
    path = _path(compiled)
    if path == "native":
        dA, dB, dw2, db2 = native.get().backward(A, B, w2, G)
        return dA, dB, dw2, db2 if bias else None
    if path == "compiled":
        out = _run_compiled("backward", _masked_sums, A, B.transpose(1, 2).contiguous(), w2, G)
        if out is not None:
            dA, dBt, dw2 = out
            return dA, dBt.contiguous(), dw2, G.sum((1, 2)) if bias else None
    dA, dB, dw2, db2 = _eager_backward(A, B, w2, G)
    return dA, dB, dw2, db2 if bias else None


def forward_into(A, B, w2, rows: TileRows, center: bool, b2=None) -> None:
    """`fused_forward` on the native path, written into the weight rows ``rows`` instead of a tile tensor; an
    uncentred bank's ``b2`` is added to its tiles' rows."""
    assert not (center and b2 is not None), "a centred tile has no constant"
    native.get().forward_into(A, B, w2, center, list(rows.tensors), rows.which, rows.offsets)
    if b2 is not None:
        for m in range(len(rows.tensors)):  # rare (center=False): per tile through the tile grid
            tiles = (rows.which == m).nonzero().flatten()
            blocks = rows.grid(m)
            blocks.add_(b2[tiles].view(*blocks.shape[:2], 1, 1, 1))
    rows.store_edges()


def backward_from(A, B, w2, rows: TileRows, center: bool):
    """`fused_backward` on the native path, the tile gradient read from the weight-gradient rows ``rows`` and
    double-centred on the fly if ``center`` (``rows`` is not modified); returns (dA, dB, dw2, db2)."""
    rows.load_edges()
    return tuple(native.get().backward_from(A, B, w2, center, list(rows.tensors), rows.which, rows.offsets))


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
    """In-place `center_tiles`, a few tiles at a time so that its passes run from cache (about 1.5x faster)."""
    per_chunk = max(1, _EAGER_BUDGET // max(1, x.shape[1] * x.shape[2]))
    for part in x.split(per_chunk):
        part.sub_(part.mean(2, keepdim=True))
        part.sub_(part.mean(1, keepdim=True))
    return x

