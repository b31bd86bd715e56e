"""optimize() never silently changes what a model computes, whatever the user does with it afterwards:

* hooks and SpikingJelly monitors attached after optimize() record what they record on the dense model (same
  count, order and values), on plain conv -> BN -> neuron chains, on residual chains fused through fx
  (spiking ResNet's BasicBlock) and on SEW-ResNet's skip-add blocks;
* a block whose chains run fused stays the user's block (class, methods, attributes set in forward, state_dict
  keys), follows train()/eval() exactly, survives copy.deepcopy and torch.save/torch.load, and restore() gives
  it back;
* backward through an optimized model gives the dense model's gradients (input and parameters), in eval and in
  train mode.

Each model is compared with a deep copy of itself made before optimize(), on fresh random non-binary inputs
[T=2, N, C, 8, 8]: a first call, a second call without reset, a call after reset_net, and after train().
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from sf_core_nets import assert_same_state, calibrate_bns, compare_calls, reset
from spikingjelly.activation_based import functional, layer, monitor, neuron
from spikingjelly.activation_based.model import sew_resnet, spiking_resnet
from torch import nn

from sparseflow_core import get_report, optimize, restore
from sparseflow_core.fx_fusion import fused_forward
from sparseflow_ops import SparseConv2d, is_bypassed

T = 2


def inputs(n=3, N=1):
    return [torch.randn(T, N, 3, 8, 8) for _ in range(n)]


def head(c):
    return [layer.AdaptiveAvgPool2d((1, 1)), layer.Flatten(), layer.Linear(c, 5)]


def plain_net():
    """image stem (fused, dense input) -> conv/BN/LIF (fused, spikes in) -> conv/BN/IF (fused) -> head."""
    return nn.Sequential(
        layer.Conv2d(3, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8), neuron.LIFNode(tau=2.0),
        layer.Conv2d(8, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8), neuron.LIFNode(tau=2.0),
        layer.Conv2d(8, 6, 3, padding=1, bias=True), layer.BatchNorm2d(6), neuron.IFNode(),
        *head(6))


def residual_net():
    """stem, then two spiking ResNet BasicBlocks: sn2(bn2(conv2(.)) + identity) fused through fx."""
    return nn.Sequential(
        layer.Conv2d(3, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8), neuron.LIFNode(tau=2.0),
        spiking_resnet.BasicBlock(8, 8, spiking_neuron=neuron.LIFNode),
        spiking_resnet.BasicBlock(8, 8, spiking_neuron=neuron.LIFNode),
        *head(8))


def sew_net():
    """stem, then two SEW-ResNet ADD blocks: identity + sn2(bn2(conv2(.))) in the fused layer's epilogue."""
    return nn.Sequential(
        layer.Conv2d(3, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8), neuron.LIFNode(tau=2.0),
        sew_resnet.BasicBlock(8, 8, cnf="ADD", spiking_neuron=neuron.LIFNode),
        sew_resnet.BasicBlock(8, 8, cnf="ADD", spiking_neuron=neuron.LIFNode),
        *head(8))


NETS = {"plain": plain_net, "residual": residual_net, "sew": sew_net}


def build(kind, N=1):
    torch.manual_seed(0)
    net = NETS[kind]()
    functional.set_step_mode(net, "m")
    net.eval()
    xs = inputs(N=N)
    calibrate_bns(net, torch.randn(T, 4, 3, 8, 8))
    return net, xs


def optimized(kind, N=1):
    net, xs = build(kind, N)
    dense = copy.deepcopy(net)
    optimize(net, xs[0])
    return net, dense, xs


def assert_fusions(kind, net):
    rep = get_report(net)
    fused = rep.by_action("fused")
    assert len(fused) >= 3, str(rep)
    if kind == "residual":
        assert sum("+residual" in e.detail for e in fused) == 2, str(rep)
    if kind == "sew":
        assert sum("skip connection's add" in e.detail for e in fused) == 2, str(rep)


# ------------------------------------------------------------------------------------------- monitors


