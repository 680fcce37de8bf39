"""g-net families of hf_gb.engine.families: chunked evaluation, gradients against autograd, end to end and on disk.

The bank-interface tests of tests/test_bank.py run over every registered family, these included."""

import json

import pytest
import torch
from test_bottleneck import NET_COVERED, _batches, _net, push_against_autograd

import hf_gb.engine.families.deep as deep
from hf_gb import GBConfig, GenomicBottleneck
from hf_gb.engine.registry import family_class
from hf_gb.engine.tiling import TileGeometry


def _deep(geometry, n=4, **config):
    cfg = GBConfig(family="deep", hidden_dim=3, family_options={"second_hidden_dim": 2}, kernel="eager", **config)
    return family_class("deep")(geometry, n, cfg, torch.Generator().manual_seed(0)).double()


@pytest.mark.parametrize("budget", [1 << 21, 7 * 5 * 16, 6 * 5], ids=["one-chunk", "tile-groups", "row-groups"])
@pytest.mark.parametrize("geometry", [TileGeometry(7, 6), TileGeometry(5, 3, 2)], ids=str)
def test_chunked_evaluation_matches_the_reference(monkeypatch, budget, geometry):
    """Whatever the chunking (whole bank, groups of tiles, groups of rows), values and gradients are the same."""
    monkeypatch.setattr(deep, "CHUNK_ELEMENTS", budget)
    bank = _deep(geometry, center=False)
    chunks = list(bank._chunks(bank.tables()))
    assert (len(chunks) == 1) == (budget == 1 << 21)
    assert all(rs.stop - rs.start < geometry.rows for _, rs in chunks) == (budget == 6 * 5)
    tables = tuple(t.detach().requires_grad_() for t in bank.tables())
    want = bank.reference(tables)
    torch.testing.assert_close(bank.evaluate(tuple(t.detach() for t in tables)), want.detach(), rtol=1e-12,
                               atol=1e-12)
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = torch.autograd.grad((want * grad).sum(), tables)
    with torch.no_grad():
        got = bank.evaluate_backward(tuple(t.detach() for t in tables), grad)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_chunks_cover_every_tile_and_row_once():
    for n, rows, per_row, budget in [(3, 5, 4, 100), (3, 5, 4, 7), (1, 9, 2, 4), (4, 2, 50, 10)]:
        seen = torch.zeros(n, rows, dtype=torch.int64)
        for ts, rs in deep._chunks(n, rows, per_row, budget):
            seen[ts, rs] += 1
            assert (ts.stop - ts.start) * (rs.stop - rs.start) * per_row <= max(budget, per_row)
        assert torch.equal(seen, torch.ones_like(seen))


@pytest.mark.parametrize("center", [True, False], ids=["centred", "uncentred"])
@pytest.mark.parametrize("accumulate", [1, 3])
def test_deep_push_equals_end_to_end_autograd(accumulate, center):
    model, gb = _net(family="deep", hidden_dim=3, family_options={"second_hidden_dim": 2}, center=center)
    assert {t.name for t in gb.covered} == NET_COVERED
    _, got = push_against_autograd(model, gb, _batches(accumulate))
    assert sum(float(g.abs().sum()) for g in got) > 0


def test_deep_kernel_setting_gives_the_same_prediction():
    _, eager = _net(family="deep", kernel="eager")
    _, compiled = _net(family="deep", kernel="compiled")
    for e, c in zip(eager.banks.values(), compiled.banks.values()):
        torch.testing.assert_close(e.predict(keep_graph=False), c.predict(keep_graph=False), rtol=0, atol=0)


def test_deep_stored_params_and_compression():
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))
    config = GBConfig(family="deep", hidden_dim=8, family_options={"second_hidden_dim": 4}, compression=20)
    gb = GenomicBottleneck(model, config)
    stats = gb.stats()
    assert stats["gnet_params"] == sum(p.numel() for p in gb.parameters())
    assert sum(r["gnet_params"] for r in stats["tensors"]) == stats["gnet_params"]
    assert 0.8 * 20 <= stats["covered_compression"] <= 1.25 * 20


def test_deep_checkpoint_round_trip_records_the_family(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    config = GBConfig(family="deep", hidden_dim=4, family_options={"second_hidden_dim": 3}, tile_size=8)
    gb = GenomicBottleneck(model, config)
    gb.save_pretrained(str(tmp_path), model_card=False)
    saved = json.loads((tmp_path / "gb_config.json").read_text())
    assert saved["family"] == "deep" and saved["family_options"] == {"second_hidden_dim": 3}
    torch.manual_seed(1)
    fresh = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    loaded = GenomicBottleneck.from_pretrained(str(tmp_path), model=fresh)
    assert loaded.config.family == "deep" and loaded.config.option("second_hidden_dim") == 3
    x = torch.randn(3, 16)
    torch.testing.assert_close(fresh(x), model(x))


def test_config_file_without_family_means_mlp(tmp_path):
    """Files of format 1 and 2 were written when "mlp" was the default: one that names no family means it. A config
    built now without one gets the present default, "auto"."""
    data = GBConfig(hidden_dim=4).to_dict()
    del data["family"]
    assert GBConfig.from_dict(data).family == "auto"
    for version in (1, 2):
        (tmp_path / "gb_config.json").write_text(json.dumps({**data, "format_version": version}))
        assert GBConfig.from_pretrained(tmp_path).family == "mlp"


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "8"])
def test_second_hidden_dim_is_validated(value):
    with pytest.raises(ValueError, match="second_hidden_dim"):
        GBConfig(family="deep", family_options={"second_hidden_dim": value})
