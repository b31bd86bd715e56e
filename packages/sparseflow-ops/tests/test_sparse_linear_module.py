"""SparseLinear and SparseConv1d against the dense modules they replace: any leading shape, SpikingJelly
multi-step layers, the folded BatchNorm1d (bypassed, same state_dict), modes, training and CPU fallbacks,
new weights, to_dense, deepcopy and pickling."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from spikingjelly.activation_based import layer
from torch import nn

from sparseflow_kernels.dispatch import force_path
from sparseflow_ops import SparseConv1d, SparseLinear, is_bypassed


def spikes(*shape, density=0.3):
    return (torch.rand(*shape) < density).float()


@torch.no_grad()
def random_bn(bn):
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.uniform_(0.5, 1.5)
    bn.bias.uniform_(-0.5, 0.5)
    return bn.eval()


def assert_close(y, ref, tol=1e-5):
    assert y.shape == ref.shape
    err = (y.double() - ref.double()).abs().max().item() / max(ref.abs().max().item(), 1.0)
    assert err <= tol, err


@pytest.mark.parametrize("shape", [(1, 37), (2, 3, 37), (2, 3, 5, 37)], ids=["M1", "3d", "4d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_sparse_linear_matches(shape, bias):
    lin = nn.Linear(37, 19, bias=bias).eval()
    ref = copy.deepcopy(lin)
    m = SparseLinear.from_dense(lin)
    x = spikes(*shape) * torch.randint(1, 3, shape)  # counts 0/1/2
    with torch.no_grad():
        assert_close(m(x), ref(x))
    assert m.last_path == "sparse"
    assert isinstance(m, nn.Linear) and m.weight is lin.weight
    assert list(m.state_dict()) == list(ref.state_dict())


def test_spikingjelly_multistep_linear_and_to_dense():
    lin = layer.Linear(24, 10, step_mode="m").eval()
    ref = copy.deepcopy(lin)
    m = SparseLinear.from_dense(lin)
    x = spikes(3, 2, 24)
    with torch.no_grad():
        assert_close(m(x), ref(x))
    assert m.step_mode == "m"
    back = m.to_dense()
    assert type(back) is layer.Linear and back.step_mode == "m" and back.weight is lin.weight
    assert not hasattr(back, "_wcache") and "block_size" not in back.__dict__
    with torch.no_grad():
        assert_close(back(x), ref(x), 0)


@pytest.mark.parametrize("mode", ["sparse", "dense", "torch"])
def test_modes(mode):
    lin = nn.Linear(40, 20).eval()
    m = SparseLinear.from_dense(copy.deepcopy(lin), mode=mode)
    x = spikes(7, 40)
    with torch.no_grad():
        assert_close(m(x), lin(x))
    assert m.last_path == mode


@pytest.mark.autograd
def test_training_runs_torch_with_autograd_and_new_weights_are_used():
    lin = nn.Linear(16, 8)
    m = SparseLinear.from_dense(lin)
    x = spikes(5, 16)
    y = m(x)
    assert m.last_path == "torch" and y.requires_grad
    y.sum().backward()
    assert lin.weight.grad is not None
    m.eval()
    with torch.no_grad():
        m(x)
        m.weight.mul_(2.0)  # in place: the packed weight cache must notice
        assert_close(m(x), nn.functional.linear(x, m.weight, m.bias))
        m.load_state_dict({"weight": torch.randn(8, 16), "bias": torch.randn(8)})
        assert_close(m(x), nn.functional.linear(x, m.weight, m.bias))


def test_deepcopy_and_pickle():
    m = SparseLinear.from_dense(nn.Linear(16, 8).eval())
    x = spikes(3, 16)
    with torch.no_grad():
        y = m(x)
        for other in (copy.deepcopy(m), torch.load(_pickled(m), weights_only=False)):
            assert_close(other(x), y, 0)


def _pickled(m):
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("with_bn", [True, False], ids=["bn", "nobn"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_conv1d_seq_to_ann_with_folded_bn(with_bn, bias):
    """Spikformer's SeqToANNContainer(Conv1d(k=1), BatchNorm1d) over [T, N, C, L] (integer counts)."""
    conv = nn.Conv1d(40, 24, 1, bias=bias).eval()
    bn = random_bn(nn.BatchNorm1d(24))
    block = layer.SeqToANNContainer(conv, bn) if with_bn else layer.SeqToANNContainer(conv)
    ref = copy.deepcopy(block)
    keys = list(block.state_dict())
    block[0] = SparseConv1d.from_dense(conv, bn if with_bn else None)
    assert is_bypassed(bn) == with_bn
    assert list(block.state_dict()) == keys
    x = spikes(2, 3, 40, 29) * 2
    with torch.no_grad():
        for _ in range(2):  # the bypass handshake resets after each call
            assert_close(block(x), ref(x))
    assert block[0].kind() == ("conv1x1+bn" if with_bn else "conv1x1")
    block[0] = block[0].to_dense()
    assert type(block[0]) is nn.Conv1d and not is_bypassed(bn)
    with torch.no_grad():
        assert_close(block(x), ref(x))


