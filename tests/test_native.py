"""The native CPU kernel (hf_gb/engine/csrc/gnet_cpu.cpp): values and gradients against the float64 reference, the
in-place route through the weights' rows, the kernel choice, and the fallback when it cannot be built."""

import logging

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_gb import GBConfig, GenomicBottleneck
from hf_gb.engine import kernels, native
from hf_gb.engine.bank import GNetBank
from hf_gb.engine.kernels import backward_from, center_tiles, forward_into, fused_backward, fused_forward, kernel_path
from hf_gb.engine.tiling import TileGeometry, tile, tile_rows, untile

pytestmark = pytest.mark.compiled  # builds the extension (about 40 s, once per machine)

# (tiles, rows, cols, hidden): one position, column counts off the 16- and 64-wide blocks, one tile (split into row
# blocks across threads), many tiles, and h with every w2 of one sign in some tile.
SHAPES = [(1, 1, 1, 1), (3, 5, 7, 2), (2, 9, 83, 5), (1, 64, 130, 7), (9, 16, 64, 4)]


@pytest.fixture(scope="module")
def ext():
    module = native.get()
    if module is None:
        pytest.fail("the native kernel did not build here (see the warning); CI must be able to build it")
    return module


def _inputs(n, r, c, h, seed=0):
    gen = torch.Generator().manual_seed(seed)
    A, B = torch.randn(n, r, h, generator=gen), torch.randn(n, c, h, generator=gen)
    w2, G = torch.randn(n, h, generator=gen), torch.randn(n, r, c, generator=gen)
    return A, B, w2, G


def _reference(A, B, w2, G, center):
    leaves = [x.double().requires_grad_() for x in (A, B, w2)]
    out = kernels.reference_forward(*leaves)
    out = center_tiles(out) if center else out
    return out.detach(), torch.autograd.grad((out * G.double()).sum(), leaves)


