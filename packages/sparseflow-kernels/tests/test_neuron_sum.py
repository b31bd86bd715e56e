"""multistep_neuron(return_sum=True): the neuron's input ``z = x * scale + shift + residual`` written next to the
spikes, in one pass. The sum against the float64 reference rounded once (``naive.neuron_sum_reference``), bit for
bit with torch's ``x + residual`` without an affine; the spikes and membrane bit for bit with the neuron kernel run
on the written sum (what a separate neuron reading it computes), and against the float64 neuron except at
threshold ties. Outputs start as NaN; inputs are fresh random reals (firing and silent neurons)."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import NEURONS, assert_fires, assert_spikes_match, kernel_neuron_kwargs, poison_allocations

from sparseflow_kernels import NeuronSpec, multistep_neuron
from sparseflow_kernels.naive import as_float64, neuron_sum_reference

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    given = None

#: the kernels run where Triton runs: the GPU, or the CPU under TRITON_INTERPRET=1
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every tensor the kernel's wrapper allocates starts as NaN: an element it forgets to write fails."""
    poison_allocations(monkeypatch)


def currents(shape, dtype, layout="contiguous"):
    """Random reals on :data:`DEVICE` (drawn on the CPU: the same values on either)."""
    if layout == "channels_last":
        T, N, C, *sp = shape
        return (torch.randn(T, N, *sp, C) * 0.8 + 0.3).movedim(-1, 2).to(dtype).to(DEVICE)
    return (torch.randn(shape) * 0.8 + 0.3).to(dtype).to(DEVICE)


