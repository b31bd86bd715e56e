"""The neuron kernels compute SpikingJelly's and snnTorch's fp32 arithmetic bit for bit.

SpikingJelly's LIF divides by ``tau`` (``h = v + (x - (v - v_reset)) / tau``); ``x * (1 / tau)`` differs from it in
the last bit for most tau (3.0, 1.7, 100, ...), and a membrane of 0.99999994 that becomes 1.0 fires. PLIF
multiplies by ``sigmoid(w)``, snnTorch's Leaky by ``beta``. Hypothesis sweeps tau, the threshold, the reset
(hard to 0 or another value, soft), ``decay_input`` and inputs placed within a few ulps of the threshold, and
compares the spikes of every step and the final membrane of the multi-step kernel and of the fused conv epilogue
(a 1x1 identity convolution, whose sums are exact) with the framework's own module (float32, torch backend,
multi-step) with ``torch.equal``, over two calls with the membrane carried over.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparseflow_kernels import NeuronSpec, multistep_neuron, spiking_conv2d

TAUS = [1.5, 1.7, 2.0, 3.0, 100.0]


def _nudge(x: torch.Tensor, ulps: torch.Tensor) -> torch.Tensor:
    """``x`` moved by ``ulps`` fp32 ulps (integers, either sign)."""
    a = x.numpy().astype(np.float32)
    k = ulps.numpy().astype(np.int64)
    out = a.copy()
    for direction in (1, -1):
        for step in range(1, int(np.abs(k).max(initial=0)) + 1):
            sel = (k * direction) >= step
            out[sel] = np.nextafter(out[sel], np.float32(direction * np.inf))
    return torch.from_numpy(out)


def _inputs(draw, T, shape, p):
    """Currents [T, *shape]: random ones, and ones that charge a neuron at rest to within a few ulps of the
    threshold (the first step) or that repeat the previous step's current (later steps)."""
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, *shape, generator=gen) * draw(st.sampled_from([0.5, 1.5, 4.0])) + draw(
        st.sampled_from([0.0, 0.5, 1.0]))
    rest = 0.0 if p["v_reset"] is None else p["v_reset"]
    if p["kind"] == "lif" and p["decay_input"]:
        crit = (p["v_threshold"] - rest) * p["tau"] + rest  # h = rest + (x - rest) / tau = v_th
    elif p["kind"] == "lif":
        crit = p["v_threshold"] - rest  # h = rest + x
    else:
        crit = p["v_threshold"] - rest
    near = torch.full((T, *shape), float(np.float32(crit)))
    near = _nudge(near, torch.randint(-4, 5, near.shape, generator=gen))
    pick = torch.rand(T, *shape, generator=gen) < draw(st.sampled_from([0.0, 0.3, 0.7]))
    return torch.where(pick, near, x).contiguous()


@st.composite
def neuron_cases(draw, kinds=("lif", "if", "plif", "leaky")):
    kind = draw(st.sampled_from(kinds))
    p = dict(kind=kind, v_threshold=draw(st.sampled_from([1.0, 0.5, 0.3, 1.7])),
             v_reset=draw(st.sampled_from([0.0, None, -0.2, 0.1])))
    if kind == "lif":
        p["tau"] = draw(st.one_of(st.sampled_from(TAUS), st.floats(1.01, 50.0)))
        p["decay_input"] = draw(st.booleans())
    elif kind == "plif":
        p["init_tau"] = draw(st.sampled_from([1.7, 2.0, 3.0, 7.3]))
        p["decay_input"] = draw(st.booleans())
    elif kind == "leaky":
        p["beta"] = draw(st.sampled_from([0.9, 0.7, 0.33, 0.95]))
        p["v_reset"] = None if p["v_reset"] is None else 0.0  # snnTorch: "subtract" or "zero"
    T = draw(st.integers(2, 4))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 3)))
    xs = [_inputs(draw, T, shape, p) for _ in range(2)]
    return p, xs


