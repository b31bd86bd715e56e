"""What the kernel tests check with: the comparison helpers (conv tolerance, spikes equal except at exact threshold
ties) and the SNN frameworks' own neuron modules as the oracle of the neuron kernels. The torch reference of
each kernel is in :mod:`sparseflow_kernels.naive`."""

from __future__ import annotations

import copy
import math

import torch


def poison_allocations(monkeypatch) -> None:
    """Every tensor ``torch.empty`` / ``torch.empty_like`` allocates starts as NaN (integers as they are): an output
    element a kernel forgets to write then fails the comparisons instead of passing by luck."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_empty(*a, **k):
        t = empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def nan_empty_like(*a, **k):
        t = empty_like(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)


# --------------------------------------------------------------------------------------------- conv


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref| (ref float64)."""
    scale = ref.abs().max().item()
    return (y.double() - ref).abs().max().item() / max(scale, 1e-30)


TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def assert_conv_close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert y.shape == ref.shape, (tuple(y.shape), tuple(ref.shape))
    assert y.dtype == dtype
    assert torch.isfinite(y).all(), "NaN/Inf in the output of a finite input (unwritten or poisoned element)"
    err = rel_err(y, ref)
    assert err < TOL[dtype], f"relative error {err:.3e} >= {TOL[dtype]:.0e}"