def run_monitored(net, xs, reset_at=2, call=None):
    """Records of an InputMonitor on every LIF node and an OutputMonitor on every BatchNorm over the calls of
    ``xs`` (reset before call ``reset_at``), and the outputs; ``call``: what runs ``net`` (e.g. its compiled
    form; default ``net`` itself)."""
    mons = [monitor.InputMonitor(net, instance=neuron.LIFNode), monitor.OutputMonitor(net, instance=layer.BatchNorm2d)]
    outs = []
    with torch.no_grad():
        for i, x in enumerate(xs):
            if i == reset_at:
                reset(net)
            outs.append((net if call is None else call)(x))
    recs = [[r.clone() for r in m.records] for m in mons]  # in call order
    names = [{n: len(m[n]) for n in m.monitored_layers} for m in mons]  # records per layer
    for m in mons:
        m.remove_hooks()
    return outs, recs, names


@pytest.mark.parametrize("kind", list(NETS))
def test_monitors_after_optimize_record_the_dense_values(kind):
    net, dense, xs = optimized(kind)
    assert_fusions(kind, net)
    out_d, rec_d, names_d = run_monitored(dense, xs)
    out_o, rec_o, names_o = run_monitored(net, xs)
    assert names_o == names_d
    for rd, ro in zip(rec_d, rec_o):
        assert len(ro) == len(rd) and len(rd) > 0
        for a, b in zip(ro, rd):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # the LIF inputs and BatchNorm outputs are analog values, not spikes
    assert any(not torch.isin(r, torch.tensor([0.0, 1.0])).all() for r in rec_d[0])
    for a, b in zip(out_o, out_d):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert_same_state(net, dense)
    # hooks gone: the fused kernels run again, with the same results
    compare_calls(net, dense, inputs())
    assert any(m.last_path not in (None, "torch") for m in net.modules() if isinstance(m, SparseConv2d)
               and m.fused_neuron is not None)


@pytest.mark.parametrize("numerics", ["fast", "faithful"])
@pytest.mark.parametrize("kind", ["plain", "sew"])
def test_torch_compile_on_the_cpu_gives_the_dense_model(kind, numerics):
    """Inductor compiles Triton kernels for CUDA only: a CPU model compiled with it must not put the interpreter's
    kernels in its graph (their outputs would stay uninitialised: NaN or wrong logits), with or without monitors."""
    torch.manual_seed(0)
    net, xs = build(kind)
    dense = copy.deepcopy(net)
    optimize(net, xs[0], numerics=numerics)
    torch._dynamo.reset()
    compiled = torch.compile(net)
    with torch.no_grad():
        for i, x in enumerate(xs):
            if i == 2:
                reset(net)
                reset(dense)
            torch.testing.assert_close(compiled(x), dense(x), rtol=1e-4, atol=1e-4)
        reset(net)
        reset(dense)
    out_d, rec_d, _ = run_monitored(dense, xs)
    out_c, rec_c, _ = run_monitored(net, xs, call=compiled)
    for a, b in zip(out_c, out_d):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for rd, rc in zip(rec_d, rec_c):
        assert len(rc) == len(rd) > 0
        for a, b in zip(rc, rd):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", ["plain", "residual"])
