"""The plan a bottleneck is built from: family "auto" per tensor, axis codes, widths, unreachable targets."""

import json
import math

import pytest
import torch
from test_bottleneck import _batches, push_against_autograd
from torch import nn

from hf_gb import GBConfig, GenomicBottleneck
from hf_gb.engine.codes import axis_codes, code_inputs, position_codes
from hf_gb.engine.tiling import TileGeometry


def _mnist_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 800), nn.ReLU(), nn.Linear(800, 10))


def test_axis_codes_are_the_coordinates_codes_in_flatten_order():
    codes = axis_codes((3, 5, 7), "gray")
    assert codes.shape == (105, 2 + 3 + 3)
    c, y, x = 2, 4, 6
    flat = (c * 5 + y) * 7 + x  # torch's flatten of (C, H, W)
    want = torch.cat([position_codes(3, "gray")[c], position_codes(5, "gray")[y], position_codes(7, "gray")[x]])
    assert torch.equal(codes[flat], want)
    assert code_inputs(TileGeometry(800, 784, col_axes=(28, 28)), "gray") == 10 + 5 + 5
    assert code_inputs(TileGeometry(8, 4, 9, kernel_axes=(3, 3))) == 3 + 2 + 4
    with pytest.raises(ValueError, match="col_axes"):
        TileGeometry(8, 780, col_axes=(28, 28))


@pytest.mark.parametrize("target", [100.0, 300.0, 700.0, 1000.0])
def test_auto_gives_an_image_reading_linear_one_wide_gnet_and_hashes_the_rest(target):
    model = _mnist_mlp()
    gb = GenomicBottleneck(model, GBConfig(compression=target, input_shapes={"0": [28, 28]}))
    fc1, fc2 = gb.covered
    assert fc1.spec.family == "coords" and fc1.geometry.col_axes == (28, 28) and fc1.geometry.cols == 784
    assert fc2.spec.family == "hash" and fc2.geometry.col_axes is None
    assert fc1.spec.hidden_dim <= 32 and fc1.n_tiles == 1  # one g-net for the whole matrix, as in PNAS
    assert abs(gb.stats()["covered_compression"] / target - 1) < 0.02
    assert set(gb.banks) == {fc1.bank, fc2.bank} and fc1.bank.startswith("coords-h") and fc2.bank.startswith("hash-")


def test_auto_splits_rows_only_when_the_hashed_features_would_outnumber_the_rows():
    gb = GenomicBottleneck(_mnist_mlp(), GBConfig(compression=10, input_shapes={"0": [28, 28]}))
    fc1 = gb.covered[0]
    bank = gb.banks[fc1.bank]
    assert fc1.n_tiles > 1 and fc1.geometry.cols == 784 and 0 < bank.pool <= fc1.geometry.rows * bank.hidden_dim
    assert abs(gb.stats()["covered_compression"] / 10 - 1) < 0.05


def test_auto_without_ordered_axes_is_random_sharing():
    model = _mnist_mlp()
    gb = GenomicBottleneck(model, GBConfig(compression=50))
    assert {t.spec.family for t in gb.covered} == {"hash"}
    assert not any(bank.center for bank in gb.banks.values())  # HashedNets' own function: no centring
    assert [list(b.keys()) for b in [dict(gb.named_parameters())]] == [["banks.hash-800x784x1.values",
                                                                       "banks.hash-10x800x1.values"]]


def test_input_shapes_are_checked_against_the_model():
    with pytest.raises(ValueError, match=r"input_shapes\['0'\].*does not describe"):
        GenomicBottleneck(_mnist_mlp(), GBConfig(compression=50, input_shapes={"0": [28, 27]}))
    with pytest.raises(ValueError, match="match no covered module"):
        GenomicBottleneck(_mnist_mlp(), GBConfig(compression=50, input_shapes={"fc9": [28, 28]}))
    for bad in ({"0": [0, 28]}, {"0": "28x28"}, [28, 28], "{not json"):
        with pytest.raises(ValueError, match="input_shapes"):
            GBConfig(input_shapes=bad)
    assert GBConfig(input_shapes='{"0": [28, 28]}').input_shapes == {"0": [28, 28]}


def test_an_unreachable_target_is_refused_with_the_reachable_ratio():
    with pytest.raises(ValueError, match=r"compression=5000 cannot be reached.*at most \d+\.\dx"):
        GenomicBottleneck(_mnist_mlp(), GBConfig(family="mlp", hidden_dim=32, compression=5000))
    # A free width shrinks instead: the same target is met with narrower g-nets.
    gb = GenomicBottleneck(_mnist_mlp(), GBConfig(family="mlp", compression=1500))
    assert gb.stats()["covered_compression"] * 1.25 >= 1500
    assert min(t.spec.hidden_dim for t in gb.covered) < 32


