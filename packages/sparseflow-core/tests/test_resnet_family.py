"""optimize() on the spiking ResNet family (SpikingJelly sew_resnet18 IAND/AND, spiking_resnet50 with its 1x1
bottleneck and downsample convolutions, MS-ResNet-18, spiking VGG-11 with and without BatchNorm), the
BatchNorm handler (SparseBatchNorm2d for spike-fed BatchNorms, conv-fed ones folded) and block_size="auto".

Tiny inputs (T=2, N=1, 32x32, 10 classes) under the Triton interpreter. The whole models run in ``mode="torch"``
(cuDNN-path convolutions with the folded BatchNorm / fused neuron plumbing, fast in the interpreter); the Triton
convolution kernels run on the front stages (``filter_fn``), which hold the 1x1 and the 0/1/2-input layers.
sew_resnet18 ADD is covered the same way in test_optimize.py."""

from __future__ import annotations

import copy

import pytest
import torch
from sf_core_nets import calibrate_bns, compare_calls, reset
from spikingjelly.activation_based import functional, layer, neuron
from torch import nn

from sparseflow_core import analyze, get_report, optimize, restore
from sparseflow_core.blocks import AUTO_CANDIDATES, auto_hook, select_block_size
from sparseflow_ops import SparseBatchNorm2d, SparseConv2d

T, PX = 2, 32


def build(name: str):
    """The model (multi-step, eval, BatchNorms calibrated so that every layer fires) and two inputs."""
    from spikingjelly.activation_based.model import ms_resnet, sew_resnet, spiking_resnet, spiking_vgg

    torch.manual_seed(0)
    if name.startswith("sew_resnet18"):
        net = sew_resnet.sew_resnet18(spiking_neuron=neuron.LIFNode, num_classes=10, cnf=name.split("-")[1])
    elif name == "spiking_resnet50":
        net = spiking_resnet.spiking_resnet50(spiking_neuron=neuron.LIFNode, num_classes=10)
    elif name == "ms_resnet18":
        net = ms_resnet.ms_resnet18(T=T, num_classes=10)
    else:
        net = getattr(spiking_vgg, name)(spiking_neuron=neuron.LIFNode, num_classes=10)
        with torch.no_grad():
            if name == "spiking_vgg11":  # no BatchNorm: scale the convolutions so that spikes reach the classifier
                for m in net.modules():
                    if isinstance(m, nn.Conv2d):
                        m.weight.mul_(2.5)
            for m in net.classifier:  # the classifier's LIFs fire on a share of their inputs (no BatchNorm there)
                if isinstance(m, nn.Linear):
                    m.weight.mul_(8.0)
                    m.bias.normal_(0.5, 1.5)
    functional.set_step_mode(net, "m")
    net.eval()
    if any(isinstance(m, nn.BatchNorm2d) for m in net.modules()):
        calibrate_bns(net, torch.randn(T, 2, 3, PX, PX))
    xs = [torch.randn(T, 1, 3, PX, PX) for _ in range(2)]
    return net, xs


def conv_names(net):
    return [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]


