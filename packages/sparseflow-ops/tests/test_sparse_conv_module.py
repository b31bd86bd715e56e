"""SparseConv2d (from_dense with/without BatchNorm and neuron) against the dense modules it replaces, and
accelerate_neuron against the original neuron modules: outputs, neuron state across calls and resets,
state_dict, training fallback with autograd, to_dense, new weights, deepcopy and pickling."""

from __future__ import annotations

import copy
import io

import pytest
import snntorch
import torch
from spikingjelly.activation_based import functional, layer, neuron, surrogate
from torch import nn

from sparseflow_ops import (
    SparseConv2d,
    accelerate_neuron,
    is_accelerated,
    is_bypassed,
    neuron_support,
    restore_neuron,
)

T, N, C, CO, H, W = 2, 1, 20, 16, 10, 8


def spikes(*shape, density=0.3):
    return (torch.rand(*shape) < density).float()


@torch.no_grad()
def calibrate_bn(bn: nn.BatchNorm2d, y: torch.Tensor) -> None:
    """Running stats close to the real statistics of ``y``, and an affine that makes neurons fire."""
    y = y.flatten(0, 1) if y.dim() == 5 else y
    mean, var = y.mean((0, 2, 3)), y.var((0, 2, 3))
    bn.running_mean.copy_(mean + 0.1 * var.sqrt() * torch.randn_like(mean))
    bn.running_var.copy_(var * (0.8 + 0.4 * torch.rand_like(var)))
    bn.weight.copy_(0.8 + 0.7 * torch.rand_like(var))
    bn.bias.copy_(0.5 + 0.5 * torch.rand_like(var))


NEURON_FACTORIES = {
    "lif-hard": lambda sm: neuron.LIFNode(tau=2.0, step_mode=sm),
    "lif-soft": lambda sm: neuron.LIFNode(tau=2.0, v_reset=None, step_mode=sm),
    "lif-nodecayinput": lambda sm: neuron.LIFNode(tau=3.0, decay_input=False, step_mode=sm),
    "if": lambda sm: neuron.IFNode(v_threshold=1.0, step_mode=sm),
    "plif": lambda sm: neuron.ParametricLIFNode(init_tau=2.5, step_mode=sm),
    "lif-vreset-neg": lambda sm: neuron.LIFNode(tau=1.7, v_threshold=0.7, v_reset=-0.2, step_mode=sm),
}


def sj_layer(neuron_kind="lif-hard", bn=True, step_mode="m", x=None, co=CO):
    """conv -> BatchNorm -> neuron, SpikingJelly layers, eval mode, BatchNorm calibrated on ``x``."""
    mods = [layer.Conv2d(C, co, 3, padding=1, bias=False, step_mode=step_mode)]
    if bn:
        mods.append(layer.BatchNorm2d(co, step_mode=step_mode))
    if neuron_kind is not None:
        mods.append(NEURON_FACTORIES[neuron_kind](step_mode))
    seq = nn.Sequential(*mods).eval()
    if bn and x is not None:
        with torch.no_grad():
            calibrate_bn(seq[1], seq[0](x))
    return seq


def fuse(seq: nn.Sequential, **kw) -> nn.Sequential:
    """A deep copy of ``seq`` with its conv replaced by SparseConv2d (bn and neuron folded/fused)."""
    new = copy.deepcopy(seq)
    bn = new[1] if len(new) > 1 and isinstance(new[1], nn.BatchNorm2d) else None
    nrn = new[-1] if isinstance(new[-1], (neuron.BaseNode, snntorch.Leaky)) else None
    new[0] = SparseConv2d.from_dense(new[0], bn, nrn, **kw)
    return new


def neuron_v(m):
    return m.mem if isinstance(m, snntorch.Leaky) else m.v


def assert_same_spikes(a, b):
    assert a.shape == b.shape
    assert not torch.isnan(a).any()
    mism = int((a != b).sum())
    assert mism == 0, f"{mism} of {a.numel()} spikes differ"


# ------------------------------------------------------------------------------------ plain convolution


