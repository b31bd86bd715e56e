"""The spiking convolution of a static input: ``x`` repeated over the steps by stride 0 (``frame.expand(T, ...)``).
A fused steps-looped tile convolves its sample's frame once and runs the BatchNorm, the residual, the neuron and the
pool over the T steps; its spikes, membrane and sum are those of the same configuration on the input repeated in
memory, bit for bit, and match the float64 reference. The ``"triton_conv"`` pair (the Triton convolution, then the
neuron kernel) convolves the frames once as well."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from kernel_checks import NEURONS, assert_spikes_match, kernel_neuron_kwargs, reference_neuron

from sparseflow_kernels import ConvConfig, spiking_conv2d
from sparseflow_kernels.conv import launch_conv, pack_conv_weight
from sparseflow_kernels.naive import as_float64, conv2d_reference
from sparseflow_kernels.tiling import spiking_configs

CONFIGS = {
    "looped-8x8": ConvConfig(8, 8, 16, 16, False, 4, 2),
    "looped-4x4": ConvConfig(4, 4, 16, 16, False, 4, 2),
    "im2col": ConvConfig(4, 8, 16, 32, False, 4, 2, im2col=True),
    "tma-4x4": ConvConfig(4, 4, 16, 16, False, 4, 2, tma=True),
}
GEOMETRIES = {"3x3s1": (3, 1, 1), "1x1": (1, 1, 0), "3x3s2": (3, 2, 1), "5x5s2": (5, 2, 2)}


def _static_layer(T, N, C, CO, H, k, dtype, seed, residual=False, v0=False):
    """A real-valued frame per sample repeated over T by stride 0, the layer's weights, and the float64 ``z``."""
    g = torch.Generator().manual_seed(seed)
    frame = (torch.randn(N, H, H, C, generator=g) * 1.5).permute(0, 3, 1, 2).to(dtype)  # channels_last
    x = frame.unsqueeze(0).expand(T, *frame.shape)
    w = (torch.randn(CO, C, k, k, generator=g) * 1.6 / (C * k * k) ** 0.5).to(dtype)
    scale = torch.rand(CO, generator=g) * 0.8 + 0.7
    shift = torch.rand(CO, generator=g) * 0.6
    res = (torch.randn(T, N, CO, 1, 1, generator=g) * 0.7).to(dtype) if residual else None
    v = torch.rand(N, CO, 1, 1, generator=g) * 1.2 - 0.4 if v0 else None
    return dict(x=x, w=w, scale=scale, shift=shift, res=res, v=v)


def _materialized(x):
    """The static input ``x`` repeated in memory, each step channels_last as the frame is (tensor descriptors need
    that layout)."""
    return x.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(x.shape)


def _run(layer, x, stride, padding, cfg, p, **kw):
    return spiking_conv2d(x, layer["w"], None, stride, padding, scale=layer["scale"], shift=layer["shift"],
                          residual=layer["res"], v=layer["v"], config=cfg, return_v=True, **kernel_neuron_kwargs(p),
                          **kw)


def _reference_z(layer, stride, padding, OH, OW):
    frame = layer["x"][0]
    y = conv2d_reference(*as_float64(frame, layer["w"], None), stride, padding)
    z = y * layer["scale"].double().view(1, -1, 1, 1) + layer["shift"].double().view(1, -1, 1, 1)
    z = z.unsqueeze(0).expand(layer["x"].shape[0], *z.shape)
    if layer["res"] is not None:
        z = z + layer["res"].double().expand(*z.shape[:3], OH, OW)
    return z.contiguous()


def _expand_hw(layer, OH, OW):
    """The residual and membrane drawn per channel, broadcast to the output's map (real tensors of their own)."""
    T, N = layer["x"].shape[:2]
    CO = layer["w"].shape[0]
    if layer["res"] is not None:
        layer["res"] = layer["res"].expand(T, N, CO, OH, OW).contiguous()
    if layer["v"] is not None:
        layer["v"] = (layer["v"] + torch.linspace(-0.2, 0.2, OH * OW).view(1, 1, OH, OW)).contiguous()


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=st.sampled_from(sorted(CONFIGS)), T=st.integers(2, 4), N=st.integers(1, 2), C=st.sampled_from([3, 16, 20]),
       CO=st.sampled_from([8, 24]), H=st.integers(3, 10), geom=st.sampled_from(sorted(GEOMETRIES)),
       neuron=st.sampled_from(["lif-hard", "if-soft", "plif-soft-nodecayinput", "leaky-zero"]),
       residual=st.booleans(), v0=st.booleans(), seed=st.integers(0, 2**16))
