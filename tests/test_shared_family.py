"""The "shared" g-net family (hf_gb.engine.families.SharedBank): one g-net per bank, a learned embedding and gain per
tile.

The bank-interface tests of tests/test_bank.py run over this family too; these add what sharing changes: the
shapes of the shared weights, gradients summed over tiles, storage counted once per bank, and files."""

import json

import pytest
import torch
from test_bank import push_against_reference
from test_bottleneck import NET_COVERED, Parallel, _batches, _net, push_against_autograd
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

import hf_gb
from hf_gb import GBConfig, GenomicBottleneck
from hf_gb.engine import kernels
from hf_gb.engine.codes import num_bits
from hf_gb.engine.families import SharedBank
from hf_gb.engine.kernels import use_compiled
from hf_gb.engine.registry import family_class
from hf_gb.engine.tiling import TileGeometry
from hf_gb.io.checkpoint import save_compressed
from hf_gb.io.checks import _gnet_values_wanted

SHARED = ("w_row", "w_col", "w_ker", "w2")


def _bank(geometry, n=5, **config):
    cfg = GBConfig(family="shared", hidden_dim=3, kernel="eager", **config)
    bank = SharedBank(geometry, n, cfg, torch.Generator().manual_seed(0)).double()
    with torch.no_grad():  # gains away from 1 and distinct scales, so that both are exercised
        if bank.gain is not None:
            bank.gain.copy_(torch.linspace(0.5, 1.5, n))
        bank.scale.copy_(torch.linspace(0.2, 1.0, n))
    return bank


def _llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("tile_gain", [True, False], ids=["gain", "no-gain"])
@pytest.mark.parametrize("geometry", [TileGeometry(4, 6), TileGeometry(5, 3, 4)], ids=str)
def test_one_set_of_weights_per_bank(geometry, tile_gain):
    bank = _bank(geometry, n=7, family_options={"tile_gain": tile_gain})
    h, bits = 3, num_bits(geometry.rows) + num_bits(geometry.cols) + geometry.kernel_bits
    shapes = {n: tuple(p.shape) for n, p in bank.named_parameters()}
    assert shapes["w_row"] == (1, num_bits(geometry.rows), h) and shapes["w_col"] == (1, num_bits(geometry.cols), h)
    assert shapes["w2"] == (1, h) and shapes["b1"] == (7, h)
    assert ("w_ker" in shapes) == (geometry.kernel > 1) and ("gain" in shapes) == tile_gain
    bank_config = GBConfig(family="shared", hidden_dim=h, family_options={"tile_gain": tile_gain})
    per_tile, shared = SharedBank.tile_params(geometry, bank_config), SharedBank.bank_params(geometry, bank_config)
    assert sum(v.numel() for k, v in bank.named_parameters() if k in SHARED) == shared == (bits + 1) * h
    assert sum(v.numel() for k, v in bank.named_parameters() if k not in SHARED) == 7 * per_tile
    assert bank.num_gnet_params() == 7 * SharedBank.params_per_tile(geometry, bank_config) + shared
    assert SharedBank.params_per_tile_of(geometry, bank_config, 7) == per_tile + shared / 7


@pytest.mark.parametrize("config", [dict(center=True), dict(center=False),
                                    dict(center=True, family_options={"tile_gain": False}),
                                    dict(center=True, stochastic=True, init_noise=0.3)],
                         ids=["centred", "uncentred", "no-gain", "stochastic"])
