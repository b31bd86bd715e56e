"""optimize() never silently changes what a model computes: modules called more than once, models without
spiking neurons, broadcasting residual adds, BatchNorms without running statistics, parametrized weights,
lazy dtype casts, models that cannot be deep-copied, bf16 on the CPU; and the errors a user sees for a wrong
input rank or dtype or a bad argument of optimize().

Silent-result cases compare with the dense model (a deep copy, fresh random non-binary inputs) on a first call,
a second call without reset and a call after ``reset_net`` (``compare_calls``)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from sf_core_nets import calibrate_bns, compare_calls, reset
from spikingjelly.activation_based import functional, layer, neuron
from torch import nn

from sparseflow_core import get_report, optimize, restore
from sparseflow_ops import SparseConv1d, SparseConv2d, SparseModule, is_accelerated, is_bypassed

T, N = 2, 2


def _m(net):
    functional.set_step_mode(net, "m")
    return net.eval()


def _xs(*shape, scale=2.0, n=3):
    return [torch.randn(*shape) * scale for _ in range(n)]


def _entries(rep):
    return {e.name: e for e in rep.layers}


def _fused_into(model):
    """{bypassed module id: the SparseFlow modules that took it over}."""
    out = {}
    for m in model.modules():
        for attr in ("_bn", "_neuron"):
            x = m.__dict__.get(attr)
            if x is not None:
                out.setdefault(id(x), []).append(m)
    return out


# ============================================================= a module called more than once is fused once at most
class SharedNeuron(nn.Module):
    """One neuron after two convolutions: sn(c2(sn(c1(x))))."""

    def __init__(self):
        super().__init__()
        self.c1 = layer.Conv2d(3, 8, 3, padding=1)
        self.c2 = layer.Conv2d(8, 8, 3, padding=1)
        self.sn = neuron.LIFNode()

    def forward(self, x):
        return self.sn(self.c2(self.sn(self.c1(x))))


class SharedBN(nn.Module):
    """One BatchNorm2d after two convolutions: s2(bn(c2(s1(bn(c1(x))))))."""

    def __init__(self):
        super().__init__()
        self.c1 = layer.Conv2d(3, 8, 3, padding=1)
        self.c2 = layer.Conv2d(8, 8, 3, padding=1)
        self.bn = layer.BatchNorm2d(8)
        self.s1 = neuron.LIFNode()
        self.s2 = neuron.IFNode()

    def forward(self, x):
        return self.s2(self.bn(self.c2(self.s1(self.bn(self.c1(x))))))


@pytest.mark.parametrize("cls", [SharedNeuron, SharedBN])
def test_shared_neuron_or_batchnorm_after_two_convs(cls):
    net = _m(cls())
    with torch.no_grad():
        net.c2.weight.mul_(4)
    xs = _xs(T, N, 3, 8, 8)
    if cls is SharedBN:
        calibrate_bns(net, xs[0])
    dense = copy.deepcopy(net)
    opt, rep = optimize(net, xs[0], block_size=8, return_report=True)
    shared = opt.sn if cls is SharedNeuron else opt.bn
    assert not is_bypassed(shared) and id(shared) not in _fused_into(opt)
    assert "shared with another path" in _entries(rep)["c2"].reason, rep.table()
    if cls is SharedNeuron:
        assert is_accelerated(opt.sn)  # the neuron still runs on the kernel, called twice with its state
    compare_calls(opt, dense, xs)


class Projections(nn.Module):
    """Conv1d(k=1) projections of spikes [T, N, C, L] (SeqToANNContainer style) sharing a BatchNorm1d (``bn``) or
    a neuron (``sn``) between two projections."""

    def __init__(self, share):
        super().__init__()
        self.share = share
        self.stem = nn.Conv1d(4, 8, 1)
        self.sn0 = neuron.LIFNode(step_mode="m")
        self.proj_a, self.proj_b = nn.Conv1d(8, 8, 1), nn.Conv1d(8, 8, 1)
        self.bn1, self.bn2 = nn.BatchNorm1d(8), nn.BatchNorm1d(8)
        self.sn1, self.sn2 = neuron.LIFNode(step_mode="m"), neuron.IFNode(step_mode="m")

    def proj(self, conv, bn, sn, s):
        return sn(bn(conv(s.flatten(0, 1))).view(s.shape))

    def forward(self, x):
        s = self.sn0(self.stem(x.flatten(0, 1)).view(*x.shape[:2], 8, -1))
        bn2 = self.bn1 if self.share == "bn" else self.bn2
        sn2 = self.sn1 if self.share == "sn" else self.sn2
        a = self.proj(self.proj_a, self.bn1, self.sn1, s)
        return self.proj(self.proj_b, bn2, sn2, a)


@pytest.mark.parametrize("share", ["bn", "sn"])
def test_shared_batchnorm1d_or_neuron_after_conv1d_projections(share):
    net = Projections(share).eval()
    with torch.no_grad():
        for bn in (net.bn1, net.bn2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.05, 0.2)
            bn.bias.uniform_(0.2, 0.8)
    xs = _xs(T, N, 4, 6)
    dense = copy.deepcopy(net)
    opt, rep = optimize(net, xs[0], return_report=True)
    assert isinstance(opt.proj_a, SparseConv1d) and isinstance(opt.proj_b, SparseConv1d), rep.table()
    shared = opt.bn1 if share == "bn" else opt.sn1
    assert len(_fused_into(opt).get(id(shared), [])) == 0 and not is_bypassed(shared), rep.table()
    e = _entries(rep)
    assert "shared with another path" in e["proj_a"].detail + e["proj_b"].detail, rep.table()
    compare_calls(opt, dense, xs)


class SharedResidualNeuron(nn.Module):
    """sn(bn(conv(x)) + x) in a block, the same neuron also after the stem: a residual chain whose neuron is shared."""

    def __init__(self):
        super().__init__()
        self.stem = layer.Conv2d(3, 8, 3, padding=1)
        self.conv = layer.Conv2d(8, 8, 3, padding=1)
        self.bn = layer.BatchNorm2d(8)
        self.sn = neuron.LIFNode()

    def forward(self, x):
        s = self.sn(self.stem(x))
        return self.sn(self.bn(self.conv(s)) + s)


def test_shared_neuron_of_a_residual_chain():
    net = nn.Sequential(SharedResidualNeuron())
    _m(net)
    xs = _xs(T, N, 3, 16, 16)
    calibrate_bns(net, xs[0])
    dense = copy.deepcopy(net)
    opt, rep = optimize(net, xs[0], block_size=8, return_report=True)
    assert id(dense[0].sn) != id(opt[0].sn) and not is_bypassed(opt[0].sn), rep.table()
    assert "shared with another path" in _entries(rep)["0.conv"].reason, rep.table()
    compare_calls(opt, dense, xs)


def test_conv_chain_called_twice_on_one_path_is_still_fused():
    """A conv -> bn -> neuron chain whose three modules are each called twice, every call in the chain: fused."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.sn0 = layer.Conv2d(3, 8, 3, padding=1), neuron.IFNode()
            self.conv, self.bn, self.sn = layer.Conv2d(8, 8, 3, padding=1), layer.BatchNorm2d(8), neuron.LIFNode()

        def forward(self, x):
            s = self.sn0(self.stem(x))
            return self.sn(self.bn(self.conv(self.sn(self.bn(self.conv(s))))))

    net = _m(Twice())
    xs = _xs(T, N, 3, 16, 16)
    calibrate_bns(net, xs[0])
    dense = copy.deepcopy(net)
    opt, rep = optimize(net, xs[0], block_size=8, return_report=True)
    assert isinstance(opt.conv, SparseConv2d) and opt.conv.fused_neuron is opt.sn, rep.table()
    compare_calls(opt, dense, xs)


