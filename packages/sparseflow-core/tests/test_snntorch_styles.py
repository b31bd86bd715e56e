"""snnTorch models as people write them, through sparseflow_core.optimize, against the dense snnTorch model:

* the explicit-state training-loop style: ``mem = lif.init_leaky()`` (or ``reset_mem()``), then a Python loop over
  time steps calling ``conv -> spk, mem = lif(cur, mem)`` with ``init_hidden=False``, spikes and membranes of every
  layer recorded per step;
* ``init_hidden=True`` layers in ``nn.Sequential`` ending in an ``output=True`` layer (``spk, mem = net(x)``), reset
  with ``utils.reset(net)``;
* ``Synaptic`` in both styles; every reset mechanism, reset_delay, graded spikes.

With ``numerics="faithful"`` (dense convolutions) the spikes and membranes equal the dense model's bit for bit;
with the default numerics the sparse layers sum in another order (compared with a tolerance). The report must
show the neurons on the kernel ("neuron-kernel") and the convolution after a neuron on the sparse path. The
bit-for-bit cases also run on CUDA (marked ``gpu``, true fp32): the kernels compiled for the GPU (no fma
contraction of ``beta * mem + x``) against snnTorch's rounded arithmetic."""

from __future__ import annotations

import copy
import warnings

import pytest
import snntorch
import torch
from snntorch import utils as snn_utils
from torch import nn

from sparseflow_core import optimize

T, N, H = 3, 2, 6
GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=GPU)]


def entries(rep):
    return {e.name: e for e in rep.layers}


class ExplicitNet(nn.Module):
    """conv -> neuron -> conv -> neuron -> linear -> neuron, states passed explicitly over a Python time loop."""

    def __init__(self, kind="leaky", init="init", out_kw=None, **kw):
        super().__init__()
        self.kind, self.init = kind, init
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.lif1 = self._neuron(0.9, 0.5, **kw)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.lif2 = self._neuron(0.8, 0.4, **kw)
        self.fc = nn.Linear(6 * H * H, 5)
        self.lif3 = self._neuron(0.7, 0.3, **{**kw, **(out_kw or {})})

    def _neuron(self, beta, thr, **kw):
        if self.kind == "leaky":
            return snntorch.Leaky(beta=beta, threshold=thr, **kw)
        return snntorch.Synaptic(alpha=0.6, beta=beta, threshold=thr, **kw)

    def _state(self, lif):
        if self.init == "carry":  # nothing: snnTorch continues from the module's stored state
            return None
        if self.kind == "leaky":
            return (lif.init_leaky() if self.init == "init" else lif.reset_mem(),)
        return lif.init_synaptic() if self.init == "init" else lif.reset_mem()

    def _step(self, lif, cur, state):
        out = lif(cur, *state) if state is not None else lif(cur)
        return out[0], out[1:]

    def forward(self, x):
        s1, s2, s3 = (self._state(m) for m in (self.lif1, self.lif2, self.lif3))
        rec = []
        for step in range(x.shape[0]):
            spk1, s1 = self._step(self.lif1, self.conv1(x[step]), s1)
            spk2, s2 = self._step(self.lif2, self.conv2(spk1), s2)
            spk3, s3 = self._step(self.lif3, self.fc(spk2.flatten(1)), s3)
            rec.append((spk1, *s1, spk2, *s2, spk3, *s3))
        return tuple(torch.stack(r) for r in zip(*rec))


def data(seed, scale=3.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, N, 2, H, H, generator=g) * scale).to(device)


def assert_outputs(got, ref, exact):
    assert len(got) == len(ref)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        if exact:
            assert torch.equal(a, b), f"output {i}: max diff {(a - b).abs().max()}"
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"output {i}")


def check_explicit(net, numerics, calls=3, reset=None, device="cpu"):
    net = net.to(device)
    dense = copy.deepcopy(net)
    opt, rep = optimize(net, data(0, device=device), return_report=True, block_size=8, numerics=numerics)
    e = entries(rep)
    for name in ("lif1", "lif2", "lif3"):
        assert e[name].action == "neuron-kernel", e[name]
        assert "snnTorch" in e[name].detail
    assert e["conv2"].action == "sparse", e["conv2"]
    # (the neuron returns its state, or the conv output feeds another op too: the neuron runs on its own kernel)
    assert "not fused" in e["conv2"].reason or "no fusion: conv output used" in e["conv2"].reason, e["conv2"]
    if numerics == "fast":
        assert e["fc"].action == "sparse", e["fc"]
    fired = []
    for call in range(calls):
        if reset is not None and call == calls - 1:
            reset(dense)
            reset(opt)
        x = data(call + 1, device=device)
        with torch.no_grad():
            ref, got = dense(x), opt(x)
        assert_outputs(got, ref, exact=numerics == "faithful")
        fired.append([ref[0].mean().item(), ref[-2 if net.kind == "leaky" else -3].mean().item()])
    rates = torch.tensor(fired).mean(0)
    assert ((rates > 0) & (rates < 1)).all(), fired  # the first and last layers both fire and stay silent
    return dense, opt


