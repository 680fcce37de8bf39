"""`GBConfig.init_active`: each g-net hidden unit starts active on a set fraction of its tile's positions."""

import pytest
import torch
from torch import nn

from hf_gb import GBConfig, GenomicBottleneck
from hf_gb.engine.families.separable import SPARSE_SAMPLE, SeparableBank


def _active(bank) -> torch.Tensor:
    """Fraction of positions at which each (tile, hidden unit) of ``bank`` is active: (n_tiles, h)."""
    A, B = bank._separable_tables(None)
    return (A[:, :, None, :] + B[:, None, :, :] > 0).float().mean(dim=(1, 2))


@pytest.mark.parametrize("family", ["mlp", "deep", "shared"])
def test_every_unit_is_active_on_the_fraction_asked_for(family):
    """8 x 8 tiles (64 positions, all counted): exactly round(0.1 * 64) = 6 active positions per unit and tile."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 16))
    gb = GenomicBottleneck(model, GBConfig(family=family, hidden_dim=6, tile_size=8, init_active=0.1,
                                           kernel="eager"))
    for bank in gb.banks.values():
        torch.testing.assert_close(_active(bank), torch.full((bank.n_tiles, 6), 6 / 64))


def test_large_tiles_are_sampled_and_no_unit_starts_dead():
    torch.manual_seed(0)
    model = nn.Linear(256, 128)
    gb = GenomicBottleneck(model, GBConfig(family="mlp", hidden_dim=16, tile_size=128, init_active=0.05,
                                           kernel="eager"))
    (bank,) = gb.banks.values()
    assert 128 * 128 > SPARSE_SAMPLE  # the biases come from a sample of positions
    active = _active(bank)
    assert active.min() > 0.02 and active.max() < 0.09, active
    assert abs(active.mean().item() - 0.05) < 0.01
    # The dense init: about half of the positions, every unit.
    config = GBConfig(family="mlp", hidden_dim=16, tile_size=128, kernel="eager")
    dense = GenomicBottleneck(nn.Linear(256, 128), config)
    assert abs(_active(next(iter(dense.banks.values()))).mean().item() - 0.5) < 0.05


def test_sparse_init_is_calibrated_and_seeded():
    """The output scale is set after the biases: the first prediction has the layer's own init std."""
    def build(seed):
        torch.manual_seed(0)
        model = nn.Linear(64, 64)
        std = model.weight.std().item()
        gb = GenomicBottleneck(model, GBConfig(family="mlp", hidden_dim=8, tile_size=32, init_active=0.02, seed=seed,
                                               kernel="eager"))
        return gb, std

    gb, std = build(0)
    assert abs(gb.covered[0].param.std().item() / std - 1) < 0.05
    again, _ = build(0)
    other, _ = build(1)
    b1 = next(iter(gb.banks.values())).b1
    assert torch.equal(b1, next(iter(again.banks.values())).b1)
    assert not torch.equal(b1, next(iter(other.banks.values())).b1)


def test_loading_does_not_run_the_sparse_init(monkeypatch):
    calls = []
    monkeypatch.setattr(SeparableBank, "sparse_biases_", lambda self, *a: calls.append(self))
    sparse = GBConfig(family="mlp", hidden_dim=8, tile_size=32, init_active=0.02)
    GenomicBottleneck(nn.Linear(64, 64), sparse, init_gnets=False)
    assert calls == []
    GenomicBottleneck(nn.Linear(64, 64), GBConfig(family="mlp", hidden_dim=8, tile_size=32, init_active=0.02))
    assert len(calls) == 1


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1, "0.1", True, float("nan")])
def test_init_active_must_be_a_fraction(value):
    with pytest.raises(ValueError, match="init_active"):
        GBConfig(init_active=value)
