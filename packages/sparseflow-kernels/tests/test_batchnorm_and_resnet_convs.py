"""sparse_batch_norm2d against float64 F.batch_norm (eval), with and without an occupancy, odd shapes, layouts,
non-binary inputs, NaN/Inf, and argument errors; plus the ResNet-family convolutions of sparse_conv2d that
test_sparse_conv2d.py does not cover (7x7 stems, 1x1 stride 2 downsamples on 0/1/2 inputs, dilated 5x5, prime
shapes). Runs under TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_conv_close, rel_err

from sparseflow_kernels import batchnorm as kbn
from sparseflow_kernels import prescan, sparse_batch_norm2d, sparse_conv2d
from sparseflow_kernels.batchnorm import batch_norm_affine, bn_eval_affine
from sparseflow_kernels.naive import as_float64, batch_norm2d_reference, conv2d_reference

BN_TOL = {torch.float32: 1e-6, torch.float16: 1e-3}


@pytest.fixture(autouse=True)
def _poison_bn_outputs(monkeypatch):
    """Buffers the BatchNorm launcher allocates start as NaN: an element it forgets to write fails."""
    orig = kbn.empty_like_layout

    def nan_fill(*args, **kwargs):
        return orig(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(kbn, "empty_like_layout", nan_fill)


def make_input(kind: str, shape, dtype=torch.float32):
    if kind == "spikes":
        return (torch.rand(shape) < 0.15).to(dtype)
    if kind == "counts012":  # SEW-ResNet ADD: sums of two spike maps
        return ((torch.rand(shape) < 0.15).float() + (torch.rand(shape) < 0.15).float()).to(dtype)
    if kind == "silent-planes":  # whole (sample, channel) planes and tiles silent, others dense
        x = (torch.rand(shape) < 0.5).float()
        x *= (torch.rand(shape[0], shape[1], 1, 1) < 0.3).float()
        return x.to(dtype)
    if kind == "real-dense":
        return torch.randn(shape).to(dtype)
    if kind == "ones":
        return torch.ones(shape, dtype=dtype)
    if kind == "zeros":
        return torch.zeros(shape, dtype=dtype)
    raise ValueError(kind)


def bn_params(C, affine=True, dtype=torch.float32):
    mean = torch.randn(C) * 0.5
    var = torch.rand(C) * 2 + 0.05
    w = (torch.randn(C) if affine else None)
    b = (torch.randn(C) if affine else None)
    cast = (lambda t: t.to(dtype) if t is not None else None)
    return cast(mean), cast(var), cast(w), cast(b)


def assert_bn_close(y, ref, dtype):
    assert y.dtype == dtype and y.shape == ref.shape
    err = rel_err(y, ref)
    assert err < BN_TOL[dtype], f"relative error {err:.3e}"


# (N, C, H, W)
BN_SHAPES = {
    "N2-C37-H13-W11": (2, 37, 13, 11),
    "N1-C1-H1-W1": (1, 1, 1, 1),
    "N3-C16-H8-W8-exact-tile": (3, 16, 8, 8),
    "N1-C67-H5-W17": (1, 67, 5, 17),
    "N2-C3-H17-W2": (2, 3, 17, 2),
}


@pytest.mark.parametrize("shape", list(BN_SHAPES.values()), ids=list(BN_SHAPES))
@pytest.mark.parametrize("kind", ["counts012", "silent-planes", "real-dense", "ones", "zeros"])
@pytest.mark.parametrize("occ", ["no-occupancy", "occupancy"])
def test_batchnorm_matches_eval_fp32(shape, kind, occ):
    x = make_input(kind, shape)
    mean, var, w, b = bn_params(shape[1])
    occupancy = prescan(x, 8, 16) if occ == "occupancy" else None
    y = sparse_batch_norm2d(x, mean, var, w, b, 1e-5, occupancy=occupancy)
    assert_bn_close(y, batch_norm2d_reference(*as_float64(x, mean, var, w, b), 1e-5), torch.float32)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided-view"])
@pytest.mark.parametrize("occ", ["no-occupancy", "occupancy"])
def test_batchnorm_layouts_kept(layout, occ):
    base = make_input("counts012", (2, 24, 11, 13))
    if layout == "channels_last":
        x = base.to(memory_format=torch.channels_last)
    elif layout == "strided-view":
        x = make_input("spikes", (2, 48, 11, 26))[:, ::2, :, ::2]
    else:
        x = base
    mean, var, w, b = bn_params(x.shape[1])
    occupancy = prescan(x, 8, 16) if occ == "occupancy" else None
    y = sparse_batch_norm2d(x, mean, var, w, b, 1e-3, occupancy=occupancy)
    assert_bn_close(y, batch_norm2d_reference(*as_float64(x, mean, var, w, b), 1e-3), torch.float32)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kind", ["spikes", "real-dense"])
def test_batchnorm_fp16_and_fp16_stats(kind):
    x = make_input(kind, (2, 37, 9, 11), torch.float16)
    mean, var, w, b = bn_params(37, dtype=torch.float16)  # a model converted with .half()
    y = sparse_batch_norm2d(x, mean, var, w, b, 1e-5, occupancy=prescan(x, 8, 16))
    assert_bn_close(y, batch_norm2d_reference(*as_float64(x, mean, var, w, b), 1e-5), torch.float16)


def test_batchnorm_no_affine_and_other_tiles():
    x = make_input("spikes", (1, 40, 11, 13))
    mean, var, _, _ = bn_params(40)
    for tile, group in (((16, 16), 16), ((4, 8), 32), ((8, 8), 64)):
        y = sparse_batch_norm2d(x, mean, var, None, None, 1e-5, occupancy=prescan(x, tile, group))
        assert_bn_close(y, batch_norm2d_reference(*as_float64(x, mean, var, None, None), 1e-5), torch.float32)


def test_zero_blocks_are_not_read():
    """Blocks the occupancy marks silent are written as the per-channel constant without reading the input:
    garbage planted in them does not reach the output (this is what lets the producer skip writing them)."""
    x = make_input("spikes", (1, 20, 16, 9))
    mean, var, w, b = bn_params(20)
    occ = prescan(x, 8, 16)
    codes = occ.codes.clone()
    codes[0, 1, 0, :] = 0  # sample 0, tile (1, 0): declared silent in every group
    forged = type(occ)(codes=codes, shape=occ.shape, tile=occ.tile, group=occ.group)
    y = sparse_batch_norm2d(x, mean, var, w, b, 1e-5, occupancy=forged)
    const = b - mean * w / torch.sqrt(var + 1e-5)
    torch.testing.assert_close(y[0, :, 8:16, 0:8], const.view(-1, 1, 1).expand(20, 8, 8), rtol=1e-6, atol=1e-6)
    ref = batch_norm2d_reference(*as_float64(x, mean, var, w, b), 1e-5)
    mask = torch.ones_like(ref, dtype=torch.bool)
    mask[0, :, 8:16, 0:8] = False
    assert rel_err(y[mask], ref[mask]) < 1e-6


@pytest.mark.parametrize("occ", ["no-occupancy", "occupancy"])
def test_batchnorm_nan_inf_propagate(occ):
    x = make_input("spikes", (2, 20, 11, 11))
    x[0, 3, 2, 2] = float("nan")
    x[1, 17, 10, 0] = float("inf")
    x[1, 5, 4, 4] = -float("inf")
    mean, var, w, b = bn_params(20)
    y = sparse_batch_norm2d(x, mean, var, w, b, 1e-5, occupancy=prescan(x, 8, 16) if occ == "occupancy" else None)
    ref = batch_norm2d_reference(x, mean, var, w, b, 1e-5)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(y[fin], ref[fin], rtol=1e-5, atol=1e-5)


def test_batchnorm_out_buffer_and_empty():
    x = make_input("spikes", (2, 20, 7, 9))
    mean, var, w, b = bn_params(20)
    out = torch.full_like(x, float("nan"))
    y = batch_norm_affine(x, *bn_eval_affine(mean, var, w, b, 1e-5), out=out)
    assert y is out
    assert_bn_close(y, batch_norm2d_reference(*as_float64(x, mean, var, w, b), 1e-5), torch.float32)
    e = torch.zeros(0, 20, 7, 9)
    assert sparse_batch_norm2d(e, mean, var, w, b).shape == e.shape


def test_batchnorm_errors():
    x = make_input("spikes", (2, 20, 7, 9))
    mean, var, w, b = bn_params(20)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        sparse_batch_norm2d(x[0], mean, var, w, b)
    with pytest.raises(ValueError, match="running_mean must have shape"):
        sparse_batch_norm2d(x, mean[:5], var, w, b)
    with pytest.raises(ValueError, match="weight must have shape"):
        sparse_batch_norm2d(x, mean, var, w[:3], b)
    with pytest.raises(TypeError, match="float64"):
        sparse_batch_norm2d(x.double(), mean, var, w, b)
    with pytest.raises(ValueError, match="occupancy describes shape"):
        sparse_batch_norm2d(x, mean, var, w, b, occupancy=prescan(x[:1], 8, 16))
    with pytest.raises(ValueError, match="out must be"):
        batch_norm_affine(x, *bn_eval_affine(mean, var, w, b), out=torch.empty(2, 20, 7, 8))
    with pytest.raises(ValueError, match="eps"):
        sparse_batch_norm2d(x, mean, var, w, b, eps=-1.0)


# ------------------------------------------------------------------- ResNet-family convolution geometries
# (N, C, CO, H, W, (KH, KW), stride, padding, dilation, bias)
RESNET_CONVS = {
    "stem-7x7-s2-p3": (1, 3, 16, 15, 13, (7, 7), 2, 3, 1, False),
    "7x7-s1-p3-C17": (1, 17, 8, 9, 7, (7, 7), 1, 3, 1, True),
    "downsample-1x1-s2-C37-H13-W11": (2, 37, 29, 13, 11, (1, 1), 2, 0, 1, False),
    "bottleneck-1x1-s1-C67-CO19": (2, 67, 19, 7, 5, (1, 1), 1, 0, 1, False),
    "bottleneck-expand-1x1-C19-CO67": (1, 19, 67, 5, 7, (1, 1), 1, 0, 1, True),
    "5x5-d2-p3-H11": (1, 20, 24, 11, 9, (5, 5), 1, 3, 2, True),
    "3x3-d3-p1-s2": (1, 20, 12, 19, 17, (3, 3), 2, 1, 3, True),
    "1x1-s3-H1-W1-edge": (2, 5, 7, 1, 1, (1, 1), 3, 0, 1, True),
}


@pytest.mark.parametrize("geom", list(RESNET_CONVS.values()), ids=list(RESNET_CONVS))
@pytest.mark.parametrize("kind", ["counts012", "silent-planes"])
def test_resnet_family_convs(geom, kind):
    N, C, CO, H, W, k, stride, padding, dilation, bias = geom
    x = make_input(kind, (N, C, H, W))
    w = torch.randn(CO, C, *k) / (C * k[0] * k[1]) ** 0.5
    b = torch.randn(CO) if bias else None
    y = sparse_conv2d(x, w, b, stride, padding, dilation)
    assert_conv_close(y, conv2d_reference(*as_float64(x, w, b), stride, padding, dilation), torch.float32)


@pytest.mark.parametrize("block_size", [8, 16], ids=["block8", "block16"])
def test_1x1_downsample_channels_last_with_folded_bn(block_size):
    """A ResNet downsample: 1x1 stride 2 on 0/1/2 inputs, BatchNorm folded as scale/shift, channels_last."""
    x = make_input("counts012", (2, 40, 17, 15)).to(memory_format=torch.channels_last)
    w = torch.randn(24, 40, 1, 1) / 40 ** 0.5
    mean, var, g, beta = bn_params(24)
    scale = g / torch.sqrt(var + 1e-5)
    y = sparse_conv2d(x, w, None, 2, 0, block_size=block_size, scale=scale, shift=beta - mean * scale)
    y_conv = conv2d_reference(*as_float64(x, w, None), 2, 0).float()
    ref = batch_norm2d_reference(*as_float64(y_conv, mean, var, g, beta), 1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_conv_close(y, ref, torch.float32)