# ==================================================================== a model without spiking neurons is unchanged
def test_model_without_spiking_neurons_is_unchanged():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(),
                        nn.Linear(4 * 4 * 4, 3)).eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    dense = copy.deepcopy(net)
    before = [(n, type(m), id(m)) for n, m in net.named_modules()]
    opt, rep = optimize(net, torch.randn(2, 3, 8, 8), return_report=True)
    assert [(n, type(m), id(m)) for n, m in opt.named_modules()] == before
    assert not any(isinstance(m, SparseModule) for m in opt.modules()) and not rep.folded
    assert "no spiking modules found: model unchanged" in rep.notes
    assert {e.name for e in rep.layers} == {"0", "3", "5"} and all(e.action == "left" for e in rep.layers)
    for _ in range(2):
        x = torch.randn(2, 3, 8, 8)
        assert torch.equal(opt(x), dense(x))


# ================================================================= crashes on valid models: run, match the dense model
class Offset(nn.Module):
    """sn(bn(conv(x)) + other) or sn(bn(conv(x))) + other, ``other`` broadcasting: a (C, 1, 1) parameter or the
    spatial mean of the block's input (keepdim)."""

    def __init__(self, other, after):
        super().__init__()
        self.other, self.after = other, after
        self.conv = layer.Conv2d(8, 8, 3, padding=1)
        self.bn = layer.BatchNorm2d(8)
        self.sn = neuron.LIFNode()
        self.offset = nn.Parameter(torch.rand(8, 1, 1))

    def forward(self, x):
        other = self.offset if self.other == "param" else x.mean((3, 4), keepdim=True)
        y = self.bn(self.conv(x))
        return self.sn(y) + other if self.after else self.sn(y + other)


