"""Family "hash" (random weight sharing): the hash itself, native == eager, push == autograd, tile choice, counting.

The bank-interface tests of tests/test_bank.py run over this family too."""

import math

import pytest
import torch
from test_bottleneck import _batches, _net, push_against_autograd

from hf_gb import GBConfig, GenomicBottleneck
from hf_gb.engine import family_class, native
from hf_gb.engine.hashing import bucket_and_sign, position_hash, seed_key
from hf_gb.engine.tiling import TileGeometry

POSITIONS = torch.tensor([0, 1, 2, 12345, 2**31 - 1, 2**31, 2**40 + 7])


def test_the_hash_never_changes():
    """A saved "hash" checkpoint stores only the values; the hash regenerates which weight reads which value.
    These are the values of the first release: a change here would load every old checkpoint scrambled."""
    key = seed_key(0, 8, 8, 1)
    assert (key, seed_key(0), seed_key(1), seed_key(2**40)) == (389617702, 1319497385, 717477174, 1161652088)
    assert position_hash(POSITIONS, key).tolist() == [
        2060789392, 2083542294, 1714040623, 1498125366, 1137719766, 2018868900, 1125289494]
    bucket, sign = bucket_and_sign(POSITIONS, key, 1000, torch.float32)
    assert bucket.tolist() == [959, 970, 798, 697, 529, 940, 524]
    assert sign.tolist() == [-1, -1, 1, -1, -1, -1, -1]
    narrow = POSITIONS[POSITIONS < 2**31]  # wide=False is a shortcut, not another function
    assert torch.equal(position_hash(narrow, key, wide=False), position_hash(narrow, key))


def test_buckets_and_signs_are_balanced():
    bucket, sign = bucket_and_sign(torch.arange(1 << 18), seed_key(3), 512, torch.float32, wide=False)
    counts = torch.bincount(bucket, minlength=512).double()
    assert counts.min() > 0 and bucket.max() < 512
    assert abs(float(counts.std()) / math.sqrt(float(counts.mean())) - 1) < 0.2  # Poisson-like spread
    assert abs(float(sign.mean())) < 0.01 and abs(float((sign[1:] * sign[:-1]).mean())) < 0.01


def _bank(kernel, n=4, **config):
    geometry = TileGeometry(30, 50, 3)
    cfg = GBConfig(family="hash", compression=7, kernel=kernel, **config)
    bank = family_class("hash")(geometry, n, cfg, torch.Generator().manual_seed(0))
    bank.calibrate(torch.full((n,), 0.05))
    return bank


@pytest.mark.compiled
@pytest.mark.parametrize("center", [True, False], ids=["centred", "uncentred"])
def test_native_kernel_matches_eager(center):
    if native.get() is None:
        pytest.skip("the native kernel cannot be built here")
    got = {}
    for kernel in ("eager", "native"):
        bank = _bank(kernel, center=center)
        assert bank.kernel_path() == kernel
        index = torch.tensor([3, 1])
        out = bank.predict(index)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        bank.push(grad)
        got[kernel] = (out, bank.values.grad.clone())
    torch.testing.assert_close(got["native"][0], got["eager"][0], rtol=0, atol=0)
    torch.testing.assert_close(got["native"][1], got["eager"][1], rtol=1e-5, atol=1e-6)
    assert bool((got["eager"][1][[0, 2]] == 0).all())  # tiles not asked for get no gradient


@pytest.mark.parametrize("accumulate", [1, 3])
@pytest.mark.parametrize("center", [True, False], ids=["centred", "uncentred"])
def test_push_equals_end_to_end_autograd(accumulate, center):
    model, gb = _net(family="hash", compression=3, center=center)
    _, got = push_against_autograd(model, gb, _batches(accumulate))
    assert sum(float(g.abs().sum()) for g in got) > 0


def test_compression_target_gives_whole_tensor_tiles():
    model = torch.nn.Sequential(torch.nn.Linear(784, 800), torch.nn.ReLU(), torch.nn.Linear(800, 10))
    for target in (100.0, 300.0, 1000.0):
        gb = GenomicBottleneck(model, GBConfig(family="hash", compression=target))
        rows = {r["name"]: r for r in gb.stats()["tensors"]}
        assert rows["0.weight"]["tile"] == [800, 784, 1] and rows["2.weight"]["tile"] == [10, 800, 1]
        assert rows["0.weight"]["gnet_params"] == math.ceil(800 * 784 / target)
        assert abs(gb.stats()["covered_compression"] / target - 1) < 0.01
        gb.detach_model()


def test_calibration_folds_the_scale_into_the_values():
    """The stored values are the weights' own (so one learning rate moves hashed and dense weights alike)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(300, 200)
    std = float(model.weight.detach().std())
    gb = GenomicBottleneck(model, GBConfig(family="hash", compression=20, center=False))
    bank = next(iter(gb.banks.values()))
    assert torch.equal(bank.scale, torch.ones_like(bank.scale))
    assert abs(float(bank.values.detach().std()) / std - 1) < 0.05
    assert abs(float(model.weight.detach().std()) / std - 1) < 0.05
    values = set(bank.values.detach().flatten().tolist())
    assert set(model.weight.detach().abs().flatten().tolist()) <= {abs(v) for v in values}


def test_stochastic_noise_keeps_its_scale_relative_to_the_weights():
    model = torch.nn.Linear(64, 64)
    gb = GenomicBottleneck(model, GBConfig(family="hash", compression=8, stochastic=True, init_noise=0.5))
    bank = next(iter(gb.banks.values()))
    torch.testing.assert_close(bank.sigma(), 0.5 * model.weight.detach().std(correction=0).reshape(1), rtol=0.05,
                               atol=0)


def test_checkpoint_round_trip(tmp_path):
    """Only the values are saved; the reloaded model predicts the same weights from the regenerated hash."""
    from hf_gb import load_compressed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.ReLU(), torch.nn.Linear(30, 5))
    gb = GenomicBottleneck(model, GBConfig(family="hash", compression=10, seed=7))
    gb.save_pretrained(tmp_path / "ckpt")
    fresh = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.ReLU(), torch.nn.Linear(30, 5))
    reloaded = load_compressed(tmp_path / "ckpt", model=fresh)
    for a, b in zip(model.parameters(), reloaded.parameters()):
        assert torch.equal(a, b)
