"""snnTorch Leaky and Synaptic on the Triton step kernel (accelerate_neuron), against snnTorch's own module: spikes
and states bit for bit (and their dtypes) over steps, in the explicit-state style (``spk, mem = lif(cur, mem)``),
with ``init_hidden=True`` and ``output=True``, for every reset mechanism, reset_delay, graded spikes, per-neuron
parameters, fp32 / fp16 / bf16, layouts; what runs snnTorch's own forward instead (training, gradients)."""

from __future__ import annotations

import copy

import pytest
import snntorch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseflow_ops import accelerate_neuron, is_accelerated, standalone_neuron_support
from sparseflow_ops.neurons import find_adapter

RESETS = ["subtract", "zero", "none"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make(kind, **kw):
    if kind == "leaky":
        return snntorch.Leaky(beta=kw.pop("beta", 0.85), threshold=kw.pop("threshold", 0.6), **kw)
    return snntorch.Synaptic(alpha=kw.pop("alpha", 0.7), beta=kw.pop("beta", 0.85),
                             threshold=kw.pop("threshold", 0.6), **kw)


def twins(kind, dtype=torch.float32, **kw):
    """(snnTorch module, an accelerated copy)."""
    dense = make(kind, **kw).to(dtype).eval()
    opt = accelerate_neuron(copy.deepcopy(dense))
    assert is_accelerated(opt)
    return dense, opt


def inputs(steps, shape=(2, 3, 4, 5), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g) * 1.5).to(dtype) for _ in range(steps)]


def assert_same(a, b, what):
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape"
    assert torch.equal(a, b), f"{what}: max diff {(a.float() - b.float()).abs().max()}"


def run_explicit(m, xs, kind, init=True):
    """The snnTorch training-loop style: states from init_leaky()/init_synaptic(), passed in and taken back."""
    out = []
    with torch.no_grad():
        if kind == "leaky":
            mem = m.init_leaky() if init else None
            for x in xs:
                spk, mem = m(x, mem) if mem is not None else m(x)
                out.append((spk, mem))
        else:
            syn, mem = m.init_synaptic() if init else (None, None)
            for x in xs:
                spk, syn, mem = m(x, syn, mem) if mem is not None else m(x)
                out.append((spk, syn, mem))
    return out


