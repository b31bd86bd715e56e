"""The fused spiking convolution with stream-K tiles (``ConvConfig(stream_k=S)``, time steps in the GEMM's M): S
programs per multiprocessor share the (channel group, tap) iterations of all tiles equally, a program's share running
from the tail of one tile into the head of the next; a tile summed by several programs is combined by the last to
finish, which runs BatchNorm, the residual and the neuron over T. Under the CPU interpreter a "GPU" has one
multiprocessor, so S is the number of programs. Against the float64 reference with any number of programs (one, a
few, more than there are iterations), pointer-gathered and tensor-descriptor tiles (both geometries), tiles of several
samples, a residual and the sum written; the counters left at zero for the next launch; and what it refuses."""

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
from sparseflow_kernels.conv import multiprocessors, tile_counters

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: (tile_h, tile_w, block_n, block_k, tile_n), pointer loads (stream-K with tensor descriptors is refused)
TILES = {"2x4": (2, 4, 16, 16, 1), "2x2-nb2": (2, 2, 16, 16, 2), "1x8-nb2": (1, 8, 16, 16, 2),
         "2x2-nb4-k32": (2, 2, 16, 32, 4)}


def _config(tile, programs):
    th, tw, bn, bk, tn = TILES[tile]
    return ConvConfig(th, tw, bn, bk, True, 4, 2, tile_n=tn, stream_k=programs)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tile=st.sampled_from(sorted(TILES)), programs=st.integers(1, 9), T=st.integers(1, 4), N=st.integers(1, 3),
       C=st.sampled_from([16, 40]), CO=st.sampled_from([16, 40]), H=st.integers(1, 7), W=st.integers(1, 7),
       k=st.sampled_from([1, 3]), residual=st.sampled_from(["none", "before", "sum"]),
       neuron=st.sampled_from(["lif-hard", "lif-soft", "if-hard"]), real=st.booleans(), seed=st.integers(0, 2**16))
def test_stream_k_matches_reference(tile, programs, T, N, C, CO, H, W, k, residual, neuron, real, seed):
    """Any number of programs, with a residual (its sum written too, or not) and an initial membrane: the float64
    reference up to fp16 rounding, spikes except at threshold ties, and the final membrane."""
    p = NEURONS[neuron]
    dtype = torch.float16
    xs, w, scale, shift, z = same_conv_layer(DEVICE, T, N, C, CO, H, W, k, dtype, seed, real)
    g = torch.Generator().manual_seed(seed + 1)
    res = None
    if residual != "none":
        res = (torch.randn(T, N, CO, H, W, generator=g) * 0.5).to(dtype)
        z = z + res.double()
        res = res.to(DEVICE)
    v0 = torch.rand(N, CO, H, W, generator=g) * 0.5
    out = spiking_conv2d(xs, w, None, 1, k // 2, scale=scale, shift=shift, residual=res, v=v0.to(DEVICE),
                         config=_config(tile, programs), return_v=True, return_sum=residual == "sum",
                         **kernel_neuron_kwargs(p))
    spikes, v = out[:2]
    ref_s, ref_h, ref_v = reference_neuron(p, z, v0.double())
    assert spikes.shape == ref_s.shape and spikes.dtype == dtype
    assert_spikes_match(spikes.cpu(), ref_s, ref_h, p["v_threshold"], v.cpu(), ref_v, tie_tol=2e-2, v_rtol=2e-2)
    if residual == "sum":
        torch.testing.assert_close(out[2].cpu().double(), z, rtol=4e-3, atol=8e-3)
    assert not tile_counters(xs.device, 1).any(), "a tile's counter was left set for the next launch"


@pytest.mark.parametrize("tile", sorted(TILES))
def test_stream_k_fires_and_matches_whole_tiles(tile):
    """A map of several tiles and channel blocks (3 samples: tiles of several part full), programs that split
    tiles at uneven points: the reference's spikes, and nearly always those of whole tiles."""
    p = NEURONS["lif-hard"]
    xs, w, scale, shift, z = same_conv_layer(DEVICE, 4, 3, 48, 40, 9, 11, 3, torch.float16, 3)
    kw = dict(scale=scale, shift=shift, return_v=True, **kernel_neuron_kwargs(p))
    ref_s, ref_h, ref_v = reference_neuron(p, z)
    assert_fires(ref_s)
    whole, _ = spiking_conv2d(xs, w, None, 1, 1, config=_config(tile, 0), **kw)
    for programs in (2, 7):
        spikes, v = spiking_conv2d(xs, w, None, 1, 1, config=_config(tile, programs), **kw)
        assert_spikes_match(spikes.cpu(), ref_s, ref_h, p["v_threshold"], v.cpu(), ref_v, tie_tol=2e-2, v_rtol=2e-2)
        assert (spikes != whole).float().mean().item() <= 1e-3


