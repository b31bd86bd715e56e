"""``optimize(numerics="faithful")`` on nets of LIF (any tau), IF and PLIF neurons: the dense logits and every
membrane bit for bit, over a first call, a second call without reset and a call after ``reset_net``.

SpikingJelly's LIF divides by tau; a kernel that multiplies by ``1/tau`` is off by an ulp for tau 3.0, 1.7, 100 and
a membrane at 0.99999994 becomes 1.0 and fires. The nets put a neuron directly on the input (currents placed within
a few ulps of the threshold reach it unchanged) and one after a conv -> BatchNorm chain (the fused chain's
faithful path), with the parameters drawn by hypothesis.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sf_core_nets import calibrate_bns, membranes, reset
from spikingjelly.activation_based import functional, layer, neuron
from torch import nn

from sparseflow_core import optimize


def _node(kind, tau, decay_input, v_threshold, v_reset):
    common = dict(v_threshold=v_threshold, v_reset=v_reset)
    if kind == "lif":
        return neuron.LIFNode(tau=tau, decay_input=decay_input, **common)
    if kind == "plif":
        return neuron.ParametricLIFNode(init_tau=tau, decay_input=decay_input, **common)
    return neuron.IFNode(**common)


@st.composite
def nets(draw):
    kinds = [draw(st.sampled_from(["lif", "lif", "if", "plif"])) for _ in range(2)]
    params = [dict(tau=draw(st.one_of(st.sampled_from([1.5, 1.7, 2.0, 3.0, 100.0]), st.floats(1.05, 30.0))),
                   decay_input=draw(st.booleans()), v_threshold=draw(st.sampled_from([1.0, 0.5, 0.3])),
                   v_reset=draw(st.sampled_from([0.0, None, -0.2]))) for _ in range(2)]
    seed = draw(st.integers(0, 2**31 - 1))
    return kinds, params, seed


def _near_threshold(shape, p, kind, gen):
    """Currents that charge a neuron at rest to within a few ulps of its threshold, mixed with random ones."""
    rest = 0.0 if p["v_reset"] is None else p["v_reset"]
    crit = (p["v_threshold"] - rest) * p["tau"] + rest if kind == "lif" and p["decay_input"] else (
        p["v_threshold"] - rest)
    near = np.full(shape, np.float32(crit), dtype=np.float32)
    k = torch.randint(-3, 4, shape, generator=gen).numpy()
    for step in range(1, 4):
        near = np.where(k >= step, np.nextafter(near, np.float32(np.inf)), near)
        near = np.where(-k >= step, np.nextafter(near, np.float32(-np.inf)), near)
    x = torch.randn(shape, generator=gen) * 1.5 + 0.5
    return torch.where(torch.rand(shape, generator=gen) < 0.5, torch.from_numpy(near), x)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nets())
def test_faithful_neurons_bit_for_bit(case):
    kinds, params, seed = case
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(
        _node(kinds[0], **params[0]),
        layer.Conv2d(3, 4, 3, padding=1, bias=False), layer.BatchNorm2d(4), _node(kinds[1], **params[1]),
        layer.Flatten(), layer.Linear(4 * 5 * 5, 3),
    )
    functional.set_step_mode(net, "m")
    net.eval()
    xs = [_near_threshold((2, 1, 3, 5, 5), params[0], kinds[0], gen) for _ in range(3)]
    calibrate_bns(net, xs[0])
    dense = copy.deepcopy(net)
    opt = optimize(copy.deepcopy(net), xs[0], numerics="faithful")
    with torch.no_grad():
        for i, x in enumerate(xs):
            if i == 2:
                reset(dense)
                reset(opt)
            ref, y = dense(x), opt(x)
            assert torch.equal(y, ref), f"call {i}: logits differ by {(y - ref).abs().max():.3g} ({kinds}, {params})"
            a, b = membranes(opt), membranes(dense)
            for name in b:
                assert torch.equal(a[name], b[name]), f"call {i}: membrane of {name} differs ({kinds}, {params})"