def test_conv1d_multistep_layer_and_training_bn():
    conv = layer.Conv1d(12, 6, 1, step_mode="m").eval()
    ref = copy.deepcopy(conv)
    m = SparseConv1d.from_dense(conv)
    x = spikes(3, 2, 12, 11)
    with torch.no_grad():
        assert_close(m(x), ref(x))
    for net in (ref, m):  # a [N, C, L] input to a multi-step layer: the dense layer and the drop-in refuse it alike
        with pytest.raises(ValueError, match=r"expected x with shape \[T, N, C, L\]"):
            net(x[0])
    # a BatchNorm in training mode runs itself (no fold)
    conv2, bn = nn.Conv1d(12, 6, 1).eval(), random_bn(nn.BatchNorm1d(6))
    seq = nn.Sequential(SparseConv1d.from_dense(conv2, bn), bn)
    bn.train()
    y = seq(x[0])
    assert seq[0].last_path == "torch"
    assert_close(y, nn.functional.batch_norm(conv2(x[0]), None, None, bn.weight, bn.bias, training=True), 1e-4)


def test_conv1d_rejects_what_it_cannot_run():
    for conv, msg in ((nn.Conv1d(4, 4, 3), "kernel_size=3"), (nn.Conv1d(4, 4, 1, stride=2), "stride=2"),
                      (nn.Conv1d(4, 4, 1, groups=2), "groups=2"), (nn.Conv1d(4, 4, 1, padding=1), "padding=1")):
        assert msg in SparseConv1d.problem(conv)
        with pytest.raises(ValueError, match=msg):
            SparseConv1d.from_dense(conv)
    with pytest.raises(ValueError, match="features"):
        SparseConv1d.from_dense(nn.Conv1d(4, 4, 1), nn.BatchNorm1d(5))
    with pytest.raises(TypeError, match="BatchNorm1d"):
        SparseLinear.from_dense(nn.Linear(4, 4), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="mode"):
        SparseLinear.from_dense(nn.Linear(4, 4), mode="fast")
    with pytest.raises(ValueError, match="SparseConv1d expects"):
        SparseConv1d.from_dense(nn.Conv1d(4, 4, 1).eval())(torch.ones(4))


def test_fp16_module():
    lin = nn.Linear(48, 30).half().eval()
    m = SparseLinear.from_dense(copy.deepcopy(lin))
    x = spikes(2, 9, 48).half()
    with torch.no_grad():
        y = m(x)
        ref = nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
    assert y.dtype == torch.float16 and m.last_path == "sparse"
    assert_close(y, ref, 2e-3)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", [(2, 3, 20, 7), (3, 20, 7), (20, 7)], ids=["TNCL", "NCL", "CL"])
def test_conv1d_torch_path_folds_bn(shape, bias):
    """The dispatch's "torch" candidate: one batched matmul with the BatchNorm folded into the weights."""
    torch.manual_seed(0)
    conv, bn = nn.Conv1d(20, 9, 1, bias=bias).eval(), nn.BatchNorm1d(9).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    x = (torch.rand(shape) < 0.3).float() * 2.0
    flat = x.flatten(0, 1) if x.dim() == 4 else x
    with torch.no_grad():
        ref = bn(conv(flat)) if flat.dim() == 3 else bn(conv(flat[None]))[0]
    m = SparseConv1d.from_dense(conv, bn)
    with torch.no_grad(), force_path("torch"):
        y = m(x)
        bn(y)  # bypassed: hands y through
    y = y.flatten(0, 1) if x.dim() == 4 else y
    assert m.last_path == "torch"
    torch.testing.assert_close(y.double(), ref.double(), rtol=1e-5, atol=1e-5)


