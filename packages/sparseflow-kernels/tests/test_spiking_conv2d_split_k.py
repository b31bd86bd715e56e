"""The fused spiking convolution with its reduction split among programs (``ConvConfig(split_k=S)``, time steps in
the GEMM's M): each program sums a share of the (channel group, tap) iterations into an fp32 workspace and the last
of a tile adds the partials in split order and runs BatchNorm, the residual and the neuron over T. Against the
float64 reference, pointer-gathered and tensor-descriptor tiles, splits that leave some programs nothing to sum; and
what it refuses."""

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
from sparseflow_kernels.conv import tile_counters

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: (tile_h, tile_w, block_n, block_k, tma): pointer tiles run in any dtype, descriptor tiles in fp16
TILES = {"ptr-2x4": (2, 4, 16, 16, False), "ptr-4x4-k32": (4, 4, 32, 32, False), "tma-2x4": (2, 4, 16, 16, True),
         "tma-rows16": (1, 16, 16, 16, True)}


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tile=st.sampled_from(sorted(TILES)), split=st.integers(1, 12), T=st.integers(1, 4), N=st.integers(1, 2),
       C=st.sampled_from([16, 40]), CO=st.sampled_from([16, 24]), H=st.integers(1, 7), W=st.integers(1, 7),
       k=st.sampled_from([1, 3]), residual=st.booleans(), neuron=st.sampled_from(["lif-hard", "lif-soft", "if-hard"]),
       real=st.booleans(), seed=st.integers(0, 2**16))
def test_split_k_matches_reference(tile, split, T, N, C, CO, H, W, k, residual, neuron, real, seed):
    """Any split (more programs than iterations included), with a residual and an initial membrane, equals the
    float64 reference up to fp16 rounding: spikes except at threshold ties, and the final membrane."""
    th, tw, bn, bk, tma = TILES[tile]
    p = NEURONS[neuron]
    dtype = torch.float16
    xs, w, scale, shift, z = same_conv_layer(DEVICE, T, N, C, CO, H, W, k, dtype, seed, real)
    g = torch.Generator().manual_seed(seed + 1)
    res = v0 = None
    if residual:
        res = (torch.randn(T, N, CO, H, W, generator=g) * 0.5).to(dtype)
        z = z + res.double()
        res = res.to(DEVICE)
    v0 = torch.rand(N, CO, H, W, generator=g) * 0.5
    cfg = ConvConfig(th, tw, bn, bk, True, 4, 2, tma=tma, split_k=split)
    spikes, v = spiking_conv2d(xs, w, None, 1, k // 2, scale=scale, shift=shift, residual=res, v=v0.to(DEVICE),
                               config=cfg, return_v=True, **kernel_neuron_kwargs(p))
    ref_s, ref_h, ref_v = reference_neuron(p, z, v0.double())
    assert spikes.shape == ref_s.shape and spikes.dtype == dtype
    assert_spikes_match(spikes.cpu(), ref_s, ref_h, p["v_threshold"], v.cpu(), ref_v, tie_tol=2e-2, v_rtol=2e-2)
    assert not tile_counters(xs.device, 1).any(), "a tile's counter was left set for the next launch"


@pytest.mark.parametrize("tile", sorted(TILES))
def test_split_k_fires_and_matches_the_whole_sum(tile):
    """A map of several tiles and channel blocks: the reference's spikes, and those of the same tiles unsplit."""
    th, tw, bn, bk, tma = TILES[tile]
    p = NEURONS["lif-hard"]
    xs, w, scale, shift, z = same_conv_layer(DEVICE, 4, 2, 48, 32, 9, 11, 3, torch.float16, 3)
    kw = dict(scale=scale, shift=shift, return_v=True, **kernel_neuron_kwargs(p))
    ref_s, ref_h, ref_v = reference_neuron(p, z)
    assert_fires(ref_s)
    whole, _ = spiking_conv2d(xs, w, None, 1, 1, config=ConvConfig(th, tw, bn, bk, True, 4, 2, tma=tma), **kw)
    for split in (2, 3, 5):
        spikes, v = spiking_conv2d(xs, w, None, 1, 1, config=ConvConfig(th, tw, bn, bk, True, 4, 2, tma=tma,
                                                                         split_k=split), **kw)
        assert_spikes_match(spikes.cpu(), ref_s, ref_h, p["v_threshold"], v.cpu(), ref_v, tie_tol=2e-2, v_rtol=2e-2)
        assert (spikes != whole).float().mean().item() <= 1e-3


