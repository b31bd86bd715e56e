"""sparse_conv_transpose2d against float64 F.conv_transpose2d: stride 2 with kernels 2/3/4, padding,
output_padding, other strides, odd sizes, input kinds, layouts, dtypes, the affine epilogue, NaN/Inf
propagation (taps past the kernel must not leak an Inf), trust in the occupancy and argument errors.
Runs under TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import TOL, rel_err

from sparseflow_kernels import ConvConfig
from sparseflow_kernels import conv_transpose as kct
from sparseflow_kernels.conv_transpose import pack_transpose_weight, sparse_conv_transpose2d
from sparseflow_kernels.naive import as_float64, conv_transpose2d_reference
from sparseflow_kernels.occupancy import Occupancy, prescan


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Outputs start as NaN: an element the kernel forgets to write fails the comparison."""
    orig = kct.empty_like_layout

    def nan_out(*a, **k):
        return orig(*a, **k).fill_(float("nan"))

    monkeypatch.setattr(kct, "empty_like_layout", nan_out)


def make_input(kind, shape, dtype=torch.float32):
    if kind == "spikes":
        x = (torch.rand(shape) < 0.25).float()
        x[..., : shape[-2] // 2, :] = 0
    elif kind == "counts012":
        x = torch.randint(0, 3, shape).float() * (torch.rand(shape) < 0.3)
    elif kind == "real-dense":
        x = torch.randn(shape)
    elif kind == "ones":
        x = torch.ones(shape)
    elif kind == "one-spike-at-tile-edge":
        x = torch.zeros(shape)
        x[0, -1, min(8, shape[2] - 1), min(7, shape[3] - 1)] = 1.0
    else:
        raise ValueError(kind)
    return x.to(dtype)


def check(y, ref, dtype):
    assert y.shape == ref.shape, (tuple(y.shape), tuple(ref.shape))
    assert y.dtype == dtype
    assert torch.isfinite(y).all(), "NaN/Inf in the output of a finite input (unwritten element)"
    err = rel_err(y, ref)
    assert err < TOL[dtype], f"relative error {err:.3e} >= {TOL[dtype]:.0e}"


# (N, C, CO, H, W, k, stride, padding, output_padding, bias)
GEOMETRIES = {
    "k2-s2-pad0": (2, 20, 12, 5, 7, 2, 2, 0, 0, True),
    "k3-s2-pad1-op1": (1, 20, 12, 6, 5, 3, 2, 1, 1, True),
    "k3-s2-pad1-op0": (1, 20, 12, 5, 6, 3, 2, 1, 0, False),
    "k3-s2-pad0": (1, 8, 5, 5, 5, 3, 2, 0, 0, True),
    "k4-s2-pad1": (2, 20, 12, 5, 6, 4, 2, 1, 0, True),
    "k4-s2-pad2-op1": (1, 8, 6, 6, 5, 4, 2, 2, 1, True),
    "k4-s2-pad0-nobias": (1, 8, 6, 4, 5, 4, 2, 0, 0, False),
    "k3-s1-pad1": (1, 8, 6, 7, 6, 3, 1, 1, 0, True),
    "k3-s(2,1)-p(1,0)-op(1,0)": (1, 8, 6, 5, 6, 3, (2, 1), (1, 0), (1, 0), True),
    "k5-s3-pad1-op2": (1, 8, 6, 4, 4, 5, 3, 1, 2, True),
    "k(2,4)-s2-p(0,1)": (1, 8, 6, 5, 5, (2, 4), 2, (0, 1), 0, True),
    "odd-C37-CO1": (1, 37, 1, 5, 3, 3, 2, 1, 1, True),
    "C3-CO70-H1-W1": (2, 3, 70, 1, 1, 2, 2, 0, 0, True),
}


@pytest.mark.parametrize("geom", list(GEOMETRIES), ids=list(GEOMETRIES))
def test_geometry(geom):
    N, C, CO, H, W, k, s, p, op, bias = GEOMETRIES[geom]
    k = (k, k) if isinstance(k, int) else k
    x = make_input("spikes", (N, C, H, W))
    w = torch.randn(C, CO, *k) / (C ** 0.5)
    b = torch.randn(CO) if bias else None
    ref = conv_transpose2d_reference(*as_float64(x, w, b), s, p, op)
    check(sparse_conv_transpose2d(x, w, b, s, p, op), ref, torch.float32)


@pytest.mark.parametrize("kind", ["spikes", "counts012", "real-dense", "ones", "one-spike-at-tile-edge"])
def test_input_kinds(kind):
    x = make_input(kind, (1, 16, 9, 8))
    w, b = torch.randn(16, 8, 3, 3) / 4, torch.randn(8)
    ref = conv_transpose2d_reference(*as_float64(x, w, b), 2, 1, 1)
    check(sparse_conv_transpose2d(x, w, b, 2, 1, 1), ref, torch.float32)


def test_all_zero_input_gives_bias():
    x = torch.zeros(1, 16, 5, 4)
    w, b = torch.randn(16, 8, 4, 4), torch.randn(8)
    y = sparse_conv_transpose2d(x, w, b, 2, 1)
    assert torch.equal(y, b.view(1, -1, 1, 1).expand_as(y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_dtype_layout(dtype, layout):
    x = make_input("counts012", (2, 24, 5, 6), dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    w, b = (torch.randn(24, 10, 3, 3) / 5).to(dtype), torch.randn(10).to(dtype)
    y = sparse_conv_transpose2d(x, w, b, 2, 1, 1)
    check(y, conv_transpose2d_reference(*as_float64(x, w, b), 2, 1, 1), dtype)
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


@pytest.mark.parametrize("cfg", [ConvConfig(4, 4, 16, 16), ConvConfig(8, 2, 32, 32)], ids=["t4x4-n16", "t8x2-n32"])
def test_configs_dense_mode_and_packed_weight(cfg):
    x = make_input("spikes", (1, 20, 5, 4))
    w, b = torch.randn(20, 12, 4, 4) / 6, torch.randn(12)
    ref = conv_transpose2d_reference(*as_float64(x, w, b), 2, 1, 0)
    check(sparse_conv_transpose2d(x, w, b, 2, 1, config=cfg), ref, torch.float32)
    packed = pack_transpose_weight(w, (2, 2), (1, 1), cfg.block_k, cfg.block_n, torch.float32)
    check(sparse_conv_transpose2d(x, w, b, 2, 1, config=cfg, packed_weight=packed, dense=True), ref,
          torch.float32)


def test_affine_epilogue():
    x = make_input("spikes", (1, 16, 6, 6))
    w, b = torch.randn(16, 8, 2, 2), torch.randn(8)
    scale, shift = torch.rand(8) + 0.5, torch.randn(8)
    y = sparse_conv_transpose2d(x, w, b, 2, scale=scale, shift=shift)
    ref = conv_transpose2d_reference(*as_float64(x, w, b), 2, 0, 0, scale=scale.double(), shift=shift.double())
    check(y, ref, torch.float32)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # Inf - Inf in the interpreter
@pytest.mark.parametrize("special", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("k", [3, 4])
def test_nan_inf_propagate_like_dense(special, k):
    """With k=3, s=2 one phase has a tap past the kernel: its (masked) input must not reach that output."""
    x = make_input("spikes", (1, 16, 7, 7))
    x[0, 3, 5, 2] = special
    x[0, 9, 0, 6] = -special
    w, b = torch.randn(16, 4, k, k), torch.randn(4)
    y = sparse_conv_transpose2d(x, w, b, 2, 1, 1 if k == 3 else 0)
    ref = conv_transpose2d_reference(x, w, b, 2, 1, 1 if k == 3 else 0)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(torch.isinf(y), torch.isinf(ref))
    fin = torch.isfinite(ref)
    assert torch.allclose(y[fin], ref[fin], atol=1e-4)


def test_trusts_given_occupancy():
    x = make_input("real-dense", (1, 16, 6, 6))
    w, b = torch.randn(16, 8, 3, 3), torch.randn(8)
    cfg = ConvConfig(8, 8, 16, 16)
    occ = prescan(x, 8, 16)
    silent = Occupancy(codes=torch.zeros_like(occ.codes), shape=occ.shape, tile=occ.tile, group=occ.group)
    y = sparse_conv_transpose2d(x, w, b, 2, 1, 1, occupancy=silent, config=cfg)
    assert torch.equal(y, b.view(1, -1, 1, 1).expand_as(y))
    check(sparse_conv_transpose2d(x, w, b, 2, 1, 1, occupancy=occ, config=cfg),
          conv_transpose2d_reference(*as_float64(x, w, b), 2, 1, 1),
          torch.float32)


@pytest.mark.parametrize("case", ["groups", "dilation", "output_padding>=stride", "channels", "dtype",
                                  "bias-shape", "negative-padding", "empty-output", "occupancy-shape"])
def test_errors(case):
    x, w, b = torch.rand(1, 8, 5, 5), torch.randn(8, 4, 3, 3), None
    kw = dict(stride=2, padding=1)
    err = ValueError
    if case == "groups":
        kw["groups"], err = 2, NotImplementedError
    elif case == "dilation":
        kw["dilation"], err = 2, NotImplementedError
    elif case == "output_padding>=stride":
        kw["output_padding"] = 2
    elif case == "channels":
        w = torch.randn(6, 4, 3, 3)
    elif case == "dtype":
        w, err = w.half(), TypeError
    elif case == "bias-shape":
        b = torch.randn(8)
    elif case == "negative-padding":
        kw["padding"] = -1
    elif case == "empty-output":
        x, kw = torch.rand(1, 8, 1, 1), dict(stride=1, padding=3)
    elif case == "occupancy-shape":
        kw["occupancy"] = prescan(torch.rand(1, 8, 6, 6), 8, 16)
    with pytest.raises(err) as ei:
        sparse_conv_transpose2d(x, w, b, **kw)
    assert "sparse_conv_transpose2d" in str(ei.value)