def test_forward_hook_on_the_fused_conv_sees_the_conv_output(kind):
    """A hook on the layer in the conv's place sees the convolution's output (not the chain's spikes)."""
    net, dense, xs = optimized(kind)
    names = [n for n, m in net.named_modules() if isinstance(m, SparseConv2d) and m.fused_neuron is not None]
    assert names
    seen = {"o": [], "d": []}
    for key, model in (("o", net), ("d", dense)):
        for n in names:
            model.get_submodule(n).register_forward_hook(lambda m, i, o, k=key, n=n: seen[k].append((n, o.clone())))
    compare_calls(net, dense, xs)
    assert [n for n, _ in seen["o"]] == [n for n, _ in seen["d"]] and seen["d"]
    for (_, a), (_, b) in zip(seen["o"], seen["d"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_global_hook_sees_the_dense_values():
    net, dense, xs = optimized("residual")
    seen = {"o": [], "d": []}
    key = ["d"]

    def hook(m, i, o):
        if isinstance(o, torch.Tensor):
            seen[key[0]].append((type(m).__name__, o.detach().clone()))

    h = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        with torch.no_grad():
            ref = dense(xs[0])
            key[0] = "o"
            y = net(xs[0])
    finally:
        h.remove()
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    leaf = [(n, o) for n, o in seen["d"] if n in ("Conv2d", "BatchNorm2d", "LIFNode")]
    leaf_o = [(n, o) for n, o in seen["o"] if n in ("Conv2d", "SparseConv2d", "BatchNorm2d", "LIFNode")]
    assert len(leaf) == len(leaf_o) > 0
    for (_, a), (_, b) in zip(leaf_o, leaf):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ the user's block


class Block(nn.Module):
    """A residual block whose forward depends on the training flag (dropout in training mode) and on a plain
    attribute (``skip``), with a method of its own."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = layer.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = layer.BatchNorm2d(c)
        self.sn1 = neuron.LIFNode(tau=2.0)
        self.conv2 = layer.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = layer.BatchNorm2d(c)
        self.drop = layer.Dropout(0.5)
        self.sn2 = neuron.LIFNode(tau=2.0)
        self.skip = True

    def forward(self, x):
        out = self.sn1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.training:
            out = self.drop(out)
        identity = x if self.skip else x * 0.5
        return self.sn2(out + identity)

    def describe(self):
        return "block"


class FeatureBlock(Block):
    """Keeps its last pre-neuron feature map (``self.feat``) and doubles the residual."""

    def forward(self, x):
        out = self.sn1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        self.feat = out
        return self.sn2(out + x)


def block_net(cls=Block):
    stem = [layer.Conv2d(3, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8), neuron.LIFNode(tau=2.0)]
    return nn.Sequential(*stem, cls(8), cls(8), *head(8))


def build_block_net(cls=Block):
    torch.manual_seed(0)
    net = block_net(cls)
    functional.set_step_mode(net, "m")
    net.eval()
    calibrate_bns(net, torch.randn(T, 4, 3, 8, 8))
    xs = inputs()
    dense = copy.deepcopy(net)
    optimize(net, xs[0])
    return net, dense, xs


def test_fused_block_stays_the_users_block():
    net, dense, xs = build_block_net()
    rep = get_report(net)
    assert sum("+residual" in e.detail for e in rep.by_action("fused")) == 2, str(rep)
    for i in (3, 4):
        assert type(net[i]) is Block and isinstance(net[i], Block) and net[i].describe() == "block"
        assert fused_forward(net[i]) is not None
    a, b = net.state_dict(), dense.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert [n for n, _ in net.named_modules()] == [n for n, _ in dense.named_modules()]
    compare_calls(net, dense, xs)
    # the fused path ran: no BatchNorm / neuron of the residual chains ran their own forward
    assert net[3].conv2.last_path not in (None, "torch")
    # a plain attribute the forward reads (traced as True): the block's own forward, exactly
    net[3].skip = dense[3].skip = False
    compare_calls(net, dense, inputs())


def test_block_that_sets_attributes_in_forward_keeps_them():
    net, dense, xs = build_block_net(FeatureBlock)
    rep = get_report(net)
    assert any("sets feat" in e.reason for e in rep.layers), str(rep)
    for i in (3, 4):
        assert type(net[i]) is FeatureBlock and isinstance(net[i].__dict__.get("feat", 0), int | torch.Tensor)
        assert not isinstance(net[i].__dict__.get("feat"), torch.fx.Proxy)
    compare_calls(net, dense, xs)
    for i in (3, 4):
        torch.testing.assert_close(net[i].feat, dense[i].feat, rtol=1e-4, atol=1e-4)


def train_step(net, x, seed):
    functional.detach_net(net)  # (a second call without reset: the membrane of the last call, detached)
    torch.manual_seed(seed)
    y = net(x)
    y.square().sum().backward()
    return y.detach()


def assert_grads_equal(a, b):
    ga = {n: p.grad for n, p in a.named_parameters()}
    gb = {n: p.grad for n, p in b.named_parameters()}
    assert ga.keys() == gb.keys()
    for n in gb:
        if gb[n] is None:
            assert ga[n] is None, n
        else:
            assert ga[n] is not None, n
            torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("make", [build_block_net, lambda: optimized("residual"), lambda: optimized("sew")],
                         ids=["dropout-block", "residual", "sew"])
@pytest.mark.autograd
def test_train_mode_is_the_dense_model_and_eval_comes_back(make):
    net, dense, xs = make()
    compare_calls(net, dense, xs[:1])
    net.train()
    dense.train()
    for i, x in enumerate(xs):
        if i == 2:
            reset(net)
            reset(dense)
        y, ref = train_step(net, x, seed=i), train_step(dense, x, seed=i)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
        assert_grads_equal(net, dense)
        assert_same_state(net, dense)
        for (n, a), (_, b) in zip(net.named_buffers(), dense.named_buffers()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    net.eval()
    dense.eval()
    reset(net)
    reset(dense)
    compare_calls(net, dense, inputs())
    assert any(m.last_path not in (None, "torch") for m in net.modules()
               if isinstance(m, SparseConv2d) and m.fused_neuron is not None)


# ---------------------------------------------------------------------------------------- autograd


@pytest.mark.autograd
@pytest.mark.parametrize("kind", list(NETS))
def test_backward_in_eval_mode_gives_the_dense_gradients(kind):
    net, dense, xs = optimized(kind)
    for i, x in enumerate(xs):
        if i == 2:
            reset(net)
            reset(dense)
        for p in (*net.parameters(), *dense.parameters()):
            p.grad = None
        functional.detach_net(net)
        functional.detach_net(dense)
        xo, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, ref = net(xo), dense(xd)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
        (y * torch.arange(y.numel()).view_as(y)).sum().backward()
        (ref * torch.arange(ref.numel()).view_as(ref)).sum().backward()
        assert xd.grad is not None and xo.grad is not None
        torch.testing.assert_close(xo.grad, xd.grad, rtol=1e-4, atol=1e-5)
        assert_grads_equal(net, dense)
        assert_same_state(net, dense)
    # under no_grad the kernels run again
    compare_calls(net, dense, inputs())
    assert any(m.last_path not in (None, "torch") for m in net.modules() if isinstance(m, SparseConv2d))


@pytest.mark.autograd
def test_input_gradient_with_frozen_parameters():
    """Parameters frozen (an adversarial attack on the input): x.grad is the dense model's."""
    net, dense, xs = optimized("residual")
    for p in (*net.parameters(), *dense.parameters()):
        p.requires_grad_(False)
    xo, xd = xs[0].clone().requires_grad_(), xs[0].clone().requires_grad_()
    net(xo).sum().backward()
    dense(xd).sum().backward()
    torch.testing.assert_close(xo.grad, xd.grad, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ copies and restore


@pytest.mark.parametrize("kind", ["residual", "sew"])
def test_deepcopy_and_pickle_of_an_optimized_model(kind):
    net, dense, xs = optimized(kind)
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    for copied in (copy.deepcopy(net), torch.load(buf, weights_only=False)):
        ref = copy.deepcopy(dense)
        assert all(fused_forward(copied[i]).block is copied[i] for i in (3, 4))
        assert not any(m is n for m in copied.modules() for n in net.modules())
        compare_calls(copied, ref, xs)
        restore(copied)
        assert not any(isinstance(m, SparseConv2d) or is_bypassed(m) or fused_forward(m) for m in copied.modules())
        assert [type(m) for m in copied.modules()] == [type(m) for m in ref.modules()]
        compare_calls(copied, ref, inputs())
    # the original still works, untouched by its copies
    compare_calls(net, dense, inputs())


@pytest.mark.parametrize("kind", ["residual", "sew"])
def test_restore_gives_back_the_block(kind):
    net, dense, xs = optimized(kind)
    blocks = [net[3], net[4]]
    restore(net)
    assert net[3] is blocks[0] and net[4] is blocks[1]
    assert "forward" not in net[3].__dict__ and "forward" not in net[4].__dict__
    assert [type(m) for m in net.modules()] == [type(m) for m in dense.modules()]
    compare_calls(net, dense, xs)
