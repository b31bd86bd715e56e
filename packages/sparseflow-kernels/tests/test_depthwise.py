"""grouped_conv2d (depthwise and grouped convolution) against float64 F.conv2d: geometries (channel multiplier 1
and 2, 3x3 / 5x5, stride 1 / 2, odd sizes), both paths (direct kernel, tensor-core kernel per group), input
kinds, layouts, dtypes, the affine epilogue, NaN/Inf propagation, trust in the occupancy and argument errors.
Runs under TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import TOL, rel_err

from sparseflow_kernels import depthwise as kdw
from sparseflow_kernels.depthwise import DepthwiseConfig, grouped_conv2d
from sparseflow_kernels.naive import as_float64, conv2d_reference
from sparseflow_kernels.occupancy import Occupancy, prescan


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Outputs start as NaN: an element the kernel forgets to write fails the comparison."""
    orig = kdw.empty_like_layout

    def nan_out(*a, **k):
        return orig(*a, **k).fill_(float("nan"))

    monkeypatch.setattr(kdw, "empty_like_layout", nan_out)


def make_input(kind, shape, dtype=torch.float32):
    if kind == "spikes":
        x = (torch.rand(shape) < 0.2).float()
        x[..., : shape[-2] // 2, :] = 0  # silent tiles next to active ones (skip + halo)
    elif kind == "counts012":  # SEW sums of spikes
        x = torch.randint(0, 3, shape).float() * (torch.rand(shape) < 0.3)
    elif kind == "real-dense":
        x = torch.randn(shape)
    elif kind == "ones":
        x = torch.ones(shape)
    elif kind == "one-spike-at-tile-corner":  # only the halo of neighbouring tiles sees it
        x = torch.zeros(shape)
        x[0, 0, min(7, shape[2] - 1), min(8, shape[3] - 1)] = 1.0
    else:
        raise ValueError(kind)
    return x.to(dtype)


def check(y, ref, dtype):
    assert y.shape == ref.shape, (tuple(y.shape), tuple(ref.shape))
    assert y.dtype == dtype
    assert torch.isfinite(y).all(), "NaN/Inf in the output of a finite input (unwritten element)"
    err = rel_err(y, ref)
    assert err < TOL[dtype], f"relative error {err:.3e} >= {TOL[dtype]:.0e}"


# (N, C, CO, H, W, k, stride, padding, dilation, groups, bias)
GEOMETRIES = {
    "dw-m1-k3-s1-pad1": (2, 12, 12, 11, 13, 3, 1, 1, 1, 12, True),
    "dw-m1-k3-s2-pad1": (1, 12, 12, 13, 12, 3, 2, 1, 1, 12, True),
    "dw-m2-k3-s1-pad1": (1, 6, 12, 9, 10, 3, 1, 1, 1, 6, True),
    "dw-m2-k3-s2-pad1-nobias": (2, 5, 10, 11, 9, 3, 2, 1, 1, 5, False),
    "dw-m1-k5-s1-pad2": (1, 12, 12, 11, 11, 5, 1, 2, 1, 12, True),
    "dw-m1-k5-s2-pad2": (1, 7, 7, 13, 13, 5, 2, 2, 1, 7, True),
    "dw-m2-k5-s2-pad2": (1, 4, 8, 12, 11, 5, 2, 2, 1, 4, True),
    "dw-k3-pad0": (1, 9, 9, 9, 10, 3, 1, 0, 1, 9, True),
    "dw-k3-p(2,0)-s(1,2)": (1, 9, 9, 9, 10, 3, (1, 2), (2, 0), 1, 9, True),
    "dw-k3-d2-pad2": (1, 8, 8, 11, 11, 3, 1, 2, 2, 8, True),
    "dw-C1-H1-W9": (2, 1, 1, 1, 9, (1, 3), 1, (0, 1), 1, 1, True),
    "dw-C37-odd": (1, 37, 37, 7, 5, 3, 1, 1, 1, 37, False),
    "grouped-direct-g2-C8": (1, 8, 6, 9, 9, 3, 1, 1, 1, 2, True),
    "grouped-direct-g3-C9-CO6": (1, 9, 6, 8, 7, 3, 2, 1, 1, 3, True),
    "grouped-gemm-g2-C40-CO24": (1, 40, 24, 9, 9, 3, 1, 1, 1, 2, True),
    "grouped-gemm-g2-C32-k1": (2, 32, 32, 7, 6, 1, 1, 0, 1, 2, False),
}


@pytest.mark.parametrize("geom", list(GEOMETRIES), ids=list(GEOMETRIES))
def test_geometry(geom):
    N, C, CO, H, W, k, s, p, d, g, bias = GEOMETRIES[geom]
    k = (k, k) if isinstance(k, int) else k
    x = make_input("spikes", (N, C, H, W))
    w = torch.randn(CO, C // g, *k)
    b = torch.randn(CO) if bias else None
    check(grouped_conv2d(x, w, b, s, p, d, g), conv2d_reference(*as_float64(x, w, b), s, p, d, g), torch.float32)


KINDS = ["spikes", "counts012", "real-dense", "ones", "one-spike-at-tile-corner"]


@pytest.mark.parametrize("kind,path", [(k, "direct") for k in KINDS] + [(k, "gemm") for k in KINDS[1::2]])
def test_input_kinds(kind, path):
    C, CO, g = (8, 16, 8) if path == "direct" else (32, 32, 2)
    x = make_input(kind, (1, C, 9, 10))
    w, b = torch.randn(CO, C // g, 3, 3), torch.randn(CO)
    ref = conv2d_reference(*as_float64(x, w, b), 1, 1, 1, g)
    check(grouped_conv2d(x, w, b, 1, 1, 1, g, path=path), ref, torch.float32)


def test_all_zero_input_gives_bias():
    x = torch.zeros(2, 6, 9, 9)
    w, b = torch.randn(12, 1, 3, 3), torch.randn(12)
    y = grouped_conv2d(x, w, b, 2, 1, 1, 6)
    assert torch.equal(y, b.view(1, -1, 1, 1).expand_as(y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("path", ["direct", "gemm"])
def test_dtype_layout(dtype, layout, path):
    C, CO, g = (12, 24, 12) if path == "direct" else (32, 16, 2)
    x = make_input("counts012", (1, C, 7, 9) if path == "gemm" else (1, C, 9, 11), dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    w, b = (torch.randn(CO, C // g, 3, 3) / 3).to(dtype), torch.randn(CO).to(dtype)
    y = grouped_conv2d(x, w, b, 1, 1, 1, g, path=path)
    check(y, conv2d_reference(*as_float64(x, w, b), 1, 1, 1, g), dtype)
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


@pytest.mark.parametrize("cfg", [DepthwiseConfig(4, 4, 8, 1), DepthwiseConfig(8, 16, 16, 4),
                                 DepthwiseConfig(4, 8, 64, 2)], ids=["t4x4-c8", "t8x16-c16", "t4x8-c64"])
def test_configs_and_dense_mode(cfg):
    x = make_input("spikes", (1, 5, 7, 6))
    w, b = torch.randn(10, 1, 3, 3), torch.randn(10)
    ref = conv2d_reference(*as_float64(x, w, b), 1, 1, 1, 5)
    check(grouped_conv2d(x, w, b, 1, 1, 1, 5, config=cfg), ref, torch.float32)
    check(grouped_conv2d(x, w, b, 1, 1, 1, 5, config=cfg, dense=True), ref, torch.float32)


@pytest.mark.parametrize("path", ["direct", "gemm"])
def test_affine_epilogue(path):
    C, CO, g = (6, 12, 6) if path == "direct" else (32, 32, 2)
    x = make_input("spikes", (1, C, 9, 9))
    w, b = torch.randn(CO, C // g, 3, 3), torch.randn(CO)
    scale, shift = torch.rand(CO) + 0.5, torch.randn(CO)
    y = grouped_conv2d(x, w, b, 1, 1, 1, g, scale=scale, shift=shift, path=path)
    ref = conv2d_reference(*as_float64(x, w, b), 1, 1, 1, g, scale=scale.double(), shift=shift.double())
    check(y, ref, torch.float32)


@pytest.mark.parametrize("special", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nan_inf_propagate_like_dense(special):
    x = make_input("spikes", (1, 4, 12, 12))
    x[0, 1, 9, 3] = special
    x[0, 2, 0, 11] = -special
    w, b = torch.randn(8, 1, 3, 3), torch.randn(8)
    y = grouped_conv2d(x, w, b, 1, 1, 1, 4)
    ref = conv2d_reference(x, w, b, 1, 1, 1, 4)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(torch.isinf(y), torch.isinf(ref))
    fin = torch.isfinite(ref)
    assert torch.allclose(y[fin], ref[fin], atol=1e-5)


def test_trusts_given_occupancy():
    """A (wrong) occupancy that says everything is silent makes the kernel skip every tile: bias only.
    Proves the skipping reads the occupancy; the right occupancy gives the dense result."""
    x = make_input("real-dense", (1, 8, 9, 9))
    w, b = torch.randn(8, 1, 3, 3), torch.randn(8)
    occ = prescan(x, 8, 8)
    silent = Occupancy(codes=torch.zeros_like(occ.codes), shape=occ.shape, tile=occ.tile, group=occ.group)
    cfg = DepthwiseConfig(8, 8, 8, 4)
    y = grouped_conv2d(x, w, b, 1, 1, 1, 8, occupancy=silent, config=cfg)
    assert torch.equal(y, b.view(1, -1, 1, 1).expand_as(y))
    check(grouped_conv2d(x, w, b, 1, 1, 1, 8, occupancy=occ, config=cfg),
          conv2d_reference(*as_float64(x, w, b), 1, 1, 1, 8),
          torch.float32)


def test_unbatched_input():
    x = make_input("spikes", (1, 6, 9, 9))[0]
    w = torch.randn(6, 1, 3, 3)
    ref = conv2d_reference(*as_float64(x[None], w, None), 1, 1, 1, 6)[0]
    check(grouped_conv2d(x, w, None, 1, 1, 1, 6), ref, torch.float32)


@pytest.mark.parametrize("case", ["groups-not-dividing", "weight-channels", "dtype-mismatch", "bias-shape",
                                  "bad-path", "kernel-too-large", "scale-shape", "5d-input"])
def test_errors(case):
    x, w, b = torch.rand(1, 6, 8, 8), torch.randn(6, 1, 3, 3), None
    kw = dict(groups=6)
    err = ValueError
    if case == "groups-not-dividing":
        kw["groups"] = 4
    elif case == "weight-channels":
        w = torch.randn(6, 2, 3, 3)
    elif case == "dtype-mismatch":
        w, err = w.half(), TypeError
    elif case == "bias-shape":
        b = torch.randn(5)
    elif case == "bad-path":
        kw["path"] = "winograd"
    elif case == "kernel-too-large":
        w = torch.randn(6, 1, 11, 11)
    elif case == "scale-shape":
        kw["scale"] = torch.ones(3)
    elif case == "5d-input":
        x = x[None]
    with pytest.raises(err) as ei:
        grouped_conv2d(x, w, b, **kw)
    assert "grouped_conv2d" in str(ei.value)


def test_silent_channel_groups_masked_within_a_block():
    """Inside one program (16 channels, two 8-channel occupancy groups) a group marked silent is not read:
    with an occupancy that (wrongly) marks group 1 silent its channels get the bias only, group 0 is exact."""
    x = make_input("real-dense", (1, 16, 9, 9))
    w, b = torch.randn(16, 1, 3, 3), torch.randn(16)
    cfg = DepthwiseConfig(8, 8, 16, 4)
    assert kdw.occupancy_group(cfg, 1, 1, x.element_size()) == 8
    occ = prescan(x, 8, 8)
    codes = occ.codes.clone()
    codes[..., 1] = 0
    half = Occupancy(codes=codes, shape=occ.shape, tile=occ.tile, group=8)
    y = grouped_conv2d(x, w, b, 1, 1, 1, 16, occupancy=half, config=cfg)
    assert torch.equal(y[:, 8:], b[8:].view(1, -1, 1, 1).expand_as(y[:, 8:]))
    check(y[:, :8], conv2d_reference(*as_float64(x, w, b), 1, 1, 1, 16)[:, :8], torch.float32)
