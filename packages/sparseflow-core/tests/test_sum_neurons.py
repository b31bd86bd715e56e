"""Neuron-first residual blocks (MS-ResNet, pre-activation ResNets: ``x + bn(conv(lif(bn(conv(lif(x))))))``): the
layer writing the residual sum also computes the spikes of the neuron that reads it (the next block's first neuron,
or the head's), in one kernel, and that neuron no longer runs a kernel of its own.

Checked on a miniature MS-ResNet and on SpikingJelly's ``ms_resnet34`` at T=2, N=1, 32 px (Triton interpreter): the
neurons fused, counted; the outputs and every neuron's membrane bit for bit those of the same optimized model
without this fusion (fp32 and fp16, over calls without a reset and after one) and close to the dense model's; a
neuron with a hook stays a kernel of its own with the reason in the report; ``restore`` gives the dense model back.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from sf_core_nets import calibrate_bns, reset
from spikingjelly.activation_based import functional, layer, neuron
from torch import nn

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    given = None

from sparseflow_core import optimize, restore
from sparseflow_core.passes import fuse_sum_neurons
from sparseflow_ops import SumNeuronForward, is_accelerated

T = 2
sf_optimize = importlib.import_module("sparseflow_core.optimize")  # (the module; the package exports the function)


def lif(**kw):
    return neuron.LIFNode(tau=4.0 / 3.0, v_threshold=0.5, decay_input=False, detach_reset=True, step_mode="m",
                          **kw)


#: the neurons of the generated networks
NEURONS = {
    "lif": lif,
    "lif-soft": lambda: neuron.LIFNode(tau=2.0, v_reset=None, v_threshold=0.6, step_mode="m"),
    "if": lambda: neuron.IFNode(v_threshold=0.8, step_mode="m"),
    "plif": lambda: neuron.ParametricLIFNode(init_tau=2.5, v_threshold=0.5, step_mode="m"),
}


class PreActBlock(nn.Module):
    """MS-ResNet's block: the neurons before the convolutions, the sum in membrane space."""

    def __init__(self, cin, cout, stride=1, add="out+identity", make_neuron=lif):
        super().__init__()
        self.add = add
        self.spike1 = make_neuron()
        self.conv1 = layer.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = layer.BatchNorm2d(cout)
        self.spike2 = make_neuron()
        self.conv2 = layer.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = layer.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(layer.Conv2d(cin, cout, 1, stride, bias=False), layer.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1(self.conv1(self.spike1(x)))
        out = self.bn2(self.conv2(self.spike2(out)))
        if self.add == "in place":
            out += identity
            return out
        if self.add == "halved in place":  # (the sum written over after the add)
            out = out + identity
            return out.mul_(0.5)
        return out + identity if self.add == "out+identity" else identity + out


class TinyMSResNet(nn.Module):
    """stem -> 8 channels; blocks of (channels, stride, add); head LIF, average pool, linear."""

    def __init__(self, blocks=((8, 1, "out+identity"), (12, 2, "identity+out"), (12, 1, "in place")), make_neuron=lif):
        super().__init__()
        self.stem = nn.Sequential(layer.Conv2d(3, 8, 3, 1, 1, bias=False), layer.BatchNorm2d(8))
        cins = [8] + [b[0] for b in blocks[:-1]]
        self.blocks = nn.Sequential(*(PreActBlock(cin, cout, stride, add, make_neuron)
                                      for cin, (cout, stride, add) in zip(cins, blocks)))
        self.head_lif = make_neuron()
        self.pool = layer.AdaptiveAvgPool2d((1, 1))
        self.fc = layer.Linear(blocks[-1][0], 5)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(self.pool(self.head_lif(x)).flatten(2))


def tiny_net(dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    net = TinyMSResNet(**kw)
    functional.set_step_mode(net, "m")
    net.eval()
    calibrate_bns(net, torch.randn(T, 2, 3, 12, 12))
    return net.to(dtype)


def without_sum_fusion(monkeypatch):
    """optimize() as it runs without this pass (the reference the fused model must equal bit for bit)."""
    monkeypatch.setattr(sf_optimize, "PIPELINE", tuple(p for p in sf_optimize.PIPELINE if p is not fuse_sum_neurons))


def neuron_states(net):
    return {n: m.v for n, m in net.named_modules() if isinstance(m, neuron.BaseNode)}


def sum_neurons(net):
    return sorted(n for n, m in net.named_modules() if isinstance(m.__dict__.get("forward"), SumNeuronForward))


def standalone_neurons(net):
    return sorted(n for n, m in net.named_modules()
                  if is_accelerated(m) and not isinstance(m.__dict__["forward"], SumNeuronForward))


def count_neuron_kernels(net, x, monkeypatch):
    """Multi-step neuron kernels one forward launches, each as (writes a sum, adds a bias with rounding of its own):
    the bias of a cuDNN convolution, which the sum's kernel adds."""
    import sparseflow_kernels.neuron as kn

    calls = []
    orig = kn.multistep_neuron

    def counted(*a, **k):
        calls.append((k.get("return_sum", False), k.get("shift") is not None and k.get("round_affine", False)))
        return orig(*a, **k)

    for mod in ("sparseflow_kernels.neuron", "sparseflow_ops.neuron", "sparseflow_ops.sum_spikes",
                "sparseflow_kernels.spiking"):
        monkeypatch.setattr(f"{mod}.multistep_neuron", counted)
    with torch.no_grad():
        net(x)
    monkeypatch.undo()
    return calls


def assert_calls_equal(fused, unfused, xs, exact=True):
    """The two models over the inputs (no reset in between, then a reset and the first input again): outputs and
    every neuron's membrane equal."""
    with torch.no_grad():
        for i, x in enumerate([*xs, None]):
            if x is None:
                reset(fused)
                reset(unfused)
                x = xs[0]
            y, ref = fused(x), unfused(x)
            assert y.dtype == ref.dtype and torch.equal(y, ref), f"call {i}: outputs differ"
            a, b = neuron_states(fused), neuron_states(unfused)
            for n in a:
                same = a[n] is b[n] or torch.equal(torch.as_tensor(a[n]), torch.as_tensor(b[n]))
                assert same, f"call {i}: membrane of {n} differs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("mode", ["torch", "dense"])
def test_tiny_ms_resnet_fused_exact(dtype, mode, monkeypatch):
    if mode == "dense" and dtype == torch.float16:
        pytest.skip("one Triton-convolution case is enough in the interpreter")
    base = tiny_net(dtype)
    xs = [torch.randn(T, 1, 3, 12, 12, dtype=dtype) * 1.5 for _ in range(2)]
    opt, rep = optimize(copy.deepcopy(base), xs[0], mode=mode, block_size=8, return_report=True)
    # the sums of blocks 0, 1 and 2 feed blocks 1.spike1, 2.spike1 and the head; the stem's output is no sum
    assert sum_neurons(opt) == ["blocks.1.spike1", "blocks.2.spike1", "head_lif"]
    assert standalone_neurons(opt) == ["blocks.0.spike1"]
    entries = {e.name: e for e in rep.layers}
    for i, reader in enumerate(["blocks.1.spike1", "blocks.2.spike1", "head_lif"]):
        e = entries[f"blocks.{i}.conv2"]
        assert e.action == "fused" and "+sum" in e.detail and reader in e.detail, (e.detail, e.reason)
    assert "blocks.1.spike1" not in entries  # (a fused neuron is reported by its layer)
    kernels = count_neuron_kernels(opt, xs[0], monkeypatch)
    sums = [bias for writes_sum, bias in kernels if writes_sum]
    # the three sums; blocks.0.spike1 on its own and, on the cuDNN path, the conv1 -> bn1 -> spike2 chains' neurons
    assert len(sums) == 3 and len(kernels) - len(sums) == (4 if mode == "torch" else 1)
    # on the GPU, cuDNN's output comes without the folded bias, which the sum's kernel adds (rounded as torch's
    # separate bias add rounds it); the CPU's convolution and the Triton one add it themselves
    assert sums == [mode == "torch" and xs[0].is_cuda] * 3
    with monkeypatch.context() as mp:
        without_sum_fusion(mp)
        unfused = optimize(copy.deepcopy(base), xs[0], mode=mode, block_size=8)
    assert sum_neurons(unfused) == [] and len(standalone_neurons(unfused)) == 4
    for net in (opt, unfused):
        reset(net)
    assert_calls_equal(opt, unfused, xs)
    # against the dense model (as the other model tests: relative error of the logits)
    dense = copy.deepcopy(base)
    reset(opt)
    with torch.no_grad():
        y, ref = opt(xs[0]).double(), dense(xs[0]).double()
    assert ref.abs().max() > 0
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert float((y - ref).norm() / ref.norm()) < tol


def check_bias_in_the_sum_kernel(dtype, device, monkeypatch):
    """The layers writing a sum leave their folded bias to the sum's kernel, which adds it rounded as torch's
    separate bias add rounds it: the outputs and membranes of the unfused optimized model, bit for bit."""
    base = tiny_net(dtype).to(device)
    xs = [(torch.randn(T, 2, 3, 12, 12) * 1.5).to(dtype).to(device) for _ in range(2)]
    opt = optimize(copy.deepcopy(base), xs[0], mode="torch", block_size=8)
    with monkeypatch.context() as mp:
        without_sum_fusion(mp)
        unfused = optimize(copy.deepcopy(base), xs[0], mode="torch", block_size=8)
    for net in (opt, unfused):
        reset(net)
    assert [bias for writes_sum, bias in count_neuron_kernels(opt, xs[0], monkeypatch) if writes_sum] == [True] * 3
    for net in (opt, unfused):
        reset(net)
    assert_calls_equal(opt, unfused, xs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_bias_left_to_the_sum_kernel_where_torch_adds_it_apart(dtype, monkeypatch):
    """On the CPU, with torch's convolution made to add its bias as it does on cuDNN (in a kernel of its own, to the
    rounded output) and the layers told so: the sum's kernel takes that add over, bit for bit."""
    import torch.nn.functional as F

    import sparseflow_ops.conv as ops_conv

    conv2d = F.conv2d

    def conv_then_bias(x, w, b=None, *args, **kwargs):
        y = conv2d(x, w, None, *args, **kwargs)
        return y if b is None else y + b.view(1, -1, 1, 1)

    monkeypatch.setattr(F, "conv2d", conv_then_bias)
    monkeypatch.setattr(ops_conv, "bias_added_separately", lambda x: True)
    check_bias_in_the_sum_kernel(dtype, "cpu", monkeypatch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: cuDNN leaves the bias to torch's own add")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cudnn_bias_added_in_the_sum_kernel_on_gpu(dtype, monkeypatch):
    """On cuDNN (which takes no bias) the sum's kernel adds the layers' folded bias in place of torch's add."""
    check_bias_in_the_sum_kernel(dtype, "cuda", monkeypatch)


def test_state_across_calls_and_fallbacks(monkeypatch):
    """Two calls without a reset carry the fused neurons' membranes; a neuron called on another tensor than the
    sum (or after a reset between the layer and it) runs itself, from its own state."""
    base = tiny_net()
    x = torch.randn(T, 1, 3, 12, 12)
    opt = optimize(copy.deepcopy(base), x, mode="torch", block_size=8)
    with monkeypatch.context() as mp:
        without_sum_fusion(mp)
        unfused = optimize(copy.deepcopy(base), x, mode="torch", block_size=8)
    reset(opt)
    reset(unfused)
    with torch.no_grad():
        opt(x)
        unfused(x)
        head, ref_head = opt.head_lif, unfused.head_lif
        v1 = head.v.clone()
        assert torch.equal(v1, ref_head.v) and v1.abs().max() > 0
        # the neuron on a tensor that is not the offered sum: its own kernel, from its stored membrane
        z = torch.randn(T, 1, 12, 6, 6)
        assert torch.equal(head(z), ref_head(z)) and torch.equal(head.v, ref_head.v)
        # the offered sum changed in place before the neuron reads it: the neuron computes from the new values
        s = opt.blocks(opt.stem(x))
        s_ref = unfused.blocks(unfused.stem(x))
        assert torch.equal(s, s_ref)
        s.mul_(0.5)
        s_ref.mul_(0.5)
        assert torch.equal(head(s), ref_head(s_ref)) and torch.equal(head.v, ref_head.v)
        # a reset between the layer writing the sum and the neuron: the neuron starts afresh
        s = opt.blocks(opt.stem(x))
        s_ref = unfused.blocks(unfused.stem(x))
        functional.reset_net(head)
        functional.reset_net(ref_head)
        assert torch.equal(head(s), ref_head(s_ref)) and torch.equal(head.v, ref_head.v)


def test_hooked_neuron_stays_unfused():
    base = tiny_net()
    seen = []
    base.blocks[2].spike1.register_forward_hook(lambda m, i, o: seen.append(o.sum()))
    x = torch.randn(T, 1, 3, 12, 12)
    opt, rep = optimize(copy.deepcopy(base), x, mode="torch", block_size=8, return_report=True)
    assert sum_neurons(opt) == ["blocks.1.spike1", "head_lif"]
    entries = {e.name: e for e in rep.layers}
    e = entries["blocks.1.conv2"]
    assert e.action == "sparse" and "+sum" not in e.detail
    assert "spikes of blocks.2.spike1 not computed here: blocks.2.spike1 has forward hooks" in e.reason, e.reason
    n = entries["blocks.2.spike1"]
    assert n.action == "neuron-kernel" and "not fused into blocks.1.conv2" in n.reason and "hooks" in n.reason
    dense = copy.deepcopy(base)
    reset(opt)
    with torch.no_grad():
        y, ref = opt(x), dense(x)
    assert torch.equal(seen[-2], seen[-1])  # (the hook saw the same spikes in the optimized call as in the dense)
    assert float((y - ref).norm() / ref.norm()) < 1e-4


def test_sum_written_over_stays_unfused():
    """A sum modified in place after the add: its reader keeps its own kernel (the report says why)."""
    blocks = ((8, 1, "out+identity"), (8, 1, "halved in place"), (8, 1, "out+identity"))
    base = tiny_net(blocks=blocks)
    x = torch.randn(T, 1, 3, 12, 12)
    opt, rep = optimize(copy.deepcopy(base), x, mode="torch", block_size=8, return_report=True)
    assert sum_neurons(opt) == ["blocks.1.spike1", "head_lif"]
    entries = {e.name: e for e in rep.layers}
    assert "the sum is modified in place" in entries["blocks.1.conv2"].reason
    assert "the sum is modified in place" in entries["blocks.2.spike1"].reason
    reset(opt)
    with torch.no_grad(), torch.inference_mode():
        y, ref = opt(x), copy.deepcopy(base)(x)
    assert float((y - ref).norm() / ref.norm()) < 1e-4


def test_restore_and_state_dict():
    base = tiny_net()
    x = torch.randn(T, 1, 3, 12, 12)
    opt = optimize(copy.deepcopy(base), x, mode="torch", block_size=8)
    a, b = opt.state_dict(), base.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    restore(opt)
    assert [type(m) for m in opt.modules()] == [type(m) for m in base.modules()]
    assert not any("forward" in m.__dict__ for m in opt.modules())
    reset(opt)
    reset(base)
    with torch.no_grad():
        assert torch.equal(opt(x), base(x))


def ms_resnet34():
    from spikingjelly.activation_based.model import ms_resnet

    torch.manual_seed(0)
    net = ms_resnet.ms_resnet34(T=T, num_classes=10)
    functional.set_step_mode(net, "m")
    net.eval()
    calibrate_bns(net, torch.randn(T, 2, 3, 32, 32))
    return net


def test_zoo_ms_resnet34(monkeypatch):
    """Every block's sum feeds the next block's first neuron (or the head's): 16 of the 17 neurons before a
    convolution are fused into the layer writing their input; the first reads the stem's output, no sum."""
    base = ms_resnet34()
    x = torch.randn(T, 1, 3, 32, 32)
    opt, rep = optimize(copy.deepcopy(base), x, mode="torch", block_size=8, return_report=True)
    fused = sum_neurons(opt)
    assert len(fused) == 16 and "head_lif" in fused and "layer1.0.spike1" not in fused
    assert standalone_neurons(opt) == ["layer1.0.spike1"]
    assert sum("+sum" in e.detail for e in rep.layers) == 16
    assert sum(s for s, _ in count_neuron_kernels(opt, x, monkeypatch)) == 16
    with monkeypatch.context() as mp:
        without_sum_fusion(mp)
        unfused = optimize(copy.deepcopy(base), x, mode="torch", block_size=8)
    assert len(standalone_neurons(unfused)) == 17
    reset(opt)
    reset(unfused)
    assert_calls_equal(opt, unfused, [x])
    dense = copy.deepcopy(base)
    reset(opt)
    with torch.no_grad():
        y, ref = opt(x).double(), dense(x).double()
    assert ref.abs().max() > 0 and float((y - ref).norm() / ref.norm()) < 1e-4


def test_faithful_numerics_keep_the_neurons_on_their_own():
    """numerics="faithful": every neuron writes its spikes in the dense module's layout, on its own kernel."""
    base = tiny_net()
    x = torch.randn(T, 1, 3, 12, 12)
    opt = optimize(copy.deepcopy(base), x, mode="torch", block_size=8, numerics="faithful")
    assert sum_neurons(opt) == [] and len(standalone_neurons(opt)) == 4
    reset(opt)
    reset(base)
    with torch.no_grad():
        assert torch.equal(opt(x), base(x))


def _prop(fn):
    if given is None:
        return pytest.mark.skip(reason="hypothesis is not installed")(fn)
    s = settings(max_examples=5, deadline=None, derandomize=True, database=None,
                 suppress_health_check=list(HealthCheck), print_blob=True)
    return s(given(data=st.data())(fn))


@_prop
def test_property_generated_networks_equal_unfused(data, monkeypatch):
    """Generated neuron-first networks (neuron type, widths, strides, the add's form, dtype): the fused model is the
    unfused one bit for bit over two calls and after a reset, every block's sum feeding a fused neuron."""
    pick = (lambda options: data.draw(st.sampled_from(list(options))))
    n_blocks = pick([1, 2, 3])
    blocks = tuple((pick([4, 8, 12]), pick([1, 2]), pick(["out+identity", "identity+out", "in place"]))
                   for _ in range(n_blocks))
    dtype = pick([torch.float32, torch.float16])
    base = tiny_net(dtype, seed=pick(range(100)), blocks=blocks, make_neuron=NEURONS[pick(sorted(NEURONS))])
    xs = [torch.randn(T, 1, 3, 10, 10, dtype=dtype) * 1.5 for _ in range(2)]
    opt = optimize(copy.deepcopy(base), xs[0], mode="torch", block_size=8)
    assert sum_neurons(opt) == [f"blocks.{i}.spike1" for i in range(1, n_blocks)] + ["head_lif"]
    with monkeypatch.context() as mp:
        without_sum_fusion(mp)
        unfused = optimize(copy.deepcopy(base), xs[0], mode="torch", block_size=8)
    reset(opt)
    reset(unfused)
    assert_calls_equal(opt, unfused, xs)


@pytest.mark.parametrize(("dtype", "path"), [(torch.float32, "sum_fused_dense"), (torch.float16, "sum_fused_tm")],
                         ids=["fp32-steps-looped", "fp16-steps-in-m"])
def test_sum_written_by_the_fused_convolution(dtype, path, monkeypatch):
    """The layers writing a sum on the fused kernel that also computes the reading neuron's spikes (the path the
    dispatch measures against the convolution + sum kernel pair; forced here): every sum neuron takes its spikes
    from it (no neuron kernel writes a sum), and over calls without a reset and after one the outputs and the sum
    neurons' membranes follow those of the pair, and then in train mode (the fp16 dense model is itself 2-5 % from
    the fp32 one on this small net, so fp16 is compared with the pair, fp32 with the dense model too)."""
    from sparseflow_kernels import dispatch

    base = tiny_net(dtype)
    xs = [torch.randn(T, 2, 3, 12, 12, dtype=dtype) * 1.5 for _ in range(2)]
    with dispatch.force_path({"sum": "pair"}):
        pair = optimize(copy.deepcopy(base), xs[0], block_size=8)
    refs = {"pair": pair, "dense": copy.deepcopy(base)} if dtype == torch.float32 else {"pair": pair}
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    with dispatch.force_path({"sum": path}):
        opt = optimize(copy.deepcopy(base), xs[0], block_size=8)
        assert sum_neurons(opt) == ["blocks.1.spike1", "blocks.2.spike1", "head_lif"]
        assert [s for s, _ in count_neuron_kernels(opt, xs[0], monkeypatch)] == [False]  # (blocks.0.spike1 alone)
        assert [opt.blocks[i].conv2.last_path for i in range(3)] == [path] * 3
        for net in (opt, *refs.values()):
            reset(net)
        with torch.no_grad():
            for i, x in enumerate([*xs, "reset", "train"]):
                if isinstance(x, str) and x == "reset":  # a reset, then the first input again
                    for net in (opt, *refs.values()):
                        reset(net)
                    x = xs[0]
                elif isinstance(x, str):  # "train": the modules' own forward, from the membranes the kernels left
                    for net in (opt, *refs.values()):
                        net.train()
                    x = xs[1]
                y = opt(x).double()
                for what, ref_net in refs.items():
                    with dispatch.force_path({"sum": "pair"}):
                        ref = ref_net(x).double()
                    assert ref.abs().max() > 0 and float((y - ref).norm() / ref.norm()) < tol, f"call {i} vs {what}"
                    for name in ("blocks.1.spike1", "blocks.2.spike1", "head_lif"):
                        v, ref_v = opt.get_submodule(name).v.double(), ref_net.get_submodule(name).v.double()
                        err = float((v - ref_v).norm() / ref_v.norm())
                        assert err < 10 * tol, f"call {i}: membrane of {name} vs {what}"