@pytest.mark.parametrize("mode", ["sparse", "dense", "torch", "auto"])
@pytest.mark.parametrize("block_size", [None, 16, "dense"], ids=["block-default", "block16", "block-dense"])
def test_conv_only_nn_conv2d(mode, block_size):
    conv = nn.Conv2d(C, CO, 3, stride=2, padding=1, bias=True).eval()
    x = spikes(N, C, 11, 10)
    ref = conv(x)
    sc = SparseConv2d.from_dense(conv, mode=mode, block_size=block_size).eval()
    assert isinstance(sc, nn.Conv2d) and sc.weight is conv.weight and sc.bias is conv.bias
    y = sc(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    expected_path = {"sparse": "sparse", "dense": "dense", "torch": "torch", "auto": "sparse"}[mode]
    if block_size == "dense":  # "dense" blocks: no sparse candidate, the kernels run without skipping
        expected_path = {"sparse": "torch", "dense": "torch", "torch": "torch", "auto": "torch"}[mode]
    assert sc.last_path == expected_path


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_conv_only_spikingjelly_multistep(mode):
    conv = layer.Conv2d(C, CO, 3, padding=1, bias=True, step_mode="m").eval()
    x = spikes(T, N, C, H, W)
    ref = conv(x)
    sc = SparseConv2d.from_dense(conv, mode=mode).eval()
    y = sc(x)
    assert y.shape == ref.shape == (T, N, CO, H, W)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert sc.last_path == mode


@pytest.mark.parametrize("mode", ["sparse", "dense", "torch"])
def test_conv_bn_folded(mode):
    x = spikes(T, N, C, H, W)
    dense = sj_layer(None, bn=True, x=x)
    fused = fuse(dense, mode=mode)
    assert is_bypassed(fused[1])
    ref = dense(x)
    y = fused(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert fused[0].kind() == "conv+bn"
    # the BatchNorm called on its own (nothing fused ran before it in this call) runs normally
    z = torch.randn(T, N, CO, H, W)
    torch.testing.assert_close(fused[1](z), dense[1](z))


def test_conv_bn_folded_4d_nn_modules():
    x = spikes(N, C, H, W)
    dense = nn.Sequential(nn.Conv2d(C, CO, 3, padding=1), nn.BatchNorm2d(CO)).eval()
    calibrate_bn(dense[1], dense[0](x).detach())
    fused = fuse(dense, mode="sparse")
    torch.testing.assert_close(fused(x), dense(x), rtol=1e-5, atol=1e-5)
    assert fused[0].last_path == "sparse"


# ----------------------------------------------------------------------------- fused spiking layer


FUSED_CASES = [(n, m) for n in NEURON_FACTORIES for m in ("sparse", "torch")] + [
    (n, m) for n in ("lif-hard", "plif") for m in ("dense", "auto")]


@pytest.mark.parametrize("neuron_kind,mode", FUSED_CASES, ids=[f"{n}-{m}" for n, m in FUSED_CASES])
def test_fused_layer_calls_and_reset(neuron_kind, mode):
    x1, x2, x3 = (spikes(T, N, C, H, W) for _ in range(3))
    dense = sj_layer(neuron_kind, x=x1)
    fused = fuse(dense, mode=mode)
    assert fused[0].kind() == "conv+bn+neuron"
    assert is_bypassed(fused[1]) and is_bypassed(fused[2])
    rates = []
    for x, reset in ((x1, False), (x2, False), (x3, True)):  # first call, second (state kept), after reset
        if reset:
            functional.reset_net(dense)
            functional.reset_net(fused)
        ref = dense(x)
        y = fused(x)
        assert_same_spikes(y, ref)
        torch.testing.assert_close(neuron_v(fused[2]), neuron_v(dense[2]), rtol=1e-5, atol=1e-5)
        rates.append(float(ref.detach().mean()))
    assert all(0.02 < r < 0.9 for r in rates), rates
    assert fused[0].last_path == {"sparse": "fused_sparse", "dense": "fused_dense", "torch": "cudnn",
                                  "auto": "fused_dense"}[mode]


@pytest.mark.parametrize("candidate", ["fused_dense", "fused_tm", "fused_tm_n128", "fused_sparse", "cudnn"])
def test_every_dispatch_candidate(candidate, monkeypatch):
    """Whatever path the measurement picks (on a GPU), the layer computes the dense model's spikes."""
    from sparseflow_kernels import dispatch

    co = 128 if candidate == "fused_tm_n128" else CO
    x1, x2 = spikes(T, N, C, H, W), spikes(T, N, C, H, W)
    dense = sj_layer("lif-soft", x=x1, co=co)
    fused = fuse(dense, mode="auto")
    offered = []

    def choose(key, cands, fallback, device=None):
        offered.append(sorted(cands))
        return candidate

    monkeypatch.setattr(dispatch, "choose", choose)
    for x in (x1, x2):
        ref = dense(x)
        assert_same_spikes(fused(x), ref)
        torch.testing.assert_close(fused[2].v, dense[2].v, rtol=1e-5, atol=1e-5)
    assert candidate in offered[0], offered[0]
    assert fused[0].last_path == candidate


def test_fused_conv_neuron_without_bn():
    x = spikes(T, N, C, H, W)
    dense = nn.Sequential(layer.Conv2d(C, CO, 3, padding=1, bias=True, step_mode="m"),
                          neuron.IFNode(v_threshold=0.3, step_mode="m")).eval()
    fused = fuse(dense, mode="sparse")
    assert fused[0].kind() == "conv+neuron"
    for _ in range(2):
        ref = dense(x)
        assert 0.02 < float(ref.detach().mean()) < 0.9
        assert_same_spikes(fused(x), ref)
        torch.testing.assert_close(fused[1].v, dense[1].v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["sparse", "torch"])
def test_fused_residual_argument(mode):
    """forward(x, residual) = neuron(bn(conv(x)) + residual), as in a ResNet block."""
    x = spikes(T, N, C, H, W)
    dense = sj_layer("lif-soft", x=x)
    fused = fuse(dense, mode=mode)
    res = spikes(T, N, CO, H, W)
    for _ in range(2):
        ref = dense[2](dense[1](dense[0](x)) + res)
        y = fused[0](x, residual=res)
        assert_same_spikes(y, ref)
        torch.testing.assert_close(fused[2].v, dense[2].v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["sparse", "dense", "torch"])
@pytest.mark.parametrize("res_dtype", ["same", "float64"])
def test_fused_residual_after_argument(mode, res_dtype):
    """forward(x, residual, residual_after=True) = residual + neuron(bn(conv(x))), as SEW-ResNet's ADD; a
    residual of another dtype is added outside the kernel with torch's type promotion."""
    x = spikes(T, N, C, H, W)
    dense = sj_layer("lif-hard", x=x)
    fused = fuse(dense, mode=mode)
    res = spikes(T, N, CO, H, W) * 2
    if res_dtype == "float64":
        res = res.double()
    for _ in range(2):
        ref = res + dense[2](dense[1](dense[0](x)))
        y = fused[0](x, residual=res, residual_after=True)
        assert y.dtype == ref.dtype
        assert_same_spikes(y - res, ref - res)
        torch.testing.assert_close(fused[2].v, dense[2].v, rtol=1e-5, atol=1e-5)
        assert not fused[0]._pending  # nothing downstream to bypass


def test_fused_single_step_spikingjelly():
    """step_mode 's': one [N, C, H, W] step per call, the membrane carried by the neuron module."""
    xs = [spikes(N, C, H, W) for _ in range(4)]
    dense = sj_layer("lif-hard", step_mode="s")
    calibrate_bn(dense[1], dense[0](xs[0]).detach())
    fused = fuse(dense, mode="sparse")
    for i, x in enumerate(xs):
        if i == 3:
            functional.reset_net(dense)
            functional.reset_net(fused)
        ref = dense(x)
        assert_same_spikes(fused(x), ref)
        torch.testing.assert_close(fused[2].v, dense[2].v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reset_mechanism", ["subtract", "zero"])
def test_fused_snntorch_leaky(reset_mechanism):
    xs = [spikes(N, C, H, W) for _ in range(4)]
    dense = nn.Sequential(nn.Conv2d(C, CO, 3, padding=1, bias=False), nn.BatchNorm2d(CO),
                          snntorch.Leaky(beta=0.8, init_hidden=True, reset_mechanism=reset_mechanism)).eval()
    with torch.no_grad():
        calibrate_bn(dense[1], dense[0](xs[0]))
    fused = fuse(dense, mode="sparse")
    assert fused[0].kind() == "conv+bn+neuron"
    rates = []
    with torch.no_grad():
        for i, x in enumerate(xs):
            if i == 3:
                dense[2].reset_mem()
                fused[2].reset_mem()
            ref = dense(x)
            assert_same_spikes(fused(x), ref)
            torch.testing.assert_close(fused[2].mem, dense[2].mem, rtol=1e-5, atol=1e-5)
            rates.append(float(ref.detach().mean()))
    assert 0.02 < sum(rates) / len(rates) < 0.9


def test_state_dict_unchanged_and_isinstance():
    x = spikes(T, N, C, H, W)
    dense = sj_layer("plif", x=x)
    fused = fuse(dense)
    assert isinstance(fused[0], nn.Conv2d)
    sd_d, sd_f = dense.state_dict(), fused.state_dict()
    assert list(sd_d) == list(sd_f)
    for k in sd_d:
        assert torch.equal(sd_d[k], sd_f[k]), k
    assert [n for n, _ in dense.named_parameters()] == [n for n, _ in fused.named_parameters()]
    assert [n for n, _ in dense.named_modules()] == [n for n, _ in fused.named_modules()]


@pytest.mark.autograd
def test_training_mode_falls_back_with_autograd():
    x = spikes(T, N, C, H, W)
    dense = sj_layer("lif-hard", x=x)
    fused = fuse(dense, mode="sparse")
    dense.train()
    fused.train()
    g = torch.randn(T, N, CO, H, W)
    ref = dense(x)
    y = fused(x)
    assert fused[0].last_path == "torch"
    assert_same_spikes(y, ref)
    (ref * g).sum().backward()
    (y * g).sum().backward()
    for (name, p_d), (_, p_f) in zip(dense.named_parameters(), fused.named_parameters()):
        assert p_f.grad is not None, name
        assert p_d.grad.abs().sum() > 0, name
        torch.testing.assert_close(p_f.grad, p_d.grad, rtol=1e-5, atol=1e-6)
    # BatchNorm running statistics were updated the same way
    torch.testing.assert_close(fused[1].running_mean, dense[1].running_mean)
    # back in eval mode the kernels run again (inference: no autograd to record)
    dense.eval()
    fused.eval()
    functional.reset_net(dense)
    functional.reset_net(fused)
    with torch.no_grad():
        assert_same_spikes(fused(x), dense(x))
    assert fused[0].last_path == "fused_sparse"


def test_to_dense_nn_conv2d():
    x = spikes(N, C, H, W)
    dense = nn.Sequential(nn.Conv2d(C, CO, 3, padding=1), nn.BatchNorm2d(CO)).eval()
    calibrate_bn(dense[1], dense[0](x).detach())
    fused = fuse(dense, mode="sparse")
    back = fused[0].to_dense()
    assert type(back) is nn.Conv2d
    assert back.weight is fused[0].weight and back.bias is fused[0].bias
    assert not is_bypassed(fused[1])
    fused[0] = back
    torch.testing.assert_close(fused(x), dense(x))
    assert fused.state_dict().keys() == dense.state_dict().keys()


BUG_TO_DENSE_SJ = (
    "Regression (fixed): SparseConv2d.to_dense() of a SpikingJelly layer.Conv2d gives a module without _step_mode "
    "(from_dense copies step_mode as a plain attribute): AttributeError on forward"
)


def test_to_dense_spikingjelly_conv():
    x = spikes(T, N, C, H, W)
    dense = sj_layer("lif-hard", x=x)
    fused = fuse(dense, mode="sparse")
    fused(x)
    functional.reset_net(fused)
    back = fused[0].to_dense()
    assert type(back) is layer.Conv2d
    assert not is_bypassed(fused[1]) and not is_bypassed(fused[2])
    fused[0] = back
    functional.reset_net(dense)
    assert back.step_mode == "m"
    assert_same_spikes(fused(x), dense(x))


@pytest.mark.parametrize("what", ["conv-weight", "bn-stats", "plif-w"])
def test_new_weights_are_picked_up(what):
    x = spikes(T, N, C, H, W)
    dense = sj_layer("plif", x=x)
    fused = fuse(dense, mode="sparse")
    before = fused(x).clone()
    functional.reset_net(fused)
    new_sd = {k: v.clone() for k, v in dense.state_dict().items()}
    if what == "conv-weight":
        new_sd["0.weight"] = torch.randn_like(new_sd["0.weight"]) * new_sd["0.weight"].std() * 1.5
    elif what == "bn-stats":
        new_sd["1.running_mean"] -= 0.3 * new_sd["1.running_var"].sqrt()
        new_sd["1.bias"] += 0.2
    else:
        new_sd["2.w"] = torch.tensor(-1.5)
    dense.load_state_dict(new_sd)
    fused.load_state_dict(new_sd)
    ref = dense(x)
    y = fused(x)
    assert_same_spikes(y, ref)
    assert not torch.equal(y, before), "the new parameters changed nothing: the test is not meaningful"
    torch.testing.assert_close(fused[2].v, dense[2].v, rtol=1e-5, atol=1e-5)


def test_in_place_weight_update_is_picked_up():
    conv = nn.Conv2d(C, CO, 3, padding=1).eval()
    sc = SparseConv2d.from_dense(copy.deepcopy(conv), mode="sparse")
    x = spikes(N, C, H, W)
    torch.testing.assert_close(sc(x), conv(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        conv.weight.mul_(-2)
        sc.weight.mul_(-2)
    torch.testing.assert_close(sc(x), conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_and_pickle_round_trip(how):
    xs = [spikes(T, N, C, H, W) for _ in range(3)]
    dense = sj_layer("lif-soft", x=xs[0])
    fused = fuse(dense, mode="sparse")
    fused(xs[0])  # some state and caches before copying
    dense(xs[0])
    if how == "deepcopy":
        clone = copy.deepcopy(fused)
    else:
        buf = io.BytesIO()
        torch.save(fused, buf)
        buf.seek(0)
        clone = torch.load(buf, weights_only=False)
    assert isinstance(clone[0], SparseConv2d)
    assert clone[0].folded_bn is clone[1] and clone[0].fused_neuron is clone[2]
    assert is_bypassed(clone[1]) and is_bypassed(clone[2])
    torch.testing.assert_close(clone[2].v, fused[2].v)
    ref = dense(xs[1])
    y_clone = clone(xs[1])
    assert_same_spikes(y_clone, ref)
    assert clone[0].last_path == "fused_sparse"
    # the clone is independent: the original continues from its own state
    assert_same_spikes(fused(xs[1]), ref)
    functional.reset_net(clone)
    functional.reset_net(dense)
    assert_same_spikes(clone(xs[2]), dense(xs[2]))


# ------------------------------------------------------------------------------------------ errors


def test_from_dense_errors():
    with pytest.raises(TypeError):
        SparseConv2d.from_dense(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="padding_mode"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="groups"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="padding"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 3, padding="same"))
    with pytest.raises(ValueError, match="mode"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 3), mode="fast")
    with pytest.raises(ValueError, match="features"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(5))
    with pytest.raises(ValueError, match="running"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="dilation"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 3, dilation=2), None, neuron.LIFNode())
    with pytest.raises(ValueError, match="store_v_seq"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 3), None, neuron.LIFNode(store_v_seq=True))
    with pytest.raises(ValueError, match="cannot be fused"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 3), None, nn.ReLU())


def test_forward_errors():
    sc = SparseConv2d.from_dense(nn.Conv2d(4, 4, 3).eval())
    with pytest.raises(ValueError, match="expects"):
        sc(torch.zeros(4, 5, 5))
    with pytest.raises(ValueError, match="residual"):
        sc(torch.zeros(1, 4, 5, 5), residual=torch.zeros(1, 4, 3, 3))


# --------------------------------------------------------------------------------- accelerate_neuron


def neuron_inputs(multistep: bool, steps: int):
    """Real-valued currents: [T, N, C, H, W] per call in multi-step mode, [N, C, H, W] otherwise."""
    shape = (T, N, 6, 5, 4) if multistep else (N, 6, 5, 4)
    return [torch.randn(shape) * 0.9 + 0.6 for _ in range(steps)]


@pytest.mark.parametrize("step_mode", ["m", "s"])
@pytest.mark.parametrize("neuron_kind", list(NEURON_FACTORIES))
def test_accelerate_spikingjelly_neuron(neuron_kind, step_mode):
    orig = NEURON_FACTORIES[neuron_kind](step_mode).eval()
    acc = accelerate_neuron(copy.deepcopy(orig))
    assert is_accelerated(acc) and type(acc) is type(orig)
    xs = neuron_inputs(step_mode == "m", 5)
    outs = []
    for i, x in enumerate(xs):
        if i == 3:  # reset in the middle
            functional.reset_net(orig)
            functional.reset_net(acc)
        ref = orig(x)
        y = acc(x)
        assert_same_spikes(y, ref)
        torch.testing.assert_close(acc.v, orig.v, rtol=1e-5, atol=1e-5)
        outs.append(float(ref.detach().mean()))
    assert 0.02 < sum(outs) / len(outs) < 0.9
    assert acc.state_dict().keys() == orig.state_dict().keys()
    restore_neuron(acc)
    assert not is_accelerated(acc)


@pytest.mark.parametrize("reset_mechanism", ["subtract", "zero"])
def test_accelerate_snntorch_leaky(reset_mechanism):
    orig = snntorch.Leaky(beta=0.85, threshold=0.9, init_hidden=True, reset_mechanism=reset_mechanism).eval()
    acc = accelerate_neuron(copy.deepcopy(orig))
    xs = neuron_inputs(False, 6)
    rates = []
    with torch.no_grad():
        for i, x in enumerate(xs):
            if i == 4:
                orig.reset_mem()
                acc.reset_mem()
            ref = orig(x)
            assert_same_spikes(acc(x), ref)
            torch.testing.assert_close(acc.mem, orig.mem, rtol=1e-5, atol=1e-5)
            rates.append(float(ref.detach().mean()))
    assert 0.02 < sum(rates) / len(rates) < 0.9


@pytest.mark.autograd
def test_accelerated_neuron_training_mode_uses_own_forward():
    orig = neuron.LIFNode(tau=2.0, step_mode="m")
    acc = accelerate_neuron(copy.deepcopy(orig))
    x = (torch.randn(T, N, 6, 5, 4) + 0.6).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y_ref, y = orig(x), acc(x2)
    assert_same_spikes(y, y_ref)
    y_ref.sum().backward()
    y.sum().backward()
    assert x2.grad is not None and x2.grad.abs().sum() > 0
    torch.testing.assert_close(x2.grad, x.grad)


def test_neuron_support_reasons():
    assert neuron_support(neuron.LIFNode())[0] is not None
    assert neuron_support(snntorch.Leaky(beta=0.5, init_hidden=True))[0] is not None
    cases = [
        (neuron.LIFNode(store_v_seq=True), "store_v_seq", False),
        (snntorch.Leaky(beta=0.5), "init_hidden", True),
        (snntorch.Leaky(beta=0.5, init_hidden=True, reset_mechanism="none"), "none", True),
        (snntorch.Leaky(beta=torch.rand(4), init_hidden=True), "per-neuron", True),
        (nn.ReLU(), "no kernel", False),
    ]
    for m, why, standalone in cases:
        adapter, reason = neuron_support(m)  # (fused into the convolution before it)
        assert adapter is None and why in reason, (m, reason)
        if standalone:  # snnTorch's step kernel runs it as a module of its own
            assert is_accelerated(accelerate_neuron(m))
        else:
            with pytest.raises(ValueError, match=why):
                accelerate_neuron(m)


# ------------------------------------------------------------------------ occupancy hand-off, [T*N] input


def _count_prescans(monkeypatch):
    from sparseflow_kernels import sparse_conv as ksc
    from sparseflow_kernels import spiking as kspk

    calls = []

    def counting(fn):
        def wrapper(*a, **k):
            calls.append(tuple(a[0].shape))
            return fn(*a, **k)

        return wrapper

    monkeypatch.setattr(ksc, "prescan", counting(ksc.prescan))
    monkeypatch.setattr(kspk, "prescan", counting(kspk.prescan))
    return calls


def test_occupancy_handoff_and_in_place_invalidation(monkeypatch):
    """A fused producer with write_occupancy hands its spikes' occupancy to the next sparse conv (no
    prescan there); once the spikes are modified in place, the consumer prescans again."""
    x = spikes(T, N, C, H, W)
    producer = sj_layer("if", x=x)
    fused = fuse(producer, mode="sparse")
    fused[0].write_occupancy = True
    consumer_dense = layer.Conv2d(CO, 8, 3, padding=1, step_mode="m").eval()
    consumer = SparseConv2d.from_dense(copy.deepcopy(consumer_dense), mode="sparse").eval()
    calls = _count_prescans(monkeypatch)
    s = fused(x)
    assert_same_spikes(s, producer(x))
    assert 0.02 < float(s.mean()) < 0.9
    n_before = len(calls)
    y = consumer(s)
    assert len(calls) == n_before, "the consumer ran a prescan although the producer wrote the occupancy"
    torch.testing.assert_close(y, consumer_dense(s), rtol=1e-5, atol=1e-5)
    # in-place write into the spikes: the attached occupancy is stale and must not be used
    s[:, :, :, :4, :4] = 1.0
    y2 = consumer(s)
    assert len(calls) == n_before + 1
    torch.testing.assert_close(y2, consumer_dense(s), rtol=1e-5, atol=1e-5)


def test_multistep_neuron_fed_flattened_batch():
    """conv on [T*N, C, H, W] (e.g. inside a SeqToANNContainer) feeding a multi-step neuron: with
    time_steps the fused layer views the batch as [T, N] and returns [T*N, ...] spikes."""
    x = spikes(T, N, C, H, W)
    dense = sj_layer("lif-hard", x=x)
    conv, bn, lif = copy.deepcopy(dense[0]), copy.deepcopy(dense[1]), copy.deepcopy(dense[2])
    sc = SparseConv2d.from_dense(conv, bn, lif, mode="sparse", time_steps=T).eval()
    y = sc(x.flatten(0, 1))
    assert y.shape == (T * N, CO, H, W)
    assert_same_spikes(y, dense(x).flatten(0, 1))
    torch.testing.assert_close(lif.v, dense[2].v, rtol=1e-5, atol=1e-5)
    bad = SparseConv2d.from_dense(copy.deepcopy(conv), copy.deepcopy(bn), copy.deepcopy(lif),
                                  mode="sparse").eval()
    with pytest.raises(ValueError, match=r"expected x with shape \[T, N, C, H, W\]"):  # as the dense layer says
        bad(x.flatten(0, 1))
    bad.step_mode = "s"  # a single-step conv without time_steps cannot tell T from N
    with pytest.raises(ValueError, match=r"expected x with shape \[T, N, C, H, W\]"):
        bad(x.flatten(0, 1))


BUG_1D_STEPS = (
    "Regression (fixed): multistep_neuron rejects the [N] membrane it returned for a [T, N] input, so an accelerated "
    "neuron fed 1-D [N] steps (or [T, N] sequences) fails on its 2nd call"
)


def test_accelerated_neuron_one_dimensional_steps():
    orig = neuron.LIFNode(tau=2.0, step_mode="s").eval()
    acc = accelerate_neuron(copy.deepcopy(orig))
    for _ in range(3):
        x = torch.randn(32) + 0.6
        assert_same_spikes(acc(x), orig(x))
        torch.testing.assert_close(acc.v, orig.v, rtol=1e-5, atol=1e-5)


# regression (fixed): the PLIF adapter cached its NeuronSpec under (w._version, w.data_ptr()) only, so a
# changed v_threshold (or v_reset / decay_input) was never re-read
ATTR_CASES = [
    pytest.param("lif-hard", "accelerate", id="lif-accelerate"),
    pytest.param("if", "accelerate", id="if-accelerate"),
    pytest.param("lif-hard", "fused", id="lif-fused"),
    pytest.param("plif", "accelerate", id="plif-accelerate"),
    pytest.param("plif", "fused", id="plif-fused"),
]


@pytest.mark.parametrize("neuron_kind,where", ATTR_CASES)
def test_changed_threshold_is_picked_up(neuron_kind, where):
    """Setting a neuron's v_threshold between calls changes what the kernels compute, as in the module."""
    if where == "accelerate":
        orig = NEURON_FACTORIES[neuron_kind]("m").eval()
        acc = accelerate_neuron(copy.deepcopy(orig))
        xs = neuron_inputs(True, 2)
        mods = (orig, acc)
    else:
        xs = [spikes(T, N, C, H, W) for _ in range(2)]
        orig = sj_layer(neuron_kind, x=xs[0])
        acc = fuse(orig, mode="sparse")
        mods = (orig[2], acc[2])
    with torch.no_grad():
        assert_same_spikes(acc(xs[0]), orig(xs[0]))
        for m in mods:
            m.v_threshold = 0.45
        functional.reset_net(orig)
        functional.reset_net(acc)
        ref = orig(xs[1])
        assert_same_spikes(acc(xs[1]), ref)


BUG_NONSPIKING_SURROGATE = (
    "Regression (fixed): neuron_support accepts a SpikingJelly neuron whose surrogate has spiking=False (its forward "
    "outputs sigmoid(alpha*(h - v_th)), not 0/1 spikes); the kernels then return binary spikes instead of "
    "the module's analog outputs"
)


@pytest.mark.parametrize("where", ["accelerate", "fused"])
def test_non_spiking_surrogate_rejected_or_exact(where):
    """A neuron is either refused with a reason, or runs with exactly its own outputs."""
    def make(sm):
        return neuron.LIFNode(tau=2.0, surrogate_function=surrogate.Sigmoid(spiking=False), step_mode=sm)

    adapter, why = neuron_support(make("m"))
    if adapter is None:
        assert "surrogate" in why or "spiking" in why, why
        return
    if where == "accelerate":
        orig = make("m").eval()
        acc = accelerate_neuron(copy.deepcopy(orig))
        x = neuron_inputs(True, 1)[0]
    else:
        x = spikes(T, N, C, H, W)
        orig = nn.Sequential(layer.Conv2d(C, CO, 3, padding=1, step_mode="m"), make("m")).eval()
        acc = fuse(orig, mode="sparse")
    with torch.no_grad():
        torch.testing.assert_close(acc(x), orig(x))


@pytest.mark.parametrize("path", ["torch", "torch_pad8"])
@pytest.mark.parametrize("defer", [False, True], ids=["bias-in-conv", "bias-after-pool"])
def test_conv_bn_pool_stem_cudnn_paths(path, defer, monkeypatch):
    """Spikformer's patch stem, conv -> BN -> max pool on a 3-channel image: the cuDNN candidates (channels_last,
    and the image zero-padded to 8 channels), the folded bias added by the conv or, deferred, by the max pool
    after the max; all give the dense modules' result."""
    import sparseflow_ops.conv as conv_mod
    from sparseflow_ops._common import take_shift
    from sparseflow_ops.pool import TritonMaxPool2d

    monkeypatch.setattr(conv_mod.kdispatch, "choose", lambda key, cands, fallback, device=None: path)
    torch.manual_seed(0)
    conv, bn, pool = nn.Conv2d(3, 16, 3, padding=1, bias=False).eval(), nn.BatchNorm2d(16).eval(), nn.MaxPool2d(3, 2, 1)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-2, 2)
    seq = nn.Sequential(conv, bn, pool)
    x = torch.rand(2, 3, 13, 11)
    with torch.no_grad():
        ref = seq.double()(x.double())
        seq.float()
        seq[0] = SparseConv2d.from_dense(conv, bn)
        seq[0].defer_shift = defer
        seq[2] = TritonMaxPool2d.from_dense(pool)
        y = seq(x)
        assert seq[0].last_path == path
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
        z = seq[0](x)
        owed = take_shift(z)  # the conv's own output still owes the bias when deferred; the pool adds it
        assert (owed is not None) == defer
        if defer:
            torch.testing.assert_close(seq[2](z).double(), ref, rtol=1e-5, atol=1e-5)
            z.add_(1.0)  # modified in place: the record no longer applies
            assert take_shift(z) is None