def framework_module(p):
    """The framework's own float32 module (SpikingJelly: multi-step, torch backend; snnTorch: stepped)."""
    if p["kind"] == "leaky":
        import snntorch

        mech = "subtract" if p["v_reset"] is None else "zero"
        return snntorch.Leaky(beta=p["beta"], threshold=p["v_threshold"], init_hidden=True,
                              reset_mechanism=mech).eval()
    from spikingjelly.activation_based import neuron

    common = dict(v_threshold=p["v_threshold"], v_reset=p["v_reset"], step_mode="m")
    if p["kind"] == "lif":
        m = neuron.LIFNode(tau=float(p["tau"]), decay_input=p["decay_input"], **common)
    elif p["kind"] == "plif":
        m = neuron.ParametricLIFNode(init_tau=p["init_tau"], decay_input=p["decay_input"], **common)
    else:
        m = neuron.IFNode(**common)
    with contextlib.suppress(Exception):  # backends other than torch are not selectable on this SpikingJelly version
        m.set_backend("torch")
    return m.eval()


def kernel_spec(p):
    """The NeuronSpec of the module's own parameters (PLIF: its ``sigmoid(w)``; Leaky: its fp32 ``beta``)."""
    m = framework_module(p)
    if p["kind"] == "leaky":
        return NeuronSpec.make("leaky", beta=float(m.beta), v_threshold=float(m.threshold), v_reset=p["v_reset"])
    if p["kind"] == "plif":
        return NeuronSpec.make("plif", decay=torch.sigmoid(m.w.detach().float()).item(),
                               decay_input=p["decay_input"], v_threshold=p["v_threshold"], v_reset=p["v_reset"])
    if p["kind"] == "lif":
        return NeuronSpec.make("lif", tau=m.tau, decay_input=p["decay_input"], v_threshold=p["v_threshold"],
                               v_reset=p["v_reset"])
    return NeuronSpec.make("if", v_threshold=p["v_threshold"], v_reset=p["v_reset"])


@torch.no_grad()
def framework_calls(p, xs):
    m = framework_module(p)
    out = []
    for x in xs:
        if p["kind"] == "leaky":
            s = torch.stack([m(xt) for xt in x])
            out.append((s, m.mem.clone()))
        else:
            out.append((m(x), m.v.clone()))
    return out


def assert_bitexact(got, ref, p, what):
    for call, ((s, v), (rs, rv)) in enumerate(zip(got, ref)):
        assert torch.equal(s, rs.to(s.dtype)), f"{what}, call {call}: spikes differ for {p}"
        assert v.dtype == rv.dtype == torch.float32
        diff = (v - rv).abs().max().item()
        assert torch.equal(v, rv), f"{what}, call {call}: membranes differ by up to {diff:.3g} for {p}"


def _kernel_calls(p, xs, run):
    spec = kernel_spec(p)
    v, out = None, []
    for x in xs:
        s, v = run(x, spec, v)
        out.append((s, v))
    return out


def _multistep(x, spec, v):
    return multistep_neuron(x, spec, v=v, return_v=True)


def _fused_conv(x, spec, v):
    """The fused conv kernel's epilogue on a 1x1 identity convolution (exact sums): z = x."""
    C = x.shape[2]
    eye = torch.eye(C).view(C, C, 1, 1)
    return spiking_conv2d(x, eye, None, 1, 0, neuron=spec, v=v, return_v=True, path="fused")


SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=60, **SETTINGS)
@given(neuron_cases())
def test_multistep_neuron_equals_framework_bit_for_bit(case):
    p, xs = case
    assert_bitexact(_kernel_calls(p, xs, _multistep), framework_calls(p, xs), p, "multistep_neuron")


@settings(max_examples=20, **SETTINGS)
@given(neuron_cases())
def test_fused_conv_epilogue_equals_framework_bit_for_bit(case):
    p, xs = case
    xs = [x.unsqueeze(-1) for x in xs]  # [T, N, C, H, 1]
    assert_bitexact(_kernel_calls(p, xs, _fused_conv), framework_calls(p, xs), p, "spiking_conv2d epilogue")


