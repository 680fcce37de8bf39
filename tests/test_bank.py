"""The bank interface: predict / push / forward / calibrate of every g-net family, on any subset of tiles."""

import pytest
import torch

from hf_gb import GBConfig
from hf_gb.engine.bank import GNetBank
from hf_gb.engine.families import MLPBank
from hf_gb.engine.registry import families, family_class, register_family
from hf_gb.engine.tiling import TileGeometry

GEOMETRIES = [TileGeometry(4, 6), TileGeometry(5, 3, 4), TileGeometry(1, 7)]
SETTINGS = [dict(center=True), dict(center=False), dict(center=True, stochastic=True, init_noise=0.3),
            dict(center=True, encoding="fourier")]
IDS = ["centred", "uncentred", "stochastic", "fourier"]


def _bank(family, geometry, n=5, **config):
    cfg = GBConfig(hidden_dim=3, kernel="eager", **config)
    return family_class(family)(geometry, n, cfg, torch.Generator().manual_seed(0)).double()


def push_against_reference(bank, index, seed=None):
    """push a random tile gradient of tiles ``index`` (noise of ``seed`` if given) and assert it equals autograd
    through the bank's unfused reference; returns the pushed gradients by parameter name, and the tile gradient."""
    g = bank.geometry
    grad = torch.randn(len(index), g.rows, g.cols * g.kernel, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)
    bank.predict(index, noise_seed=seed)
    bank.push(grad.clone())
    got = {n: p.grad.clone() for n, p in bank.named_parameters()}
    bank.zero_grad(set_to_none=True)
    want = bank(index, reference=True)
    if seed is not None:
        want = want + bank.sigma(index)[:, None, None] * bank.noise(seed, index)
    (want * grad).sum().backward()
    for name, p in bank.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-10, atol=1e-12, msg=name)
    bank.zero_grad(set_to_none=True)
    return got, grad


@pytest.fixture(params=families())
def family(request):
    return request.param