def compare(dense_out, opt_out):
    assert len(dense_out) == len(opt_out)
    for t, (d, o) in enumerate(zip(dense_out, opt_out)):
        for i, (a, b) in enumerate(zip(d, o)):
            assert_same(b, a, f"step {t} output {i}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("delay", [True, False])
@pytest.mark.parametrize("reset", RESETS)
@pytest.mark.parametrize("kind", ["leaky", "synaptic"])
def test_explicit_state_steps_bit_for_bit(kind, reset, delay, dtype):
    dense, opt = twins(kind, dtype, reset_mechanism=reset, reset_delay=delay)
    xs = inputs(4, dtype=dtype)
    d, o = run_explicit(dense, xs, kind), run_explicit(opt, xs, kind)
    compare(d, o)
    assert any(s[0].any() for s in d) and not all(s[0].all() for s in d)  # spikes and silence both happen
    assert_same(opt.mem, dense.mem, "stored mem")


@pytest.mark.parametrize("reset", RESETS)
@pytest.mark.parametrize("kind", ["leaky", "synaptic"])
def test_init_hidden_and_output_layers(kind, reset):
    """init_hidden=True returns spk and keeps the state; output=True also returns it; reset_mem() restarts."""
    for output in (False, True):
        dense, opt = twins(kind, init_hidden=True, output=output, reset_mechanism=reset)
        xs = inputs(3, seed=1)
        for call in range(3):
            if call == 2:
                dense.reset_mem()
                opt.reset_mem()
            with torch.no_grad():
                for x in xs:
                    a, b = dense(x), opt(x)
                    if output:
                        assert isinstance(b, tuple) and len(b) == len(a)
                        for i, (p, q) in enumerate(zip(a, b)):
                            assert_same(q, p, f"output {i}")
                    else:
                        assert_same(b, a, "spk")
                    assert_same(opt.mem, dense.mem, "stored mem")


def test_stored_state_carries_between_calls_and_resets():
    """lif(x) without a state continues from the module's stored mem (snnTorch), a mem of another shape restarts
    from zeros, and reset_mem() / init_leaky() restart."""
    dense, opt = twins("leaky")
    xs = inputs(3, seed=2)
    compare(run_explicit(dense, xs, "leaky", init=False), run_explicit(opt, xs, "leaky", init=False))
    compare(run_explicit(dense, xs, "leaky", init=False), run_explicit(opt, xs, "leaky", init=False))
    other = inputs(2, shape=(3, 3, 4, 5), seed=3)
    compare(run_explicit(dense, other, "leaky", init=False), run_explicit(opt, other, "leaky", init=False))
    compare(run_explicit(dense, xs, "leaky"), run_explicit(opt, xs, "leaky"))


@pytest.mark.parametrize("factor", [2.0, 0.5])
@pytest.mark.parametrize("delay", [True, False])
def test_graded_spikes(factor, delay):
    dense, opt = twins("leaky", graded_spikes_factor=factor, reset_delay=delay)
    xs = inputs(4, seed=4)
    compare(run_explicit(dense, xs, "leaky"), run_explicit(opt, xs, "leaky"))


def test_per_neuron_and_learnable_parameters():
    """beta a tensor per channel ([C, 1, 1]), threshold per column ([W]), learnable beta/threshold (no_grad)."""
    g = torch.Generator().manual_seed(5)
    beta = torch.rand(3, 1, 1, generator=g) * 1.2  # (values above 1 are clamped by snnTorch)
    thr = torch.rand(5, generator=g) + 0.3
    for kw in (dict(beta=beta, threshold=thr), dict(beta=0.8, threshold=0.7, learn_beta=True, learn_threshold=True),
               dict(beta=beta, learn_beta=True, reset_mechanism="zero")):
        dense, opt = twins("leaky", **kw)
        xs = inputs(4, seed=6)
        compare(run_explicit(dense, xs, "leaky"), run_explicit(opt, xs, "leaky"))
    dense, opt = twins("synaptic", alpha=torch.rand(5, generator=g), beta=beta, learn_alpha=True)
    xs = inputs(3, seed=7)
    compare(run_explicit(dense, xs, "synaptic"), run_explicit(opt, xs, "synaptic"))


def test_ties_at_the_threshold_and_layouts():
    """A membrane exactly at the threshold does not fire (strict >); outputs take the memory layout snnTorch's
    own elementwise ops give them (the previous membrane's, the input's at the start); [N, F] inputs work too."""
    dense, opt = twins("leaky", beta=0.5, threshold=0.5)
    x = torch.full((2, 3, 4, 5), 0.5)
    compare(run_explicit(dense, [x, x * 0.5, x], "leaky"), run_explicit(opt, [x, x * 0.5, x], "leaky"))
    xs = [t.to(memory_format=torch.channels_last) for t in inputs(3, seed=8)]
    for init in (False, True):  # (init_leaky(): zeros like the stored mem, contiguous here)
        for m in (dense, opt):
            m.mem = torch.zeros(xs[0].shape) if init else torch.zeros(0)
        d, o = run_explicit(dense, xs, "leaky", init=init), run_explicit(opt, xs, "leaky", init=init)
        compare(d, o)
        for t in range(3):
            assert [v.stride() for v in o[t]] == [v.stride() for v in d[t]], (init, t)
    xs = inputs(3, shape=(4, 7), seed=9)
    compare(run_explicit(dense, xs, "leaky"), run_explicit(opt, xs, "leaky"))


def test_half_model_keeps_snntorch_dtypes():
    """In a half-precision snnTorch model the spikes are fp32 and a reset by subtraction makes the membrane fp32:
    the kernel returns those dtypes, with the same values."""
    dense, opt = twins("leaky", torch.float16)
    d = run_explicit(dense, inputs(3, dtype=torch.float16, seed=10), "leaky")
    o = run_explicit(opt, inputs(3, dtype=torch.float16, seed=10), "leaky")
    compare(d, o)
    assert o[0][0].dtype == torch.float32 and o[-1][1].dtype == torch.float32


def test_outputs_are_written_by_the_kernel(monkeypatch):
    """Outputs allocated NaN-filled before the kernel runs: every element is overwritten."""
    dense, opt = twins("synaptic", reset_mechanism="zero")
    xs = inputs(3, seed=11)
    ref = run_explicit(dense, xs, "synaptic")
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: empty_like(*a, **k).fill_(float("nan")))
    compare(ref, run_explicit(opt, xs, "synaptic"))