@pytest.mark.parametrize("defer", [False, True], ids=["bias-in-conv", "bias-after-pool"])
@pytest.mark.parametrize("geom", [(3, 1, 1), (7, 2, 3)], ids=["3x3", "7x7-s2"])
def test_conv_bn_stem_im2col_path(geom, defer, monkeypatch):
    """An image stem's conv -> BN (3 channels) on the im2col kernel (the reduction over (tap, channel) pairs): the
    dense modules' result, the bias added in the kernel whether or not a max pool would take it (nothing owed), on
    [N, C, H, W] and multi-step inputs, and the path recorded for the compiled forward."""
    import sparseflow_ops.conv as conv_mod
    from sparseflow_ops._common import take_shift

    monkeypatch.setattr(conv_mod.kdispatch, "choose", lambda key, cands, fallback, device=None: "im2col")
    k, st, pad = geom
    torch.manual_seed(1)
    conv, bn = nn.Conv2d(3, 80, k, st, pad).eval(), nn.BatchNorm2d(80).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.bias.uniform_(-2, 2)
    seq = nn.Sequential(conv, bn)
    x = torch.randn(2, 2, 3, 13, 11)
    with torch.no_grad():
        ref = seq.double()(x.double().flatten(0, 1))
        seq.float()
        seq[0] = SparseConv2d.from_dense(conv, bn)
        seq[0].defer_shift = defer
        for xi, want in ((x.flatten(0, 1), ref), (x, ref.view(2, 2, *ref.shape[1:]))):
            y = seq(xi)
            assert seq[0].last_path == "im2col" and take_shift(y) is None
            torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ a biased convolution
