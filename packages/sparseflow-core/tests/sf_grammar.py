"""A grammar of the small spiking networks users write, for ``test_grammar.py``.

A net is a stem (conv -> BatchNorm -> neuron), one or two blocks and a head (flatten + Linear), either in
SpikingJelly's multi-step form (``layer.*`` modules, ``[T, N, ...]`` tensors) or as a single-step loop (a
``forward`` that calls ``nn.Conv2d`` / ``nn.BatchNorm2d`` / single-step neurons once per time step). Blocks:

* ``plain``: conv -> BN -> neuron; ``seq``: ``layer.SeqToANNContainer(conv, BN)`` -> neuron (multi-step only);
* ``add_before``: spiking-ResNet ``sn2(bn2(conv2(sn1(bn1(conv1(x))))) + r)``; ``add_after``: SEW
  ``sn2(bn2(conv2(sn1(bn1(conv1(x)))))) + r``; the residual ``r`` is ``x`` (``same``), ``x`` averaged over the
  channels (``channel``, broadcast ``[.., 1, H, W]``) or a ``[C, 1, 1]`` parameter (``param``);
* ``shared_neuron``: one neuron module called in two chains; ``shared_bn``: one BatchNorm in two chains;
* ``reuse``: the same block instance twice in a row; ``pool``: a max pool.

Neurons: LIF (tau, decay_input, hard/soft reset), IF, PLIF. BatchNorm variants: default, ``affine=False``,
``track_running_stats=False``, ``momentum=None``, another ``eps``.
"""

from __future__ import annotations

import copy

import torch
from hypothesis import strategies as st
from spikingjelly.activation_based import functional, layer, neuron
from torch import nn

BN_VARIANTS = {
    "default": {},
    "affine_false": {"affine": False},
    "no_running_stats": {"track_running_stats": False},
    "momentum_none": {"momentum": None},
    "eps": {"eps": 1e-2},
}
BLOCKS = ("plain", "seq", "add_before", "add_after", "shared_neuron", "shared_bn", "reuse", "pool")


# ------------------------------------------------------------------------------------------------ strategies
@st.composite
def neuron_specs(draw):
    kind = draw(st.sampled_from(["lif", "lif", "if", "plif"]))
    spec = {"kind": kind, "v_threshold": draw(st.sampled_from([1.0, 0.5])),
            "v_reset": draw(st.sampled_from([0.0, None]))}
    if kind == "lif":
        spec.update(tau=draw(st.sampled_from([2.0, 1.5, 3.0])), decay_input=draw(st.booleans()))
    elif kind == "plif":
        spec.update(init_tau=draw(st.sampled_from([2.0, 3.0])))
    return spec


@st.composite
def block_specs(draw, kinds=BLOCKS):
    kind = draw(st.sampled_from(kinds))
    return {"kind": kind, "bn": draw(st.sampled_from(list(BN_VARIANTS))), "sn": draw(neuron_specs()),
            "sn2": draw(neuron_specs()), "res": draw(st.sampled_from(["same", "channel", "param"]))}