@example(cfg="tma-4x4", T=2, N=1, C=16, CO=8, H=3, geom="1x1", neuron="lif-hard", residual=False, v0=False, seed=0)
@example(cfg="tma-4x4", T=3, N=2, C=16, CO=24, H=7, geom="3x3s1", neuron="if-soft", residual=True, v0=True, seed=1)
def test_static_equals_materialized_and_reference(cfg, T, N, C, CO, H, geom, neuron, residual, v0, seed):
    k, stride, padding = GEOMETRIES[geom]
    c = CONFIGS[cfg]
    if c.tma and (stride != 1 or C % 8):
        c = CONFIGS["looped-8x8"]  # (tensor descriptors take "same" convolutions whose pixels are 16-byte rows)
    dtype = torch.float16 if c.tma else torch.float32
    p = NEURONS[neuron]
    layer = _static_layer(T, N, C, CO, H, k, dtype, seed, residual, v0)
    OH = (H + 2 * padding - k) // stride + 1
    _expand_hw(layer, OH, OH)
    x = layer["x"]
    assert x.stride(0) == 0
    spikes, v = _run(layer, x, stride, padding, c, p)
    ms, mv = _run(layer, _materialized(x), stride, padding, c, p)
    assert torch.equal(spikes, ms) and torch.equal(v, mv)
    ref_s, ref_h, ref_v = reference_neuron(p, _reference_z(layer, stride, padding, OH, OH), layer["v"])
    tol = dict(tie_tol=2e-2, v_rtol=2e-2) if dtype == torch.float16 else {}
    assert_spikes_match(spikes, ref_s, ref_h, p["v_threshold"], v, ref_v, **tol)


@pytest.mark.parametrize("cfg", ["looped-8x8", "im2col"])
def test_static_pool_in_the_epilogue(cfg):
    """Max pool 2 / 2 of the spikes in the epilogue of a static input's tiles: the pooled spikes of the repeated
    input, bit for bit, and the reference's pooled."""
    p = NEURONS["lif-hard"]
    layer = _static_layer(3, 2, 3, 16, 16, 3, torch.float32, 5)
    kw = dict(pool=(2, 2, 0))
    spikes, v = _run(layer, layer["x"], 1, 1, CONFIGS[cfg], p, **kw)
    ms, mv = _run(layer, _materialized(layer["x"]), 1, 1, CONFIGS[cfg], p, **kw)
    assert spikes.shape == (3, 2, 16, 8, 8)
    assert torch.equal(spikes, ms) and torch.equal(v, mv)
    ref_s, _, _ = reference_neuron(p, _reference_z(layer, 1, 1, 16, 16))
    pooled = torch.nn.functional.max_pool2d(ref_s.flatten(0, 1), 2).view(spikes.shape)
    assert 0 < pooled.float().mean() < 1
    assert (spikes.double() != pooled).double().mean() < 1e-3  # (threshold ties of the float32 sums)


def test_static_sum_and_spikes():
    """``return_sum`` (the residual stream of a neuron-first network) from a static input: the same sum, spikes
    and membrane as the repeated input."""
    p = NEURONS["lif-soft"]
    layer = _static_layer(3, 2, 16, 16, 7, 3, torch.float32, 9, residual=True)
    _expand_hw(layer, 7, 7)
    outs = [_run(layer, x, 1, 1, CONFIGS["looped-4x4"], p, return_sum=True)
            for x in (layer["x"], _materialized(layer["x"]))]
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert torch.isfinite(outs[0][2]).all()


@pytest.mark.parametrize("name", ["fused_tm", "fused_dense"])
def test_static_input_on_every_configuration(name):
    """A configuration with the steps in the GEMM's rows reads the input repeated in memory, one with the steps
    looped the frame once: both give the materialized input's result."""
    cfg = spiking_configs(16, 16, 3)[name]
    p = NEURONS["lif-hard"]
    layer = _static_layer(3, 1, 16, 16, 6, 3, torch.float32, 3)
    a = _run(layer, layer["x"], 1, 1, cfg, p)
    b = _run(layer, _materialized(layer["x"]), 1, 1, cfg, p)
    assert all(torch.equal(u, w) for u, w in zip(a, b))


