"""sparseflow_core.stats on crafted inputs with hand-computed densities."""

from __future__ import annotations

import pytest
import torch

from sparseflow_core.stats import block_density, block_mask, element_density, is_integer_valued, silent_planes


def test_element_density_counts_nonzeros():
    x = torch.zeros(2, 3, 2, 2)  # 24 elements
    x[0, 0, 0, 0] = 1.0
    x[1, 2, 1, 1] = -2.5
    x[0, 1, 1, 0] = float("nan")  # NaN is not zero
    assert element_density(x) == pytest.approx(3 / 24)
    assert element_density(torch.ones(5)) == 1.0
    assert element_density(torch.zeros(4, 4)) == 0.0
    assert element_density(torch.zeros(0, 3)) == 0.0
    assert element_density(torch.tensor([-0.0, 0.0, 1.0, 0.0])) == pytest.approx(0.25)


@pytest.mark.parametrize(
    "values,expected",
    [
        ([0.0, 1.0, 1.0, 0.0], True),  # spikes
        ([0.0, 2.0, 3.0, -1.0], True),  # SEW-style sums and differences
        ([0.0, 0.5, 1.0], False),
        ([1.0, float("inf")], False),
        ([1.0, float("nan")], False),
        ([1e-7], False),
    ],
    ids=["spikes", "counts", "half", "inf", "nan", "tiny"],
)
def test_is_integer_valued(values, expected):
    x = torch.tensor(values)
    assert is_integer_valued(x) is expected
    assert is_integer_valued(x.half()) is expected


def test_is_integer_valued_integer_dtypes():
    assert is_integer_valued(torch.tensor([1, 5, -3]))
    assert is_integer_valued(torch.tensor([True, False]))


def test_block_mask_single_pixel_halo_spans_four_tiles():
    """A non-zero at (7, 7) of a 16x16 map: a 3x3 stride-1 consumer reads it from output pixels 6..8 x 6..8,
    which lie in all four 8x8 output tiles; channel 0 is group 0 of two groups (C = 20)."""
    x = torch.zeros(1, 20, 16, 16)
    x[0, 0, 7, 7] = 1.0
    m = block_mask(x, tile=8, group=16, kernel=3, stride=1)
    assert m.shape == (1, 2, 2, 2) and m.dtype == torch.bool
    assert m[0, 0].all() and not m[0, 1].any()
    assert block_density(x, tile=8, group=16, kernel=3) == pytest.approx(4 / 8)
    # a 1x1 consumer has no halo: only the tile holding the pixel
    m1 = block_mask(x, tile=8, group=16, kernel=1, stride=1)
    assert m1[0, 0].tolist() == [[True, False], [False, False]]
    assert block_density(x, tile=8, group=16, kernel=1) == pytest.approx(1 / 8)


def test_block_mask_interior_pixel_partial_group():
    """Channel 17 is in the second group (padded to 32 channels); pixel (3, 3) stays inside tile (0, 0)."""
    x = torch.zeros(1, 20, 16, 16)
    x[0, 17, 3, 3] = -1.0
    m = block_mask(x, tile=8, group=16, kernel=3)
    assert m.sum() == 1 and m[0, 1, 0, 0]
    assert block_density(x, 8, 16, 3) == pytest.approx(1 / 8)


def test_block_mask_stride2():
    """3x3 stride 2 pad 1 on 16x16: output 8x8; input pixel (8, 8) is read only by output pixel (4, 4),
    which is in 4x4 tile (1, 1)."""
    x = torch.zeros(1, 20, 16, 16)
    x[0, 2, 8, 8] = 1.0
    m = block_mask(x, tile=4, group=16, kernel=3, stride=2, padding=1)
    assert m.shape == (1, 2, 2, 2)
    assert m.sum() == 1 and m[0, 0, 1, 1]
    # input pixel (7, 7) is read by output pixels 3..4 x 3..4: all four tiles
    x2 = torch.zeros(1, 20, 16, 16)
    x2[0, 2, 7, 7] = 1.0
    assert block_mask(x2, tile=4, group=16, kernel=3, stride=2, padding=1)[0, 0].all()


def test_block_mask_partial_tiles_and_batch():
    """13x13 map, tile 8: 2x2 tiles with partial ones (ceil mode); samples are separate."""
    x = torch.zeros(2, 16, 13, 13)
    x[1, 5, 12, 12] = 1.0  # bottom-right corner: output pixels 11..12 -> tile (1, 1) only
    m = block_mask(x, tile=8, group=16, kernel=3)
    assert m.shape == (2, 1, 2, 2)
    assert not m[0].any()
    assert m[1, 0].tolist() == [[False, False], [False, True]]
    assert block_density(x, 8, 16, 3) == pytest.approx(1 / 8)


def test_block_density_bounds():
    assert block_density(torch.zeros(0, 4, 8, 8)) == 0.0
    assert block_density(torch.zeros(2, 4, 8, 8)) == 0.0
    assert block_density(torch.ones(2, 40, 9, 9)) == 1.0


def test_silent_planes():
    x = torch.zeros(2, 3, 4, 4)
    x[0, 0, 1, 2] = 1.0
    x[1, 2, 3, 3] = float("nan")
    assert silent_planes(x) == pytest.approx(4 / 6)
    assert silent_planes(torch.ones(1, 5, 2, 2)) == 0.0
    assert silent_planes(torch.zeros(0, 5, 2, 2)) == 0.0