@pytest.mark.parametrize("config", SETTINGS, ids=IDS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_predict_any_subset_of_tiles(family, geometry, config):
    bank = _bank(family, geometry, **config)
    seed = 11 if config.get("stochastic") else None
    full = bank.predict(noise_seed=seed, keep_graph=False)
    assert full.shape == (5, geometry.rows, geometry.cols * geometry.kernel)
    index = torch.tensor([3, 0])
    torch.testing.assert_close(bank.predict(index, noise_seed=seed, keep_graph=False), full[index])
    if config["center"]:  # every row and column of every tile sums to zero (before noise)
        mean = bank.predict(keep_graph=False)
        torch.testing.assert_close(mean.sum(1), torch.zeros_like(mean.sum(1)), atol=1e-12, rtol=0)
        torch.testing.assert_close(mean.sum(2), torch.zeros_like(mean.sum(2)), atol=1e-12, rtol=0)


@pytest.mark.parametrize("config", SETTINGS, ids=IDS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_push_equals_autograd_of_the_reference(family, geometry, config):
    """push(grad) of tiles `index` == d sum(grad * prediction) / d params, with the unfused reference and autograd."""
    index = torch.tensor([4, 1, 2])
    got, _ = push_against_reference(_bank(family, geometry, **config), index, 5 if config.get("stochastic") else None)
    untouched = [i for i in range(5) if i not in index.tolist()]
    assert all(got[n][untouched].abs().sum() == 0 for n in got if got[n].shape[0] == 5)  # only tiles `index` learn


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_pushed_gradients_have_their_parameters_layout(family, geometry):
    """A fused optimizer (Trainer's default adamw_torch_fused) reads a gradient as flat memory in its parameter's
    layout: a permuted gradient (an einsum's result) scrambled every update of the example LM (val loss 2.60 ->
    3.07) until push stored gradients in the parameters' own strides. After two pushes (assign, then add), a
    fused AdamW step equals the unfused one."""
    bank = _bank(family, geometry).float()
    grad = torch.randn(5, geometry.rows, geometry.cols * geometry.kernel, generator=torch.Generator().manual_seed(3))
    for _ in range(2):
        bank.predict()
        bank.push(grad.clone())
    for name, p in bank.named_parameters():
        if p.grad is not None:
            assert p.grad.stride() == p.stride(), name
    copies = [{n: p.detach().clone() for n, p in bank.named_parameters()} for _ in range(2)]
    results = []
    for fused, start in zip((False, True), copies):
        params = {n: torch.nn.Parameter(v) for n, v in start.items()}
        for n, p in params.items():
            p.grad = bank.get_parameter(n).grad
        torch.optim.AdamW(params.values(), lr=1e-2, fused=fused).step()
        results.append(params)
    for n in results[0]:
        torch.testing.assert_close(results[1][n], results[0][n], msg=n)


@pytest.mark.parametrize("encoding", ["binary", "fourier"])
def test_counted_values_are_the_parameters(family, encoding):
    """What compression ratios count (`params_per_tile`, `bank_params`) is what the bank holds, for every code."""
    geometry = TileGeometry(8, 16, 3)
    cls = family_class(family)
    config = GBConfig(hidden_dim=3, kernel="eager", encoding=encoding)
    bank = cls(geometry, 5, config, torch.Generator().manual_seed(0))
    assert bank.num_gnet_params() == 5 * cls.params_per_tile(geometry, config) + cls.bank_params(geometry, config)


def test_fused_forward_matches_reference(family):
    bank = _bank(family, TileGeometry(6, 5, 2))
    torch.testing.assert_close(bank(), bank(reference=True), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bank().detach(), bank.predict(keep_graph=False), rtol=1e-12, atol=1e-12)


def test_calibrate_sets_each_tiles_std(family):
    bank = _bank(family, TileGeometry(8, 8), center=False)
    target = torch.linspace(0.01, 0.5, 5)
    bank.calibrate(target)
    out = bank.predict(keep_graph=False).flatten(1)
    torch.testing.assert_close(out.std(1, correction=0), target.double(), rtol=1e-6, atol=1e-9)
    if bank.removes_mean:
        torch.testing.assert_close(out.mean(1), torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-9)
    else:  # a family without an output bias: the mean is what its function gives, small against the std
        assert bool((out.mean(1).abs() < 0.5 * target.double()).all())


def test_push_needs_a_kept_prediction():
    bank = _bank("mlp", TileGeometry(4, 4))
    bank.predict(keep_graph=False)
    with pytest.raises(RuntimeError, match="keep_graph"):
        bank.push(torch.zeros(5, 4, 4, dtype=torch.float64))
    bank.predict()
    bank.push(torch.zeros(5, 4, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="keep_graph"):
        bank.push(torch.zeros(5, 4, 4, dtype=torch.float64))  # one push per prediction


def test_noise_needs_a_stochastic_bank():
    with pytest.raises(ValueError, match="stochastic"):
        _bank("mlp", TileGeometry(4, 4)).predict(noise_seed=1)


def test_centred_mlp_has_no_b2_and_loads_a_format_1_state():
    centred, uncentred = _bank("mlp", TileGeometry(4, 4)), _bank("mlp", TileGeometry(4, 4), center=False)
    assert "b2" not in centred.state_dict() and "b2" in uncentred.state_dict()
    old = {**centred.state_dict(), "b2": torch.zeros(5, dtype=torch.float64)}  # what format 1 saved
    centred.load_state_dict(old)  # strict: b2 is dropped, nothing else is unexpected


def test_register_family_refuses_duplicates_and_nameless():
    class Twin(MLPBank):
        family = "mlp"

    with pytest.raises(ValueError, match="already registered"):
        register_family(Twin)

    class Nameless(GNetBank):
        pass

    with pytest.raises(ValueError, match="family"):
        register_family(Nameless)
    with pytest.raises(ValueError, match="unknown g-net family 'nope'"):
        family_class("nope")
    with pytest.raises(ValueError, match="family"):
        GBConfig(family="nope")


def test_copy_drops_a_kept_prediction():
    import copy

    bank = _bank("mlp", TileGeometry(4, 4))
    bank.predict()
    twin = copy.deepcopy(bank)
    with pytest.raises(RuntimeError, match="keep_graph"):
        twin.push(torch.zeros(5, 4, 4, dtype=torch.float64))
    bank.push(torch.zeros(5, 4, 4, dtype=torch.float64))  # the original keeps its own