def test_linear_torch_path_folds_bn():
    torch.manual_seed(1)
    lin, bn = nn.Linear(12, 5).eval(), nn.BatchNorm1d(5).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = (torch.rand(7, 12) < 0.4).float()
    with torch.no_grad():
        ref = bn(lin(x))
        m = SparseLinear.from_dense(lin, bn)
        with force_path({"linear": "torch"}):
            y = m(x)
            bn(y)  # bypassed
    assert m.last_path == "torch"
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


class _SpikingProjection(nn.Module):
    """Spikformer's MLP layer: SeqToANNContainer(Conv1d(k=1), BatchNorm1d) -> multi-step neuron, with the
    block's skip connection ``x + layer(x)`` when ``skip``."""

    def __init__(self, C, CO, neuron_kind="lif", bias=False):
        super().__init__()
        from spikingjelly.activation_based import neuron as sjn
        self.fc = layer.SeqToANNContainer(nn.Conv1d(C, CO, 1, bias=bias), random_bn(nn.BatchNorm1d(CO)))
        if neuron_kind == "lif":
            self.lif = sjn.LIFNode(tau=2.0, step_mode="m", detach_reset=True)
        elif neuron_kind == "lif-soft":
            self.lif = sjn.LIFNode(tau=1.5, v_reset=None, decay_input=False, step_mode="m")
        else:
            self.lif = sjn.IFNode(step_mode="m", v_threshold=0.8)

    def forward(self, x):
        return self.lif(self.fc(x))


def _fuse_projection(net, mode="auto", T=3):
    conv = net.fc[0]
    net.fc[0] = SparseConv1d.from_dense(conv, net.fc[1], net.lif, mode=mode, time_steps=T)
    return net.fc[0]


@pytest.mark.parametrize("layout", ["contiguous", "channels-innermost"])
@pytest.mark.parametrize("neuron_kind", ["lif", "lif-soft", "if"])
@pytest.mark.parametrize("mode", ["auto", "dense", "sparse"])
def test_conv1d_fused_neuron_matches_spikingjelly(neuron_kind, mode, layout):
    """The fused spiking projection gives the SpikingJelly modules' spikes (float64 reference) on a first call,
    on a second call without reset (membrane carried) and after reset_net; the BN and neuron are bypassed.
    Channels-innermost tokens (as the kernels write spikes) run with all samples' tokens merged into one map."""
    from spikingjelly.activation_based import functional
    torch.manual_seed(3)
    net = _SpikingProjection(20, 24, neuron_kind, bias=neuron_kind == "if").eval()
    ref = copy.deepcopy(net).double()
    keys = list(net.state_dict())
    m = _fuse_projection(net, mode)
    assert m.kind() == "conv1x1+bn+neuron" and is_bypassed(net.lif) and is_bypassed(net.fc[1])
    assert list(net.state_dict()) == keys
    fired = 0
    with torch.no_grad():
        for step in range(3):
            if step == 2:
                functional.reset_net(net)
                functional.reset_net(ref)
            x = spikes(3, 2, 20, 13) * torch.randint(1, 3, (3, 2, 20, 13))  # counts 0/1/2
            if layout == "channels-innermost":
                x = x.transpose(2, 3).contiguous().transpose(2, 3)
            y = net(x)
            r = ref(x.double())
            assert y.dtype == torch.float32 and y.shape == r.shape
            assert torch.equal(y.double(), r), (y.double() - r).abs().sum()
            torch.testing.assert_close(net.lif.v.double(), ref.lif.v, rtol=1e-4, atol=1e-5)
            fired += int(y.sum())
    assert fired > 0
    assert m.last_path != "torch"
    # the final membrane is kept channels innermost, as the kernels write spikes: a [N*L, CO] buffer whose (sample,
    # token) dims merge, whatever the input's layout
    assert m._tokens_merge(net.lif.v) and net.lif.v.stride(-2) == 1