def _close(got, want):
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("center", [False, True], ids=["raw", "centred"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_native_matches_reference(ext, shape, center):
    A, B, w2, G = _inputs(*shape)
    w2[0, : shape[3] // 2 + 1] = w2[0, : shape[3] // 2 + 1].abs()  # tile 0: mostly positive w2
    want_out, want_grads = _reference(A, B, w2, G, center)
    _close(fused_forward(A, B, w2, compiled="native", center=center), want_out)
    Gc = center_tiles(G) if center else G  # the tile route takes the centred gradient, as push gives it
    dA, dB, dw2, db2 = fused_backward(A, B, w2, Gc, compiled="native")
    for got, want in zip((dA, dB, dw2), want_grads):
        _close(got, want)
    _close(db2, Gc.double().sum((1, 2)))


def test_native_threads_agree(ext):
    """One tile split over row blocks (partial sums added per block) gives what one thread gives."""
    A, B, w2, G = _inputs(1, 96, 70, 6)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused_forward(A, B, w2, compiled="native", center=True), fused_backward(A, B, w2, G, compiled="native")
        torch.set_num_threads(2)
        two = fused_forward(A, B, w2, compiled="native", center=True), fused_backward(A, B, w2, G, compiled="native")
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(two[0], one[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(two[1], one[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# Weights of one bank (tiles 4 x 6 x 2): divided exactly (4 and 3 tiles), overhanging to the right (last tile column
# 2 of 6 wide), below (last tile row 1 of 4 high), both (the corner tile goes to the right buffer), and a weight
# smaller than its one tile in both axes.
EDGE_CASES = {
    "exact": [(8, 12, 2), (4, 18, 2)],
    "right": [(8, 14, 2)],
    "below": [(9, 12, 2)],
    "both": [(9, 14, 2), (8, 12, 2)],
    "inside-one-tile": [(3, 5, 2)],
}


@pytest.mark.parametrize("shapes", EDGE_CASES.values(), ids=EDGE_CASES.keys())
@pytest.mark.parametrize("center", [False, True], ids=["raw", "centred"])
def test_rows_route_matches_tile_route(ext, center, shapes):
    """Written into (and read from) weights' rows in place, tiles that overhang a weight's far edges through edge
    buffers, the kernels give the tile tensors' values (cropped as `untile` crops, zero padded as `tile` pads)."""
    geom = TileGeometry(4, 6, 2)
    gen = torch.Generator().manual_seed(3)
    weights = [torch.randn(*s, generator=gen) for s in shapes]
    n = sum(tile(w, geom).shape[0] for w in weights)
    A, B, w2, _ = _inputs(n, 4, 12, 3)
    b2 = None if center else torch.randn(n)
    rows = tile_rows(weights, geom)
    assert rows is not None and rows.offsets.shape == (n, 4)
    forward_into(A, B, w2, rows, center=center, b2=b2)
    want = fused_forward(A, B, w2, b2, compiled="native", center=center)
    done = 0
    for w in weights:
        k = tile(w, geom).shape[0]
        assert torch.equal(w, untile(want[done: done + k], w.shape, geom)), "the same bits as the tile route"
        done += k

    grads = [torch.randn_like(w) for w in weights]
    kept = [g.clone() for g in grads]
    G = torch.cat([tile(g, geom) for g in grads])
    got = backward_from(A, B, w2, tile_rows(grads, geom), center=center)
    want = fused_backward(A, B, w2, center_tiles(G) if center else G, compiled="native")
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[3], G.sum((1, 2)), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(g, k) for g, k in zip(grads, kept)), "the gradient rows must not be modified"


def test_tile_rows_refuses_what_it_cannot_address():
    geom = TileGeometry(4, 4)
    assert tile_rows([torch.zeros(8, 8, 1)], geom) is not None
    assert tile_rows([torch.zeros(8, 8).t().unsqueeze(-1)], geom) is None  # a transposed (Conv1D) view
    assert tile_rows([torch.zeros(8, 8, 1, dtype=torch.float64)], geom) is None
    edges = tile_rows([torch.zeros(8, 6, 1), torch.zeros(8, 8, 1)], geom)  # the first overhangs to the right
    assert [tuple(b.shape) for _, b, _ in edges.edges] == [(8, 4, 1)] and len(edges.tensors) == 3


class _Sum(nn.Sequential):
    def forward(self, x):
        return sum(m(x) for m in self)


def _train(kernel, model_fn, x, steps=2, **config):
    torch.manual_seed(0)
    model = model_fn()
    gb = GenomicBottleneck(model, GBConfig(**{"family": "mlp", "kernel": kernel, **config}))
    seen = []
    for step in range(steps):
        gb.predict_weights(step=step)
        model(x).pow(2).sum().backward()
        gb.push_gradients()
        seen.append([p.detach().clone() for p in model.parameters()] + [p.grad.clone() for p in gb.parameters()])
        with torch.no_grad():
            for p in gb.parameters():
                p.sub_(1e-2 * p.grad)
        gb.zero_grad()
    return gb, seen


@pytest.mark.parametrize(
    "case",
    ["linear", "linear-uncentred", "linear-stochastic", "linear-edges", "conv1d", "conv2d", "shared"],
)
def test_bottleneck_native_equals_eager(ext, case, monkeypatch):
    """Two predict/push steps through the native kernels (in place where the weights allow it, through tiles
    elsewhere) give the eager kernels' weights and g-net gradients; the route taken is the expected one."""
    routes = []
    for name in ("predict_into", "push_from"):
        original = getattr(GNetBank, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            result = _original(self, *args, **kwargs)
            routes.append((_name, result is not False))
            return result

        monkeypatch.setattr(GNetBank, name, spy)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    config = dict(hidden_dim=4, tile_size=[16, 16])
    if case == "linear-edges":  # 16 x 16 tiles overhang both 45 x 30 weights: their edges go through buffers
        model_fn = lambda: _Sum(nn.Linear(30, 45), nn.Linear(30, 45))  # noqa: E731
        x = torch.randn(3, 30, generator=torch.Generator().manual_seed(1))
    elif case.startswith("linear"):
        model_fn = lambda: _Sum(nn.Linear(32, 48), nn.Linear(32, 48))  # noqa: E731
        config.update(center=case != "linear-uncentred", stochastic=case == "linear-stochastic")
    elif case == "conv1d":
        model_fn = lambda: _Sum(Conv1D(48, 32), nn.Linear(32, 48))  # noqa: E731 (one bank: Conv1D's rows are strided)
    elif case == "conv2d":
        model_fn = lambda: nn.Sequential(nn.Conv2d(2, 16, 3), nn.Flatten(), nn.Linear(16 * 4 * 4, 16))  # noqa: E731
        x = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    else:
        model_fn = lambda: _Sum(nn.Linear(32, 48), nn.Linear(32, 48))  # noqa: E731
        config.update(family="shared", hidden_dim=6)
    _, want = _train("eager", model_fn, x, **config)
    routes.clear()
    gb, got = _train("native", model_fn, x, **config)
    assert {bank.kernel_path() for bank in gb.banks.values()} == {"native"}
    for a_step, b_step in zip(got, want):
        for a, b in zip(a_step, b_step):  # float32 sums in another order: tolerance relative to each tensor
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()))
    in_place = {"linear": True, "linear-uncentred": True, "linear-edges": True, "shared": True, "conv2d": True}
    pushed_in_place = [ok for name, ok in routes if name == "push_from"]
    if in_place.get(case):
        assert pushed_in_place and all(pushed_in_place)
    elif case == "conv1d":
        assert not routes  # one bank holds a transposed weight: the tile route, for the whole bank
    else:  # stochastic: noise is added to tiles, so the push takes the tile route
        assert not any(pushed_in_place)


def test_kernel_choice(ext, monkeypatch):
    cpu, big = torch.device("cpu"), kernels.AUTO_COMPILE_MIN_NUMEL
    assert kernel_path("auto", big, cpu, torch.float32) == "native"
    assert kernel_path("native", 1, cpu, torch.float32) == "native"
    assert kernel_path("auto", 1, cpu, torch.float32) == "native"  # no compile cost per shape: any size
    assert kernel_path("auto", big - 1, cpu, torch.bfloat16) == "eager"
    assert kernel_path("compiled", big, cpu, torch.float32) == "compiled"
    assert kernel_path("auto", big, cpu, torch.bfloat16) == "compiled"
    assert kernel_path("auto", big, torch.device("meta"), torch.float32) == "compiled"
    monkeypatch.setenv("HF_GB_DISABLE_COMPILE", "1")
    assert kernel_path("native", big, cpu, torch.float32) == "eager"


def test_native_refused_off_cpu_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_native_refused", False)
    with caplog.at_level(logging.WARNING, logger="hf_gb.engine.kernels"):
        for _ in range(2):
            assert kernel_path("native", 1, torch.device("meta"), torch.float32) == "compiled"
    assert len([r for r in caplog.records if "CPU only" in r.getMessage()]) == 1


def test_build_failure_falls_back_with_one_warning(tmp_path, monkeypatch, caplog):
    import torch.utils.cpp_extension as cpp

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing built there
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_failed", False)
    monkeypatch.setattr(cpp, "load", broken)
    with caplog.at_level(logging.WARNING, logger="hf_gb.engine.native"):
        for _ in range(2):
            assert kernel_path("auto", 1 << 30, torch.device("cpu"), torch.float32) == "compiled"
    assert native.failed()
    messages = [r.getMessage() for r in caplog.records if "cannot be built" in r.getMessage()]
    assert len(messages) == 1 and "no C++ compiler" in messages[0]


def test_bad_tables_are_refused(ext):
    A, B, w2, G = _inputs(2, 3, 4, 5)
    with pytest.raises(RuntimeError, match="float32"):
        ext.forward(A.double(), B, w2, False)
    with pytest.raises(RuntimeError, match=r"A \(n, R, h\)"):
        ext.forward(A, B[:, :, :4], w2, False)
    with pytest.raises(RuntimeError, match="tile gradient"):
        ext.backward(A, B, w2, G[:, :2])
    rows = tile_rows([torch.zeros(3, 4, 1)], TileGeometry(3, 4))
    with pytest.raises(RuntimeError, match="offsets"):  # rows of one tile for tables of two
        ext.forward_into(A, B, w2, False, list(rows.tensors), rows.which, rows.offsets)


def test_path_names_pick_their_kernels(monkeypatch):
    """'eager' runs the eager kernels (a path name is not a truthy 'compile it'), and an unknown name is refused."""

    def no_compiling(*args):
        raise AssertionError("the compiled kernels ran for path 'eager'")

    monkeypatch.setattr(kernels, "_run_compiled", no_compiling)
    A, B, w2, G = _inputs(2, 3, 4, 5)
    want_out, want_grads = _reference(A, B, w2, G, center=False)
    _close(fused_forward(A, B, w2, compiled="eager"), want_out)
    for got, want in zip(fused_backward(A, B, w2, G, compiled="eager"), want_grads):
        _close(got, want)
    with pytest.raises(ValueError, match="kernel path"):
        fused_forward(A, B, w2, compiled="fast")


def test_ddp_on_the_native_kernels(tmp_path, ext, monkeypatch):
    """Two gloo processes on the native kernels (weights written and their DDP-averaged gradients read in place)
    end bit-identical, and match one process on the whole batch as the eager run does (test_accelerate_plugin)."""
    from accelerate.state import AcceleratorState, GradientState
    from test_accelerate_plugin import _SCRIPT, launch_two, loop, new_accelerator

    result = launch_two(_SCRIPT, str(tmp_path), env={"HF_GB_DISABLE_COMPILE": "0", "GB_TEST_KERNEL": "native"})
    assert "cannot be built" not in result.stderr
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for name in ("plain", "stochastic"):
        for k in rank0[name]:
            assert torch.equal(rank0[name][k], rank1[name][k]), f"{name} {k}"

    monkeypatch.setenv("GB_TEST_KERNEL", "native")
    try:
        accelerator = new_accelerator(loop.GRAD_ACCUM)
        plugin = loop.make_plugin()
        model, optimizer = loop.setup(accelerator, plugin, seed=100)  # rank 0's init, which prepare() broadcast
        assert {b.kernel_path() for b in plugin.bottleneck.banks.values()} == {"native"}
        loop.train(accelerator, plugin, model, optimizer, loop.STEPS)
        one = loop.snapshot(accelerator, plugin, model)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    # As in test_accelerate_plugin: the model to float tolerance, the g-nets loosely (Adam turns the rounding noise in
    # the null space of the centring into steps of a fraction of the LR; measured up to 5.0e-3 here).
    for k, v in one.items():
        tol = dict(rtol=0, atol=1e-2) if k.startswith("gnet.") else {}
        torch.testing.assert_close(v, rank0["plain"][k], msg=lambda m, k=k: f"{k}: {m}", **tol)


# ----------------------------------------------------------------------------- no build to predict
def test_prediction_without_gradients_never_waits_for_a_build(tmp_path, monkeypatch, caplog):
    """A fresh machine (empty extension cache): building a bottleneck, loading its checkpoint and a forward run
    eager without building (same logits); the first prediction for training builds, announced, in
    ``$TORCH_EXTENSIONS_DIR``."""
    from test_checkpoint import tiny_bottleneck

    import hf_gb

    cache = tmp_path / "extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(cache))
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_failed", False)
    builds = []

    def no_build(directory):
        builds.append(directory)
        raise RuntimeError("the test stops the build here")

    monkeypatch.setattr(native, "_build", no_build)
    gb = tiny_bottleneck(seed=0)  # init, calibration and first prediction: no gradient follows
    gb.save_pretrained(str(tmp_path / "ckpt"))
    model = hf_gb.load_compressed(str(tmp_path / "ckpt"))
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    gb.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gb.model(ids).logits, rtol=0, atol=0)
    assert builds == [] and not cache.exists()
    with caplog.at_level(logging.WARNING, logger="hf_gb.engine.native"):
        gb.predict_weights(keep_graph=True)  # training
    assert builds == [cache / native.build_directory().name]
    announced = [r.getMessage() for r in caplog.records if "building the native g-net kernel" in r.getMessage()]
    assert len(announced) == 1 and f"about {native.BUILD_SECONDS} s" in announced[0] and str(cache) in announced[0]


def test_prediction_without_gradients_takes_a_built_kernel(ext, monkeypatch):
    """A kernel built earlier (here: by the fixture) is loaded from its folder, without a build."""
    built = native.build_directory()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(built.parent))
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_build", lambda directory: pytest.fail("built again"))
    with kernels.prediction_only():
        assert kernel_path("auto", 1, torch.device("cpu"), torch.float32) == "native"
    A, B, w2, G = _inputs(2, 3, 4, 5)
    _close(fused_forward(A, B, w2, compiled="native"), _reference(A, B, w2, G, center=False)[0])