def test_the_mlp_default_plan_is_unchanged():
    """family="mlp" with the old default width plans the tiles and bank names of earlier versions."""
    gb = GenomicBottleneck(_mnist_mlp(), GBConfig(family="mlp", hidden_dim=32, compression=20))
    assert all(key == t.geometry.key() for key, t in zip(gb.banks, gb.covered))
    assert all(t.spec.hidden_dim == 32 and t.geometry.col_axes is None for t in gb.covered)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_axis_codes_push_equals_end_to_end_autograd(accumulate):
    """Image-coded columns and (ky, kx)-coded kernels: the closed-form push equals autograd through the g-nets."""
    from test_bottleneck import Net

    torch.manual_seed(0)
    model = Net().double()
    config = GBConfig(family="mlp", hidden_dim=3, tile_size=8, kernel="eager", kernel_code="axes",
                      input_shapes={"fc": [3, 2, 2]})
    gb = GenomicBottleneck(model, config).double()
    conv = next(t for t in gb.covered if t.name == "conv.weight")
    fc = next(t for t in gb.covered if t.name == "fc.weight")
    assert conv.geometry.kernel_axes == tuple(model.conv.weight.shape[2:]) and fc.geometry.col_axes == (3, 2, 2)
    _, got = push_against_autograd(model, gb, _batches(accumulate))
    assert sum(float(g.abs().sum()) for g in got) > 0


@pytest.mark.parametrize("accumulate", [1, 3])
def test_coords_push_equals_end_to_end_autograd(accumulate):
    """The hashed row features and the stored-divided-by-the-multiplier tensors: push equals autograd."""
    from test_bottleneck import Net

    torch.manual_seed(0)
    model = Net().double()
    config = GBConfig(family="coords", compression=2, tile_size=8, kernel="eager", input_shapes={"fc": [3, 2, 2]})
    gb = GenomicBottleneck(model, config).double()
    assert any(bank.row_pool is not None for bank in gb.banks.values())
    _, got = push_against_autograd(model, gb, _batches(accumulate))
    assert sum(float(g.abs().sum()) for g in got) > 0


def test_coords_stores_its_tensors_divided_by_the_multiplier():
    from hf_gb.engine.families import CoordsBank, MLPBank
    from hf_gb.engine.families.coords import LR_MULTIPLIER

    geometry = TileGeometry(64, 49, col_axes=(7, 7))
    config = GBConfig(family="coords", compression=4, kernel="eager", center=False)
    bank = CoordsBank(geometry, 1, config, torch.Generator().manual_seed(0))
    plain = MLPBank(geometry, 1, GBConfig(family="mlp", hidden_dim=bank.hidden_dim, kernel="eager", center=False),
                    torch.Generator().manual_seed(0))
    # The same draw, each code's weights at unit pre-activation variance, stored divided by the multiplier.
    rows, cols = bank.row_codes.shape[1], bank.col_codes.shape[1]
    torch.testing.assert_close(bank.w_row * LR_MULTIPLIER, plain.w_row * math.sqrt((rows + cols) / rows))
    torch.testing.assert_close(bank.w_col * LR_MULTIPLIER, plain.w_col * math.sqrt((rows + cols) / cols))
    A, B, *_ = bank.tables()
    assert float(A.detach().std()) > 0.3 and float(B.detach().std()) > 0.3  # used at the scale of "mlp"'s tables


@pytest.mark.parametrize("family", ["coords", "auto"])
def test_the_multiplier_is_a_family_option_that_changes_storage_not_weights(family):
    """``lr_multiplier`` (also through "auto") divides what is stored and leaves the predicted weights alone."""
    stored, weights = {}, {}
    for m in (10.0, 2.5):
        model = _mnist_mlp()
        config = GBConfig(family=family, compression=300, input_shapes={"0": [28, 28]}, kernel="eager",
                          family_options={"lr_multiplier": m})
        gb = GenomicBottleneck(model, config)
        bank = next(b for b in gb.banks.values() if getattr(b, "family", None) == "coords")
        assert bank.multiplier == m
        gb.predict_weights(keep_graph=False)
        stored[m], weights[m] = bank.w_col.detach().clone(), model[0].weight.detach().clone()
    torch.testing.assert_close(stored[2.5], stored[10.0] * 4)
    torch.testing.assert_close(weights[2.5], weights[10.0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value", [0, -1.0, "ten"])
def test_a_bad_multiplier_is_refused_by_name(value):
    with pytest.raises(ValueError, match="lr_multiplier"):
        GBConfig(family="coords", family_options={"lr_multiplier": value})


def test_a_saved_auto_plan_round_trips(tmp_path):
    from hf_gb import load_compressed

    model = _mnist_mlp()
    gb = GenomicBottleneck(model, GBConfig(compression=300, input_shapes={"0": [28, 28]}, encoding="gray"))
    gb.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "gb_config.json").read_text())
    assert saved["format_version"] == 5 and [t["family"] for t in saved["tensors"]] == ["coords", "hash"]
    reloaded = load_compressed(tmp_path / "ckpt", model=nn.Sequential(nn.Linear(784, 800), nn.ReLU(),
                                                                        nn.Linear(800, 10)))
    for a, b in zip(model.parameters(), reloaded.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.compiled
def test_coords_native_kernels_match_eager():
    from hf_gb.engine import native

    if native.get() is None:
        pytest.skip("the native kernel cannot be built here")
    got = {}
    for kernel in ("eager", "native"):
        model = _mnist_mlp()
        gb = GenomicBottleneck(model, GBConfig(compression=300, input_shapes={"0": [28, 28]}, kernel=kernel))
        gb.predict_weights()
        x = torch.randn(8, 784, generator=torch.Generator().manual_seed(1))
        model(x).square().mean().backward()
        gb.push_gradients()
        got[kernel] = (model[0].weight.detach().clone(), {n: p.grad.clone() for n, p in gb.named_parameters()})
    torch.testing.assert_close(got["native"][0], got["eager"][0], rtol=1e-4, atol=1e-6)
    for name, grad in got["eager"][1].items():
        torch.testing.assert_close(got["native"][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