@st.composite
def net_specs(draw, kinds=BLOCKS, step="m"):
    """A net: its step form, sizes, stem, blocks, hooks, numerics and seed."""
    step = draw(st.sampled_from(["m", "s"])) if step == "any" else step
    kinds = tuple(k for k in kinds if step == "m" or k != "seq")
    blocks = draw(st.lists(block_specs(kinds), min_size=1, max_size=2))
    pools = [i for i, b in enumerate(blocks) if b["kind"] == "pool"]
    for i in pools[1:]:  # maps of 4-6 px: one pool at most
        blocks[i] = dict(blocks[i], kind="plain")
    return {
        "step": step, "C": draw(st.integers(2, 4)), "H": draw(st.integers(4, 6)), "W": draw(st.integers(4, 6)),
        "stem_bn": draw(st.sampled_from(list(BN_VARIANTS))), "stem_sn": draw(neuron_specs()), "blocks": blocks,
        "numerics": draw(st.sampled_from(["fast", "faithful"])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


# ------------------------------------------------------------------------------------------------ modules
def make_neuron(spec, step):
    common = {"v_threshold": spec["v_threshold"], "v_reset": spec["v_reset"], "step_mode": step}
    if spec["kind"] == "lif":
        return neuron.LIFNode(tau=spec["tau"], decay_input=spec["decay_input"], **common)
    if spec["kind"] == "plif":
        return neuron.ParametricLIFNode(init_tau=spec["init_tau"], **common)
    return neuron.IFNode(**common)


def make_conv(ci, co, step):
    return layer.Conv2d(ci, co, 3, padding=1, bias=False, step_mode="m") if step == "m" else \
        nn.Conv2d(ci, co, 3, padding=1, bias=False)


def make_bn(c, variant, step):
    kw = BN_VARIANTS[variant]
    return layer.BatchNorm2d(c, step_mode="m", **kw) if step == "m" else nn.BatchNorm2d(c, **kw)


def _residual(mode, x, param):
    if mode == "same":
        return x
    if mode == "channel":
        return x.mean(dim=-3, keepdim=True)  # [.., 1, H, W]: broadcast over the channels
    return param  # [C, 1, 1]


class Chain(nn.Module):
    """conv -> BN -> neuron."""

    def __init__(self, c, bn, sn, step):
        super().__init__()
        self.conv, self.bn, self.sn = make_conv(c, c, step), make_bn(c, bn, step), make_neuron(sn, step)

    def forward(self, x):
        return self.sn(self.bn(self.conv(x)))


class SeqChain(nn.Module):
    """SeqToANNContainer(conv, BN) -> neuron (multi-step)."""

    def __init__(self, c, bn, sn, step):
        super().__init__()
        self.proj = layer.SeqToANNContainer(nn.Conv2d(c, c, 3, padding=1, bias=False), make_bn(c, bn, "s"))
        self.sn = make_neuron(sn, "m")

    def forward(self, x):
        return self.sn(self.proj(x))


class Residual(nn.Module):
    """Spiking-ResNet (add before the second neuron) or SEW (add after it)."""

    def __init__(self, c, b, step, after):
        super().__init__()
        self.after, self.res = after, b["res"]
        self.conv1, self.bn1, self.sn1 = make_conv(c, c, step), make_bn(c, b["bn"], step), make_neuron(b["sn"], step)
        self.conv2, self.bn2, self.sn2 = make_conv(c, c, step), make_bn(c, b["bn"], step), make_neuron(b["sn2"], step)
        self.gamma = nn.Parameter(torch.rand(c, 1, 1) * 0.5 + 0.25)

    def forward(self, x):
        out = self.bn2(self.conv2(self.sn1(self.bn1(self.conv1(x)))))
        if self.after:
            return self.sn2(out) + _residual(self.res, x, self.gamma)
        return self.sn2(out + _residual(self.res, x, self.gamma))


class SharedNeuron(nn.Module):
    """One neuron module in two chains: sn(bn_b(conv_b(sn(bn_a(conv_a(x))))))."""

    def __init__(self, c, b, step):
        super().__init__()
        self.conv_a, self.bn_a = make_conv(c, c, step), make_bn(c, b["bn"], step)
        self.conv_b, self.bn_b = make_conv(c, c, step), make_bn(c, b["bn"], step)
        self.sn = make_neuron(b["sn"], step)

    def forward(self, x):
        return self.sn(self.bn_b(self.conv_b(self.sn(self.bn_a(self.conv_a(x))))))


class SharedBN(nn.Module):
    """One BatchNorm in two chains: sn_b(bn(conv_b(sn_a(bn(conv_a(x))))))."""

    def __init__(self, c, b, step):
        super().__init__()
        self.conv_a, self.conv_b = make_conv(c, c, step), make_conv(c, c, step)
        self.bn = make_bn(c, b["bn"], step)
        self.sn_a, self.sn_b = make_neuron(b["sn"], step), make_neuron(b["sn2"], step)

    def forward(self, x):
        return self.sn_b(self.bn(self.conv_b(self.sn_a(self.bn(self.conv_a(x))))))


def make_block(b, c, step):
    kind = b["kind"]
    if kind == "plain":
        return Chain(c, b["bn"], b["sn"], step)
    if kind == "seq":
        return SeqChain(c, b["bn"], b["sn"], step)
    if kind in ("add_before", "add_after"):
        return Residual(c, b, step, after=kind == "add_after")
    if kind == "shared_neuron":
        return SharedNeuron(c, b, step)
    if kind == "shared_bn":
        return SharedBN(c, b, step)
    if kind == "reuse":
        blk = Chain(c, b["bn"], b["sn"], step)
        return nn.Sequential(blk, blk)
    if kind == "pool":
        return layer.MaxPool2d(2, step_mode="m") if step == "m" else nn.MaxPool2d(2)
    raise ValueError(kind)


class StepLoop(nn.Module):
    """The single-step form: ``forward`` calls the body (single-step modules) once per time step."""

    def __init__(self, body, head):
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x):
        return torch.stack([self.head(self.body(x[t])) for t in range(x.shape[0])])


def build(spec) -> tuple[nn.Module, tuple]:
    """The net of ``spec`` (eval mode, BatchNorms calibrated so that neurons fire) and its input shape."""
    torch.manual_seed(spec["seed"])
    step, C, H, W = spec["step"], spec["C"], spec["H"], spec["W"]
    mods = [make_conv(2, C, step), make_bn(C, spec["stem_bn"], step), make_neuron(spec["stem_sn"], step)]
    h, w = H, W
    for b in spec["blocks"]:
        mods.append(make_block(b, C, step))
        if b["kind"] == "pool":
            h, w = h // 2, w // 2
    if step == "m":
        net = nn.Sequential(*mods, layer.Flatten(step_mode="m"), layer.Linear(C * h * w, 3, step_mode="m"))
        functional.set_step_mode(net, "m")
    else:
        net = StepLoop(nn.Sequential(*mods), nn.Sequential(nn.Flatten(), nn.Linear(C * h * w, 3)))
    shape = (2, 1, 2, H, W)
    calibrate(net, torch.randn(shape, generator=torch.Generator().manual_seed(spec["seed"])))
    return net.eval(), shape


@torch.no_grad()
def calibrate(net, x) -> None:
    """Running statistics near the real ones and an affine after which neurons fire (every BN variant)."""
    gen = torch.Generator().manual_seed(7)

    def hook(bn, inputs):
        y = inputs[0]
        y = y.flatten(0, 1) if y.dim() == 5 else y
        mean, var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False) + 1e-3
        r = lambda: torch.rand(mean.shape, generator=gen)
        if bn.track_running_stats:
            bn.running_mean.copy_(mean + 0.1 * var.sqrt() * (r() - 0.5))
            bn.running_var.copy_(var * (0.8 + 0.4 * r()))
        if bn.affine:
            bn.weight.copy_(0.8 + 0.7 * r())
            bn.bias.copy_(0.5 + 0.5 * r())

    handles = [m.register_forward_pre_hook(hook) for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    net.eval()
    try:
        net(x)
    finally:
        for hd in handles:
            hd.remove()
    reset(net)


def reset(net) -> None:
    functional.reset_net(net)


def neurons(net):
    return [(n, m) for n, m in net.named_modules() if isinstance(m, neuron.BaseNode)]


@torch.no_grad()
def min_tie_distance(snapshot: nn.Module, x: torch.Tensor) -> float:
    """Run a copy of the dense model (``snapshot``: its state before a call) on ``x`` and return the smallest
    |h - v_threshold| of any neuron at any step (h: the charged membrane it fires from)."""
    net = copy.deepcopy(snapshot)
    best = [float("inf")]

    def pre(m, args):
        sim = copy.deepcopy(m)
        sim._forward_pre_hooks.clear()
        xs = args[0] if m.step_mode == "m" else args[0].unsqueeze(0)
        for t in range(xs.shape[0]):
            probe = copy.deepcopy(sim)
            probe.v_threshold = 1e30
            step = xs[t:t + 1] if m.step_mode == "m" else xs[t]
            probe(step)
            best[0] = min(best[0], float((probe.v - m.v_threshold).abs().min()))
            sim(step)

    for _, m in neurons(net):
        m.register_forward_pre_hook(pre)
    net(x)
    return best[0]