def test_split_k_refusals():
    """split_k needs every step's sum in one tile (t_in_m), and runs dense with no occupancy written."""
    with pytest.raises(ValueError, match="split_k"):
        ConvConfig(8, 8, 64, 16, False, 4, 3, split_k=2)
    with pytest.raises(ValueError, match="split_k"):
        ConvConfig(2, 4, 64, 16, True, 4, 3, split_k=0)
    xs, w, scale, shift, _ = same_conv_layer(DEVICE, 2, 1, 16, 16, 8, 8, 3, torch.float16, 0)
    cfg = ConvConfig(2, 4, 16, 16, True, 4, 2, split_k=2)
    with pytest.raises(ValueError, match="split_k=2"):
        spiking_conv2d(xs, w, None, 1, 1, scale=scale, shift=shift, config=cfg, write_occupancy=True)
    with pytest.raises(ValueError, match="split_k=2"):
        spiking_conv2d(xs, w, None, 1, 1, scale=scale, shift=shift, config=cfg, sparse=True)


@pytest.mark.parametrize("T", [1, 4, 8, 16])
def test_split_k_in_the_measured_candidates(T):
    """The spiking layers' measured candidates include split tensor-descriptor tiles, all with T in M, only where T
    fits in M, and none without tensor descriptors."""
    from sparseflow_kernels.tiling import spiking_configs

    split = {k: c for k, c in spiking_configs(256, 256, T, tma=True).items() if c.split_k > 1}
    assert all(c.t_in_m and c.tma for c in split.values())
    assert bool(split) == (T <= 8)
    assert not any(c.split_k > 1 for c in spiking_configs(256, 256, T, tma=False).values())


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU: the programs of a tile race for its counter")
@pytest.mark.parametrize("tma", [False, True])
def test_split_k_on_gpu_repeated_and_in_a_cuda_graph(tma):
    """The last-arrival reduction under real concurrency: a deep layer's shape (7x7, 256 channels, many splits),
    the same bits on every one of 20 eager calls and 10 CUDA-graph replays (the sum's order does not depend on which
    program arrives last), equal to the float64 reference up to rounding."""
    if tma and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("tensor descriptors need a tensor-memory accelerator")
    p = NEURONS["lif-hard"]
    xs, w, scale, shift, z = same_conv_layer(DEVICE, 4, 8, 256, 256, 7, 7, 3, torch.float16, 7)
    ref_s, ref_h, ref_v = reference_neuron(p, z)
    assert_fires(ref_s)
    kw = dict(scale=scale, shift=shift, **kernel_neuron_kwargs(p))
    for split in (2, 4, 9):
        cfg = ConvConfig(4, 8, 64, 64, True, 4, 3, tma=tma, split_k=split)
        first, v = spiking_conv2d(xs, w, None, 1, 1, config=cfg, return_v=True, **kw)
        assert_spikes_match(first.cpu(), ref_s, ref_h, p["v_threshold"], v.cpu(), ref_v, tie_tol=2e-2, v_rtol=2e-2)
        for _ in range(20):
            assert torch.equal(spiking_conv2d(xs, w, None, 1, 1, config=cfg, **kw), first)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            spiking_conv2d(xs, w, None, 1, 1, config=cfg, **kw)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = spiking_conv2d(xs, w, None, 1, 1, config=cfg, **kw)
        for _ in range(10):
            out.fill_(float("nan"))  # poisoned before every replay
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, first), split