@pytest.mark.parametrize("other", ["param", "mean"])
@pytest.mark.parametrize("after", [False, True], ids=["before-neuron", "after-neuron"])
def test_broadcasting_residual_add(other, after):
    net = _m(nn.Sequential(layer.Conv2d(3, 8, 3, padding=1), neuron.IFNode(), Offset(other, after)))
    xs = _xs(T, N, 3, 16, 16)
    calibrate_bns(net, xs[0])
    dense = copy.deepcopy(net)
    opt, rep = optimize(net, xs[0], block_size=8, return_report=True)
    reason = _entries(rep)["2.conv"].reason
    assert "broadcasts" in reason and "1, 1)" in reason, rep.table()
    compare_calls(opt, dense, xs)


def test_batchnorm_without_running_stats_left_with_reason():
    net = _m(nn.Sequential(layer.Conv2d(3, 8, 3, padding=1), neuron.IFNode(), layer.Conv2d(8, 8, 3, padding=1),
                           layer.BatchNorm2d(8, track_running_stats=False), neuron.LIFNode()))
    xs = _xs(T, N, 3, 16, 16)
    dense = copy.deepcopy(net)
    opt, rep = optimize(net, xs[0], block_size=8, return_report=True)
    e = _entries(rep)
    assert "no running statistics" in e["2"].reason, rep.table()
    assert not is_bypassed(opt[3]) and "fed by convolution 2" in e["3"].reason
    compare_calls(opt, dense, xs)


@pytest.mark.parametrize("param", ["weight_norm", "spectral_norm"])
def test_parametrized_conv_and_linear_left_dense(param):
    wrap = getattr(nn.utils.parametrizations, param)
    net = _m(nn.Sequential(layer.Conv2d(3, 8, 3, padding=1), neuron.IFNode(), wrap(layer.Conv2d(8, 8, 3, padding=1)),
                           layer.BatchNorm2d(8), neuron.LIFNode(), layer.Flatten(), wrap(layer.Linear(8 * 16 * 16, 4))))
    xs = _xs(T, N, 3, 16, 16)
    calibrate_bns(net, xs[0])
    dense = copy.deepcopy(net)
    opt, rep = optimize(net, xs[0], block_size=8, return_report=True)
    e = _entries(rep)
    for name in ("2", "6"):
        assert e[name].action == "left" and "parametrized" in e[name].reason, rep.table()
        assert e[name].type in ("Conv2d", "Linear")
    compare_calls(opt, dense, xs)


def _small(dtype=torch.float32):
    torch.manual_seed(5)
    net = _m(nn.Sequential(layer.Conv2d(3, 8, 3, padding=1), neuron.IFNode(), layer.Conv2d(8, 8, 3, padding=1),
                           layer.BatchNorm2d(8), neuron.LIFNode()))
    return net.to(dtype)


@pytest.mark.parametrize("lazy", [True, False])
def test_dtype_casts_floating_inputs_on_every_call(lazy):
    """optimize(model, dtype=float16): fp32 inputs are cast on the first and every later call (eager or lazy); an
    fp16 input gives the same result."""
    xs = _xs(T, N, 3, 16, 16)
    opt = optimize(_small(), None if lazy else xs[0], dtype=torch.float16, block_size=8)
    ys = []
    for x in (xs[0], xs[1], xs[0].half()):
        ys.append(opt(x))
        assert ys[-1].dtype == torch.float16
        reset(opt)
    assert torch.equal(ys[0], ys[2])
    restore(opt)
    with pytest.raises(RuntimeError):
        opt(xs[0])  # the cast is optimize()'s: restore() removes it with the rest