@pytest.mark.parametrize("reset", ["subtract", "zero", "none"])
@pytest.mark.parametrize("device", DEVICES)
def test_explicit_state_leaky_every_reset_bit_for_bit(device, reset, strict_fp32):
    check_explicit(ExplicitNet("leaky", reset_mechanism=reset), "faithful", device=device)


@pytest.mark.parametrize("init", ["reset_mem", "carry"])
def test_explicit_state_user_resets(init):
    """reset_mem() as the initial state; or no state at all, so the state carries over calls (as in snnTorch)
    until the user resets it (reset_mem() on each neuron)."""
    def reset(net):
        for m in (net.lif1, net.lif2, net.lif3):
            m.reset_mem()

    check_explicit(ExplicitNet("leaky", init=init), "faithful", calls=3, reset=reset if init == "carry" else None)


def test_explicit_state_options():
    """reset_delay=False with graded spikes, learnable beta/threshold (run under no_grad)."""
    check_explicit(ExplicitNet("leaky", reset_delay=False, graded_spikes_factor=1.0, learn_beta=True,
                               learn_threshold=True), "faithful", calls=2)
    net = ExplicitNet("leaky")
    for m in (net.lif1, net.lif2, net.lif3):
        m.graded_spikes_factor.fill_(2.0)
    check_explicit(net, "faithful", calls=2)


def test_explicit_state_fast_numerics():
    """Default numerics: sparse convolution and linear after the neurons (their own order of fp32 sums)."""
    check_explicit(ExplicitNet("leaky", reset_mechanism="zero"), "fast", calls=2)


@pytest.mark.parametrize("reset", ["subtract", "zero", "none"])
@pytest.mark.parametrize("device", DEVICES)
def test_explicit_state_synaptic(device, reset, strict_fp32):
    check_explicit(ExplicitNet("synaptic", reset_mechanism=reset), "faithful", calls=2 if device == "cpu" else 3,
                   device=device)


# ------------------------------------------------------------------------- init_hidden=True, output=True layer


def hidden_net(kind="leaky", reset="subtract"):
    def mk(beta, thr, **kw):
        if kind == "leaky":
            return snntorch.Leaky(beta=beta, threshold=thr, init_hidden=True, reset_mechanism=reset, **kw)
        return snntorch.Synaptic(alpha=0.6, beta=beta, threshold=thr, init_hidden=True, reset_mechanism=reset, **kw)

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), mk(0.9, 0.5),
        nn.Conv2d(6, 6, 3, padding=1), mk(0.8, 0.4),
        nn.Flatten(), nn.Linear(6 * H * H, 5), mk(0.7, 0.3, output=True),
    ).eval()


def forward_pass(net, x):
    """snnTorch's tutorial loop: utils.reset(net), then one step per call; the output layer gives (spk, mem)."""
    snn_utils.reset(net)
    spk_rec, mem_rec = [], []
    for step in range(x.shape[0]):
        out = net(x[step])
        spk_rec.append(out[0])
        mem_rec.append(out[-1])
    return torch.stack(spk_rec), torch.stack(mem_rec)


@pytest.mark.parametrize("kind,reset,inplace,device", [
    ("leaky", "subtract", True, "cpu"), ("leaky", "zero", True, "cpu"), ("leaky", "none", True, "cpu"),
    ("synaptic", "subtract", True, "cpu"), ("leaky", "subtract", False, "cpu"),
    pytest.param("leaky", "subtract", True, "cuda", marks=GPU),
])
def test_init_hidden_with_output_layer(kind, reset, inplace, device, strict_fp32):
    """Both nets built by snnTorch's constructors (utils.reset knows their neurons); with inplace=False optimize
    works on a deep copy, whose neurons utils.reset must reset too. The conv -> Leaky chains are fused into one
    kernel (the multi-step kernel's Leaky step)."""
    dense, net = hidden_net(kind, reset).to(device), hidden_net(kind, reset).to(device)
    opt, rep = optimize(net, data(0, device=device)[0], return_report=True, block_size=8, numerics="faithful",
                        inplace=inplace)
    assert (opt is net) == inplace
    e = entries(rep)
    assert e["6"].action == "neuron-kernel", e["6"]  # the output=True layer
    if kind == "leaky" and reset != "none":
        assert e["2"].action == "fused" and "3" in e["2"].detail, e["2"]  # conv + hidden neuron in one kernel
    else:
        assert e["3"].action == "neuron-kernel", e["3"]
    fired = []
    for call in range(3):  # forward_pass resets through utils.reset: the optimized copy's neurons too
        x = data(call + 10, device=device)
        with torch.no_grad():
            ref = forward_pass(dense, x)
            states = [dense[i].mem.clone() for i in (1, 3, 6)]  # (utils.reset resets every snnTorch neuron)
            got = forward_pass(opt, x)
        assert_outputs(got, ref, exact=True)
        assert_outputs([opt[i].mem for i in (1, 3, 6)], states, exact=True)
        fired.append(ref[0].mean().item())
    assert 0.0 < sum(fired) / len(fired) < 1.0, fired