def test_conv1d_fused_bias_folded_once(monkeypatch):
    """A fused projection with a bias (Spikformer's and QKFormer's MLPs) hands the kernels its bias folded into the
    BatchNorm's shift, computed once and kept while the parameters are unchanged (no small folding kernels per
    call, in every CUDA-graph replay); the SpikingJelly modules' spikes over calls, and a new bias is taken."""
    from spikingjelly.activation_based import functional

    import sparseflow_kernels.spiking as kspk
    import sparseflow_ops.base as ops_base
    import sparseflow_ops.linear as ops_linear

    torch.manual_seed(5)
    net = _SpikingProjection(20, 24, "lif", bias=True).eval()
    ref = copy.deepcopy(net).double()
    m = _fuse_projection(net)
    folds, biases = [], []
    fold = ops_base.fold_affine
    monkeypatch.setattr(ops_base, "fold_affine", lambda b, sc, sh: (folds.append(b is not None), fold(b, sc, sh))[1])
    real = kspk.spiking_conv2d
    monkeypatch.setattr(ops_linear, "spiking_conv2d", lambda *a, **k: (biases.append(a[2]), real(*a, **k))[1])
    x = spikes(3, 2, 20, 13)
    with torch.no_grad():
        for step in range(3):
            if step == 2:
                functional.reset_net(net)
                functional.reset_net(ref)
            assert torch.equal(net(x).double(), ref(x.double()))
        assert folds == [True] and biases and all(b is None for b in biases)
        for model in (net, ref):
            model.fc[0].bias.add_(0.5)
        functional.reset_net(net)
        functional.reset_net(ref)
        y = net(x)
        assert torch.equal(y.double(), ref(x.double())) and folds == [True, True] and 0 < y.mean() < 1
    assert m.last_path not in ("torch", None)


def test_conv1d_fused_neuron_residual_after():
    """forward(x, residual=r) returns r + spikes (the skip connection in the kernel's epilogue); on the torch
    path (training) the same through the original modules."""
    torch.manual_seed(4)
    net = _SpikingProjection(24, 24).eval()
    ref = copy.deepcopy(net).double()
    m = _fuse_projection(net)
    x = spikes(3, 2, 24, 11) * 2
    with torch.no_grad():
        y = m(x.flatten(0, 1), residual=x.flatten(0, 1))
        r = x.double() + ref(x.double())
        assert torch.equal(y.view(r.shape).double(), r)
        assert not m._pending  # nothing downstream to bypass
        net.train()
        ref.train()
        y = m(x.flatten(0, 1), residual=x.flatten(0, 1))
        assert m.last_path == "torch"
        r = x.double() + ref(x.double())
        torch.testing.assert_close(y.view(r.shape).double(), r)
    with pytest.raises(ValueError, match="only accepted by a fused"):
        SparseConv1d.from_dense(nn.Conv1d(4, 4, 1))(torch.ones(2, 4, 3), residual=torch.ones(2, 4, 3))


def test_conv1d_fused_neuron_to_dense_and_wrong_T():
    net = _SpikingProjection(8, 8).eval()
    m = _fuse_projection(net, T=3)
    with pytest.raises(RuntimeError, match="T=3"), torch.no_grad():
        net.fc[0](spikes(4, 8, 5))
    net.fc[0] = m.to_dense()
    assert type(net.fc[0]) is nn.Conv1d and not is_bypassed(net.lif) and not is_bypassed(net.fc[1])


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual_after"])
def test_conv1d_fused_compiled_path_uses_registered_op(monkeypatch, residual):
    """The forward torch.compile traces for a fused spiking projection: torch.ops.sparseflow.spiking_conv2d with the
    eager dispatch's path (run eagerly here with compiling() forced true), the residual added after the neuron;
    same spikes, same membrane hand-over as the eager kernels."""
    import sparseflow_ops.linear as lin_mod

    torch.manual_seed(5)
    net = _SpikingProjection(16, 16).eval()
    ref = copy.deepcopy(net).double()
    m = _fuse_projection(net)
    x = spikes(3, 2, 16, 9) * 2
    flat = x.flatten(0, 1)
    with torch.no_grad():
        m(flat, residual=flat) if residual else net(x)  # eager: the dispatch picks a path
        from spikingjelly.activation_based import functional
        functional.reset_net(net)
        monkeypatch.setattr(lin_mod, "compiling", lambda: True)
        monkeypatch.setattr(lin_mod, "spiking_conv2d", lambda *a, **k: pytest.fail("eager launcher under compile"))
        for _ in range(2):  # the membrane carries over as in the eager path
            y = m(flat, residual=flat).view(x.shape) if residual else net(x)
            r = ref(x.double()) + (x.double() if residual else 0)
            assert torch.equal(y.double(), r)


