import logging

import pytest
import torch

from hf_gb import GBConfig
from hf_gb.engine import kernels
from hf_gb.engine.families import MLPBank
from hf_gb.engine.kernels import center_tiles, fused_backward, fused_forward, reference_forward, use_compiled
from hf_gb.engine.tiling import TileGeometry

# (tiles, rows, cols, hidden): single positions, thin tiles, and one shape large enough to need chunking.
SHAPES = [(1, 1, 1, 1), (3, 4, 5, 6), (2, 1, 9, 4), (2, 9, 1, 4), (5, 16, 24, 8)]


def _inputs(n, r, c, h, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    A, B = torch.randn(n, r, h, generator=gen, dtype=dtype), torch.randn(n, c, h, generator=gen, dtype=dtype)
    w2, b2 = torch.randn(n, h, generator=gen, dtype=dtype), torch.randn(n, generator=gen, dtype=dtype)
    G = torch.randn(n, r, c, generator=gen, dtype=dtype)
    return A, B, w2, b2, G


def _reference_grads(A, B, w2, b2, G):
    leaves = [x.detach().requires_grad_() for x in (A, B, w2, b2)]
    out = reference_forward(*leaves)
    return out.detach(), torch.autograd.grad((out * G).sum(), leaves)


def _tol(dtype):
    return {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}


@pytest.fixture(params=[None, 64], ids=["one-chunk", "tiny-budget"])
def eager_budget(request, monkeypatch):
    """Run each eager test once as is and once with a budget so small that every block is chunked."""
    if request.param is not None:
        monkeypatch.setattr(kernels, "_EAGER_BUDGET", request.param)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_eager_matches_reference(shape, dtype, eager_budget):
    A, B, w2, b2, G = _inputs(*shape, dtype=dtype)
    ref_out, ref_grads = _reference_grads(A, B, w2, b2, G)
    torch.testing.assert_close(fused_forward(A, B, w2, b2, compiled=False), ref_out, **_tol(dtype))
    for got, want in zip(fused_backward(A, B, w2, G, compiled=False), ref_grads):
        torch.testing.assert_close(got, want, **_tol(dtype))


def test_reference_is_the_g_net_formula():
    A, B, w2, b2, _ = _inputs(2, 3, 4, 5)
    out = reference_forward(A, B, w2, b2)
    n, i, j = 1, 2, 3
    assert out[n, i, j].item() == pytest.approx((w2[n] * torch.relu(A[n, i] + B[n, j])).sum().item() + b2[n].item())


@pytest.mark.parametrize("center", [True, False], ids=["centred", "uncentred"])
@pytest.mark.parametrize("geometry", [TileGeometry(3, 4), TileGeometry(1, 3), TileGeometry(2, 1, 3)], ids=str)
def test_bank_forward_gradcheck(geometry, center):
    """The bank's differentiable forward (fused kernels in an autograd Function) against finite differences."""
    bank = MLPBank(geometry, 2, GBConfig(hidden_dim=5, center=center), torch.Generator().manual_seed(0)).double()
    params = [p for p in bank.parameters()]

    def predict(*values):
        return torch.func.functional_call(bank, dict(zip([n for n, _ in bank.named_parameters()], values)), ())

    assert torch.autograd.gradcheck(predict, [p.detach().requires_grad_() for p in params], eps=1e-6, atol=1e-6)


@pytest.mark.compiled
def test_compiled_matches_eager():
    """The fast path (fused forward, two masked sums for the backward) agrees with eager; one shape, float32."""
    if not use_compiled("compiled", 1):
        pytest.fail("torch.compile is unavailable here; the fast path cannot be tested")
    # The shape of the bank in test_bottleneck's compiled test, so that one compilation serves both.
    A, B, w2, b2, G = _inputs(6, 16, 40, 8, dtype=torch.float32)
    ref_out, ref_grads = _reference_grads(A, B, w2, b2, G)
    torch.testing.assert_close(fused_forward(A, B, w2, b2, compiled=True), ref_out, rtol=1e-4, atol=1e-4)
    got = fused_backward(A, B, w2, G, compiled=True)
    for g, want in zip(got, ref_grads):
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-4)
    # The double centring fused into both (what centred banks, the default, run).
    leaves = [t.detach().requires_grad_() for t in (A, B, w2)]
    want = center_tiles(reference_forward(*leaves))
    want_grads = torch.autograd.grad(want, leaves, G)
    torch.testing.assert_close(fused_forward(A, B, w2, compiled=True, center=True), want, rtol=1e-4, atol=1e-4)
    got = fused_backward(A, B, w2, center_tiles(G), compiled=True, bias=False)
    for g, w in zip(got[:3], want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    assert not kernels._compile_failed


@pytest.mark.compiled
def test_use_compiled(monkeypatch):
    monkeypatch.setattr(kernels, "_compile_failed", False)
    assert use_compiled("compiled", 1)
    assert not use_compiled("eager", 1 << 30)
    assert use_compiled("auto", kernels.AUTO_COMPILE_MIN_NUMEL)
    assert not use_compiled("auto", kernels.AUTO_COMPILE_MIN_NUMEL - 1)
    monkeypatch.setenv("HF_GB_DISABLE_COMPILE", "1")
    assert not use_compiled("compiled", 1 << 30)


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(kernels, "_compile_failed", False)
    monkeypatch.setattr(kernels, "_compiled", {"forward": broken, "backward": broken})
    A, B, w2, b2, G = _inputs(2, 3, 4, 5)
    ref_out, ref_grads = _reference_grads(A, B, w2, b2, G)
    with caplog.at_level(logging.WARNING, logger="hf_gb.engine.kernels"):
        torch.testing.assert_close(fused_forward(A, B, w2, b2, compiled=True), ref_out)
        for got, want in zip(fused_backward(A, B, w2, G, compiled=True), ref_grads):
            torch.testing.assert_close(got, want)
        torch.testing.assert_close(fused_forward(A, B, w2, b2, compiled=True), ref_out)
    assert kernels._compile_failed and not use_compiled("compiled", 1)
    warnings = [r for r in caplog.records if "torch.compile is unavailable" in r.getMessage()]
    assert len(warnings) == 1
