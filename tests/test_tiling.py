import math

import pytest
import torch
from torch import nn

from hf_gb import GBConfig
from hf_gb.engine.codes import FOURIER_PAIRS, code_width, num_bits, position_codes
from hf_gb.engine.families import MLPBank
from hf_gb.engine.layers import view3d
from hf_gb.engine.tiling import (
    TileGeometry,
    choose_geometry,
    compression_of,
    grid,
    tile,
    tile_into,
    untile,
    untile_into,
)


class FakeConv1D(nn.Module):
    """Stand-in for transformers' GPT-2 Conv1D: weight stored (in, out)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))


# (module, layout, tile rows, tile cols): every covered layout, awkward shapes, tiles that do and do not divide.
CASES = [
    (lambda: nn.Linear(5, 7), "matrix", 3, 2),
    (lambda: nn.Linear(8, 6), "matrix", 3, 4),  # divides exactly
    (lambda: nn.Linear(9, 1), "matrix", 1, 4),  # 1 x N
    (lambda: nn.Linear(1, 9), "matrix", 4, 1),  # N x 1
    (lambda: nn.Linear(1, 1), "matrix", 1, 1),
    (lambda: nn.Linear(13, 11), "matrix", 16, 16),  # tile larger than the tensor
    (lambda: nn.Embedding(10, 6), "matrix", 4, 4),
    (lambda: nn.Conv1d(3, 5, 3), "kernel", 2, 2),
    (lambda: nn.Conv2d(3, 4, 1), "kernel", 3, 2),  # 1x1 kernel
    (lambda: nn.Conv2d(3, 5, 3), "kernel", 2, 3),  # 3x3 kernel
    (lambda: nn.Conv2d(4, 6, 3, groups=2), "kernel", 3, 2),
    (lambda: nn.Conv3d(2, 3, 3), "kernel", 2, 2),  # 3x3x3 kernel
    (lambda: nn.Conv3d(4, 4, (1, 2, 3)), "kernel", 4, 4),
    (lambda: FakeConv1D(7, 5), "transposed", 3, 2),
    (lambda: FakeConv1D(8, 4), "transposed", 4, 2),  # divides exactly, non-contiguous view
]


def _ids(case):
    m = case[0]()
    return f"{type(m).__name__}{tuple(m.weight.shape)}-{case[2]}x{case[3]}"


@pytest.mark.parametrize("make,layout,rows,cols", CASES, ids=[_ids(c) for c in CASES])
def test_tile_untile_round_trip(make, layout, rows, cols):
    weight = make().weight.detach()
    w = view3d(weight, layout)
    out, inp, k = w.shape
    geom = TileGeometry(min(rows, out), min(cols, inp), k)
    tiles = tile(w, geom)
    nr, nc = grid(w.shape, geom)
    assert tiles.shape == (nr * nc, geom.rows, geom.cols * k)
    assert torch.equal(untile(tiles, w.shape, geom), w)
    # Tile order is row-major over the grid, kernel positions innermost in a tile row; padding is zero.
    for t in range(nr * nc):
        r0, c0 = (t // nc) * geom.rows, (t % nc) * geom.cols
        block = tiles[t].reshape(geom.rows, geom.cols, k)
        valid = w[r0 : r0 + geom.rows, c0 : c0 + geom.cols]
        assert torch.equal(block[: valid.shape[0], : valid.shape[1]], valid)
        padding = block.clone()
        padding[: valid.shape[0], : valid.shape[1]] = 0
        assert torch.count_nonzero(padding) == 0
    # The single-copy variants used by the bottleneck agree with tile/untile.
    dst = torch.full_like(tiles, math.nan)
    tile_into(dst, w, geom)
    assert torch.equal(dst, tiles)
    target = torch.zeros_like(weight)
    untile_into(view3d(target, layout), tiles, geom)
    assert torch.equal(target, weight)


def test_view3d_shares_memory():
    conv = nn.Conv2d(2, 3, 3)
    gpt = FakeConv1D(4, 6)
    assert view3d(conv.weight, "kernel").shape == (3, 2, 9)
    assert view3d(gpt.weight, "transposed").shape == (4, 6, 1)
    with torch.no_grad():
        view3d(gpt.weight, "transposed")[1, 2, 0] = 42.0
    assert gpt.weight[2, 1] == 42.0


@pytest.mark.parametrize("size,bits", [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (128, 7), (129, 8), (1024, 10)])
def test_num_bits(size, bits):
    assert num_bits(size) == bits


@pytest.mark.parametrize("encoding", ["binary", "gray"])
@pytest.mark.parametrize("size", [1, 2, 5, 16, 100])
def test_position_codes_are_distinct_pm1(encoding, size):
    codes = position_codes(size, encoding)
    assert codes.shape == (size, num_bits(size))
    assert set(codes.unique().tolist()) <= {-1.0, 1.0}
    assert len({tuple(c) for c in codes.tolist()}) == size


@pytest.mark.parametrize("size", [1, 2, 5, 16, 100])
def test_fourier_codes_are_the_bits_and_smooth_pairs(size):
    codes = position_codes(size, "fourier")
    pairs = min(FOURIER_PAIRS, num_bits(size))
    assert codes.shape == (size, code_width(size, "fourier")) == (size, num_bits(size) + 2 * pairs)
    assert torch.equal(codes[:, : num_bits(size)], position_codes(size))  # the binary bits come first
    if not pairs:  # one position: nothing to code
        return
    sin, cos = codes[:, num_bits(size) :].split(pairs, dim=1)
    torch.testing.assert_close(sin**2 + cos**2, torch.ones_like(sin))
    if size > 1:  # the lowest frequency is monotone in the position: smooth, unlike any single bit
        assert bool((cos[1:, 0] < cos[:-1, 0]).all())


def test_binary_codes_lsb_first():
    assert position_codes(8)[5].tolist() == [1.0, -1.0, 1.0]  # 5 = 0b101
    assert position_codes(8)[6].tolist() == [-1.0, 1.0, 1.0]  # 6 = 0b110


def test_gray_codes_change_one_bit_per_step():
    codes = position_codes(64, "gray")
    changes = (codes[1:] != codes[:-1]).sum(1)
    assert torch.equal(changes, torch.ones(63, dtype=changes.dtype))
    binary_changes = (position_codes(64)[1:] != position_codes(64)[:-1]).sum(1)
    assert binary_changes.max() > 1  # the two encodings really differ


def test_unknown_encoding():
    with pytest.raises(ValueError, match="encoding='hex'"):
        position_codes(4, "hex")


@pytest.mark.parametrize("center", [True, False], ids=["centred", "uncentred"])
@pytest.mark.parametrize(
    "geom,h,params",
    [
        (TileGeometry(100, 100), 32, (14 + 2) * 32),  # about 20x
        (TileGeometry(1024, 1024), 32, (20 + 2) * 32),  # about 1,500x
        (TileGeometry(16, 8, 9), 4, (4 + 3 + 9 + 2) * 4),  # one bit per kernel position
        (TileGeometry(1, 1), 8, 2 * 8),
    ],
)
def test_mlp_params_per_tile(geom, h, params, center):
    # First layer (row + col + kernel bits, bias) and output weights; b2 only without centring (which removes it).
    config = GBConfig(hidden_dim=h, center=center)
    assert MLPBank.params_per_tile(geom, config) == params + (0 if center else 1)
    assert MLPBank.params_per_tile(geom, GBConfig(hidden_dim=h, center=center, stochastic=True)) == (
        params + (0 if center else 1) + 1  # the learned noise scale
    )
    bank = MLPBank(geom, 3, config, torch.Generator().manual_seed(0))
    assert bank.num_gnet_params() == 3 * MLPBank.params_per_tile(geom, config)


def _mlp(h):
    return lambda g: MLPBank.params_per_tile(g, GBConfig(hidden_dim=h))


def test_compression_of():
    geom = TileGeometry(100, 100)
    assert compression_of((100, 100, 1), geom, 512) == pytest.approx(10000 / 512)
    assert compression_of((150, 100, 1), geom, 512) == pytest.approx(15000 / (2 * 512))  # padded tile still costs


@pytest.mark.parametrize("shape", [(1024, 1024, 1), (768, 3072, 1), (3072, 768, 1), (256, 128, 9), (500, 300, 1)])
@pytest.mark.parametrize("target", [10.0, 50.0, 200.0])
def test_choose_geometry_meets_target(shape, target):
    geom = choose_geometry(shape, _mlp(32), target, None)
    assert geom.kernel == shape[2] and geom.rows <= shape[0] and geom.cols <= shape[1]
    ratio = compression_of(shape, geom, _mlp(32)(geom))
    assert abs(math.log(ratio / target)) < math.log(1.2), (geom, ratio)


def test_choose_geometry_explicit_tile_is_clipped():
    assert choose_geometry((10, 300, 1), _mlp(32), None, [64, 64]) == TileGeometry(10, 64, 1)
    assert choose_geometry((10, 300, 9), _mlp(32), 50.0, [4, 8]) == TileGeometry(4, 8, 9)  # tile_size wins


def test_choose_geometry_unreachable_target_takes_closest():
    geom = choose_geometry((16, 16, 1), _mlp(32), 1000.0, None)
    assert geom == TileGeometry(16, 16, 1)  # the largest tile is the best this tensor can do