def test_hooks_on_neurons_see_the_dense_values():
    net = ExplicitNet("leaky")
    dense = copy.deepcopy(net)
    opt = optimize(net, data(0), block_size=8, numerics="faithful")
    seen = {"dense": [], "opt": []}
    for key, model in (("dense", dense), ("opt", opt)):
        model.lif2.register_forward_hook(lambda m, args, out, key=key: seen[key].append((args[0], *out)))
    with torch.no_grad():
        dense(data(5))
        opt(data(5))
    assert len(seen["opt"]) == T
    for a, b in zip(seen["opt"], seen["dense"]):
        for u, v in zip(a, b):
            assert torch.equal(u, v)


@pytest.mark.autograd
def test_training_mode_runs_dense_with_gradients():
    net = ExplicitNet("leaky", learn_beta=True)
    dense = copy.deepcopy(net)
    opt = optimize(net, data(0), block_size=8, numerics="faithful")
    opt.train()
    dense.train()
    x = data(6)
    got, ref = opt(x), dense(x)
    assert_outputs([g.detach() for g in got], [r.detach() for r in ref], exact=True)
    got[-1].sum().backward()
    assert opt.lif3.beta.grad is not None and opt.conv1.weight.grad is not None


def test_neurons_left_with_reasons():
    """inhibition (a winner-take-all across the neurons of a sample) and state_quant (a user quantizer of the
    membrane) stay snnTorch's own; the report says why; the other neurons still run on the kernel."""
    import snntorch.functional.quant as quant

    cases = [(dict(out_kw=dict(inhibition=True)), ("lif3",), "inhibition"),
             (dict(state_quant=quant.state_quant(4)), ("lif1", "lif2", "lif3"), "state_quant")]
    for kw, left, word in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # (snnTorch calls inhibition unstable)
            net = ExplicitNet("leaky", **kw)
        dense = copy.deepcopy(net)
        opt, rep = optimize(net, data(0), return_report=True, block_size=8, numerics="faithful")
        e = entries(rep)
        for name in ("lif1", "lif2", "lif3"):
            if name in left:
                assert e[name].action == "left" and word in e[name].reason, e[name]
            else:
                assert e[name].action == "neuron-kernel", e[name]
        with torch.no_grad():
            assert_outputs(opt(data(1)), dense(data(1)), exact=True)


def test_spikes_not_membranes_feed_sparse_layers():
    """lif(cur, mem) returns (spk, mem): the layer reading spk is spike-fed (sparse), the one reading the membrane
    is not (left with the reason)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
            self.lif1 = snntorch.Leaky(beta=0.9, threshold=0.5)
            self.fc_spk = nn.Linear(6 * H * H, 4)
            self.fc_mem = nn.Linear(6 * H * H, 4)

        def forward(self, x):
            mem = self.lif1.init_leaky()
            out = []
            for step in range(x.shape[0]):
                spk, mem = self.lif1(self.conv1(x[step]), mem)
                out.append(self.fc_spk(spk.flatten(1)) + self.fc_mem(mem.flatten(1)))
            return torch.stack(out)

    torch.manual_seed(0)
    net = Net().eval()
    dense = copy.deepcopy(net)
    opt, rep = optimize(net, data(0), return_report=True, block_size=8)
    e = entries(rep)
    assert e["fc_spk"].action == "sparse", e["fc_spk"]
    assert e["fc_mem"].action == "left" and "spiking module" in e["fc_mem"].reason, e["fc_mem"]
    assert e["lif1"].action == "neuron-kernel"
    with torch.no_grad():
        torch.testing.assert_close(opt(data(1)), dense(data(1)), rtol=1e-4, atol=1e-4)
