"""`GBConfig.gains`: learned per-row / per-column output gains of every covered tensor."""

import json

import pytest
import torch
from test_bottleneck import _batches, _net, _reference_weights, push_against_autograd
from test_checkpoint import tiny_bottleneck

import hf_gb
from hf_gb import GBConfig, GenomicBottleneck
from hf_gb.engine.gains import gain_key
from hf_gb.engine.tiling import gain_values


def _randomise_gains(gb, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*gb.row_gains.values(), *gb.col_gains.values()]:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)


@pytest.mark.parametrize("gains", ["rows", "columns", "both"])
@pytest.mark.parametrize("stochastic", [False, True], ids=["deterministic", "stochastic"])
def test_push_with_gains_equals_end_to_end_autograd(gains, stochastic):
    """Every covered layout (conv, GPT-2 Conv1D, padded, MultiheadAttention, tied, unused), 2 micro-batches."""
    model, gb = _net(gains=gains, stochastic=stochastic, init_noise=0.3)
    gb.train()
    _randomise_gains(gb)
    trainable, got = push_against_autograd(model, gb, _batches(2), step=3,
                                           noise_seed=gb.noise_seed(3) if stochastic else None)
    names = [n for n, _ in trainable]
    rows = [n for n in names if n.startswith("row_gains.")]
    cols = [n for n in names if n.startswith("col_gains.")]
    assert bool(rows) == (gains in ("rows", "both")) and bool(cols) == (gains in ("columns", "both"))
    grads = dict(zip(names, got))
    used = [gain_key(t.name) for t in gb.covered if t.name != "unused.weight"]
    for key in used:  # every gain of a tensor that took part in the loss learns
        for n in (f"row_gains.{key}", f"col_gains.{key}"):
            if n in grads:
                assert grads[n].abs().min() > 0, n


def test_gains_start_at_one_and_change_nothing_until_trained():
    """log-gains start at 0: the same seed and tiles predict exactly the weights of a bottleneck without gains."""
    _, plain = _net(min_compression=0.1)  # cover the same tensors although the gains cost storage
    _, gb = _net(gains="both", min_compression=0.1)
    assert [t.name for t in gb.covered] == [t.name for t in plain.covered]
    assert all(not p.detach().any() for p in [*gb.row_gains.values(), *gb.col_gains.values()])
    for t, r in zip(gb.covered, plain.covered):
        torch.testing.assert_close(t.param, r.param, rtol=0, atol=0)


def test_gains_are_counted_as_stored_values():
    _, gb = _net(gains="both", min_compression=0.1)
    _, plain = _net(min_compression=0.1)
    s, p = gb.stats(), plain.stats()
    n_gains = sum(v.numel() for v in [*gb.row_gains.values(), *gb.col_gains.values()])
    assert n_gains == sum(gain_values(t.shape, "both") for t in gb.covered) > 0
    assert s["gnet_params"] == sum(v.numel() for v in gb.parameters()) == p["gnet_params"] + n_gains
    assert sum(r["gnet_params"] for r in s["tensors"]) == s["gnet_params"]
    for r, q, t in zip(s["tensors"], p["tensors"], gb.covered):
        assert r["gnet_params"] == q["gnet_params"] + t.shape[0] + t.shape[1], r["name"]


def test_compression_target_pays_for_the_gains():
    """At a compression target the tiles shrink to make room for the gains, instead of overshooting the storage."""
    dims = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    for gains in ("none", "both"):
        gb = GenomicBottleneck(dims, GBConfig(family="mlp", compression=40, gains=gains, kernel="eager"))
        ratio = gb.stats()["covered_compression"]
        assert 40 / 1.6 < ratio < 40 * 1.6, (gains, ratio)
        if gains == "none":
            plain_tiles = [t.geometry for t in gb.covered]
        else:
            assert [t.geometry for t in gb.covered] != plain_tiles
        gb.detach_model()


def test_gains_survive_a_checkpoint(tmp_path):
    gb = tiny_bottleneck(gains="rows")
    _randomise_gains(gb)
    gb.predict_weights(keep_graph=False)
    gb.save_pretrained(str(tmp_path / "ckpt"))
    assert json.loads((tmp_path / "ckpt" / "gb_config.json").read_text())["gains"] == "rows"
    reloaded = hf_gb.load_compressed(str(tmp_path / "ckpt"))
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    gb.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, gb.model(ids).logits, atol=0, rtol=0)
    restored = GenomicBottleneck.from_pretrained(str(tmp_path / "ckpt"))
    for key, value in gb.row_gains.items():
        torch.testing.assert_close(restored.row_gains[key], value, atol=0, rtol=0)


@pytest.mark.compiled
@pytest.mark.parametrize("kernel", ["native", "compiled"])
def test_gains_on_the_fused_kernels_match_eager(kernel, monkeypatch):
    """float32 through the kernels (native: rows written in place) against the eager reference."""
    monkeypatch.delenv("HF_GB_DISABLE_COMPILE", raising=False)
    models = {}
    for k in ("eager", kernel):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 32))
        gb = GenomicBottleneck(model, GBConfig(family="mlp", hidden_dim=8, tile_size=32, gains="both", kernel=k))
        _randomise_gains(gb)
        gb.predict_weights()
        model(torch.randn(4, 64, generator=torch.Generator().manual_seed(1))).square().sum().backward()
        gb.push_gradients()
        models[k] = gb
    for t, r in zip(models[kernel].covered, models["eager"].covered):
        torch.testing.assert_close(t.param, r.param, rtol=1e-5, atol=1e-6)
    ref = dict(models["eager"].named_parameters())
    for n, p in models[kernel].named_parameters():
        scale = float(ref[n].grad.abs().max())  # float32 sums in another order
        torch.testing.assert_close(p.grad, ref[n].grad, rtol=1e-4, atol=1e-4 * scale, msg=lambda m, n=n: f"{n}: {m}")


def test_reference_weights_include_the_gains():
    """The test helper itself: a gain of exp(1) on one row scales that row of the reference by e."""
    _, gb = _net(gains="rows")
    before = _reference_weights(gb)["fc.weight"].detach()
    with torch.no_grad():
        gb.row_gains[gain_key("fc.weight")][3] = 1.0
    after = _reference_weights(gb)["fc.weight"].detach()
    torch.testing.assert_close(after[3], before[3] * torch.e)
    torch.testing.assert_close(after[:3], before[:3])