def test_launch_static_errors():
    """The launcher refuses a static frame with the steps in the GEMM's rows, and frames of the wrong count."""
    x = torch.randn(2, 16, 5, 5)
    w = torch.randn(8, 16, 3, 3)
    tm = ConvConfig(4, 4, 16, 16, True, 4, 2)
    looped = ConvConfig(4, 4, 16, 16, False, 4, 2)
    out = torch.empty(6, 8, 5, 5)
    with pytest.raises(ValueError, match="static=True convolves each steps-looped tile's frame once"):
        launch_conv(x, pack_conv_weight(w, tm, x.dtype), 8, 3, 3, (1, 1), (1, 1), (1, 1), T=3, N=2, out=out,
                    cfg=tm, prec="ieee", static=True)
    with pytest.raises(ValueError, match=r"x holds 2 frames and out 6 for T=3, N=2$"):
        launch_conv(x, pack_conv_weight(w, looped, x.dtype), 8, 3, 3, (1, 1), (1, 1), (1, 1), T=3, N=2, out=out,
                    cfg=looped, prec="ieee")
    with pytest.raises(ValueError, match=r"x holds 6 frames .* with static=True"):
        launch_conv(torch.randn(6, 16, 5, 5), pack_conv_weight(w, looped, x.dtype), 8, 3, 3, (1, 1), (1, 1), (1, 1),
                    T=3, N=2, out=out, cfg=looped, prec="ieee", static=True)


@pytest.mark.parametrize("pool", [None, (3, 2, 1)], ids=["neuron", "neuron+pool3/2/1"])
def test_triton_conv_pair_on_a_static_stem(pool):
    """An image stem (3 channels, 7 x 7 / 2) on the ``"triton_conv"`` path, the (tap, channel) im2col tiling: a static
    input's frames convolved once give the repeated input's spikes and membrane bit for bit, and the float64
    reference's (pooled 3 / 2 / 1 where asked)."""
    p = NEURONS["lif-hard"]
    layer = _static_layer(3, 2, 3, 16, 19, 7, torch.float32, 11)
    cfg = spiking_configs(3, 16, 3)["im2col_8x8"]
    kw = dict(path="triton_conv", pool=pool)
    spikes, v = _run(layer, layer["x"], 2, 3, cfg, p, **kw)
    ms, mv = _run(layer, _materialized(layer["x"]), 2, 3, cfg, p, **kw)
    assert torch.equal(spikes, ms) and torch.equal(v, mv)
    ref_s, ref_h, ref_v = reference_neuron(p, _reference_z(layer, 2, 3, 10, 10))
    if pool is None:
        assert_spikes_match(spikes, ref_s, ref_h, p["v_threshold"], v, ref_v)
    else:
        pooled = torch.nn.functional.max_pool2d(ref_s.flatten(0, 1), 3, 2, 1).view(spikes.shape)
        assert 0 < pooled.float().mean() < 1
        assert (spikes.double() != pooled).double().mean() < 1e-3  # (threshold ties of the float32 sums)
        torch.testing.assert_close(v.double(), ref_v, rtol=1e-4, atol=1e-4)  # (the full map's membrane)


def test_triton_conv_refuses_t_in_m():
    layer = _static_layer(3, 1, 16, 16, 6, 3, torch.float32, 2)
    with pytest.raises(ValueError, match="path='triton_conv' convolves the frames on their own"):
        _run(layer, layer["x"], 1, 1, ConvConfig(4, 4, 16, 16, True, 4, 2), NEURONS["lif-hard"], path="triton_conv")


def test_static_channels_last_input_on_a_tensor_descriptor_t_in_m_tiling():
    """A tiling with the steps in the GEMM's rows reads the static input repeated in memory: copied channels_last,
    as each step is, so tensor-descriptor loads take it; the result is the materialized input's, bit for bit."""
    p = NEURONS["lif-hard"]
    layer = _static_layer(3, 2, 16, 16, 6, 3, torch.float16, 4)
    cfg = spiking_configs(16, 16, 3, tma=True)["tma_tm_2x4"]
    x = layer["x"]
    assert x.stride(0) == 0 and x[0].is_contiguous(memory_format=torch.channels_last)
    a = _run(layer, x, 1, 1, cfg, p)
    b = _run(layer, _materialized(x), 1, 1, cfg, p)
    assert all(torch.equal(u, w) for u, w in zip(a, b))
    assert 0 < a[0].float().mean() < 1