def same_conv_layer(device, T, N, C, CO, H, W, k, dtype, seed, real=False):
    """A "same" k x k spiking conv layer's inputs on ``device``: channels_last input steps (spikes at 30 %, or real
    values), weights, folded-BatchNorm scale and shift, and the float64 pre-activation ``z`` [T, N, CO, H, W]."""
    from sparseflow_kernels.naive import as_float64, conv2d_reference
    from sparseflow_kernels.spiking import new_spike_tensor

    g = torch.Generator().manual_seed(seed)
    if real:
        x = torch.randn(T, N, C, H, W, generator=g) * 1.5
    else:
        x = (torch.rand(T, N, C, H, W, generator=g) < 0.3).float()
    xs = new_spike_tensor(T, N, C, H, W, dtype, device)  # channels_last steps, as the fused layers write them
    xs.copy_(x.to(dtype))
    w = (torch.randn(CO, C, k, k, generator=g) * 1.6 / (0.3 * C * k * k) ** 0.5).to(dtype)
    scale = torch.rand(CO, generator=g) * 0.8 + 0.7
    shift = torch.rand(CO, generator=g) * 0.6
    y = conv2d_reference(*as_float64(xs.cpu().flatten(0, 1), w), None, 1, k // 2)
    z = y.view(T, N, *y.shape[1:]) * scale.double().view(1, 1, -1, 1, 1) + shift.double().view(1, 1, -1, 1, 1)
    return xs, w.to(device), scale.to(device), shift.to(device), z


# --------------------------------------------------------------------------------------------- neurons

#: neuron parameter sets (id -> kwargs understood by ``kernel_neuron_kwargs`` and ``reference_neuron``)
NEURONS = {
    "lif-hard": dict(kind="lif", tau=2.0, decay_input=True, v_threshold=1.0, v_reset=0.0),
    "lif-soft": dict(kind="lif", tau=2.0, decay_input=True, v_threshold=1.0, v_reset=None),
    "lif-nodecayinput": dict(kind="lif", tau=3.0, decay_input=False, v_threshold=1.0, v_reset=0.0),
    "lif-vreset-neg-th0.6": dict(kind="lif", tau=1.5, decay_input=True, v_threshold=0.6, v_reset=-0.25),
    "if-hard": dict(kind="if", v_threshold=1.0, v_reset=0.0),
    "if-soft": dict(kind="if", v_threshold=0.8, v_reset=None),
    "plif-hard": dict(kind="plif", init_tau=2.5, decay_input=True, v_threshold=1.0, v_reset=0.0),
    "plif-soft-nodecayinput": dict(kind="plif", init_tau=4.0, decay_input=False, v_threshold=1.0,
                                   v_reset=None),
    "leaky-subtract": dict(kind="leaky", beta=0.9, v_threshold=1.0, v_reset=None),
    "leaky-zero": dict(kind="leaky", beta=0.7, v_threshold=0.8, v_reset=0.0),
}


def plif_decay(init_tau: float) -> float:
    """sigmoid(w) of a ParametricLIFNode built with ``init_tau`` (w = -log(init_tau - 1)), in float64."""
    w = torch.tensor(-math.log(init_tau - 1.0), dtype=torch.float64)
    return float(torch.sigmoid(w))


def kernel_neuron_kwargs(p: dict) -> dict:
    """Keyword arguments of ``spiking_conv2d`` / ``multistep_neuron`` for neuron parameters ``p``."""
    kind = p["kind"]
    kw = dict(neuron=kind, v_threshold=p["v_threshold"], v_reset=p["v_reset"])
    if kind == "lif":
        kw.update(tau=p["tau"], decay_input=p["decay_input"])
    elif kind == "plif":
        kw.update(tau=1.0 / plif_decay(p["init_tau"]), decay_input=p["decay_input"])
    elif kind == "leaky":
        kw.update(beta=p["beta"])
    return kw


def make_sj_node(p: dict, step_mode: str = "m"):
    """The SpikingJelly module for neuron parameters ``p`` (float64)."""
    from spikingjelly.activation_based import neuron

    kind = p["kind"]
    if kind == "lif":
        node = neuron.LIFNode(tau=p["tau"], decay_input=p["decay_input"], v_threshold=p["v_threshold"],
                              v_reset=p["v_reset"], step_mode=step_mode)
    elif kind == "if":
        node = neuron.IFNode(v_threshold=p["v_threshold"], v_reset=p["v_reset"], step_mode=step_mode)
    elif kind == "plif":
        node = neuron.ParametricLIFNode(init_tau=p["init_tau"], decay_input=p["decay_input"],
                                        v_threshold=p["v_threshold"], v_reset=p["v_reset"],
                                        step_mode=step_mode)
    else:
        raise ValueError(kind)
    return node.double().eval()


def make_leaky(p: dict):
    import snntorch

    mech = "subtract" if p["v_reset"] is None else "zero"
    lk = snntorch.Leaky(beta=p["beta"], threshold=p["v_threshold"], init_hidden=True, reset_mechanism=mech)
    return lk.double().eval()


class NeuronReference:
    """A stateful float64 reference neuron (SpikingJelly module in multi-step mode, or snnTorch ``Leaky``
    stepped over t) that also reports the charged membrane each step fires from."""

    def __init__(self, p: dict):
        self.p = p
        self.leaky = p["kind"] == "leaky"
        self.node = make_leaky(p) if self.leaky else make_sj_node(p)

    def set_v(self, v: torch.Tensor) -> None:
        if self.leaky:
            self.node.mem = v.double().clone()
        else:
            self.node.v = v.double().clone()

    @property
    def v(self) -> torch.Tensor:
        return self.node.mem if self.leaky else self.node.v

    @torch.no_grad()
    def __call__(self, z: torch.Tensor):
        """z: float64 [T, N, ...] -> (spikes [T, ...], charged membrane h [T, ...], final v)."""
        spikes, hs = [], []
        for t in range(z.shape[0]):
            if self.leaky:
                spikes.append(self.node(z[t]))
                hs.append(self.node.mem.clone())  # snnTorch fires from (and keeps) this membrane
            else:
                # the charged membrane: the same module one step further with an unreachable threshold
                probe = copy.deepcopy(self.node)
                probe.v_threshold = 1e30
                probe(z[t:t + 1])
                hs.append(probe.v.clone())
                spikes.append(self.node(z[t:t + 1])[0])
        return torch.stack(spikes), torch.stack(hs), self.v.clone()


def reference_neuron(p: dict, z: torch.Tensor, v0: torch.Tensor | None = None):
    ref = NeuronReference(p)
    if v0 is not None:
        ref.set_v(v0)
    return ref(z)


def assert_spikes_match(spikes, ref_spikes, ref_h, v_threshold, v=None, ref_v=None, *, tie_tol=1e-4,
                        v_rtol=1e-4, max_flip_frac=0.01):
    """Spikes equal the reference except at exact threshold ties.

    Per neuron, the first step where the spikes differ must be one where the reference's charged membrane
    is within ``tie_tol`` of the threshold; that neuron's later steps (and final membrane) are not compared.
    The final membrane of every other neuron is within ``v_rtol`` (relative, with the same absolute floor).
    """
    T = ref_spikes.shape[0]
    assert spikes.shape == ref_spikes.shape, (tuple(spikes.shape), tuple(ref_spikes.shape))
    s = spikes.double().reshape(T, -1)
    r = ref_spikes.double().reshape(T, -1)
    h = ref_h.double().reshape(T, -1)
    assert not torch.isnan(s).any(), "NaN in the spikes (an output element was not written)"
    assert ((s == 0) | (s == 1)).all(), "spikes must be 0 or 1"
    diff = s != r
    flipped = diff.any(0)
    n_flip = int(flipped.sum())
    if n_flip:
        idx = flipped.nonzero().squeeze(1)
        first = diff[:, idx].double().argmax(0)
        dist = (h[first, idx] - v_threshold).abs()
        assert dist.max() <= tie_tol, (
            f"{n_flip} neurons differ; worst first difference at |h - v_th| = {dist.max():.3e} (not a tie)"
        )
        assert n_flip <= max(2, max_flip_frac * s.shape[1]), f"{n_flip} of {s.shape[1]} neurons flipped"
    if v is not None:
        vv = v.double().reshape(-1)
        rv = ref_v.double().reshape(-1)
        assert vv.shape == rv.shape
        keep = ~flipped
        assert torch.isfinite(vv[keep]).all()
        torch.testing.assert_close(vv[keep], rv[keep], rtol=v_rtol, atol=v_rtol)
    return n_flip


def assert_fires(ref_spikes, lo=0.02, hi=0.9):
    """The test is only meaningful when the reference both fires and stays silent often enough."""
    rate = float(ref_spikes.double().mean())
    assert lo < rate < hi, f"reference firing rate {rate:.3f} outside ({lo}, {hi}): retune the test inputs"
