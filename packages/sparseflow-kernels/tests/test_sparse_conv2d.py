"""sparse_conv2d against float64 F.conv2d: geometry, layouts, dtypes, input kinds, the affine epilogue,
NaN/Inf propagation, trust in the given occupancy, and argument errors. Runs under TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import TOL, assert_conv_close, rel_err

from sparseflow_kernels import ConvConfig, Occupancy, prescan, sparse_conv2d
from sparseflow_kernels.naive import as_float64, conv2d_reference
from sparseflow_kernels.occupancy import CODE_ANY


def spikes(*shape, density=0.25, dtype=torch.float32):
    return (torch.rand(*shape) < density).to(dtype)


def make_input(kind: str, shape, dtype=torch.float32):
    if kind == "spikes":
        return spikes(*shape, dtype=dtype)
    if kind == "counts012":  # SEW-ResNet style sums of spikes
        return torch.randint(0, 3, shape).float().mul_(torch.rand(shape) < 0.4).to(dtype)
    if kind == "real-sparse":
        return (torch.randn(shape) * (torch.rand(shape) < 0.3)).to(dtype)
    if kind == "real-dense":
        return torch.randn(shape).to(dtype)
    if kind == "ones":
        return torch.ones(shape, dtype=dtype)
    raise ValueError(kind)


def weights(CO, C, KH, KW, bias=True, dtype=torch.float32):
    w = (torch.randn(CO, C, KH, KW) / (C * KH * KW) ** 0.5).to(dtype)
    b = torch.randn(CO).to(dtype) if bias else None
    return w, b


# (N, C, CO, H, W, (KH, KW), stride, padding, dilation, bias)
GEOMETRIES = {
    "k1x1": (2, 20, 24, 9, 9, (1, 1), 1, 0, 1, True),
    "k1x1-s2": (2, 20, 24, 9, 10, (1, 1), 2, 0, 1, True),
    "k3x3-s1-pad1": (2, 20, 24, 11, 13, (3, 3), 1, 1, 1, True),
    "k3x3-s1-pad0": (2, 20, 24, 11, 13, (3, 3), 1, 0, 1, True),
    "k3x3-s2-pad1": (2, 20, 24, 13, 12, (3, 3), 2, 1, 1, True),
    "k3x3-s(1,2)-pad1": (1, 20, 24, 11, 13, (3, 3), (1, 2), 1, 1, True),
    "k3x3-p(2,0)": (1, 20, 24, 11, 9, (3, 3), 1, (2, 0), 1, True),
    "k3x3-p(0,1)-s(2,1)": (1, 20, 24, 11, 9, (3, 3), (2, 1), (0, 1), 1, True),
    "k3x3-d2-pad2": (1, 20, 24, 13, 11, (3, 3), 1, 2, 2, True),
    "k3x3-d(2,1)-p(2,1)": (1, 20, 24, 13, 11, (3, 3), 1, (2, 1), (2, 1), True),
    "k5x5-s1-pad2": (1, 20, 24, 11, 11, (5, 5), 1, 2, 1, True),
    "k5x5-s2-pad2-nobias": (1, 20, 24, 13, 13, (5, 5), 2, 2, 1, False),
    "k3x3-nobias": (2, 20, 24, 9, 9, (3, 3), 1, 1, 1, False),
    "k3x1-p(1,0)": (1, 20, 24, 9, 9, (3, 1), 1, (1, 0), 1, True),
    "k1x1-pad2(pad-only-output-rim)": (1, 20, 24, 7, 5, (1, 1), 1, 2, 1, True),
    "odd-C37-CO1-H13-W7": (2, 37, 1, 13, 7, (3, 3), 1, 1, 1, True),
    "odd-C3-CO5-H11-W2": (1, 3, 5, 11, 2, (3, 3), 1, 1, 1, True),
    "C40-CO40-3groups": (1, 40, 40, 13, 13, (3, 3), 1, 1, 1, True),
    "C16-CO16-exact-group": (1, 16, 16, 9, 9, (3, 3), 1, 1, 1, True),
    "C1-H1-W11": (2, 1, 8, 1, 11, (1, 3), 1, (0, 1), 1, True),
}


@pytest.mark.parametrize("geom", list(GEOMETRIES.values()), ids=list(GEOMETRIES))
@pytest.mark.parametrize("kind", ["spikes", "real-sparse"])
def test_matches_conv2d_fp32(geom, kind):
    N, C, CO, H, W, k, stride, padding, dilation, bias = geom
    x = make_input(kind, (N, C, H, W))
    w, b = weights(CO, C, *k, bias=bias)
    y = sparse_conv2d(x, w, b, stride, padding, dilation)
    assert_conv_close(y, conv2d_reference(*as_float64(x, w, b), stride, padding, dilation), torch.float32)


FP16_GEOMS = ["k1x1", "k3x3-s1-pad1", "k3x3-s2-pad1", "k5x5-s1-pad2", "odd-C37-CO1-H13-W7"]


@pytest.mark.parametrize("name", FP16_GEOMS, ids=FP16_GEOMS)
@pytest.mark.parametrize("kind", ["spikes", "real-dense"])
def test_matches_conv2d_fp16(name, kind):
    N, C, CO, H, W, k, stride, padding, dilation, bias = GEOMETRIES[name]
    x = make_input(kind, (N, C, H, W), torch.float16)
    w, b = weights(CO, C, *k, bias=bias, dtype=torch.float16)
    y = sparse_conv2d(x, w, b, stride, padding, dilation)
    assert_conv_close(y, conv2d_reference(*as_float64(x, w, b), stride, padding, dilation), torch.float16)


@pytest.mark.parametrize("kind", ["spikes", "counts012", "real-sparse", "real-dense", "ones"])
@pytest.mark.parametrize("block_size", [8, 16], ids=["block8", "block16"])
def test_input_kinds_and_block_sizes(kind, block_size):
    x = make_input(kind, (2, 20, 13, 13))
    w, b = weights(16, 20, 3, 3)
    y = sparse_conv2d(x, w, b, 1, 1, block_size=block_size)
    assert_conv_close(y, conv2d_reference(*as_float64(x, w, b), 1, 1), torch.float32)


def test_all_zero_input_gives_bias():
    x = torch.zeros(2, 20, 11, 11)
    w, b = weights(24, 20, 3, 3)
    y = sparse_conv2d(x, w, b, 2, 1)
    assert y.shape == (2, 24, 6, 6)
    torch.testing.assert_close(y, b.view(1, -1, 1, 1).expand_as(y), rtol=0, atol=0)
    y0 = sparse_conv2d(x, w, None, 2, 1)
    assert torch.equal(y0, torch.zeros_like(y0))


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided-view", "permuted-view"])
def test_layouts(layout):
    base = spikes(2, 20, 11, 13)
    if layout == "nchw":
        x = base
    elif layout == "channels_last":
        x = base.to(memory_format=torch.channels_last)
    elif layout == "strided-view":  # every other channel and column of a larger tensor
        big = spikes(2, 40, 11, 26)
        x = big[:, ::2, :, ::2]
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    else:  # H and W swapped in memory
        x = spikes(2, 20, 13, 11).transpose(2, 3)
    w, b = weights(24, x.shape[1], 3, 3)
    ref = conv2d_reference(*as_float64(x, w, b), 1, 1)
    y = sparse_conv2d(x, w, b, 1, 1)
    assert_conv_close(y, ref, torch.float32)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    else:
        assert y.is_contiguous()
    # the dense sweep over the same view agrees bit for bit
    assert torch.equal(sparse_conv2d(x, w, b, 1, 1, dense=True), y)


def test_unbatched_3d_input():
    x = spikes(20, 11, 9)
    w, b = weights(24, 20, 3, 3)
    y = sparse_conv2d(x, w, b, 1, 1)
    assert y.shape == (24, 11, 9)
    assert_conv_close(y, conv2d_reference(*as_float64(x, w, b), 1, 1), torch.float32)


@pytest.mark.parametrize("block_size", [4, (4, 16), (16, 8)], ids=["block4", "block4x16", "block16x8"])
def test_rectangular_and_small_blocks(block_size):
    x = spikes(2, 20, 13, 11)
    w, b = weights(24, 20, 3, 3)
    y = sparse_conv2d(x, w, b, 1, 1, block_size=block_size)
    assert_conv_close(y, conv2d_reference(*as_float64(x, w, b), 1, 1), torch.float32)


def test_empty_batch():
    w, b = weights(8, 20, 3, 3)
    y = sparse_conv2d(torch.zeros(0, 20, 9, 9), w, b, 1, 1)
    assert y.shape == (0, 8, 9, 9)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_padding_strings(padding):
    x = spikes(1, 20, 9, 11)
    w, b = weights(8, 20, 3, 3)
    y = sparse_conv2d(x, w, b, 1, padding)
    assert_conv_close(y, conv2d_reference(*as_float64(x, w, b), 1, padding), torch.float32)


@pytest.mark.parametrize("kind", ["spikes", "real-dense"])
@pytest.mark.parametrize("geom", ["k3x3-s2-pad1", "k5x5-s1-pad2", "odd-C37-CO1-H13-W7"])
def test_dense_flag_identical_to_sparse(kind, geom):
    N, C, CO, H, W, k, stride, padding, dilation, bias = GEOMETRIES[geom]
    x = make_input(kind, (N, C, H, W))
    w, b = weights(CO, C, *k, bias=bias)
    ys = sparse_conv2d(x, w, b, stride, padding, dilation)
    yd = sparse_conv2d(x, w, b, stride, padding, dilation, dense=True)
    assert torch.equal(ys, yd)
    assert_conv_close(yd, conv2d_reference(*as_float64(x, w, b), stride, padding, dilation), torch.float32)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("which", ["scale+shift", "scale", "shift"])
def test_scale_shift_epilogue(bias, which):
    x = spikes(2, 20, 9, 9)
    w, b = weights(24, 20, 3, 3, bias=bias)
    scale = torch.rand(24) + 0.5 if "scale" in which else None
    shift = torch.randn(24) if "shift" in which else None
    y = sparse_conv2d(x, w, b, 1, 1, scale=scale, shift=shift)
    ref = conv2d_reference(*as_float64(x, w, b), 1, 1)
    if scale is not None:
        ref = ref * scale.double().view(1, -1, 1, 1)
    if shift is not None:
        ref = ref + shift.double().view(1, -1, 1, 1)
    assert_conv_close(y, ref, torch.float32)


def test_scale_shift_fp16():
    x = spikes(1, 20, 9, 9, dtype=torch.float16)
    w, b = weights(24, 20, 3, 3, dtype=torch.float16)
    scale, shift = torch.rand(24) + 0.5, torch.randn(24)
    y = sparse_conv2d(x, w, b, 1, 1, scale=scale, shift=shift)
    ref = conv2d_reference(*as_float64(x, w, b), 1, 1, scale=scale.double(), shift=shift.double())
    assert_conv_close(y, ref, torch.float16)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("mode", ["sparse", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_nan_inf_propagate_like_conv2d(mode, dtype):
    x = torch.randn(1, 20, 13, 13) * (torch.rand(1, 20, 13, 13) < 0.3)
    x[0, 3, 2, 2] = float("nan")
    x[0, 17, 9, 10] = float("inf")
    x[0, 5, 12, 0] = float("-inf")
    x[0, 5, 12, 1] = float("inf")  # +inf and -inf meet in some receptive fields: NaN there
    x = x.to(dtype)
    w, b = weights(24, 20, 3, 3, dtype=dtype)
    y = sparse_conv2d(x, w, b, 1, 1, dense=mode == "dense")
    ref = conv2d_reference(*as_float64(x, w, b), 1, 1)
    assert torch.isnan(ref).any() and torch.isinf(ref).any()
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(torch.isposinf(y), torch.isposinf(ref))
    assert torch.equal(torch.isneginf(y), torch.isneginf(ref))
    fin = torch.isfinite(ref)
    err = rel_err(y[fin], ref[fin])
    assert err < TOL[dtype]


def test_kernel_trusts_given_occupancy():
    """All-zero codes for an input full of non-zeros: every block is skipped, only the bias remains."""
    x = make_input("real-dense", (2, 20, 11, 11))
    w, b = weights(24, 20, 3, 3)
    real = prescan(x, 8, 16)
    assert (real.codes & CODE_ANY).all()
    empty = Occupancy(codes=torch.zeros_like(real.codes), shape=real.shape, tile=real.tile, group=real.group)
    y = sparse_conv2d(x, w, b, 1, 1, occupancy=empty, block_size=8)
    torch.testing.assert_close(y, b.view(1, -1, 1, 1).expand_as(y), rtol=0, atol=0)
    # with the true occupancy (and without any) the result is the convolution
    assert_conv_close(sparse_conv2d(x, w, b, 1, 1, occupancy=real, block_size=8),
                      conv2d_reference(*as_float64(x, w, b), 1, 1), torch.float32)


def test_occupancy_skips_only_the_marked_group():
    """Codes that hide channel group 1 of sample 0: the output is the conv over the other blocks."""
    x = make_input("real-dense", (2, 40, 9, 9))
    w, b = weights(8, 40, 3, 3)
    occ = prescan(x, 8, 16)
    codes = occ.codes.clone()
    codes[0, ..., 1] = 0
    y = sparse_conv2d(x, w, b, 1, 1, occupancy=Occupancy(codes, occ.shape, occ.tile, occ.group), block_size=8)
    x_hidden = x.clone()
    x_hidden[0, 16:32] = 0
    assert_conv_close(y, conv2d_reference(*as_float64(x_hidden, w, b), 1, 1), torch.float32)
    assert rel_err(y, conv2d_reference(*as_float64(x, w, b), 1, 1)) > 1e-2  # it did make a difference


def test_explicit_config_and_packed_weight():
    from sparseflow_kernels.conv import pack_weight

    x = spikes(1, 40, 9, 9)
    w, b = weights(40, 40, 3, 3)
    cfg = ConvConfig(tile_h=4, tile_w=8, block_n=16, block_k=32)
    packed = pack_weight(w, cfg.block_k, cfg.block_n, x.dtype)
    y = sparse_conv2d(x, w, b, 1, 1, config=cfg, packed_weight=packed)
    assert_conv_close(y, conv2d_reference(*as_float64(x, w, b), 1, 1), torch.float32)


# ------------------------------------------------------------------------------------------- errors


def test_error_dtype_mismatch():
    x = spikes(1, 4, 5, 5)
    w, b = weights(4, 4, 3, 3)
    with pytest.raises(TypeError, match="dtype"):
        sparse_conv2d(x, w.half(), None)
    with pytest.raises(TypeError, match="dtype"):
        sparse_conv2d(x, w, b.half())
    with pytest.raises(TypeError, match="dtype"):
        sparse_conv2d(x.double(), w.double())


@pytest.mark.parametrize("shape", [(4, 5), (1, 1, 4, 5, 5)], ids=["2d", "5d"])
def test_error_wrong_rank(shape):
    w, _ = weights(4, 4, 3, 3)
    with pytest.raises(ValueError, match="shape"):
        sparse_conv2d(torch.zeros(shape), w)


def test_error_wrong_weight_rank_and_channels():
    x = spikes(1, 4, 5, 5)
    with pytest.raises(ValueError, match="weight"):
        sparse_conv2d(x, torch.randn(4, 4, 3))
    with pytest.raises(ValueError, match="channels"):
        sparse_conv2d(x, torch.randn(4, 5, 3, 3))


def test_error_groups():
    x = spikes(1, 4, 5, 5)
    with pytest.raises(NotImplementedError, match="groups"):
        sparse_conv2d(x, torch.randn(4, 2, 3, 3), None, 1, 1, 1, 2)


def test_error_bad_padding():
    x = spikes(1, 4, 5, 5)
    w, _ = weights(4, 4, 3, 3)
    with pytest.raises(ValueError, match="padding"):
        sparse_conv2d(x, w, None, 1, "full")
    with pytest.raises(ValueError, match="padding"):
        sparse_conv2d(x, w, None, 1, -1)
    with pytest.raises(ValueError, match="same"):
        sparse_conv2d(x, w, None, 2, "same")


def test_error_fp32_precision():
    x = spikes(1, 4, 5, 5)
    w, _ = weights(4, 4, 3, 3)
    with pytest.raises(ValueError, match="fp32_precision"):
        sparse_conv2d(x, w, None, 1, 1, fp32_precision="fp64")


def test_error_kernel_larger_than_input():
    with pytest.raises(ValueError, match="larger"):
        sparse_conv2d(spikes(1, 4, 2, 2), torch.randn(4, 4, 3, 3))


def test_error_scale_shape():
    x = spikes(1, 4, 5, 5)
    w, _ = weights(6, 4, 3, 3)
    with pytest.raises(ValueError, match="scale"):
        sparse_conv2d(x, w, None, 1, 1, scale=torch.ones(5))


def test_error_occupancy_mismatch():
    x = spikes(1, 20, 9, 9)
    w, _ = weights(6, 20, 3, 3)
    with pytest.raises(ValueError, match="occupancy"):
        sparse_conv2d(x, w, occupancy=prescan(spikes(1, 20, 9, 10), 8, 16))
    with pytest.raises(ValueError, match="group"):
        sparse_conv2d(x, w, occupancy=prescan(x, 8, 32))


def test_error_cpu_without_interpreter(monkeypatch):
    x = spikes(1, 4, 5, 5)
    w, _ = weights(4, 4, 3, 3)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA"):
        sparse_conv2d(x, w, None, 1, 1)
    with pytest.raises(RuntimeError, match="CUDA"):
        prescan(x)


@pytest.mark.parametrize("op", ["sparse_conv2d", "spiking_conv2d", "grouped_conv2d", "sparse_conv_transpose2d"])
def test_too_many_channel_groups_are_refused_by_name(op):
    """Every convolution refuses, before launching, more input channels than its kernel can list in groups of
    ``block_k`` (per group for a grouped convolution), with one message naming the count."""
    from sparseflow_kernels import grouped_conv2d, sparse_conv_transpose2d, spiking_conv2d
    from sparseflow_kernels.tiling import MAX_GROUPS, ConvConfig

    C, cfg = MAX_GROUPS * 16 + 1, ConvConfig(8, 8, 16, 16)
    x = torch.rand(1, C, 1, 1)
    calls = {
        "sparse_conv2d": lambda: sparse_conv2d(x, torch.rand(16, C, 1, 1), config=cfg),
        "spiking_conv2d": lambda: spiking_conv2d(x[None], torch.rand(16, C, 1, 1), config=cfg),
        "grouped_conv2d": lambda: grouped_conv2d(torch.rand(1, 2 * C, 1, 1), torch.rand(32, C, 1, 1), groups=2,
                                                 config=cfg),
        "sparse_conv_transpose2d": lambda: sparse_conv_transpose2d(x, torch.rand(C, 16, 1, 1), config=cfg),
    }
    what = "channels per group" if op == "grouped_conv2d" else "channels"
    with pytest.raises(ValueError, match=f"{op}: {C} {what} make more than {MAX_GROUPS} groups of 16"):
        calls[op]()
