"""prescan edge codes on crafted inputs, against a plain-torch reference, and the consumer's halo: exact
(sparse == dense for non-zeros on tile borders) and tight (it tests edge/corner bits, not whole tiles)."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_conv_close

from sparseflow_kernels import Occupancy, prescan, sparse_conv2d
from sparseflow_kernels.naive import as_float64, conv2d_reference, prescan_reference
from sparseflow_kernels.occupancy import (
    CODE_ANY,
    CODE_BL,
    CODE_BOTTOM,
    CODE_BR,
    CODE_LEFT,
    CODE_RIGHT,
    CODE_TL,
    CODE_TOP,
    CODE_TR,
)

# -------------------------------------------------------------------------------- crafted single pixels

# (row, col) inside an 8x8 tile -> expected code
POSITIONS = {
    "top-left-corner": ((0, 0), CODE_ANY | CODE_TOP | CODE_LEFT | CODE_TL),
    "top-right-corner": ((0, 7), CODE_ANY | CODE_TOP | CODE_RIGHT | CODE_TR),
    "bottom-left-corner": ((7, 0), CODE_ANY | CODE_BOTTOM | CODE_LEFT | CODE_BL),
    "bottom-right-corner": ((7, 7), CODE_ANY | CODE_BOTTOM | CODE_RIGHT | CODE_BR),
    "top-edge": ((0, 3), CODE_ANY | CODE_TOP),
    "bottom-edge": ((7, 5), CODE_ANY | CODE_BOTTOM),
    "left-edge": ((4, 0), CODE_ANY | CODE_LEFT),
    "right-edge": ((2, 7), CODE_ANY | CODE_RIGHT),
    "middle": ((3, 4), CODE_ANY),
}


def test_single_pixel_codes():
    """Sample i holds one non-zero at position i (tile (1, 0), channel 21 = group 1): exact code there,
    zero everywhere else."""
    names = list(POSITIONS)
    x = torch.zeros(len(names), 24, 16, 13)
    for i, name in enumerate(names):
        (r, c), _ = POSITIONS[name]
        x[i, 21, 8 + r, c] = 0.5
    occ = prescan(x, 8, 16)
    assert occ.codes.dtype == torch.int16
    assert occ.codes.shape == (len(names), 2, 2, 2)
    assert occ.shape == (len(names), 24, 16, 13) and occ.tile == (8, 8) and occ.group == 16
    for i, name in enumerate(names):
        expected = torch.zeros(2, 2, 2, dtype=torch.int16)
        expected[1, 0, 1] = POSITIONS[name][1]
        assert torch.equal(occ.codes[i], expected), (name, occ.codes[i])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), -3.0, 1e-30],
                         ids=["nan", "inf", "-inf", "negative", "tiny"])
def test_special_values_count_as_nonzero(value):
    x = torch.zeros(1, 16, 8, 8)
    x[0, 0, 0, 0] = value
    occ = prescan(x, 8, 16)
    assert int(occ.codes[0, 0, 0, 0]) == CODE_ANY | CODE_TOP | CODE_LEFT | CODE_TL


def test_negative_zero_counts_as_zero():
    x = torch.zeros(1, 16, 8, 8)
    x[0, 3, 4, 4] = -0.0
    assert int(prescan(x, 8, 16).codes.abs().sum()) == 0


def test_partial_edge_tiles():
    """H = W = 13: the second tile row/column has 5 valid rows/cols; its last valid row is not its
    bottom row, so a non-zero there sets no bottom/right bit."""
    x = torch.zeros(4, 20, 13, 13)
    x[0, 0, 12, 12] = 1  # last valid pixel of tile (1, 1): not its bottom-right corner
    x[1, 19, 8, 12] = 1  # top row of tile (1, 1), channel 19 in the partial group 1
    x[2, 5, 12, 8] = 1  # left column of tile (1, 1)
    x[3, 16, 8, 8] = 1  # top-left corner of tile (1, 1), group 1
    occ = prescan(x, 8, 16)
    assert occ.codes.shape == (4, 2, 2, 2)
    expect = torch.zeros(4, 2, 2, 2, dtype=torch.int16)
    expect[0, 1, 1, 0] = CODE_ANY
    expect[1, 1, 1, 1] = CODE_ANY | CODE_TOP
    expect[2, 1, 1, 0] = CODE_ANY | CODE_LEFT
    expect[3, 1, 1, 1] = CODE_ANY | CODE_TOP | CODE_LEFT | CODE_TL
    assert torch.equal(occ.codes, expect)


def test_rectangular_tile_and_other_groups():
    x = torch.zeros(1, 33, 9, 9)
    x[0, 32, 3, 8] = 1  # group 4 (of 8 channels), tile (0, 2) of 4x4 tiles: row 3 = bottom, col 8 = left
    occ = prescan(x, (4, 4), 8)
    assert occ.codes.shape == (1, 3, 3, 5)
    nz = (occ.codes != 0).nonzero().tolist()
    assert nz == [[0, 0, 2, 4]]
    assert int(occ.codes[0, 0, 2, 4]) == CODE_ANY | CODE_BOTTOM | CODE_LEFT | CODE_BL


SHAPES = {
    "B2-C20-13x13-t8-g16": ((2, 20, 13, 13), 8, 16),
    "B3-C40-9x17-t8-g16": ((3, 40, 9, 17), 8, 16),
    "B1-C70-11x7-t16-g16": ((1, 70, 11, 7), 16, 16),
    "B2-C24-12x10-t4x8-g8": ((2, 24, 12, 10), (4, 8), 8),
    "B1-C5-6x6-t2-g32": ((1, 5, 6, 6), 2, 32),
    "B1-C300-5x6-t4-g16": ((1, 300, 5, 6), 4, 16),  # 19 groups over several programs
}


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided-view"])
@pytest.mark.parametrize("case", list(SHAPES.values()), ids=list(SHAPES))
def test_codes_match_reference(case, layout):
    shape, tile, group = case
    B, C, H, W = shape
    if layout == "strided-view":
        x = (torch.rand(B, C, 2 * H, W) < 0.03).float()[:, :, ::2]
    else:
        x = (torch.rand(shape) < 0.03).float()
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
    x[0, 0, 0, 0] = float("nan")
    occ = prescan(x, tile, group)
    ref = prescan_reference(x, tile, group)
    assert torch.equal(occ.codes, ref)
    assert 0.0 < occ.block_density() <= 1.0
    assert occ.block_density() == pytest.approx(float((ref & CODE_ANY).ne(0).float().mean()))


def test_prescan_errors(monkeypatch):
    with pytest.raises(ValueError, match="4-D"):
        prescan(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="power of two"):
        prescan(torch.zeros(1, 4, 8, 8), 6)
    with pytest.raises(ValueError, match="power of two"):
        prescan(torch.zeros(1, 4, 8, 8), 8, 12)
    with pytest.raises(TypeError, match="dtype"):
        prescan(torch.zeros(1, 4, 8, 8, dtype=torch.float64))


def test_occupancy_check_matches():
    occ = prescan(torch.zeros(1, 20, 9, 9), 8, 16)
    occ.check_matches("op", (1, 20, 9, 9), 16)
    with pytest.raises(ValueError, match="shape"):
        occ.check_matches("op", (1, 20, 9, 10), 16)
    with pytest.raises(ValueError, match="group"):
        occ.check_matches("op", (1, 20, 9, 9), 32)


# ------------------------------------------------------------------------------------- consumer halo

# consumer convolutions: (KH, KW), stride, padding, dilation
CONSUMERS = {
    "3x3-s1": ((3, 3), 1, 1, 1),
    "3x3-s2": ((3, 3), 2, 1, 1),
    "3x3-s(1,2)": ((3, 3), (1, 2), 1, 1),
    "3x3-s1-p0": ((3, 3), 1, 0, 1),
    "1x1-s1": ((1, 1), 1, 0, 1),
    "5x5-s1": ((5, 5), 1, 2, 1),
    "3x3-d2": ((3, 3), 1, 2, 2),
}


def border_input(B, C, H, W, tile=8, density=0.15):
    """Non-zeros only on the border rows/columns of the producer's tiles."""
    r = torch.arange(H) % tile
    c = torch.arange(W) % tile
    border = ((r == 0) | (r == tile - 1))[:, None] | ((c == 0) | (c == tile - 1))[None, :]
    x = (torch.rand(B, C, H, W) < density).float() * border
    x[:, 16:32] *= torch.rand(B, 1, H, W) < 0.3  # thinner second group
    return x


