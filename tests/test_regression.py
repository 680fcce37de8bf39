"""Regression of g-nets to existing weights (hf_gb.compress.regression)."""

from __future__ import annotations

import pytest
import torch

from hf_gb import GBConfig, GenomicBottleneck
from hf_gb.compress.regression import compress_by_regression, covered_weights, fit_to_weights, relative_errors


def smooth_model() -> torch.nn.Module:
    """Two Linear layers whose weights are smooth functions of position: a g-net can learn them."""
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            i = torch.arange(layer.out_features, dtype=torch.float32)[:, None]
            j = torch.arange(layer.in_features, dtype=torch.float32)[None, :]
            layer.weight.copy_(0.2 * torch.sin(i / 6) * torch.cos(j / 9) + 0.05 * torch.cos((i + j) / 4))
    return model


# Centred g-nets cannot represent the targets' row and column means (part of these smooth weights), so the error
# they can reach is bounded away from zero; uncentred ones can represent the whole target.
@pytest.mark.parametrize("center, max_ratio", [(False, 0.5), (True, 0.75)])
def test_fit_reduces_the_relative_error_and_reports_it(center, max_ratio):
    model = smooth_model()
    targets = covered_weights(model)
    gb = GenomicBottleneck(model, GBConfig(family="mlp", hidden_dim=16, tile_size=32, center=center))
    before = relative_errors(gb, targets)
    after = fit_to_weights(gb, targets, steps=150, lr=3e-2, progress=False)
    assert set(after) == {"0.weight", "2.weight"}
    for name in after:
        assert after[name] < max_ratio * before[name], (name, before[name], after[name])
        w, t = dict(model.named_parameters())[name], targets[name]
        assert after[name] == pytest.approx(((w - t).norm() / t.norm()).item(), rel=1e-5)  # the model holds the fit
    assert all(p.grad is None for p in model.parameters())  # nothing left for the next predict to trip on


def test_uncovered_tensors_are_left_alone():
    model = smooth_model()
    bias = model[0].bias.detach().clone()
    config = GBConfig(family="mlp", hidden_dim=4, tile_size=16)
    gb, errors = compress_by_regression(model, config, steps=3, progress=False)
    assert torch.equal(model[0].bias, bias)
    assert sorted(errors) == sorted(t.name for t in gb.covered)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": -1}, "steps must be"),
        ({"lr": 0.0}, "lr must be"),
        ({"schedule": "linear"}, "schedule must be"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    model = smooth_model()
    targets = covered_weights(model)
    gb = GenomicBottleneck(model, GBConfig(family="mlp", hidden_dim=4, tile_size=16))
    with pytest.raises(ValueError, match=message):
        fit_to_weights(gb, targets, progress=False, **kwargs)


def test_targets_must_match_the_covered_tensors():
    model = smooth_model()
    gb = GenomicBottleneck(model, GBConfig(family="mlp", hidden_dim=4, tile_size=16))
    with pytest.raises(ValueError, match="lack 1 covered"):
        fit_to_weights(gb, {"0.weight": torch.zeros(32, 32)}, steps=1, progress=False)
    with pytest.raises(ValueError, match=r"shape \(3, 3\)"):
        fit_to_weights(gb, {"0.weight": torch.zeros(3, 3), "2.weight": torch.zeros(16, 32)}, steps=1, progress=False)
