"""The fused spiking convolution with tiles loaded through tensor descriptors (``ConvConfig(tma=True)``) against
the float64 reference: "same" convolutions of fp16/bf16 channels_last inputs, on both tile geometries (``tile_h > 1``:
5-D boxes of ``tile_h x tile_w`` pixels; ``tile_h == 1``: ``tile_w`` pixels in row-major order across the map's
rows, whose column edges the kernel masks), with time steps looped or in the GEMM's M. Under the CPU interpreter the
descriptors run as masked loads; on a GPU with a tensor-memory accelerator, as TMA copies."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_checks import (
    NEURONS,
    assert_fires,
    assert_spikes_match,
    kernel_neuron_kwargs,
    reference_neuron,
    same_conv_layer,
)

from sparseflow_kernels import ConvConfig, spiking_conv2d
from sparseflow_kernels.conv import tma_supported
from sparseflow_kernels.tiling import TMA_CONFIGS, spiking_configs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float16]  # (no bf16 in the interpreter)
CONFIGS = {
    "rows16": ConvConfig(1, 16, 32, 16, False, 4, 2, tma=True),
    "rows32-tm": ConvConfig(1, 32, 16, 16, True, 4, 2, tma=True),
    "tile4x4": ConvConfig(4, 4, 32, 16, False, 4, 2, tma=True),
    "tile2x4-tm": ConvConfig(2, 4, 16, 32, True, 4, 2, tma=True),
}


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=st.sampled_from(sorted(CONFIGS)), T=st.integers(1, 5), N=st.integers(1, 2), C=st.sampled_from([16, 24, 40]),
       CO=st.sampled_from([16, 24]), H=st.integers(1, 9), W=st.integers(1, 9), k=st.sampled_from([1, 3]),
       dtype=st.sampled_from(DTYPES), real=st.booleans(), seed=st.integers(0, 2**16))
def test_tma_matches_reference(cfg, T, N, C, CO, H, W, k, dtype, real, seed):
    p = NEURONS["lif-hard"]
    xs, w, scale, shift, z = same_conv_layer(DEVICE, T, N, C, CO, H, W, k, dtype, seed, real)
    assert tma_supported(xs.flatten(0, 1), (k, k), (1, 1), (k // 2, k // 2))
    spikes, v = spiking_conv2d(xs, w, None, 1, k // 2, scale=scale, shift=shift, config=CONFIGS[cfg], return_v=True,
                               **kernel_neuron_kwargs(p))
    ref_s, ref_h, ref_v = reference_neuron(p, z)
    assert spikes.dtype == dtype and spikes.shape == ref_s.shape
    assert_spikes_match(spikes.cpu(), ref_s, ref_h, p["v_threshold"], v.cpu(), ref_v, tie_tol=2e-2, v_rtol=2e-2)


@pytest.mark.parametrize("cfg", sorted(CONFIGS))
def test_tma_fires_and_matches_pointer_loads(cfg):
    """A map of several tiles: the reference's spikes, and those of the pointer-gathered kernel of like tiles."""
    p = NEURONS["lif-hard"]
    xs, w, scale, shift, z = same_conv_layer(DEVICE, 4, 2, 32, 24, 11, 13, 3, torch.float16, 1)
    c = CONFIGS[cfg]
    kw = dict(scale=scale, shift=shift, return_v=True, **kernel_neuron_kwargs(p))
    spikes, v = spiking_conv2d(xs, w, None, 1, 1, config=c, **kw)
    ref_s, ref_h, ref_v = reference_neuron(p, z)
    assert_fires(ref_s)
    assert_spikes_match(spikes.cpu(), ref_s, ref_h, p["v_threshold"], v.cpu(), ref_v, tie_tol=2e-2, v_rtol=2e-2)
    pointer = ConvConfig(max(2, c.tile_h), c.tile_w if c.tile_h > 1 else 8, c.block_n, c.block_k, c.t_in_m, 4, 2)
    s2, _ = spiking_conv2d(xs, w, None, 1, 1, config=pointer, **kw)
    assert (s2 != spikes).float().mean().item() <= 1e-3


@pytest.mark.parametrize("name", sorted(TMA_CONFIGS))
def test_every_measured_tiling_matches_reference(name):
    """Each tensor-descriptor tiling the spiking layers measure, as a layer builds it (``spiking_configs``), over a
    map of several tiles with output channels for two of its widest blocks: the float64 reference's spikes."""
    p = NEURONS["lif-hard"]
    xs, w, scale, shift, z = same_conv_layer(DEVICE, 4, 1, 32, 256, 17, 18, 3, torch.float16, 5)
    cfg = spiking_configs(32, 256, 4, tma=True)[name]
    spikes, v = spiking_conv2d(xs, w, None, 1, 1, scale=scale, shift=shift, config=cfg, return_v=True,
                               **kernel_neuron_kwargs(p))
    ref_s, ref_h, ref_v = reference_neuron(p, z)
    assert_fires(ref_s)
    assert_spikes_match(spikes.cpu(), ref_s, ref_h, p["v_threshold"], v.cpu(), ref_v, tie_tol=2e-2, v_rtol=2e-2)


@pytest.mark.parametrize("case", ["stride2", "fp32", "nchw", "padding0-k3"])
def test_tma_refuses_what_it_cannot_load(case):
    """Inputs the descriptors cannot express are refused by name, not run wrong."""
    xs, w, scale, shift, _ = same_conv_layer(DEVICE, 2, 1, 16, 16, 8, 8, 3, torch.float16, 0)
    stride, padding = 1, 1
    if case == "stride2":
        stride = 2
    elif case == "fp32":
        xs, w = xs.float(), w.float()
    elif case == "nchw":
        xs = xs.contiguous()
    else:
        padding = 0
    flat = xs.flatten(0, 1) if case != "nchw" else xs.reshape(-1, *xs.shape[2:])
    assert not tma_supported(flat, (3, 3), (stride, stride), (padding, padding))
    with pytest.raises(ValueError, match="tma=True"):
        spiking_conv2d(xs, w, None, stride, padding, scale=scale, shift=shift, config=CONFIGS["rows16"])


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs a GPU with a tensor-memory accelerator")
@pytest.mark.parametrize("H,C,N", [(14, 64, 2), (7, 128, 3), (28, 32, 1)])
def test_tma_configs_on_gpu(H, C, N):
    """Every tensor-descriptor configuration a spiking layer measures, as TMA copies, against the float64 reference
    and the cuDNN path, and refusing nothing it was offered for."""
    from sparseflow_kernels.tiling import spiking_configs

    p = NEURONS["lif-hard"]
    xs, w, scale, shift, z = same_conv_layer(DEVICE, 4, N, C, C, H, H, 3, torch.float16, H)
    ref_s, ref_h, ref_v = reference_neuron(p, z)
    assert_fires(ref_s)
    kw = dict(scale=scale, shift=shift, **kernel_neuron_kwargs(p))
    cudnn = spiking_conv2d(xs, w, None, 1, 1, path="cudnn", **kw)
    cfgs = {k: c for k, c in spiking_configs(C, C, 4, tma=True).items() if c.tma}
    assert cfgs
    for name, c in cfgs.items():
        spikes, v = spiking_conv2d(xs, w, None, 1, 1, config=c, return_v=True, **kw)
        assert_spikes_match(spikes.cpu(), ref_s, ref_h, p["v_threshold"], v.cpu(), ref_v, tie_tol=2e-2, v_rtol=2e-2)
        assert (spikes != cudnn).float().mean().item() <= 1e-3, name
