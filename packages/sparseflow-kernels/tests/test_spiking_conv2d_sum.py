"""The fused spiking convolution that also writes its neuron's input (``spiking_conv2d(..., return_sum=True)``): the
residual stream ``bn(conv(x)) + residual`` of a network whose neurons come before their convolutions, and the spikes
of the neuron reading it, from one kernel.

Against the float64 reference, rounded as separate ops round it (the affine to ``x``'s dtype, then the sum), on every
tile geometry of the fused kernel (pointer gathers, tensor descriptors, steps looped or in the GEMM's M, tiles of
several samples, split reductions) and on the cuDNN path; the spikes and final membrane are exactly those of the
multi-step neuron run on the stored sum; and what it refuses."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_checks import NEURONS, assert_fires, kernel_neuron_kwargs, same_conv_layer

from sparseflow_kernels import ConvConfig, multistep_neuron, spiking_conv2d

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: name -> (ConvConfig, takes fp32 inputs); None: the cuDNN path
CONFIGS = {
    "ptr-4x4": (ConvConfig(4, 4, 16, 16, False, 4, 2), True),
    "ptr-2x4-tm": (ConvConfig(2, 4, 16, 16, True, 4, 2), True),
    "ptr-2x2-nb2-split2": (ConvConfig(2, 2, 16, 16, True, 4, 2, split_k=2, tile_n=2), True),
    "tma-4x4": (ConvConfig(4, 4, 16, 16, False, 4, 2, tma=True), False),
    "tma-rows16": (ConvConfig(1, 16, 16, 16, False, 4, 2, tma=True), False),
    "tma-2x2-nb4-tm": (ConvConfig(2, 2, 16, 16, True, 4, 2, tma=True, tile_n=4), False),
    "cudnn": (None, True),
}


def _run(xs, w, scale, shift, res, v0, p, cfg_name, **kw):
    cfg, _ = CONFIGS[cfg_name]
    path = "cudnn" if cfg is None else "fused"
    return spiking_conv2d(xs, w, None, 1, w.shape[-1] // 2, scale=scale, shift=shift, residual=res, v=v0,
                          return_v=True, return_sum=True, config=cfg, path=path, v_dtype=xs.dtype,
                          **kernel_neuron_kwargs(p), **kw)


def _reference_sum(z_affine: torch.Tensor, res: torch.Tensor, x_dtype, sum_dtype) -> torch.Tensor:
    """``bn(conv(x))`` rounded to ``x``'s dtype, plus the residual, rounded to the sum's dtype (float64 math)."""
    return (z_affine.to(x_dtype).double() + res.double()).to(sum_dtype)


def _check(xs, w, scale, shift, z_affine, res, v0, p, cfg_name):
    spikes, v, s = _run(xs, w, scale, shift, res.to(DEVICE), None if v0 is None else v0.to(DEVICE), p, cfg_name)
    sum_dtype = torch.promote_types(xs.dtype, res.dtype)
    assert s.dtype == sum_dtype and s.shape == res.shape and spikes.shape == res.shape
    if CONFIGS[cfg_name][0] is not None:
        assert spikes.stride() == s.stride()  # (the fused kernel's sum in the spikes' layout: channels innermost)
    s = s.cpu()
    assert not torch.isnan(s).any(), "NaN in the sum (an element was not written)"
    ref = _reference_sum(z_affine, res, xs.dtype, sum_dtype)
    # the products summed in fp32, not float64: a rounding may land one unit away
    tol = 2e-3 if xs.dtype == torch.float16 else 1e-5
    torch.testing.assert_close(s, ref, rtol=tol, atol=tol * 4)
    # the neuron fired from the stored sum: what the multi-step neuron computes from it, bit for bit
    ref_s, ref_v = multistep_neuron(s.to(DEVICE), v=None if v0 is None else v0.to(DEVICE), return_v=True,
                                    v_dtype=xs.dtype, **kernel_neuron_kwargs(p))
    assert torch.equal(spikes.cpu(), ref_s.cpu()), "spikes differ from the neuron run on the stored sum"
    assert torch.equal(v.cpu(), ref_v.cpu()), "final membrane differs from the neuron run on the stored sum"
    return ref_s


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=st.sampled_from(sorted(CONFIGS)), T=st.integers(1, 4), N=st.integers(1, 3), C=st.sampled_from([16, 24]),
       CO=st.sampled_from([16, 24]), H=st.integers(1, 7), W=st.integers(1, 7), k=st.sampled_from([1, 3]),
       x32=st.booleans(), res32=st.booleans(), has_v=st.booleans(),
       neuron=st.sampled_from(["lif-hard", "lif-soft", "if-hard", "lif-nodecayinput"]), real=st.booleans(),
       seed=st.integers(0, 2**16))
def test_sum_and_spikes_match_reference(cfg, T, N, C, CO, H, W, k, x32, res32, has_v, neuron, real, seed):
    """Any shape, neuron, initial membrane, an fp32 input (where the tiling takes one) or an fp32 residual (the sum
    then fp32): the rounded float64 sum, and the neuron's spikes and membrane from it."""
    dtype = torch.float32 if x32 and CONFIGS[cfg][1] else torch.float16
    xs, w, scale, shift, z = same_conv_layer(DEVICE, T, N, C, CO, H, W, k, dtype, seed, real)
    g = torch.Generator().manual_seed(seed + 1)
    res = (torch.randn(T, N, CO, H, W, generator=g) * 0.7).to(torch.float32 if res32 else dtype)
    v0 = torch.rand(N, CO, H, W, generator=g) * 0.5 if has_v else None
    _check(xs, w, scale, shift, z, res, v0, NEURONS[neuron], cfg)


@pytest.mark.parametrize("cfg", sorted(CONFIGS))
def test_sum_fires_over_several_tiles(cfg):
    """A batch of 3 over several tiles and channel blocks (a tile of several samples part full): the neuron both
    fires and stays silent, from the sum the kernel stored."""
    p = NEURONS["lif-hard"]
    xs, w, scale, shift, z = same_conv_layer(DEVICE, 4, 3, 32, 40, 9, 7, 3, torch.float16, 5)
    res = (torch.randn(4, 3, 40, 9, 7, generator=torch.Generator().manual_seed(9)) * 0.7).half()
    spikes = _check(xs, w, scale, shift, z, res, None, p, cfg)
    assert_fires(spikes.cpu())


def test_refusals():
    xs, w, scale, shift, _ = same_conv_layer(DEVICE, 2, 1, 16, 16, 4, 4, 3, torch.float16, 0)
    res = torch.zeros(2, 1, 16, 4, 4, dtype=torch.float16, device=DEVICE)
    kw = dict(scale=scale, shift=shift, return_sum=True)
    with pytest.raises(ValueError, match=r"return_sum=True .* needs a residual added before the neuron"):
        spiking_conv2d(xs, w, None, 1, 1, **kw)
    with pytest.raises(ValueError, match="return_sum=True"):
        spiking_conv2d(xs, w, None, 1, 1, residual=res, residual_after=True, **kw)
    with pytest.raises(ValueError, match="return_sum=True"):
        spiking_conv2d(xs, w, None, 1, 1, residual=res, write_occupancy=True, **kw)
