"""The fused spiking convolution with tiles of several samples (``ConvConfig(tile_n=S)``, time steps in the GEMM's M):
the rows are step x sample x pixel, so a tile of ``2 x 2`` pixels of 8 samples fills 128 rows on a 14 x 14 map
without computing rows beyond it. Against the float64 reference with batches the tile does not divide (samples past
the batch masked), a residual before or after the neuron and an initial membrane, by pointer-gathered and
tensor-descriptor tiles (both geometries) and split reductions; equal to the one-sample tiles; and what it refuses."""

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
from sparseflow_kernels.tiling import spiking_configs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: (tile_h, tile_w, block_n, block_k, tma, split_k, tile_n)
TILES = {"ptr-2x2-nb2": (2, 2, 16, 16, False, 1, 2), "ptr-1x4-nb4": (1, 4, 16, 16, False, 1, 4),
         "tma-2x2-nb4": (2, 2, 16, 16, True, 1, 4), "tma-rows8-nb2": (1, 8, 16, 16, True, 1, 2),
         "tma-2x4-nb2-split3": (2, 4, 16, 16, True, 3, 2)}


def _config(tile, **kw):
    th, tw, bn, bk, tma, split, tn = TILES[tile]
    return ConvConfig(th, tw, bn, bk, True, 4, 2, tma=tma, split_k=split, tile_n=tn, **kw)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tile=st.sampled_from(sorted(TILES)), T=st.integers(1, 4), N=st.integers(1, 5), C=st.sampled_from([16, 40]),
       CO=st.sampled_from([16, 24]), H=st.integers(1, 7), W=st.integers(1, 7), k=st.sampled_from([1, 3]),
       residual=st.sampled_from(["none", "before", "after"]),
       neuron=st.sampled_from(["lif-hard", "lif-soft", "if-hard"]), real=st.booleans(), seed=st.integers(0, 2**16))
def test_tile_n_matches_reference(tile, T, N, C, CO, H, W, k, residual, neuron, real, seed):
    """Any batch (a tile's samples past it included), a residual before or after the neuron and an initial membrane:
    the float64 reference up to fp16 rounding, spikes except at threshold ties, and the final membrane; after the
    neuron, the stored sum is the residual plus those spikes, rounded once."""
    p = NEURONS[neuron]
    dtype = torch.float16
    xs, w, scale, shift, z = same_conv_layer(DEVICE, T, N, C, CO, H, W, k, dtype, seed, real)
    g = torch.Generator().manual_seed(seed + 1)
    res = None
    if residual != "none":
        res = (torch.randn(T, N, CO, H, W, generator=g) * 0.5).to(dtype)
        if residual == "before":
            z = z + res.double()
    v0 = torch.rand(N, CO, H, W, generator=g) * 0.5
    out, v = spiking_conv2d(xs, w, None, 1, k // 2, scale=scale, shift=shift,
                            residual=res.to(DEVICE) if res is not None else None, residual_after=residual == "after",
                            v=v0.to(DEVICE), config=_config(tile), return_v=True, **kernel_neuron_kwargs(p))
    out = out.cpu()
    ref_s, ref_h, ref_v = reference_neuron(p, z, v0.double())
    assert out.shape == ref_s.shape and out.dtype == dtype
    spikes = out
    if residual == "after":
        spikes = (out != res).to(dtype)  # |res| < 2048: adding 1 always changes an fp16 value there
        torch.testing.assert_close(out, (res.float() + spikes.float()).to(dtype), rtol=0, atol=0)
    assert_spikes_match(spikes, ref_s, ref_h, p["v_threshold"], v.cpu(), ref_v, tie_tol=2e-2, v_rtol=2e-2)


@pytest.mark.parametrize("tile", sorted(TILES))
def test_tile_n_fires_and_equals_one_sample_tiles(tile):
    """A batch of 5 (the last tile part full) over several tiles and channel blocks: the reference's spikes, and
    the spikes and final membrane of the same tiles holding one sample each."""
    p = NEURONS["lif-hard"]
    xs, w, scale, shift, z = same_conv_layer(DEVICE, 4, 5, 48, 32, 9, 7, 3, torch.float16, 3)
    kw = dict(scale=scale, shift=shift, return_v=True, **kernel_neuron_kwargs(p))
    ref_s, ref_h, ref_v = reference_neuron(p, z)
    assert_fires(ref_s)
    spikes, v = spiking_conv2d(xs, w, None, 1, 1, config=_config(tile), **kw)
    assert_spikes_match(spikes.cpu(), ref_s, ref_h, p["v_threshold"], v.cpu(), ref_v, tie_tol=2e-2, v_rtol=2e-2)
    one = ConvConfig(**{**_config(tile).as_dict(), "tile_n": 1})
    s1, v1 = spiking_conv2d(xs, w, None, 1, 1, config=one, **kw)
    assert (spikes != s1).float().mean().item() <= 1e-3
    same = (spikes == s1).all(0)  # neurons whose spikes agree at every step: their membranes agree too
    torch.testing.assert_close(v[same], v1[same], rtol=1e-5, atol=1e-5)


def test_tile_n_refusals():
    """Samples per tile need every step in the GEMM's M, run dense and write no occupancy."""
    with pytest.raises(ValueError, match="tile_n"):
        ConvConfig(2, 2, 64, 16, False, 4, 3, tile_n=2)
    with pytest.raises(ValueError, match="power of two"):
        ConvConfig(2, 2, 64, 16, True, 4, 3, tile_n=3)
    xs, w, scale, shift, _ = same_conv_layer(DEVICE, 2, 2, 16, 16, 8, 8, 3, torch.float16, 0)
    cfg = ConvConfig(2, 2, 16, 16, True, 4, 2, tile_n=2)
    with pytest.raises(ValueError, match="tile_n=2"):
        spiking_conv2d(xs, w, None, 1, 1, scale=scale, shift=shift, config=cfg, write_occupancy=True)
    with pytest.raises(ValueError, match="tile_n=2"):
        spiking_conv2d(xs, w, None, 1, 1, scale=scale, shift=shift, config=cfg, sparse=True)


@pytest.mark.parametrize("N", [1, 2, 4, 8, 32])
def test_measured_candidates_hold_no_more_samples_than_the_batch(N):
    """Told the batch, a layer measures no tiling whose tiles hold more samples than it; untold, all of them."""
    every = spiking_configs(256, 256, 4, tma=True)
    assert any(c.tile_n > 1 for c in every.values())
    cfgs = spiking_configs(256, 256, 4, tma=True, N=N)
    assert set(cfgs) == {name for name, c in every.items() if c.tile_n <= N}
