"""multistep_neuron against SpikingJelly's LIF/IF/PLIF modules and snnTorch's Leaky (float64), over
repeated calls that pass the returned membrane back, with scale/shift/residual and arbitrary shapes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import NEURONS, NeuronReference, assert_fires, assert_spikes_match, kernel_neuron_kwargs

from sparseflow_kernels import NeuronSpec, multistep_neuron
from sparseflow_kernels.naive import affine_reference, as_float64


def make_x(shape, layout="contiguous"):
    """Real-valued input currents (both firing and silent neurons) in the requested memory layout."""
    if layout == "contiguous":
        return torch.randn(shape) * 0.9 + 0.5
    if layout == "transposed":  # last two dims swapped in memory: spatial dims do not merge
        s = list(shape)
        s[-1], s[-2] = s[-2], s[-1]
        return (torch.randn(s) * 0.9 + 0.5).transpose(-1, -2)
    if layout == "channels_last":  # channels innermost (what the fused conv layers return)
        T, N, C, *sp = shape
        return (torch.randn(T, N, *sp, C) * 0.9 + 0.5).movedim(-1, 2)
    if layout == "strided":  # every other element of the last dim
        s = list(shape)
        s[-1] *= 2
        return (torch.randn(s) * 0.9 + 0.5)[..., ::2]
    raise ValueError(layout)


SHAPES = {
    "TNC": ((3, 2, 7), "contiguous"),
    "TNCHW": ((3, 2, 5, 4, 6), "contiguous"),
    "TNCHW-transposed": ((2, 2, 5, 4, 6), "transposed"),
    "TNCHW-channels_last": ((3, 1, 20, 3, 5), "channels_last"),
    "TNCL-strided": ((2, 3, 6, 9), "strided"),
    "TNCDHW": ((2, 1, 3, 2, 3, 4), "contiguous"),
}


def run_calls(p, xs, *, scale=None, shift=None, residuals=None):
    """Kernel over several calls (v passed back) and the float64 reference module kept across them."""
    ref = NeuronReference(p)
    v = None
    outs = []
    for i, x in enumerate(xs):
        res = residuals[i] if residuals is not None else None
        x_before = x.clone()
        s, v_new = multistep_neuron(x, scale=scale, shift=shift, residual=res, v=v, return_v=True,
                                    **kernel_neuron_kwargs(p))
        assert torch.equal(x, x_before)
        z = affine_reference(*as_float64(x, scale, shift), dim=2)
        if res is not None:
            z = z + res.double()
        rs, rh, rv = ref(z)
        outs.append((s, v_new, rs, rh, rv))
        v = v_new
    return outs


def check_calls(p, outs):
    """Spikes of every call match; the membrane of neurons that never hit a tie matches after each call."""
    flipped_any = None
    all_ref = torch.cat([o[2].reshape(o[2].shape[0], -1) for o in outs])
    assert_fires(all_ref)
    for s, v, rs, rh, rv in outs:
        assert s.shape == rs.shape and v.shape == rv.shape
        assert v.dtype == torch.float32
        if flipped_any is not None and flipped_any.any():  # a neuron that tied earlier is not compared again
            keep = ~flipped_any
            s = s.reshape(s.shape[0], -1)[:, keep]
            rs, rh = rs.reshape(rs.shape[0], -1)[:, keep], rh.reshape(rh.shape[0], -1)[:, keep]
            v, rv = v.reshape(-1)[keep], rv.reshape(-1)[keep]
        assert_spikes_match(s, rs, rh, p["v_threshold"], v, rv)
        diff = (s.double().reshape(s.shape[0], -1) != rs.double().reshape(rs.shape[0], -1)).any(0)
        flipped_any = diff if flipped_any is None else flipped_any | diff


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("neuron", list(NEURONS), ids=list(NEURONS))
def test_matches_reference_across_calls(neuron, shape):
    p = NEURONS[neuron]
    dims, layout = SHAPES[shape]
    xs = [make_x(dims, layout) for _ in range(3)]
    check_calls(p, run_calls(p, xs))


@pytest.mark.parametrize("neuron", list(NEURONS), ids=list(NEURONS))
def test_2d_input_single_call(neuron):
    """[T, N]: one neuron per sample."""
    p = NEURONS[neuron]
    x = make_x((4, 64))
    s, v = multistep_neuron(x, return_v=True, **kernel_neuron_kwargs(p))
    assert s.shape == (4, 64) and v.shape == (64,)
    rs, rh, rv = NeuronReference(p)(x.double())
    assert_fires(rs)
    assert_spikes_match(s, rs, rh, p["v_threshold"], v, rv)


BUG_2D_V = ("Regression (fixed): multistep_neuron rejects, for a [T, N] input, the [N] membrane it returned itself "
            "(expects v of shape [N, 1])")


def test_2d_input_pass_v_back():
    p = NEURONS["lif-hard"]
    xs = [make_x((3, 32)) for _ in range(2)]
    check_calls(p, run_calls(p, xs))


OPTIONS = {
    "scale": dict(scale=True),
    "shift": dict(shift=True),
    "scale+shift": dict(scale=True, shift=True),
    "residual": dict(residual=True),
    "scale+shift+residual": dict(scale=True, shift=True, residual=True),
}


@pytest.mark.parametrize("neuron", ["lif-hard", "if-soft", "plif-soft-nodecayinput", "leaky-subtract"])
@pytest.mark.parametrize("option", list(OPTIONS), ids=list(OPTIONS))
def test_scale_shift_residual(option, neuron):
    p = NEURONS[neuron]
    o = OPTIONS[option]
    dims = (3, 2, 6, 3, 4)
    xs = [make_x(dims) for _ in range(2)]
    scale = torch.rand(6) + 0.5 if o.get("scale") else None
    shift = torch.randn(6) * 0.5 if o.get("shift") else None
    residuals = [make_x(dims, "transposed") * 0.5 for _ in range(2)] if o.get("residual") else None
    check_calls(p, run_calls(p, xs, scale=scale, shift=shift, residuals=residuals))


def test_initial_v_given_and_unchanged():
    p = NEURONS["lif-soft"]
    x = make_x((3, 2, 4, 5, 5))
    v0 = torch.rand(2, 4, 5, 5) * 1.5 - 0.5
    v0_before = v0.clone()
    s, v = multistep_neuron(x, v=v0, return_v=True, **kernel_neuron_kwargs(p))
    assert torch.equal(v0, v0_before)
    ref = NeuronReference(p)
    ref.set_v(v0)
    rs, rh, rv = ref(x.double())
    assert_spikes_match(s, rs, rh, p["v_threshold"], v, rv)
    # a non-contiguous initial membrane reads the same values
    v0_t = v0.transpose(-1, -2).contiguous().transpose(-1, -2)
    s2, v2 = multistep_neuron(x, v=v0_t, return_v=True, **kernel_neuron_kwargs(p))
    assert torch.equal(s, s2) and torch.equal(v, v2)


def test_spec_object_and_return_types():
    spec = NeuronSpec.make("lif", tau=2.0, v_reset=None)
    x = make_x((2, 3, 4))
    s = multistep_neuron(x, spec)
    assert isinstance(s, torch.Tensor) and s.shape == x.shape and s.dtype == x.dtype
    s2, v = multistep_neuron(x, spec, return_v=True)
    assert torch.equal(s, s2) and v.shape == (3, 4)
    s16 = multistep_neuron(x, spec, out_dtype=torch.float16)
    assert s16.dtype == torch.float16 and torch.equal(s16.float(), s)


def test_fp16_input():
    p = NEURONS["lif-hard"]
    x = make_x((3, 2, 8, 4, 4)).half()
    s, v = multistep_neuron(x, return_v=True, **kernel_neuron_kwargs(p))
    assert s.dtype == torch.float16
    rs, rh, rv = NeuronReference(p)(x.double())
    assert_spikes_match(s, rs, rh, p["v_threshold"], v, rv)


def test_spec_kernel_args():
    assert NeuronSpec.make("lif", tau=4.0).decay == 0.25
    assert NeuronSpec.make("lif", v_reset=-0.5).v_init == -0.5
    assert NeuronSpec.make("lif", v_reset=None).v_init == 0.0
    assert NeuronSpec.make("leaky", beta=0.5, v_reset=0.0).v_init == 0.0
    assert NeuronSpec.make("leaky", beta=0.5, v_reset=None).hard_reset is False
    assert NeuronSpec.make("plif", decay=0.3).decay == 0.3
    with pytest.raises(ValueError, match="beta"):
        NeuronSpec.make("leaky")
    with pytest.raises(ValueError, match="tau"):
        NeuronSpec.make("plif", tau=0.5)


def test_errors(monkeypatch):
    x = make_x((2, 3, 4))
    with pytest.raises(ValueError, match="T, N"):
        multistep_neuron(torch.ones(5))
    with pytest.raises(ValueError, match="residual"):
        multistep_neuron(x, residual=torch.ones(2, 3, 5))
    with pytest.raises(ValueError, match="scale"):
        multistep_neuron(x, scale=torch.ones(5))
    with pytest.raises(ValueError, match="v must"):
        multistep_neuron(x, v=torch.ones(2, 4))
    with pytest.raises(TypeError, match="dtype"):
        multistep_neuron(x.double())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA"):
        multistep_neuron(x)


@pytest.mark.parametrize("neuron", list(NEURONS), ids=list(NEURONS))
def test_library_torch_reference_agrees_with_frameworks(neuron):
    """sparseflow_kernels.naive (the library's own float64 reference) against the framework modules."""
    from sparseflow_kernels.naive import neuron_reference

    p = NEURONS[neuron]
    z = make_x((4, 8, 6)).double() * 1.5
    v0 = torch.rand(8, 6, dtype=torch.float64) - 0.3
    spec = NeuronSpec.make(**kernel_neuron_kwargs(p))
    s, h, v = neuron_reference(z, spec, v0.clone())
    ref = NeuronReference(p)
    ref.set_v(v0)
    rs, rh, rv = ref(z)
    assert_fires(rs)
    # decay constants differ in the last bits (the frameworks keep beta / w in float32): ~1e-7 relative
    assert_spikes_match(s, rs, rh, p["v_threshold"], v, rv, tie_tol=1e-6, v_rtol=1e-6, max_flip_frac=0)
    torch.testing.assert_close(h, rh, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("T", [1, 4, 5, 9, 12, 16])
@pytest.mark.parametrize("neuron", ["lif-hard", "if-soft", "leaky-subtract"])
def test_step_counts(neuron, T):
    """One step, and more steps than the other tests use, with residual and BatchNorm, match the float64
    reference over repeated calls: steps loaded one at a time (odd T), four at a time over three loads (12) and
    eight at a time over two (16)."""
    p = NEURONS[neuron]
    C = 5
    xs = [make_x((T, 2, C, 3, 2), "channels_last") for _ in range(2)]
    res = [torch.randn(T, 2, C, 3, 2) * 0.3 for _ in range(2)]
    check_calls(p, run_calls(p, xs, scale=torch.rand(C) + 0.5, shift=torch.randn(C) * 0.2, residuals=res))


@pytest.mark.parametrize("T", [3, 6])
def test_input_repeated_over_steps_by_stride_zero(T):
    """An input expanded over t (stride 0: one map read for every step) gives the spikes and membrane of the
    same map materialized T times, bit for bit."""
    frame = make_x((1, 2, 6, 4, 3), "channels_last")[0]
    scale, shift = torch.rand(6) + 0.5, torch.randn(6) * 0.2
    expanded = frame.unsqueeze(0).expand(T, *frame.shape)
    assert expanded.stride(0) == 0
    kw = kernel_neuron_kwargs(NEURONS["lif-hard"])
    s0, v0 = multistep_neuron(expanded, scale=scale, shift=shift, return_v=True, **kw)
    s1, v1 = multistep_neuron(expanded.contiguous(), scale=scale, shift=shift, return_v=True, **kw)
    assert s0.float().sum() > 0 and torch.equal(s0, s1) and torch.equal(v0, v1)


@given(T=st.integers(1, 64), C=st.integers(1, 600), S=st.integers(1, 5000))
@settings(max_examples=200, deadline=None)
def test_neuron_tile_step_chunk_divides_the_steps(T, C, S):
    """The steps loaded at once: 8 or 4 where that divides T, else one, so that no load is masked by step; a step's
    block holds at most 1024 elements."""
    from sparseflow_kernels.tiling import neuron_tile

    block_s, block_c, t_chunk = neuron_tile(C, S, T)
    assert t_chunk in (1, 4, 8) and T % t_chunk == 0
    assert t_chunk == 8 or (t_chunk == 4 and T % 8 != 0) or T % 4 != 0
    assert block_s * block_c <= 1024 and block_c <= 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_preserve_layout_on_strides_whose_spatial_dims_do_not_merge(dtype, monkeypatch):
    """``preserve_layout`` on an input whose spatial dims do not merge into one (heads x head channels x tokens
    stored tokens-outer, as an attention's output may be): the spikes and membrane of the same input made contiguous,
    written into the returned tensor itself (outputs start as NaN), contiguous."""
    from kernel_checks import poison_allocations

    poison_allocations(monkeypatch)
    g = torch.Generator().manual_seed(3)
    T, N, H, D, L = 3, 2, 3, 4, 5
    x = (torch.rand(T, N, L, H, D, generator=g) * 2).to(dtype).movedim(2, -1)
    v0 = torch.rand(N, H, D, L, generator=g)
    assert x.stride()[2:] == (D, 1, H * D)
    y, v = multistep_neuron(x, "lif", tau=2.0, v=v0, return_v=True, preserve_layout=True)
    want, v_want = multistep_neuron(x.contiguous(), "lif", tau=2.0, v=v0, return_v=True, preserve_layout=True)
    assert torch.equal(y, want) and torch.equal(v, v_want) and y.is_contiguous()
    assert 0 < y.float().mean() < 1


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("preserve", [False, True])
def test_final_membrane_in_the_spikes_layout(layout, preserve, monkeypatch):
    """The final membrane comes channels innermost where the spikes do (its stores coalesce with theirs) and
    contiguous otherwise, with the values of the membrane taken in either layout, bit for bit, also when handed
    back as the next call's initial membrane (outputs start as NaN)."""
    from kernel_checks import poison_allocations

    poison_allocations(monkeypatch)
    x = make_x((3, 2, 6, 4, 5), layout).half()
    kw = kernel_neuron_kwargs(NEURONS["lif-hard"])
    y, v = multistep_neuron(x, return_v=True, v_dtype=torch.float16, preserve_layout=preserve, **kw)
    innermost = layout == "channels_last" or not preserve
    assert y.stride(2) == 1 if innermost else y.is_contiguous()
    assert v.is_contiguous(memory_format=torch.channels_last) if innermost else v.is_contiguous()
    assert v._base is None  # a tensor of its own: a neuron may detach it in place
    yc, vc = multistep_neuron(x.contiguous(), return_v=True, v_dtype=torch.float16, preserve_layout=True, **kw)
    assert torch.equal(y, yc) and torch.equal(v, vc) and vc.is_contiguous() and 0 < y.float().mean() < 1
    y2, v2 = multistep_neuron(x, v=v, return_v=True, v_dtype=torch.float16, preserve_layout=preserve, **kw)
    y2c, v2c = multistep_neuron(x.contiguous(), v=vc, return_v=True, v_dtype=torch.float16, preserve_layout=True,
                                **kw)
    assert torch.equal(y2, y2c) and torch.equal(v2, v2c)
