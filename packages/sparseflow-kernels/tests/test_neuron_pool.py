"""multistep_neuron_max_pool against its definition, the neuron kernel followed by F.max_pool2d (bit for bit:
the same neuron arithmetic, and the max of spikes is exact), over shapes, pool geometries, neurons, an initial
membrane and inputs repeated over T by stride 0; pool_covers_input against a brute-force count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import NEURONS, kernel_neuron_kwargs

from sparseflow_kernels import NeuronSpec, multistep_neuron
from sparseflow_kernels.naive import neuron_max_pool_reference
from sparseflow_kernels.neuron_pool import multistep_neuron_max_pool, pool_covers_input

GEOMETRIES = [(3, 2, 1, False), (2, 2, 0, False), (3, 1, 1, False), (3, 2, 1, True), (2, 1, 0, False),
              (3, 3, 0, True), (4, 2, 1, False)]


def _brute_covers(H, W, k, s, p, ceil):
    x = torch.zeros(1, 1, H, W)
    _, idx = F.max_pool2d(x.new_full(x.shape, -1.0), k, s, p, ceil_mode=ceil, return_indices=True)
    seen = torch.zeros(H * W, dtype=torch.bool)
    oh, ow = idx.shape[-2:]
    for i in range(oh):
        for j in range(ow):
            r0, c0 = i * s - p, j * s - p
            for a in range(max(r0, 0), min(r0 + k, H)):
                for b in range(max(c0, 0), min(c0 + k, W)):
                    seen[a * W + b] = True
    return bool(seen.all())


@settings(max_examples=40, deadline=None)
@given(H=st.integers(2, 12), W=st.integers(2, 12), geom=st.sampled_from(GEOMETRIES))
def test_pool_covers_input_matches_brute_force(H, W, geom):
    k, s, p, ceil = geom
    if H + 2 * p < k or W + 2 * p < k:
        return
    assert pool_covers_input(H, W, k, s, p, 1, ceil) == _brute_covers(H, W, k, s, p, ceil)


@settings(max_examples=10, deadline=None)
@given(T=st.integers(1, 4), N=st.integers(1, 2), C=st.integers(1, 9), H=st.integers(4, 9),
       geom=st.sampled_from([g for g in GEOMETRIES if g[1] <= g[0]]),
       neuron=st.sampled_from(["lif-hard", "lif-soft", "if-hard", "plif-soft-nodecayinput", "leaky-zero"]),
       with_v=st.booleans(), repeated=st.booleans(), half=st.booleans(), seed=st.integers(0, 99))
def test_equals_neuron_then_pool(T, N, C, H, geom, neuron, with_v, repeated, half, seed):
    k, s, p, ceil = geom
    if not pool_covers_input(H, H + 1, k, s, p, 1, ceil):
        return
    torch.manual_seed(seed)
    dt = torch.float16 if half else torch.float32
    x = (torch.randn(T, N, H, H + 1, C) * 1.4 + 0.4).to(dt).permute(0, 1, 4, 2, 3)
    if repeated and T > 1:
        x = x[:1].expand(x.shape)
    scale, shift = torch.rand(C) + 0.5, torch.randn(C) * 0.3
    v = torch.rand(N, C, H, H + 1) * 0.8 if with_v else None
    kw = kernel_neuron_kwargs(NEURONS[neuron])
    got, got_v = multistep_neuron_max_pool(x, kernel_size=k, stride=s, padding=p, ceil_mode=ceil, scale=scale,
                                           shift=shift, v=v, return_v=True, **kw)
    spikes, want_v = multistep_neuron(x, scale=scale, shift=shift, v=v, return_v=True, **kw)
    want = F.max_pool2d(spikes.flatten(0, 1).float(), k, s, p, ceil_mode=ceil).to(dt)
    assert got.dtype == dt and got[0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got.flatten(0, 1), want)
    assert torch.equal(got_v, want_v)
    assert want.sum() > 0 or spikes.sum() == 0


def test_errors():
    x = torch.randn(2, 1, 3, 8, 8)
    with pytest.raises(ValueError, match="must cover every pixel"):
        multistep_neuron_max_pool(x, kernel_size=2, stride=3)
    with pytest.raises(ValueError, match=r"\[T, N, C, H, W\]"):
        multistep_neuron_max_pool(x[0], kernel_size=3, stride=2, padding=1)
    with pytest.raises(ValueError, match="scale must have shape"):
        multistep_neuron_max_pool(x, kernel_size=3, stride=2, padding=1, scale=torch.ones(4))
    with pytest.raises(ValueError, match="v must have shape"):
        multistep_neuron_max_pool(x, kernel_size=3, stride=2, padding=1, v=torch.zeros(1, 3, 4, 4))


@pytest.mark.parametrize("neuron", ["lif-hard", "if-soft", "leaky-subtract"])
def test_matches_float64_reference(neuron):
    """Against the float64 reference (naive.neuron_max_pool_reference): a pooled spike differs only where one of its
    window's spikes sits at a threshold tie."""
    torch.manual_seed(5)
    p = NEURONS[neuron]
    x = torch.randn(3, 2, 6, 9, 9) * 1.5 + 0.4
    scale, shift = torch.rand(6) + 0.5, torch.randn(6) * 0.3
    got, v = multistep_neuron_max_pool(x, kernel_size=3, stride=2, padding=1, scale=scale, shift=shift,
                                       return_v=True, **kernel_neuron_kwargs(p))
    spec = NeuronSpec.make(**kernel_neuron_kwargs(p))
    ref, h, ref_v = neuron_max_pool_reference(x.double(), spec, 3, 2, 1, scale=scale.double(),
                                              shift=shift.double())
    near = (h - p["v_threshold"]).abs() < 1e-5
    tie = F.max_pool2d(near.flatten(0, 1).double(), 3, 2, 1).view(ref.shape) > 0
    assert ref.sum() > 0 and ((got.double() == ref) | tie).all()
    assert torch.allclose(v.double()[~near.any(0)], ref_v[~near.any(0)], atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("repeated", [False, True])
@pytest.mark.parametrize("dt", [torch.float16, torch.float32])
def test_gpu_stem_shape_equals_neuron_then_pool(dt, repeated):
    """A spiking ResNet stem's map ([4, 2, 64, 112, 112], 3x3/2 pool), compiled for the GPU: bit for bit the neuron
    kernel followed by the pool."""
    torch.manual_seed(0)
    x = (torch.randn(4, 2, 112, 112, 64, device="cuda") * 1.5 + 0.3).to(dt).permute(0, 1, 4, 2, 3)
    if repeated:
        x = x[:1].expand(x.shape)
    scale = torch.rand(64, device="cuda") + 0.5
    shift = torch.randn(64, device="cuda") * 0.3
    got, got_v = multistep_neuron_max_pool(x, "lif", kernel_size=3, stride=2, padding=1, scale=scale, shift=shift,
                                           return_v=True)
    spikes, want_v = multistep_neuron(x, "lif", scale=scale, shift=shift, return_v=True)
    want = F.max_pool2d(spikes.flatten(0, 1), 3, 2, 1)
    assert want.float().mean() > 0.01
    assert torch.equal(got.flatten(0, 1), want) and torch.equal(got_v, want_v)
