"""qk_token_attention: QKFormer's token attention (head sums of q, the neuron over the steps, ``attn * k``) in one
kernel. Against the float64 reference (spikes equal except at threshold ties) on spike and real inputs, and, for
spikes, against the dense composition on the existing kernels (the sum in the input's dtype, the multi-step neuron
kernel, the multiply) bit for bit. Outputs start as NaN."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import NEURONS, assert_fires, assert_spikes_match, kernel_neuron_kwargs, poison_allocations

from sparseflow_kernels import NeuronSpec, multistep_neuron, qk_token_attention
from sparseflow_kernels.naive import qk_token_attention_reference

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    given = None

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    poison_allocations(monkeypatch)


def make_qk(T, N, C2, L, dtype, layout, seed, spikes=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(T, N, L, C2, generator=g) < 0.35).float() if spikes else \
        torch.randn(T, N, L, C2, generator=g) * 0.5 + 0.2
    x = x.to(dtype).to(DEVICE)
    return x.transpose(2, 3) if layout == "channels_innermost" else x.transpose(2, 3).contiguous()


def composed(qk, heads, spec, v0):
    """The dense module's arithmetic with the neuron on the multi-step kernel: what the drop-in replaces."""
    T, N, C2, L = qk.shape
    C = C2 // 2
    q = qk[:, :, :C].reshape(T, N, heads, C // heads, L)
    k = qk[:, :, C:].reshape(T, N, heads, C // heads, L)
    attn, v = multistep_neuron(q.sum(dim=3, keepdim=True), spec, v=v0, return_v=True, v_dtype=qk.dtype)
    return (attn * k).reshape(T, N, C, L), v


def check(p, qk, heads, v0=None, spikes=True):
    spec = NeuronSpec.make(**kernel_neuron_kwargs(p))
    before = qk.clone()
    y, v = qk_token_attention(qk, heads, spec, v=v0, return_v=True)
    assert torch.equal(qk, before)
    T, N, C2, L = qk.shape
    assert y.shape == (T, N, C2 // 2, L) and y.dtype == qk.dtype and not torch.isnan(y).any()
    assert v.shape == (N, heads, 1, L) and v.dtype == qk.dtype
    if qk.stride(2) == 1:
        assert y.stride(2) == 1  # channels innermost in, channels innermost out
    _ref, (attn, h, rv) = qk_token_attention_reference(qk.double().cpu(), heads, spec,
                                                       None if v0 is None else v0.double().cpu())
    C, D = C2 // 2, C2 // (2 * heads)
    k = qk[:, :, C:].reshape(T, N, heads, D, L)
    y5 = y.reshape(T, N, heads, D, L)
    # the kernel's spike of each (step, sample, head, token), read where k is non-zero (else the reference's)
    seen = (k != 0).any(dim=3, keepdim=True)
    fired = ((y5 != 0) & (k != 0)).any(dim=3, keepdim=True)
    got = torch.where(seen.cpu(), fired.cpu().double(), attn)
    assert torch.equal(y5, fired.to(qk.dtype) * k), "the output is not the spike times k"
    assert_spikes_match(got, attn, h, p["v_threshold"], v.cpu(), rv, v_rtol=1e-2 if qk.dtype != torch.float32
                        else 1e-4)
    if spikes:
        want_y, want_v = composed(qk, heads, spec, v0)
        assert torch.equal(y, want_y) and torch.equal(v, want_v)
    return attn


@pytest.mark.parametrize("layout", ["channels_innermost", "contiguous"])
@pytest.mark.parametrize("neuron", ["lif-hard", "lif-soft", "if-hard", "plif-hard"])
def test_spikes_bit_for_bit_and_the_membrane_handed_on(neuron, layout):
    T, N, heads, D, L = 4, 2, 3, 6, 19
    p = dict(NEURONS[neuron], v_threshold=NEURONS[neuron]["v_threshold"] * 2.5)
    qk = make_qk(T, N, 2 * heads * D, L, torch.float16, layout, seed=1)
    attn = check(p, qk, heads)
    assert_fires(attn)
    _y, v = qk_token_attention(qk, heads, NeuronSpec.make(**kernel_neuron_kwargs(p)), return_v=True)
    check(p, make_qk(T, N, 2 * heads * D, L, torch.float16, layout, seed=2), heads, v0=v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_real_inputs_against_float64(dtype):
    T, N, heads, D, L = 3, 2, 2, 5, 33
    qk = make_qk(T, N, 2 * heads * D, L, dtype, "channels_innermost", seed=4, spikes=False)
    v0 = (torch.randn(N, heads, 1, L) * 0.3).to(dtype).to(DEVICE)
    attn = check(NEURONS["lif-hard"], qk, heads, v0=v0, spikes=False)
    assert_fires(attn)


def test_bad_inputs_and_no_steps():
    qk = make_qk(2, 1, 12, 5, torch.float32, "contiguous", seed=0)
    with pytest.raises(ValueError, match=r"expected qk of shape \[T, N, 2C, L\]"):
        qk_token_attention(qk[0], 2)
    with pytest.raises(ValueError, match="not 2 x num_heads"):
        qk_token_attention(qk, 4)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        qk_token_attention(qk, 0)
    with pytest.raises(ValueError, match=r"v must have shape \(1, 2, 1, 5\)"):
        qk_token_attention(qk, 2, v=torch.zeros(1, 2, 5, device=DEVICE))
    y, v = qk_token_attention(qk[:0], 2, v=torch.ones(1, 2, 1, 5, device=DEVICE), return_v=True)
    assert y.shape == (0, 1, 6, 5) and torch.equal(v, torch.ones(1, 2, 1, 5, device=DEVICE))


def _prop(fn):
    if given is None:
        return pytest.mark.skip(reason="hypothesis is not installed")(fn)
    s = settings(max_examples=15, deadline=None, derandomize=True, database=None,
                 suppress_health_check=list(HealthCheck), print_blob=True)
    return s(given(data=st.data())(fn))


@_prop
def test_property_shapes_heads_neurons(data):
    """Random steps, samples, heads, head widths (1, primes, past a power of two) and token counts (past one
    block of tokens), neurons, dtypes, layouts and initial membranes."""
    pick = (lambda options: data.draw(st.sampled_from(list(options))))
    T, N, heads, D, L = pick([1, 2, 5]), pick([1, 3]), pick([1, 2, 3]), pick([1, 2, 7, 17]), pick([1, 6, 130])
    dtype = pick([torch.float32, torch.float16])
    p = NEURONS[pick(["lif-hard", "lif-soft", "lif-nodecayinput", "if-soft", "plif-soft-nodecayinput"])]
    qk = make_qk(T, N, 2 * heads * D, L, dtype, pick(["channels_innermost", "contiguous"]), seed=pick(range(100)))
    v0 = (torch.randn(N, heads, 1, L) * 0.5).to(dtype).to(DEVICE) if pick([True, False]) else None
    check(p, qk, heads, v0=v0)
