"""sparseflow_core.sops and the SOP/energy columns of profile(): synaptic operations counted on hand-built
inputs with known answers, the energy formula, firing rates, and agreement with SpikingJelly's SynOpCounter."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sf_core_nets import calibrate_bns, image_input, small_sj_net
from spikingjelly.activation_based import functional, layer, neuron
from torch import nn

from sparseflow_core import optimize, profile
from sparseflow_core.sops import (
    E_AC_J,
    E_MAC_J,
    attention_sops,
    input_kind,
    layer_sops,
    spikingjelly_sops,
    theoretical_energy,
)


def loop_sops(conv: nn.Conv2d, x: torch.Tensor) -> int:
    """By definition: every input element adds value x fan-out, the fan-out counted output by output."""
    N, C, H, W = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    per_group = conv.out_channels // conv.groups
    total = 0
    for n in range(N):
        for c in range(C):
            for oy in range(Ho):
                for ox in range(Wo):
                    for i in range(kh):
                        for j in range(kw):
                            iy, ix = oy * sh - ph + i * dh, ox * sw - pw + j * dw
                            if 0 <= iy < H and 0 <= ix < W:
                                total += int(x[n, c, iy, ix]) * per_group
    return total


def test_conv_sops_known_answers():
    conv = nn.Conv2d(2, 5, 3, padding=1)
    assert layer_sops(conv, torch.zeros(1, 2, 4, 4)) == 0
    # all ones, 4x4, pad 1: per axis the (output, tap) pairs landing inside are 2 + 3 + 3 + 2 = 10
    assert layer_sops(conv, torch.ones(1, 2, 4, 4)) == 2 * 10 * 10 * 5
    corner = torch.zeros(1, 2, 4, 4)
    corner[0, 1, 0, 0] = 1  # reaches outputs (0..1, 0..1): 4 taps, 5 output channels
    assert layer_sops(conv, corner) == 4 * 5
    graded = corner * 2  # a SEW sum of 2: two spikes arriving together
    assert layer_sops(conv, graded) == 2 * 4 * 5
    strided = nn.Conv2d(2, 5, 3, stride=2, padding=1)
    assert layer_sops(strided, corner) == 1 * 5  # only output (0, 0), tap (1, 1)
    mid = torch.zeros(1, 2, 4, 4)
    mid[0, 0, 1, 1] = 1  # per axis: output 0 tap 2 and output 1 tap 0
    assert layer_sops(strided, mid) == 4 * 5
    grouped = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    assert layer_sops(grouped, torch.ones(1, 4, 4, 4)) == 4 * 100 * 3  # fan-out: 6 / 2 channels
    five = torch.ones(2, 3, 2, 4, 4)  # [T, N, C, H, W] counts like the flattened batch
    assert layer_sops(conv, five) == 6 * 2 * 100 * 5


def test_linear_and_conv1d_sops():
    lin = nn.Linear(6, 7)
    x = torch.zeros(3, 2, 6)
    x[0, 1, 2] = 1
    x[2, 0, 5] = 3
    assert layer_sops(lin, x) == 4 * 7
    c1 = nn.Conv1d(3, 4, 3, padding=1)
    y = torch.zeros(1, 3, 5)
    y[0, 2, 0] = 1  # edge: reached by outputs 0 and 1
    assert layer_sops(c1, y) == 2 * 4
    assert layer_sops(nn.ReLU(), y) is None


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 2), st.integers(0, 2), st.integers(1, 2), st.sampled_from([1, 2]),
       st.integers(3, 7), st.integers(0, 10**6))
def test_conv_sops_match_the_definition(k, stride, pad, dil, groups, size, seed):
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(2 * groups, 2 * groups, k, stride, min(pad, k), dil, groups)
    x = torch.randint(0, 3, (2, 2 * groups, size, size), generator=g).float()
    x *= torch.rand(x.shape, generator=g) < 0.3
    if size + 2 * conv.padding[0] < dil * (k - 1) + 1:
        return
    assert layer_sops(conv, x) == loop_sops(conv, x)


def test_input_kind():
    assert input_kind(torch.tensor([0.0, 1.0])) == "binary"
    assert input_kind(torch.tensor([0.0, 2.0, 1.0])) == "graded"
    assert input_kind(torch.tensor([0.5, 1.0])) == "analog"
    assert input_kind(torch.tensor([-1.0, 1.0])) == "analog"
    assert input_kind(torch.tensor([float("nan")])) == "analog"


def test_energy_formula_and_constants():
    assert theoretical_energy(10, 100) == pytest.approx(10 * 4.6e-12 + 100 * 0.9e-12)
    assert (E_MAC_J, E_AC_J) == (4.6e-12, 0.9e-12)
    with pytest.raises(ValueError, match="energy constants"):
        theoretical_energy(1, 1, e_mac=-1.0)


def test_attention_sops_match_spikingjelly_counter():
    from spikingjelly.activation_based.op_counter import DispatchCounterMode, SynOpCounter

    g = torch.Generator().manual_seed(3)
    q, k, v = ((torch.rand(2, 3, 5, 8, generator=g) < 0.4).float() for _ in range(3))
    counter = SynOpCounter()
    with DispatchCounterMode([counter]):
        (q @ k.transpose(-1, -2)) @ v
    assert attention_sops(q, k, v) == counter.get_total() > 0


def _profile_net(net, x, **kw):
    return profile(net, x, reps=1, dense=False, **kw)


def test_profile_sops_energy_and_firing_rates_match_spikingjelly():
    """The dense net and its optimized copy report the same SOPs, equal to SpikingJelly's SynOpCounter on the dense
    net layer by layer; the image stem is analog (MAC energy), the firing rates are the neurons' spike fractions."""
    net = small_sj_net()
    x = image_input(T=2, N=1)
    calibrate_bns(net, x)
    sj = spikingjelly_sops(net, x)
    for model in (net, optimize(copy.deepcopy(net), x)):
        rep = _profile_net(model, x, e_mac=1e-12, e_ac=2e-12)
        rows = {e.name: e for e in rep.layers}
        assert rows["0"].input_kind == "analog" and rows["0"].sops is None
        for name in ("3", "6", "10", "13", "17"):
            assert rows[name].input_kind == "binary"
            assert rows[name].sops == sj[f"Sequential.{name}"] > 0, name
        assert rep.total_sops == sj["total"]
        assert rep.nonspiking_macs == rows["0"].macs
        assert rep.theoretical_energy_j == pytest.approx(1e-12 * rows["0"].macs + 2e-12 * sj["total"])
        assert rows["3"].energy_j == pytest.approx(2e-12 * rows["3"].sops)
        functional.reset_net(net)
        spikes = net[:3](x)
        assert rows["2"].firing_rate == pytest.approx(float((spikes != 0).float().mean()))
        assert 0 < rows["15"].firing_rate < 1
        assert "not available" in rep.energy_source
        d = rep.to_dict()
        assert d["total_sops"] == sj["total"] and d["sops_per_sample"] == sj["total"] / 1
        assert "sops" in rep.to_csv().splitlines()[0] and "SOPs" in rep.table()