def test_stream_k_refusals_and_candidates():
    """stream_k needs every step's sum in one tile (t_in_m), not split_k, and runs dense with no occupancy written;
    the measured candidates hold stream-K tiles only with tensor descriptors and T in M."""
    from sparseflow_kernels.tiling import spiking_configs

    for bad in (dict(t_in_m=False, stream_k=1), dict(t_in_m=True, stream_k=1, split_k=2),
                dict(t_in_m=True, stream_k=-1)):
        with pytest.raises(ValueError, match="stream_k"):
            ConvConfig(2, 4, 64, 16, num_warps=4, num_stages=3, **bad)
    xs, w, scale, shift, _ = same_conv_layer(DEVICE, 2, 1, 16, 16, 8, 8, 3, torch.float16, 0)
    cfg = ConvConfig(2, 4, 16, 16, True, 4, 2, stream_k=2)
    for kw in (dict(write_occupancy=True), dict(sparse=True)):
        with pytest.raises(ValueError, match="stream_k=2"):
            spiking_conv2d(xs, w, None, 1, 1, scale=scale, shift=shift, config=cfg, **kw)
    with pytest.raises(ValueError, match=r"stream_k=1\) with tensor descriptors \(tma=True\) is not supported"):
        spiking_conv2d(xs, w, None, 1, 1, scale=scale, shift=shift,
                       config=ConvConfig(2, 4, 16, 16, True, 4, 2, tma=True, stream_k=1))
    for T, tma in ((4, True), (16, True), (4, False)):  # (not a measured candidate: see the refusal above)
        assert not any(c.stream_k for c in spiking_configs(256, 256, T, tma, N=8).values())
    assert multiprocessors(torch.device("cpu")) == 1


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU: the programs sharing a tile race for its counter")
def test_stream_k_on_gpu_repeated_on_two_streams_and_in_a_cuda_graph():
    """The last-arrival combination under real concurrency, on the deep layers' shapes (14x14 and 7x7 at N = 8,
    256 and 512 channels, one and two programs per multiprocessor): the same bits on every one of 20 eager calls, on
    a second stream and over 10 CUDA-graph replays, equal to the float64 reference up to rounding."""
    p = NEURONS["lif-hard"]
    kw = dict(**kernel_neuron_kwargs(p))
    for C, H, cfgs in ((256, 14, [ConvConfig(2, 2, 128, 64, True, 8, 3, tile_n=8, stream_k=1)]),
                       (512, 7, [ConvConfig(4, 8, 128, 64, True, 8, 3, stream_k=1),
                                 ConvConfig(4, 8, 64, 64, True, 4, 3, stream_k=2)])):
        xs, w, scale, shift, z = same_conv_layer(DEVICE, 4, 8, C, C, H, H, 3, torch.float16, 7)
        ref_s, ref_h, ref_v = reference_neuron(p, z)
        assert_fires(ref_s)
        kw.update(scale=scale, shift=shift)
        for cfg in cfgs:
            first, v = spiking_conv2d(xs, w, None, 1, 1, config=cfg, return_v=True, **kw)
            assert_spikes_match(first.cpu(), ref_s, ref_h, p["v_threshold"], v.cpu(), ref_v, tie_tol=2e-2,
                                v_rtol=2e-2)
            for _ in range(20):
                assert torch.equal(spiking_conv2d(xs, w, None, 1, 1, config=cfg, **kw), first)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                other = spiking_conv2d(xs, w, None, 1, 1, config=cfg, **kw)
            torch.cuda.current_stream().wait_stream(s)
            assert torch.equal(other, first)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = spiking_conv2d(xs, w, None, 1, 1, config=cfg, **kw)
            for _ in range(10):
                out.fill_(float("nan"))  # poisoned before every replay
                graph.replay()
                torch.cuda.synchronize()
                assert torch.equal(out, first), (C, cfg)