def test_model_that_cannot_be_deep_copied():
    net, dense = _small(), _small()
    net.lock = threading.Lock()
    with torch.no_grad():  # some neuron state before optimize(): it must be the same afterwards
        x0 = torch.randn(T, N, 3, 16, 16) * 2
        net(x0)
        dense(x0)
    example = torch.randn(T, N, 3, 16, 16)
    rng = torch.get_rng_state()
    opt, rep = optimize(net, example, block_size=8, return_report=True)
    assert torch.equal(torch.get_rng_state(), rng)
    assert any("could not be deep-copied" in n and "lock" in n for n in rep.notes), rep.notes
    assert isinstance(opt[2], SparseConv2d) and opt[2].fused_neuron is opt[4]
    compare_calls(opt, dense, _xs(T, N, 3, 16, 16))


def test_bfloat16_on_the_cpu_runs_dense_with_a_notice(caplog):
    from sparseflow_kernels import sparse_conv2d

    net = _small(torch.bfloat16)
    dense = copy.deepcopy(net)
    xs = [x.bfloat16() for x in _xs(T, N, 3, 16, 16)]
    opt, rep = optimize(net, xs[0], block_size=8, return_report=True)
    assert any("bfloat16 kernels need a GPU" in n for n in rep.notes), rep.notes
    compare_calls(opt, dense, xs)
    with pytest.raises(TypeError, match="bfloat16 kernels need a CUDA GPU"):
        sparse_conv2d(torch.rand(1, 3, 8, 8, dtype=torch.bfloat16), torch.randn(4, 3, 3, 3, dtype=torch.bfloat16))


# ====================================================================================== clear errors on bad input
def test_four_d_input_to_a_multistep_model_says_what_it_expects():
    net = _small()
    dense = copy.deepcopy(net)
    opt = optimize(net, torch.randn(T, 1, 3, 16, 16), block_size=8)
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"\[T, N, C, H, W\]") as want:
        dense(x)
    with pytest.raises(type(want.value), match=r"expected x with shape \[T, N, C, H, W\], got \(1, 3, 16, 16\)"):
        opt(x)


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64, "half-model"])
def test_wrong_input_dtype_names_the_dtype(dtype):
    opt = optimize(_small(), torch.randn(T, 1, 3, 16, 16), block_size=8)
    x = torch.randn(T, 1, 3, 16, 16)
    if dtype == "half-model":
        opt.half()
        want = "input dtype torch.float32 does not match the weight dtype torch.float16"
    else:
        x = (x * 3).to(dtype)
        want = f"input dtype {dtype} does not match the weight dtype torch.float32"
    with pytest.raises(RuntimeError, match=want):
        opt(x)


BAD_ARGS = [
    (dict(block_size=7), ValueError, "block_size must be None, 'dense', 'auto', one of 4, 8, 16"),
    (dict(block_size="huge"), ValueError, "got 'huge'"),
    (dict(block_size=True), ValueError, "block_size must be"),
    (dict(block_size={"2": 12}), ValueError, "block_size['2'] must be"),
    (dict(block_size={"nope": 8}), ValueError, "block_size names 'nope', which is not a module of the model"),
    (dict(mode="fast"), ValueError, "mode must be one of ('auto', 'sparse', 'dense', 'torch'), got 'fast'"),
    (dict(numerics="exact"), ValueError, "numerics must be one of ('fast', 'faithful')"),
    (dict(dtype=torch.int8), TypeError, "dtype must be None or one of torch.float32, torch.float16, torch.bfloat16"),
    (dict(dtype="half"), TypeError, "dtype must be None or one of"),
    (dict(filter_fn=3), TypeError, "filter_fn must be None or a callable"),
    (dict(fuse="yes"), TypeError, "fuse must be True or False"),
    (dict(inplace=None), TypeError, "inplace must be True or False"),
]


@pytest.mark.parametrize("kw,exc,fragment", BAD_ARGS, ids=[str(a[0]) for a in BAD_ARGS])
def test_bad_argument_is_refused_up_front(kw, exc, fragment):
    net = _small()
    before = [(n, type(m)) for n, m in net.named_modules()]
    with pytest.raises(exc) as err:
        optimize(net, torch.randn(T, 1, 3, 16, 16), **kw)
    assert fragment in str(err.value)
    assert [(n, type(m)) for n, m in net.named_modules()] == before and get_report(net) is None


def test_bad_argument_of_a_lazy_optimize_is_refused_at_once():
    with pytest.raises(ValueError, match="block_size"):
        optimize(_small(), block_size=7)