HALO_CASES = [(c, pt) for c in CONSUMERS for pt in ("occ8", "occ4", "occ16x8")
              if pt == "occ8" or c in ("3x3-s1", "3x3-s2")]
PRODUCER_TILES = {"occ8": 8, "occ4": 4, "occ16x8": (16, 8)}


@pytest.mark.parametrize("consumer,producer", HALO_CASES, ids=[f"{c}-{p}" for c, p in HALO_CASES])
def test_halo_exact_on_tile_borders(consumer, producer):
    k, stride, padding, dilation = CONSUMERS[consumer]
    producer_tile = PRODUCER_TILES[producer]
    pt = producer_tile if isinstance(producer_tile, int) else producer_tile[1]
    x = border_input(1, 32, 17, 12, tile=pt)
    w = torch.randn(16, 32, *k)
    b = torch.randn(16)
    occ = prescan(x, producer_tile, 16)
    ys = sparse_conv2d(x, w, b, stride, padding, dilation, occupancy=occ, block_size=8)
    yd = sparse_conv2d(x, w, b, stride, padding, dilation, dense=True, block_size=8)
    assert torch.equal(ys, yd)
    assert_conv_close(ys, conv2d_reference(*as_float64(x, w, b), stride, padding, dilation), torch.float32)


@pytest.mark.parametrize("stride", [1, 2], ids=["s1", "s2"])
def test_halo_exact_single_border_pixels(stride):
    """One non-zero per sample, at every kind of border position of tile (1, 1) and its neighbours."""
    spots = [(8, 8), (8, 15), (15, 8), (15, 15), (7, 7), (7, 8), (8, 7), (12, 15), (15, 12)]
    x = torch.zeros(len(spots), 16, 16, 16)
    for i, (r, c) in enumerate(spots):
        x[i, i % 16, r, c] = 1.0 + i
    w = torch.randn(8, 16, 3, 3)
    b = torch.randn(8)
    ys = sparse_conv2d(x, w, b, stride, 1, block_size=8)
    assert_conv_close(ys, conv2d_reference(*as_float64(x, w, b), stride, 1), torch.float32)