def rel_err(y, ref):
    return float((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


SLOW = pytest.mark.slow
MODELS = ["sew_resnet18-IAND", "sew_resnet18-AND", pytest.param("spiking_resnet50", marks=SLOW), "ms_resnet18",
          "spiking_vgg11", pytest.param("spiking_vgg11_bn", marks=SLOW)]


@pytest.mark.parametrize("name", MODELS)
def test_every_spike_consuming_conv_is_replaced(name):
    base, xs = build(name)
    dense = copy.deepcopy(base)
    an = analyze(dense, xs[0], collect_stats=False)
    net = copy.deepcopy(base)
    with torch.no_grad():
        opt, rep = optimize(net, xs[0], mode="torch", block_size=8, return_report=True)
    entries = {e.name: e for e in rep.layers}
    convs = conv_names(dense)
    spike_fed = [c for c in convs if an.spike_fed(c)[0]]
    assert spike_fed, "the model's convolutions should consume spikes"
    for c in convs:
        e = entries[c]
        if c in spike_fed:
            assert e.action in ("fused", "sparse"), f"{c}: {e.action} ({e.reason})"
        else:
            assert e.action == "left" and e.reason, c
    ones = [c for c in spike_fed if dense.get_submodule(c).kernel_size == (1, 1)]
    if name == "spiking_resnet50":
        assert len(ones) >= 30 and any("downsample" in c for c in ones)  # bottleneck + downsample 1x1s
    if name.startswith("sew_resnet18"):
        assert any("downsample" in c for c in ones)
    # every BatchNorm: folded into its convolution, replaced, or listed with the reason it stays
    folded = {b for b, _ in rep.folded}
    for n, m in dense.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert n in folded or (n in entries and (entries[n].action == "sparse" or entries[n].reason)), n
    assert folded or name == "spiking_vgg11", "conv -> BatchNorm pairs must be folded"
    # the optimized model's state_dict is the original's and loads into the original model
    a, b = opt.state_dict(), dense.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():  # one call (the interpreter is slow); test_optimize.py checks repeated calls and state
        reset(opt)
        reset(dense)
        y, ref = opt(xs[0]), dense(xs[0])
    assert torch.isfinite(y).all() and ref.abs().max() > 0
    assert rel_err(y, ref) < 1e-4
    restore(opt)
    assert [type(m) for m in opt.modules()] == [type(m) for m in dense.modules()]


@pytest.mark.parametrize("name,front", [
    pytest.param("spiking_resnet50", ("layer1",), marks=SLOW),
    ("sew_resnet18-IAND", ("layer1", "layer2.0")),
], ids=["spiking_resnet50-layer1", "sew_resnet18-IAND-layer1-2.0"])
def test_kernels_on_front_stages(name, front):
    """The Triton kernels (default mode) on the stages holding the 1x1 bottleneck / downsample convolutions and
    the SEW block outputs; the rest excluded to keep the interpreter fast."""
    base, xs = build(name)
    dense = copy.deepcopy(base)
    with torch.no_grad():
        opt, rep = optimize(copy.deepcopy(base), xs[0], block_size=8, return_report=True,
                            filter_fn=lambda m, n: n.startswith(front))
        compare_calls(opt, dense, xs[:1])
    rep = get_report(opt)
    ran = [e for e in rep.layers if e.action in ("fused", "sparse")]
    assert ran and all(e.name.startswith(front) for e in ran)
    paths = {e.name: e.path for e in ran}
    assert all(p in ("fused_dense", "fused_sparse", "sparse", "dense") for p in paths.values()), paths
    if name == "spiking_resnet50":
        one = [e.name for e in ran if opt.get_submodule(e.name).kernel_size == (1, 1)]
        assert "layer1.0.downsample.0" in one and len(one) >= 6


# ------------------------------------------------------------------------------------------ BatchNorm handler
class SpikeBN(nn.Module):
    """image conv -> BN (folded? no: the image conv stays) -> LIF -> BN on spikes -> conv -> BN -> LIF ->
    (spikes + spikes) -> BN on 0/1/2 values -> pooled classifier."""

    def __init__(self):
        super().__init__()
        self.conv0 = layer.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = layer.BatchNorm2d(16)
        self.sn0 = neuron.LIFNode(tau=2.0)
        self.bn_spk = layer.BatchNorm2d(16)  # consumes spikes: SparseBatchNorm2d
        self.conv1 = layer.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn1 = layer.BatchNorm2d(16)  # fed by a conv consuming non-spikes: stays
        self.sn1 = neuron.LIFNode(tau=2.0)
        self.conv2 = layer.Conv2d(16, 16, 1, bias=False)
        self.bn2 = layer.BatchNorm2d(16)  # folded into conv2
        self.sn2 = neuron.IFNode()
        self.bn_sum = layer.BatchNorm2d(16)  # consumes 0/1/2 (SEW ADD)
        self.head = layer.Linear(16, 4)
        functional.set_step_mode(self, "m")

    def forward(self, x):
        s0 = self.sn0(self.bn0(self.conv0(x)))
        s1 = self.sn1(self.bn1(self.conv1(self.bn_spk(s0))))
        s2 = self.sn2(self.bn2(self.conv2(s1)))
        return self.head(self.bn_sum(s1 + s2).mean((3, 4)))


def spike_bn_net():
    torch.manual_seed(0)
    net = SpikeBN().eval()
    calibrate_bns(net, torch.randn(T, 2, 3, 9, 9))
    return net, [torch.randn(T, 1, 3, 9, 9) for _ in range(2)]


@pytest.mark.parametrize("mode", ["auto", "torch"])
def test_batchnorm_handler(mode):
    base, xs = spike_bn_net()
    dense = copy.deepcopy(base)
    with torch.no_grad():
        opt, rep = optimize(copy.deepcopy(base), xs[0], mode=mode, block_size=8, return_report=True)
    e = {x.name: x for x in rep.layers}
    for n in ("bn_spk", "bn_sum"):
        assert isinstance(opt.get_submodule(n), SparseBatchNorm2d), n
        assert e[n].action == "sparse" and "batchnorm" in e[n].detail
    for bn, conv in (("bn0", "conv0"), ("bn1", "conv1")):  # after convolutions on non-spikes
        assert (bn, conv) in rep.folded or (type(opt.get_submodule(bn)) is layer.BatchNorm2d
                                            and f"fed by convolution {conv}" in e[bn].reason)
    assert ("bn2", "conv2") in rep.folded and isinstance(opt.conv2, SparseConv2d)
    assert "bn2" not in e  # folded BatchNorms are listed in rep.folded, not as declined layers
    a, b = opt.state_dict(), dense.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        compare_calls(opt, dense, xs)
    assert opt.bn_spk.last_path == ("torch" if mode == "torch" else "kernel")
    restore(opt)
    assert type(opt.bn_spk) is layer.BatchNorm2d and opt.bn_spk.step_mode == "m"
    assert opt.bn_spk.weight is base.bn_spk.weight or torch.equal(opt.bn_spk.weight, base.bn_spk.weight)


def test_batchnorm_handler_declines_training_mode():
    base, xs = spike_bn_net()
    base.bn_spk.train()
    with torch.no_grad():
        opt, rep = optimize(copy.deepcopy(base), xs[0], mode="torch", return_report=True)
    e = {x.name: x for x in rep.layers}
    assert type(opt.bn_spk) is layer.BatchNorm2d and "training mode" in e["bn_spk"].reason


# -------------------------------------------------------------------------------------------- block_size auto
def test_block_size_auto_on_cpu_uses_the_default_rule():
    base, xs = spike_bn_net()
    dense = copy.deepcopy(base)
    with torch.no_grad():
        opt, rep = optimize(copy.deepcopy(base), xs[0], block_size="auto", return_report=True)
        compare_calls(opt, dense, xs)
    assert any("block_size='auto'" in n and "default rule" in n for n in rep.notes)
    auto = [x for x in rep.layers if str(x.block_size).startswith("auto")]
    assert "conv2" in {x.name for x in auto}  # every spike-fed convolution
    for x in auto:
        m = opt.get_submodule(x.name)
        hook = auto_hook(m)
        default = select_block_size(9)
        assert hook is not None and str(x.block_size) == f"auto (default {default})"
        assert hook.last == (default, "default rule (no CUDA timing)") and m.block_size == default
    assert AUTO_CANDIDATES == (8, 16, "dense")
    restore(opt)
    assert all(not any(type(h).__name__ == "AutoBlockSize" for h in m._forward_pre_hooks.values())
               for m in opt.modules())


def test_block_size_auto_chooses_measured_winner(monkeypatch):
    """The measuring logic with a fake clock: candidates are timed once per shape, the fastest is kept and
    cached, and the neuron state and the module's mode are as before the timing runs."""
    from sparseflow_core import blocks

    base, xs = spike_bn_net()
    with torch.no_grad():
        opt = optimize(copy.deepcopy(base), xs[0], block_size="auto", mode="torch")
    conv = opt.conv2
    fake_ms = {8: 3.0, 16: 1.0, "dense": 2.0}
    calls = []

    def fake_time(fn, warmup=2, reps=5):
        fn()
        calls.append(conv.block_size)
        return fake_ms[conv.block_size]

    monkeypatch.setattr("sparseflow_kernels.dispatch.time_ms", fake_time)
    blocks.clear_auto_cache()
    x = torch.randn(T, 1, 16, 9, 9).gt(0.5).float()
    sn = conv.fused_neuron
    reset(opt)
    before = copy.deepcopy(sn.v)
    best, results = blocks.measure_block_size(conv, (x,))
    assert best == 16 and results == fake_ms and calls == [8, 16, "dense"]
    assert conv.mode == "torch" and conv.block_size == select_block_size(9)
    assert (sn.v == before) if not isinstance(before, torch.Tensor) else torch.equal(sn.v, before)