@pytest.mark.parametrize("neuron_kind", [None, "lif-hard"], ids=["conv+bn", "conv+bn+lif"])
@pytest.mark.parametrize("mode", ["dense", "torch"])
def test_conv_bias_folded_once_not_per_call(neuron_kind, mode, monkeypatch):
    """A convolution with a bias, a BatchNorm and a neuron: the kernels get the bias folded into the BatchNorm's
    shift, computed once and kept while the parameters are unchanged (no small folding kernels per call), the
    dense modules' outputs over calls, and a new bias is taken."""
    import sparseflow_kernels.sparse_conv as ksc
    import sparseflow_kernels.spiking as kspk
    import sparseflow_ops.base as ops_base
    import sparseflow_ops.conv as ops_conv

    torch.manual_seed(4)
    x = [spikes(T, N, C, H, W) for _ in range(2)]
    seq = sj_layer(neuron_kind, x=x[0])
    seq[0].bias = nn.Parameter(torch.randn(CO) * 0.3)
    with torch.no_grad():
        calibrate_bn(seq[1], seq[0](x[0]))
    new = fuse(seq, mode=mode)
    folds, biases = [], []
    fold = ksc.fold_affine

    def counted_fold(bias, scale, shift):
        folds.append(bias is not None)
        return fold(bias, scale, shift)

    for mod in (ksc, kspk, ops_base):
        monkeypatch.setattr(mod, "fold_affine", counted_fold)
    for name in ("sparse_conv2d", "spiking_conv2d"):
        real = getattr(ops_conv, name)
        monkeypatch.setattr(ops_conv, name, lambda *a, real=real, **k: (biases.append(a[2]), real(*a, **k))[1])
    with torch.no_grad():
        for i, xi in enumerate([*x, x[0]]):
            if neuron_kind is not None and i == 2:
                functional.reset_net(seq)
                functional.reset_net(new)
            ref, got = seq(xi), new(xi)
            assert (got - ref).abs().max().item() < 1e-4, i
        # a plain convolution on cuDNN takes the BatchNorm folded into its weights and bias (cached, no kernel of
        # SparseFlow's); the other paths call the kernels, which never see the bias on its own
        kernels = not (mode == "torch" and neuron_kind is None)
        assert bool(biases) == kernels and all(b is None for b in biases)
        assert folds.count(True) == int(kernels)  # folded once, at the first call
        seq[0].bias.add_(0.5)  # new parameters (in both models: ``fuse`` made a copy): folded again
        new[0].bias.add_(0.5)
        functional.reset_net(seq)
        functional.reset_net(new)
        assert (new(x[1]) - seq(x[1])).abs().max().item() < 1e-4
        assert folds.count(True) == 2 * int(kernels)