def test_conv1d_fused_single_step_neuron():
    """A single-step neuron (step_mode 's') after the projection: one [N, C, L] step per call, the membrane
    carried by the neuron module across calls, as SpikingJelly's own."""
    from spikingjelly.activation_based import functional
    from spikingjelly.activation_based import neuron as sjn

    torch.manual_seed(6)
    conv, bn = nn.Conv1d(12, 10, 1, bias=False).eval(), random_bn(nn.BatchNorm1d(10))
    lif = sjn.LIFNode(tau=2.0, step_mode="s")
    net = nn.Sequential(conv, bn, lif).eval()
    ref = copy.deepcopy(net).double()
    net[0] = SparseConv1d.from_dense(conv, bn, lif)
    fired = 0
    with torch.no_grad():
        for step in range(4):
            if step == 3:
                functional.reset_net(net)
                functional.reset_net(ref)
            x = spikes(2, 12, 7) * 2
            y, r = net(x), ref(x.double())
            assert torch.equal(y.double(), r)
            fired += int(y.sum())
    assert fired > 0 and net[0].last_path != "torch"


def test_spikformer_block_with_a_hooked_mlp_keeps_its_add():
    """A forward hook on the MLP: SparseSpikformerBlock calls the MLP as a module (the hook runs) and adds the skip
    connection itself; the attention branch still adds it in its fused projection. Same output as the dense block."""
    from spikingjelly.activation_based import functional
    from spikingjelly.activation_based.model.spikformer import SpikformerBlock

    from sparseflow_ops import SparseSpikformerBlock

    torch.manual_seed(7)
    block = SpikformerBlock(16, 2, mlp_ratio=2.0, tau=2.0, detach_reset=True).eval()
    for m in block.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            random_bn(m)
    functional.set_step_mode(block, "m")
    ref = copy.deepcopy(block)
    calls = []
    block.mlp.register_forward_hook(lambda m, i, o: calls.append(1))
    new = SparseSpikformerBlock.from_dense(block)
    for cont, lif in ((new.mlp.fc1, new.mlp.neuron1), (new.mlp.fc2, new.mlp.neuron2)):
        cont[0] = SparseConv1d.from_dense(cont[0], cont[1], lif, time_steps=2)
    x = spikes(2, 1, 16, 3, 3) * 2
    with torch.no_grad():
        y, r = new(x), ref(x)
    assert calls == [1] and new._mlp_fc2() is None
    assert torch.equal(y, r)


def test_force_path_picks_the_module_path_nests_and_restores():
    """``force_path`` makes an auto-mode module take the forced candidate (``last_path``), by name or by op kind;
    the innermost block wins, leaving a block (also by an exception) restores the outer rule, and outside every
    block the module's own choice (the CPU fallback, "sparse") comes back. Every path gives the dense result."""
    torch.manual_seed(3)
    lin = nn.Linear(24, 10).eval()
    m = SparseLinear.from_dense(lin)
    x = spikes(6, 24)
    with torch.no_grad():
        ref = lin(x)

        def run():
            y = m(x)
            assert_close(y, ref)
            return m.last_path

        assert run() == "sparse"
        with force_path("torch"):
            assert run() == "torch"
            with force_path({"linear": "dense"}):
                assert run() == "dense"
                with force_path({"conv1x1": "torch"}):  # another op kind: the linear rule still applies
                    assert run() == "dense"
            assert run() == "torch"
            with pytest.raises(RuntimeError, match="inside"), force_path("dense"):
                assert run() == "dense"
                raise RuntimeError("inside")
            assert run() == "torch"
            with force_path("no_such_path"):  # not a candidate: the usual choice
                assert run() == "torch"
        assert run() == "sparse"