class SEWBlock(nn.Module):
    """conv -> BN -> IF, plus the identity (SEW ADD): the next conv receives graded spike counts."""

    def __init__(self):
        super().__init__()
        self.conv = layer.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = layer.BatchNorm2d(4)
        self.sn = neuron.IFNode()
        self.head = layer.Conv2d(4, 3, 3, stride=2, padding=1)

    def forward(self, s):
        return self.head(self.sn(self.bn(self.conv(s))) + s)


def test_graded_sew_inputs_count_value_times_fanout_and_spikingjelly_skips_them():
    """SpikingJelly's SynOpCounter counts convolutions with binary operands only: the SEW sum (values 0, 1, 2) gets 0
    there, and value x fan-out here (more than the binary sum's count); the binary first conv agrees."""
    net = SEWBlock()
    functional.set_step_mode(net, "m")
    s = (torch.rand(2, 1, 4, 6, 6) < 0.5).float()
    calibrate_bns(net, s)
    net.eval()
    rep = _profile_net(net, s)
    rows = {e.name: e for e in rep.layers}
    functional.reset_net(net)
    summed = net.sn(net.bn(net.conv(s))) + s
    functional.reset_net(net)
    assert rows["head"].input_kind == "graded" and summed.max() == 2
    assert rows["head"].sops == layer_sops(nn.Conv2d(4, 3, 3, 2, 1), summed)
    sj = spikingjelly_sops(net, s)
    assert sj["SEWBlock.conv"] == rows["conv"].sops
    assert sj.get("SEWBlock.head", 0) == 0 < rows["head"].sops
    binary = layer_sops(nn.Conv2d(4, 3, 3, 2, 1), (summed != 0).float())
    assert binary < rows["head"].sops and math.isfinite(binary)