@pytest.mark.autograd
def test_training_and_gradients_run_snntorch(monkeypatch):
    """Training mode, and eval calls that need gradients, run snnTorch's own forward (autograd intact)."""
    ran = []
    orig = snntorch.Leaky.forward
    monkeypatch.setattr(snntorch.Leaky, "forward", lambda self, *a, **k: ran.append(1) or orig(self, *a, **k))
    _, opt = twins("leaky", learn_beta=True)
    x = inputs(1, seed=12)[0]
    _, mem = opt(x)  # grad enabled, beta is a Parameter: snnTorch's forward
    assert ran and mem.requires_grad
    mem.sum().backward()
    assert opt.beta.grad is not None
    ran.clear()
    with torch.no_grad():
        opt(x, opt.init_leaky())
    assert not ran  # the kernel
    opt.train()
    xr = x.clone().requires_grad_(True)
    _, mem = opt(xr, opt.init_leaky())
    assert ran and mem.grad_fn is not None


def test_init_hidden_with_state_raises_like_snntorch():
    _, opt = twins("leaky", init_hidden=True)
    x = inputs(1)[0]
    with torch.no_grad(), pytest.raises(TypeError, match="init_hidden=True"):
        opt(x, torch.zeros_like(x))


def test_left_with_reasons():
    """inhibition and state_quant are not pointwise neurons the kernel runs: the reason says why."""
    import snntorch.functional.quant as quant

    cases = {
        "inhibition": snntorch.Leaky(beta=0.8, inhibition=True),
        "state_quant": snntorch.Leaky(beta=0.8, state_quant=quant.state_quant(num_bits=4)),
        "spike_grad": snntorch.Leaky(beta=0.8, spike_grad=lambda v: torch.sigmoid(v)),
    }
    for word, m in cases.items():
        adapter, why = standalone_neuron_support(m)
        assert adapter is None and word in why, why
        with pytest.raises(ValueError, match=word):
            accelerate_neuron(m)
    # the fused kernels' narrower set: explicit state and output layers run on the step kernel only
    assert find_adapter(snntorch.Leaky(beta=0.8)).step_forward
    from sparseflow_ops import neuron_support

    assert "explicit state" in neuron_support(snntorch.Leaky(beta=0.8))[1]
    assert "output=True" in neuron_support(snntorch.Leaky(beta=0.8, init_hidden=True, output=True))[1]
    assert "two state variables" in neuron_support(snntorch.Synaptic(alpha=0.5, beta=0.8, init_hidden=True))[1]


@settings(max_examples=12, deadline=None)
@given(beta=st.floats(-0.5, 1.5), thr=st.floats(0.05, 2.0), gsf=st.sampled_from([1.0, 0.25, 3.0]),
       reset=st.sampled_from(RESETS), delay=st.booleans(), kind=st.sampled_from(["leaky", "synaptic"]),
       seed=st.integers(0, 2**16))
def test_property_any_parameters(beta, thr, gsf, reset, delay, kind, seed):
    kw = dict(beta=beta, threshold=thr, reset_mechanism=reset, reset_delay=delay)
    dense, opt = twins(kind, **kw)
    dense.graded_spikes_factor.fill_(gsf)
    opt.graded_spikes_factor.fill_(gsf)
    xs = inputs(3, shape=(2, 3, 5), seed=seed)
    compare(run_explicit(dense, xs, kind), run_explicit(opt, xs, kind))


def test_parameters_read_once_and_again_after_a_change(monkeypatch):
    """The parameters' values (a device sync on CUDA) are read once per configuration, and again after an in-place
    change (an optimizer step, load_state_dict): the new beta is used."""
    from sparseflow_ops import snntorch_neurons

    built = []
    orig = snntorch_neurons.step_plan
    monkeypatch.setattr(snntorch_neurons, "step_plan", lambda *a, **k: built.append(1) or orig(*a, **k))
    dense, opt = twins("leaky")
    xs = inputs(4, seed=13)
    compare(run_explicit(dense, xs, "leaky"), run_explicit(opt, xs, "leaky"))
    assert len(built) == 2  # 4 steps: the first from no state (snnTorch's zeros), then the mem's configuration
    with torch.no_grad():
        dense.beta.fill_(0.5)
        opt.beta.fill_(0.5)
    compare(run_explicit(dense, xs, "leaky"), run_explicit(opt, xs, "leaky"))
    assert len(built) == 3  # (init_leaky() now gives a mem of the input's shape: one configuration)


def test_reset_mechanism_changed_after_construction_is_left():
    """snnTorch keeps the constructor's state update when reset_mechanism is assigned later: not the kernel's case."""
    m = snntorch.Leaky(beta=0.8)
    m.reset_mechanism = "zero"
    adapter, why = standalone_neuron_support(m)
    assert adapter is None and "changed after construction" in why