def _lie(occ: Occupancy, idx, code) -> Occupancy:
    codes = occ.codes.clone()
    codes[idx] = code
    return Occupancy(codes, occ.shape, occ.tile, occ.group)


def test_halo_tests_edge_bit_not_whole_tile():
    """A 3x3 stride-1 consumer reads only the left column of the right neighbour tile: it must decide by
    that tile's LEFT bit. Codes that keep ANY but drop LEFT make the left output tile skip the group."""
    x = torch.zeros(1, 16, 16, 16)
    x[0, 5, 3, 8] = 2.0  # left column of tile (0, 1)
    w, b = torch.randn(4, 16, 3, 3), torch.randn(4)
    occ = prescan(x, 8, 16)
    assert int(occ.codes[0, 0, 1, 0]) == CODE_ANY | CODE_LEFT
    ref = conv2d_reference(*as_float64(x, w, b), 1, 1)
    y = sparse_conv2d(x, w, b, 1, 1, occupancy=_lie(occ, (0, 0, 1, 0), CODE_ANY), block_size=8)
    bias = b.double().view(1, -1, 1, 1).expand(1, 4, 16, 8)
    torch.testing.assert_close(y[..., :8].double(), bias, rtol=0, atol=0)  # skipped: the left tile
    torch.testing.assert_close(y[..., 8:].double(), ref[..., 8:], rtol=1e-6, atol=1e-6)
    assert (ref[..., 7] - bias[..., 7]).abs().max() > 1e-3  # the skipped tile did see the pixel


def test_halo_tests_corner_bit():
    """The bottom-right output tile of a 3x3 consumer reads only the bottom-right corner pixel of the
    top-left producer tile: its decision is the BR corner bit (edges decide the other two neighbours)."""
    x = torch.zeros(1, 16, 16, 16)
    x[0, 9, 7, 7] = -1.5
    w, b = torch.randn(4, 16, 3, 3), torch.randn(4)
    occ = prescan(x, 8, 16)
    full = CODE_ANY | CODE_BOTTOM | CODE_RIGHT | CODE_BR
    assert int(occ.codes[0, 0, 0, 0]) == full
    ref = conv2d_reference(*as_float64(x, w, b), 1, 1)
    y = sparse_conv2d(x, w, b, 1, 1, occupancy=_lie(occ, (0, 0, 0, 0), full & ~CODE_BR), block_size=8)
    expect = ref.clone()
    expect[..., 8:, 8:] = b.double().view(1, -1, 1, 1)
    torch.testing.assert_close(y.double(), expect, rtol=1e-6, atol=1e-6)
    assert (ref[..., 8, 8] - b.double()).abs().max() > 1e-3


def test_halo_stride2_uses_bottom_bit():
    """Stride 2: output tile row 1 (rows 8..15) starts at input row 15, the bottom row of input tile row 1."""
    x = torch.zeros(1, 16, 32, 16)
    x[0, 2, 15, 3] = 1.0
    w, b = torch.randn(4, 16, 3, 3), torch.randn(4)
    occ = prescan(x, 8, 16)
    assert int(occ.codes[0, 1, 0, 0]) == CODE_ANY | CODE_BOTTOM
    ref = conv2d_reference(*as_float64(x, w, b), 2, 1)
    y = sparse_conv2d(x, w, b, 2, 1, occupancy=_lie(occ, (0, 1, 0, 0), CODE_ANY), block_size=8)
    torch.testing.assert_close(y[..., :8, :].double(), ref[..., :8, :], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y[..., 8:, :].double(), b.double().view(1, -1, 1, 1).expand(1, 4, 8, 8),
                               rtol=0, atol=0)
    assert (ref[..., 8, :] - b.double().view(1, -1, 1)).abs().max() > 1e-3