def check_sum_call(spec, x, res, scale=None, shift=None, v0=None):
    """One call: the sum, and the spikes / membrane of the neuron reading it. Returns (spikes, v, z) on the CPU."""
    scale, shift, v0 = (None if t is None else t.to(DEVICE) for t in (scale, shift, v0))
    x_before, r_before = x.clone(), None if res is None else res.clone()
    s, v, z = multistep_neuron(x, spec, scale=scale, shift=shift, residual=res, v=v0, return_v=True,
                               v_dtype=x.dtype, return_sum=True)
    assert torch.equal(x, x_before) and (res is None or torch.equal(res, r_before))
    want_dtype = torch.promote_types(x.dtype, res.dtype) if res is not None else x.dtype
    assert z.shape == x.shape and z.dtype == want_dtype and torch.isfinite(z).all()
    assert z.stride() == x.stride(), "the sum is written in x's memory layout"
    # the sum: torch's x + residual bit for bit; with an affine (rounded at each fp32 step) close to the exact value
    if scale is None and shift is None:
        want = x + res if res is not None else x
        assert torch.equal(z, want), "the sum differs from torch's x + residual"
    else:
        xd, scd, shd, rd = as_float64(x, scale, shift, res)
        exact = neuron_sum_reference(xd, spec, scale=scd, shift=shd, residual=rd, sum_dtype=torch.float64)[0]
        tol = 1e-6 if z.dtype == torch.float32 else 1e-3
        torch.testing.assert_close(z.double(), exact, rtol=tol, atol=tol)
    # the neuron reading the stored sum: the standalone kernel, bit for bit
    s2, v2 = multistep_neuron(z, spec, v=v0, return_v=True, v_dtype=x.dtype)
    assert torch.equal(s, s2) and torch.equal(v, v2), "spikes differ from the neuron run on the written sum"
    assert s.dtype == x.dtype and not torch.isnan(s).any()
    return s.cpu(), v.cpu(), z.cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("affine", [False, True], ids=["no-affine", "affine"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("neuron", ["lif-hard", "lif-soft", "if-hard", "plif-hard", "leaky-subtract"])
def test_sum_and_spikes_across_calls(neuron, layout, affine, dtype):
    torch.manual_seed(7)
    p = NEURONS[neuron]
    spec = NeuronSpec.make(**kernel_neuron_kwargs(p))
    shape = (3, 2, 5, 3, 4)
    scale = (torch.rand(5) + 0.5) if affine else None
    shift = (torch.randn(5) * 0.2) if affine else None
    v, zs, spikes = None, [], []
    for _ in range(2):  # the membrane handed back between calls
        x, res = currents(shape, dtype, layout), currents(shape, dtype)
        s, v, z = check_sum_call(spec, x, res, scale, shift, v)
        zs.append(z)
        spikes.append(s)
    # against the float64 neuron over both calls (on the sums as stored)
    rs, rh, rv = neuron_sum_reference(torch.cat(zs).double(), spec)[1:]
    assert_fires(rs)
    assert_spikes_match(torch.cat(spikes), rs, rh, p["v_threshold"], v, rv, v_rtol=1e-2)


def test_sum_without_residual_and_2d():
    spec = NeuronSpec.make("lif", tau=2.0)
    x = currents((4, 2, 3, 5), torch.float32)
    z = check_sum_call(spec, x, None)[2]
    assert torch.equal(z, x.cpu())
    x2, r2 = currents((4, 9), torch.float16), currents((4, 9), torch.float16)
    s2, z2 = multistep_neuron(x2, spec, residual=r2, return_sum=True)
    assert z2.shape == (4, 9) and torch.equal(z2, x2 + r2)
    assert torch.equal(s2, multistep_neuron(z2, spec))


@pytest.mark.parametrize("res_dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_round_affine_is_torchs_bias_add_then_residual(dtype, res_dtype):
    """``round_affine`` with a shift (a convolution's bias): the sum is torch's ``(x + bias) + residual``, each add
    rounded to its result's dtype, bit for bit; the spikes are those of the neuron run on that sum."""
    torch.manual_seed(3)
    spec = NeuronSpec.make("lif", tau=2.0, v_threshold=0.5)
    for layout in ("contiguous", "channels_last"):
        x, res = currents((3, 2, 6, 4, 5), dtype, layout), currents((3, 2, 6, 4, 5), res_dtype)
        bias = (torch.randn(6) * 0.7).to(dtype).to(DEVICE)
        want = (x + bias.view(-1, 1, 1)) + res
        s, z = multistep_neuron(x, spec, shift=bias, residual=res, return_sum=True, round_affine=True)
        assert z.dtype == want.dtype and torch.equal(z, want)
        assert torch.equal(s, multistep_neuron(z, spec, out_dtype=dtype))
    # without the rounding the fp16 sums differ somewhere (one rounding instead of two)
    if dtype == torch.float16:
        z1 = multistep_neuron(x, spec, shift=bias, residual=res, return_sum=True)[1]
        assert not torch.equal(z1, want)


def test_sum_dtype_promotes_and_errors():
    spec = NeuronSpec.make("if", v_threshold=0.5)
    x, res = currents((2, 1, 3, 2, 2), torch.float16), currents((2, 1, 3, 2, 2), torch.float32)
    s, z = multistep_neuron(x, spec, residual=res, return_sum=True)
    assert z.dtype == torch.float32 and torch.equal(z, x + res) and s.dtype == torch.float16
    with pytest.raises(ValueError, match="residual_after"):
        multistep_neuron(x, spec, residual=res, residual_after=True, return_sum=True)


def _prop(fn):
    if given is None:
        return pytest.mark.skip(reason="hypothesis is not installed")(fn)
    s = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                 suppress_health_check=list(HealthCheck), print_blob=True)
    return s(given(data=st.data())(fn))


@_prop
def test_property_sum_then_spikes(data):
    """Random shapes (1s and primes), neuron, dtype, layout, affine and initial membrane: the written sum is the
    neuron's input, and the spikes are those of the neuron reading it."""
    pick = (lambda options: data.draw(st.sampled_from(list(options))))
    shape = (pick([1, 2, 3]), pick([1, 2]), pick([1, 3, 17]), pick([1, 2, 5]), pick([1, 3, 7]))
    dtype = pick([torch.float32, torch.float16])
    p = NEURONS[pick(sorted(NEURONS))]
    spec = NeuronSpec.make(**kernel_neuron_kwargs(p))
    torch.manual_seed(pick(range(1000)))
    x = currents(shape, dtype, pick(["contiguous", "channels_last"]))
    res = currents(shape, pick([dtype, torch.float32])) if pick([True, False]) else None
    C = shape[2]
    scale, shift = ((torch.rand(C) + 0.5, torch.randn(C) * 0.3) if pick([True, False]) else (None, None))
    v0 = (torch.randn(shape[1:]) * 0.5) if pick([True, False]) else None
    s, v, z = check_sum_call(spec, x, res, scale, shift, v0)
    rs, rh, rv = neuron_sum_reference(z.double(), spec, v=None if v0 is None else v0.double())[1:]
    assert_spikes_match(s, rs, rh, p["v_threshold"], v, rv, v_rtol=1e-2)