@pytest.mark.parametrize("tau", [3.0, 1.7, 100.0])
def test_lif_divides_by_tau(tau):
    """Explicit cases: for these tau, x / tau and x * (1 / tau) differ; the kernel gives SpikingJelly's value."""
    p = dict(kind="lif", tau=tau, decay_input=True, v_threshold=1.0, v_reset=0.0)
    x = torch.linspace(-2.0, 4.0, 97).view(1, 1, 97).repeat(3, 1, 1)
    x = x + torch.arange(3).view(3, 1, 1) * 0.37
    one_over = x[0] * np.float32(1.0 / tau)
    assert not torch.equal(one_over, x[0] / tau)  # the case exercises a real difference
    got = _kernel_calls(p, [x, x], _multistep)
    assert_bitexact(got, framework_calls(p, [x, x]), p, "multistep_neuron")


def test_membrane_just_below_threshold_does_not_fire():
    """A current that SpikingJelly charges to the largest float below the threshold: no spike there."""
    p = dict(kind="lif", tau=3.0, decay_input=True, v_threshold=1.0, v_reset=0.0)
    cands = _nudge(torch.full((64,), 3.0), torch.arange(-32, 32))
    h = cands / 3.0
    below = cands[h < 1.0]
    x = below.view(1, 1, -1)  # one step from rest
    ref = framework_calls(p, [x])
    assert ref[0][0].sum() == 0 and (ref[0][1] > 0.99999).any()
    assert_bitexact(_kernel_calls(p, [x], _multistep), ref, p, "multistep_neuron")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("decay_input", [True, False])
@pytest.mark.parametrize("v_reset", [0.0, None, -0.2])
@pytest.mark.parametrize("tau", [3.0, 1.7, 100.0, 2.0])
def test_lif_kernels_divide_like_spikingjelly_on_gpu(tau, v_reset, decay_input):
    """The compiled kernels (``tl.math.div_rn``; the fused conv epilogue too, on an fp32 IEEE 1x1 identity conv,
    whose sums are exact) against SpikingJelly's own LIF on CUDA, fp32, two calls: spikes and membranes bit for bit,
    currents placed at the threshold included."""
    from spikingjelly.activation_based import neuron

    torch.manual_seed(0)
    T, N, C, H = 4, 2, 8, 16
    rest = 0.0 if v_reset is None else v_reset
    crit = (1.0 - rest) * tau + rest if decay_input else 1.0 - rest
    x = torch.randn(T, N, C, H, H, device="cuda") * 1.5 + 0.5
    near = torch.full_like(x, crit)
    for k in range(1, 4):  # a few ulps either side of the current that charges a neuron at rest to v_th
        near = torch.where(torch.rand_like(x) < 0.3, torch.nextafter(near, near + (1 if k % 2 else -1)), near)
    x = torch.where(torch.rand_like(x) < 0.5, near, x)
    m = neuron.LIFNode(tau=tau, decay_input=decay_input, v_reset=v_reset, step_mode="m").cuda().eval()
    eye = torch.eye(C, device="cuda").view(C, C, 1, 1)
    v1 = v2 = None
    with torch.no_grad():
        for call in range(2):
            ref = m(x)
            s1, v1 = multistep_neuron(x, "lif", tau=tau, decay_input=decay_input, v_reset=v_reset, v=v1,
                                      return_v=True)
            s2, v2 = spiking_conv2d(x, eye, None, 1, 0, neuron="lif", tau=tau, decay_input=decay_input,
                                    v_reset=v_reset, v=v2, return_v=True, path="fused", fp32_precision="ieee")
            for s, v in ((s1, v1), (s2, v2)):
                assert torch.equal(s, ref), f"call {call}: spikes differ"
                assert torch.equal(v, m.v), f"call {call}: membranes differ by {(v - m.v).abs().max():.3g}"