@pytest.mark.parametrize("geometry", [TileGeometry(4, 6), TileGeometry(5, 3, 4)], ids=str)
def test_push_sums_the_tiles_into_the_shared_weights(geometry, config):
    """push of tiles `index` == autograd through the unfused reference; shared weights learn from every tile asked
    for, each tile's own values only from itself."""
    bank = _bank(geometry, **config)
    seed = 5 if config.get("stochastic") else None
    index = torch.tensor([4, 1, 2])
    got, grad = push_against_reference(bank, index, seed)
    for name in SHARED:
        if name in got:
            assert got[name].abs().sum() > 0, name
    for name in ("b1", "gain", "b2", "log_sigma"):
        if name in got:
            assert got[name][[0, 3]].abs().sum() == 0 and got[name][index].abs().sum() > 0, name

    # The shared weights' gradient is the sum of what each tile alone would push.
    total = {n: torch.zeros_like(p) for n, p in bank.named_parameters() if n in SHARED}
    for k, t in enumerate(index.tolist()):
        bank.zero_grad(set_to_none=True)
        bank.predict(torch.tensor([t]), noise_seed=seed)
        bank.push(grad[k : k + 1].clone())
        for n in total:
            total[n] += bank.get_parameter(n).grad
    for n in total:
        torch.testing.assert_close(total[n], got[n], rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("geometry", [TileGeometry(4, 6), TileGeometry(5, 3, 4), TileGeometry(1, 7)], ids=str)
def test_index_subsets_give_the_tiles_of_the_full_prediction(geometry):
    bank = _bank(geometry, n=6, center=False)
    full = bank.predict(keep_graph=False)
    for index in ([5, 0], [2], [1, 2, 3, 4], []):
        index = torch.tensor(index, dtype=torch.long)
        torch.testing.assert_close(bank.predict(index, keep_graph=False), full[index], rtol=0, atol=0)
    torch.testing.assert_close(bank(reference=True).detach(), full, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(full[0], full[1])  # tiles of one shared g-net still differ (their embeddings)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_push_equals_end_to_end_autograd(accumulate):
    model, gb = _net(family="shared", hidden_dim=3)
    assert {t.name for t in gb.covered} == NET_COVERED
    _, got = push_against_autograd(model, gb, _batches(accumulate))
    assert sum(float(g.abs().sum()) for g in got) > 0


@pytest.mark.compiled
def test_compiled_path_matches_eager():
    """predict and push through the compiled kernels agree with the eager path (one bank, float32)."""
    if not use_compiled("compiled", 1):
        pytest.fail("torch.compile is unavailable here; the fast path cannot be tested")
    results = []
    for kernel in ("eager", "compiled"):
        torch.manual_seed(0)
        model = Parallel(nn.Linear(40, 48), Conv1D(48, 40))  # one bank: 6 tiles of 16 x 40, h = 8 (as test_bottleneck)
        gb = GenomicBottleneck(model, GBConfig(family="shared", hidden_dim=8, tile_size=[16, 40], kernel=kernel))
        assert len(gb.banks) == 1 and next(iter(gb.banks.values())).compiled() == (kernel == "compiled")
        gb.predict_weights()
        model(torch.randn(4, 40, generator=torch.Generator().manual_seed(1))).pow(2).sum().backward()
        gb.push_gradients()
        results.append(([p.detach().clone() for p in model.parameters()], [p.grad for p in gb.parameters()]))
    assert not kernels._compile_failed  # the compiled kernels ran, not the eager fallback
    for eager, compiled in zip(*results):
        for e, c in zip(eager, compiled):
            torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)


def test_stats_count_the_shared_values_once_per_bank():
    model = _llama()
    config = GBConfig(family="shared", hidden_dim=8, tile_size=16)
    gb = GenomicBottleneck(model, config)
    assert len(gb.banks) == 1 and len(gb.covered) > 2  # every projection in one bank of 16 x 16 tiles
    (bank,) = gb.banks.values()
    stats = gb.stats()
    held = sum(p.numel() for p in gb.parameters())
    shared = SharedBank.bank_params(bank.geometry, config)
    assert stats["gnet_params"] == held == bank.n_tiles * SharedBank.params_per_tile(bank.geometry, config) + shared
    assert sum(r["gnet_params"] for r in stats["tensors"]) == held  # each tensor carries its share
    assert sum(gb.bank_shares().values()) == shared
    assert stats["covered_compression"] == pytest.approx(stats["covered_params"] / held)
    assert _gnet_values_wanted(model, config) == held  # what a loader expects the file to hold
    assert f"g-net params: {held:,}" in gb.summary()


def test_per_tile_families_count_no_shared_values():
    """Existing families: no shared values, per-tile counts unchanged (the tile choice and ratios are the same)."""
    for family in ("mlp", "deep"):
        cls, config = family_class(family), GBConfig(family=family, hidden_dim=8)
        for geometry in (TileGeometry(16, 16), TileGeometry(5, 3, 9)):
            assert cls.bank_params(geometry, config) == 0
            assert cls.params_per_tile_of(geometry, config, 3) == cls.params_per_tile(geometry, config)
        gb = GenomicBottleneck(_llama(), GBConfig(family=family, hidden_dim=8, compression=10))
        assert set(gb.bank_shares().values()) == {0}
        assert sum(r["gnet_params"] for r in gb.stats()["tensors"]) == gb.stats()["gnet_params"]


@pytest.mark.parametrize("target", [10, 40])
def test_compression_target_counts_the_shared_values(target):
    """The tile choice spreads a bank's shared values over each tensor's own tiles: an upper bound of what it
    stores, so the reported ratio (which counts everything once) is not below what that choice expected."""
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 512))
    gb = GenomicBottleneck(model, GBConfig(family="shared", hidden_dim=16, compression=target))
    expected = []
    for t in gb.covered:
        per_tile = SharedBank.params_per_tile_of(t.geometry, gb.config, t.n_tiles)
        expected.append(t.param.numel() / (t.n_tiles * per_tile))
    ratio = gb.stats()["covered_compression"]
    assert ratio >= min(expected) * (1 - 1e-9)
    assert 0.75 * target <= ratio <= 1.5 * target


def test_checkpoint_round_trip_records_the_family(tmp_path):
    gb = GenomicBottleneck(_llama(), GBConfig(family="shared", hidden_dim=8, tile_size=16))
    with torch.no_grad():  # trained-looking per-tile values, so that a load that dropped them would show
        for bank in gb.banks.values():
            bank.gain.uniform_(0.5, 1.5)
            bank.b1.add_(torch.randn_like(bank.b1))
    gb.predict_weights(keep_graph=False)
    folder = tmp_path / "ckpt"
    save_compressed(gb, str(folder), model_card=False)
    saved = json.loads((folder / "gb_config.json").read_text())
    assert saved["family"] == "shared" and "tile_gain" not in saved and "family_options" not in saved
    loaded = hf_gb.load_compressed(str(folder))
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    gb.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, gb.model(ids).logits, atol=0, rtol=0)
    reloaded = GenomicBottleneck.from_pretrained(str(folder), model=_llama(seed=1))
    assert reloaded.config.family == "shared"
    for key, bank in gb.banks.items():
        for name, value in bank.state_dict().items():
            torch.testing.assert_close(reloaded.banks[key].state_dict()[name], value, rtol=0, atol=0)


@pytest.mark.parametrize("value", [None, 0, "yes"])
def test_tile_gain_is_validated(value):
    with pytest.raises(ValueError, match="tile_gain"):
        GBConfig(family="shared", family_options={"tile_gain": value})
