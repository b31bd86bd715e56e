"""max_pool2d against F.max_pool2d in float64: layouts, odd shapes, padding, dilation, ceil_mode, NaN/inf."""

import pytest
import torch

from sparseflow_kernels.naive import max_pool2d_reference
from sparseflow_kernels.pool import max_pool2d

CASES = [  # (N, C, H, W, kernel, stride, padding, dilation, ceil_mode)
    (2, 5, 13, 11, 3, 2, 1, 1, False),  # the ResNet stem pool on an odd map
    (1, 3, 7, 9, 2, 2, 0, 1, True),
    (3, 1, 6, 5, 3, 1, 1, 1, False),
    (2, 7, 10, 10, 3, 3, 1, 2, True),
    (1, 70, 5, 6, (2, 3), (1, 2), (1, 0), 1, False),  # more channels than one channel block
    (1, 2, 1, 1, 1, 1, 0, 1, False),
]


def _ids(c):
    return "N{}C{}H{}W{}-k{}s{}p{}d{}{}".format(*c[:8], "-ceil" if c[8] else "")


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_max_pool2d_matches_torch(case, layout, dtype):
    N, C, H, W, k, s, p, d, ceil = case
    x = torch.randn(N, C, H, W).to(dtype)
    x[torch.rand_like(x, dtype=torch.float32) < 0.3] = 0  # ties and zeros between values
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    ref = max_pool2d_reference(x.double(), k, s, p, d, ceil)
    y = max_pool2d(x, k, s, p, d, ceil)
    assert y.dtype == dtype and y.shape == ref.shape
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)  # the layout is kept
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=0)


def test_max_pool2d_spikes_and_specials():
    x = (torch.rand(2, 4, 9, 9) < 0.1).float()  # binary spikes, mostly zero
    x[0, 1, 3, 3] = float("nan")
    x[1, 2, 0, 0] = float("-inf")
    x[1, 3, 5, 5] = float("inf")
    x[1, 0] = 2.0  # non-binary (SEW adds)
    ref = max_pool2d_reference(x, 3, 2, 1)
    y = max_pool2d(x, 3, 2, 1)
    torch.testing.assert_close(y, ref, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(y[0, 1]).any()
    # 3-D input ([C, H, W])
    torch.testing.assert_close(max_pool2d(x[0], 2), max_pool2d_reference(x[0], 2), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.randn(4, 4)), "expected"),
    (dict(x=torch.randn(1, 1, 4, 4), kernel_size=2, padding=2), "padding"),
    (dict(x=torch.randn(1, 1, 4, 4).long(), kernel_size=2), "dtype"),
    (dict(x=torch.randn(1, 1, 2, 2), kernel_size=3), "too small"),
])
def test_max_pool2d_bad_input(bad, match):
    kw = {"kernel_size": 2, **bad}
    with pytest.raises((ValueError, TypeError), match=match):
        max_pool2d(kw.pop("x"), **kw)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_max_pool2d_shift_equals_pool_of_shifted(layout, dtype):
    """``shift``: max_pool2d(x) + shift[c] is exactly max_pool2d(x + shift[c]) (a folded bias added after the
    pool), NaN and infinities included."""
    x = torch.randn(2, 70, 11, 9).to(dtype)
    x[0, 1, 3, 3] = float("nan")
    x[1, 2, 0, 0] = float("-inf")
    x[1, 3, 5, 5] = float("inf")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    shift = (torch.randn(70) * 3).to(dtype)
    ref = max_pool2d_reference(x + shift.view(-1, 1, 1), 3, 2, 1)  # the bias added in the storage dtype, then pooled
    y = max_pool2d(x, 3, 2, 1, shift=shift)
    torch.testing.assert_close(y, ref, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match="shift must have shape"):
        max_pool2d(x, 3, 2, 1, shift=shift[:5])
