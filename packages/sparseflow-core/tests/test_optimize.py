"""sparseflow_core.optimize on small SpikingJelly / snnTorch nets and on spiking_resnet18 / sew_resnet18:
same outputs and neuron state as the dense model over calls and resets, the report, residual fusion,
bypassed modules really skipped, idempotence, restore, lazy mode, filters and what is left alone."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import snntorch
import torch
from sf_core_nets import (
    ResidualBlock,
    build_resnet,
    build_small_sj,
    calibrate_bns,
    compare_calls,
    reset,
    run_steps,
    small_nn_net,
    small_sj_net,
    snntorch_net,
    spiking_modules,
)
from spikingjelly.activation_based import functional, layer, neuron
from torch import fx, nn

from sparseflow_core import CudaGraphModel, get_report, is_optimized, optimize, restore
from sparseflow_core.arguments import CastInputs
from sparseflow_core.fx_fusion import fused_forward
from sparseflow_core.hooks import module_hooks
from sparseflow_ops import SparseConv2d, has_hooks, is_accelerated, is_bypassed

SJ_NEURON_CLASSES = (neuron.LIFNode, neuron.IFNode, neuron.ParametricLIFNode)


@pytest.fixture(scope="module")
def small_sj():
    return build_small_sj()


@pytest.fixture
def sj_twins(small_sj):
    """(model to optimize, its dense twin, inputs): fresh deep copies for every test."""
    net, xs = small_sj
    return copy.deepcopy(net), copy.deepcopy(net), xs


def conv_names(net):
    return [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]


def entries(rep):
    return {e.name: e for e in rep.layers}


def spy_forward(monkeypatch, classes):
    """Record every module whose *class* forward runs (what a bypassed/accelerated module must not do)."""
    ran = []
    for cls in classes:
        orig = cls.forward

        def spy(self, *args, __orig=orig, **kwargs):
            ran.append(self)
            return __orig(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", spy)
    return ran


def assert_report_covers(rep, dense):
    """Every Conv2d of the dense model has exactly one entry; every spiking module is either an entry of
    its own or named in the entry of the convolution it was fused into."""
    convs = [e.name for e in rep.layers if e.type == "Conv2d"]
    assert sorted(convs) == sorted(conv_names(dense))
    assert len(convs) == len(set(convs))
    table = rep.table()
    fused_details = " ".join(e.detail for e in rep.layers if e.action == "fused")
    own = {e.name for e in rep.layers}
    for name in spiking_modules(dense):
        assert name in own or f"{name})" in fused_details or f"{name}," in fused_details, name
        assert name in table
    for e in rep.layers:
        assert e.action in ("fused", "sparse", "kernel", "neuron-kernel", "left")
        if e.action == "left":
            assert e.reason, f"{e.name} left without a reason"


# ------------------------------------------------------------------------------ small SpikingJelly net


@pytest.mark.parametrize("mode", ["auto", "sparse", "torch"])
def test_small_net_outputs_match(sj_twins, mode):
    net, dense, xs = sj_twins
    opt = optimize(net, xs[0], mode=mode)
    assert opt is net
    compare_calls(opt, dense, xs)


def test_small_net_report(sj_twins):
    net, dense, xs = sj_twins
    opt, rep = optimize(net, xs[0], return_report=True)
    assert get_report(opt) is rep
    e = entries(rep)
    # the stem sees the image, not spikes: fused (conv + BN + neuron in one kernel) but nothing skipped
    assert e["0"].action == "fused" and "image" in e["0"].reason and e["0"].detail.endswith("dense input")
    assert e["3"].action == "fused" and e["3"].detail.startswith("conv+bn+neuron")
    assert e["6"].action == "sparse" and e["6"].detail == "conv+bn (7); bias added after the max pool 8"
    assert e["10"].action == "fused" and e["13"].action == "fused"
    assert "2" not in e and e["9"].action == "neuron-kernel"
    assert sorted(rep.folded) == sorted([("1", "0"), ("4", "3"), ("7", "6"), ("11", "10"), ("14", "13")])
    assert e["3"].block_size == 8 and e["10"].block_size == "dense"
    assert 0 < e["3"].elem_density < 1
    assert_report_covers(rep, dense)
    assert isinstance(opt[3], SparseConv2d) and isinstance(opt[0], SparseConv2d) and opt[0].block_size == "dense"
    assert is_bypassed(opt[4]) and is_bypassed(opt[5]) and is_bypassed(opt[1]) and is_bypassed(opt[2])
    with torch.no_grad():
        opt(xs[0])
    paths = {x.name: x.path for x in get_report(opt).layers}
    assert paths["3"] in ("fused_dense", "fused_sparse") and paths["6"] in ("sparse", "dense")


def test_bypassed_modules_do_not_run(sj_twins, monkeypatch):
    net, dense, xs = sj_twins
    opt, rep = optimize(net, xs[0], return_report=True)
    with torch.no_grad():
        ref = dense(xs[0])
    ran = spy_forward(monkeypatch, (layer.BatchNorm2d, *SJ_NEURON_CLASSES))
    with torch.no_grad():
        torch.testing.assert_close(opt(xs[0]), ref, rtol=1e-4, atol=1e-4)
    ran_names = {n for n, m in opt.named_modules() if any(m is r for r in ran)}
    folded = {bn for bn, _ in rep.folded}
    assert folded and not (folded & ran_names), f"folded BatchNorms ran: {folded & ran_names}"
    with torch.no_grad():
        dense(xs[0])
    assert any(m is dense[1] for m in ran)  # the spy sees BatchNorms that do run (the dense twin's)
    neurons = set(spiking_modules(opt))
    assert not (neurons & ran_names), f"neurons ran their own forward: {neurons & ran_names}"


def test_idempotent(sj_twins):
    net, dense, xs = sj_twins
    optimize(net, xs[0])
    before = [(n, type(m), id(m)) for n, m in net.named_modules()]
    out, rep = optimize(net, xs[0], return_report=True)
    assert out is net
    assert [(n, type(m), id(m)) for n, m in net.named_modules()] == before
    assert "already optimized: left unchanged" in rep.notes
    compare_calls(net, dense, xs)


def test_inplace_false_leaves_original(sj_twins):
    net, dense, xs = sj_twins
    before = [(n, type(m)) for n, m in net.named_modules()]
    opt = optimize(net, xs[0], inplace=False)
    assert opt is not net and is_optimized(opt) and not is_optimized(net)
    assert [(n, type(m)) for n, m in net.named_modules()] == before
    compare_calls(opt, dense, xs[:2])


def test_lazy_mode_optimizes_on_first_call(sj_twins):
    net, dense, xs = sj_twins
    opt, rep = optimize(net, return_report=True)
    assert opt is net
    assert any("pending" in n for n in rep.notes)
    assert not any(isinstance(m, SparseConv2d) for m in net.modules())
    compare_calls(net, dense, xs)
    assert any(isinstance(m, SparseConv2d) for m in net.modules())
    rep2 = get_report(net)
    assert rep2 is not None and not any("pending" in n for n in rep2.notes)
    assert_report_covers(rep2, dense)
    assert len(net._forward_pre_hooks) == 0


def test_filter_fn_respected(sj_twins):
    net, dense, xs = sj_twins
    seen = []

    def keep(m, name):
        seen.append(name)
        return name not in ("10", "9")

    opt, rep = optimize(net, xs[0], filter_fn=keep, return_report=True)
    e = entries(rep)
    for name in ("10", "9"):
        assert e[name].action == "left" and e[name].reason == "excluded by filter_fn"
    assert not isinstance(opt[10], SparseConv2d) and not is_accelerated(opt[9])
    assert e["3"].action == "fused" and e["13"].action == "fused"
    assert {"0", "3", "6", "10", "13", "9"} <= set(seen)
    compare_calls(opt, dense, xs)


@pytest.mark.parametrize("option", ["fuse=False", "neurons=False", "block_size=16", "block_size=dense",
                                    "block_size=dict", "write_occupancy=True"])
def test_options(sj_twins, option):
    net, dense, xs = sj_twins
    kw = {"fuse=False": dict(fuse=False), "neurons=False": dict(neurons=False),
          "block_size=16": dict(block_size=16), "block_size=dense": dict(block_size="dense"),
          "block_size=dict": dict(block_size={"3": 16}),
          "write_occupancy=True": dict(write_occupancy=True)}[option]
    opt, rep = optimize(net, xs[0], return_report=True, **kw)
    e = entries(rep)
    if option == "fuse=False":
        assert not rep.folded and all(x.action != "fused" for x in rep.layers)
        assert e["3"].action == "sparse" and e["3"].detail == "conv"
        assert e["5"].action == "neuron-kernel"
    elif option == "neurons=False":
        assert e["9"].action == "left" and e["9"].reason == "neurons=False" and not is_accelerated(opt[9])
        assert e["3"].action == "fused"
    elif option == "block_size=16":
        assert e["3"].block_size == 16 and opt[3].block_size == 16
    elif option == "block_size=dense":
        assert e["6"].action == "left" and "dense op" in e["6"].reason  # conv+bn without neuron: left
        assert e["3"].action == "fused" and opt[3].block_size == "dense"
    elif option == "block_size=dict":
        assert e["3"].block_size == 16 and e["6"].block_size == 8
    else:
        assert opt[3].write_occupancy  # its spikes feed the sparse conv 6
        assert not opt[10].write_occupancy
    compare_calls(opt, dense, xs)


def test_write_occupancy_hands_over_without_prescan(sj_twins, monkeypatch):
    from sparseflow_kernels import sparse_conv as ksc

    net, dense, xs = sj_twins
    opt = optimize(net, xs[0], write_occupancy=True, mode="sparse")
    shapes = []
    orig = ksc.prescan

    def counting(x, *a, **k):
        shapes.append(tuple(x.shape))
        return orig(x, *a, **k)

    monkeypatch.setattr(ksc, "prescan", counting)
    compare_calls(opt, dense, xs)
    assert (4, 20, 16, 16) not in shapes, "conv 6 prescanned spikes whose occupancy conv 3 wrote"


@pytest.mark.autograd
def test_training_mode_after_optimize(sj_twins):
    """In training mode the optimized model runs the original modules: same outputs and gradients."""
    net, dense, xs = sj_twins
    opt = optimize(net, xs[0])
    opt.train()
    dense.train()
    y, ref = opt(xs[0]), dense(xs[0])
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    ref.sum().backward()
    for (n, p), (_, q) in zip(opt.named_parameters(), dense.named_parameters()):
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_state_dict_unchanged(sj_twins):
    net, dense, xs = sj_twins
    opt = optimize(net, xs[0])
    a, b = opt.state_dict(), dense.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_seq_to_ann_container_flattened_time():
    """conv/bn inside SeqToANNContainer see [T*N, ...]; the multi-step neuron after the container sees
    [T, N, ...]: fused with the T of the example input; other batch sizes work, a T*N not divisible by T
    raises the documented error."""
    torch.manual_seed(0)
    net = nn.Sequential(
        layer.SeqToANNContainer(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)),
        neuron.LIFNode(step_mode="m"),
        layer.SeqToANNContainer(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)),
        neuron.LIFNode(step_mode="m"),
        layer.SeqToANNContainer(nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8)),
        neuron.IFNode(step_mode="m"),
    ).eval()
    xs = [torch.randn(2, 2, 3, 14, 14) for _ in range(3)]
    calibrate_bns(net, xs[0])
    dense = copy.deepcopy(net)
    opt, rep = optimize(net, xs[0], return_report=True)
    e = entries(rep)
    assert e["2.0"].action == "fused" and e["4.0"].action == "fused"
    assert e["0.0"].action == "fused" and "no skipping" in e["0.0"].reason  # image input: fused, dense
    assert opt[2][0].time_steps == 2
    compare_calls(opt, dense, xs)
    compare_calls(opt, dense, [x[:, :1] for x in xs])  # N = 1
    with pytest.raises(RuntimeError, match="T=2"), torch.no_grad():
        opt(torch.randn(3, 1, 3, 14, 14))


def test_cuda_graph_wrapper_on_cpu(sj_twins):
    """cuda_graph=True on the CPU: the wrapper runs eagerly, every call starting from reset neuron state."""
    net, dense, xs = sj_twins
    wrapped, rep = optimize(net, xs[0], mode="torch", cuda_graph=True, return_report=True)
    assert isinstance(wrapped, CudaGraphModel) and wrapped.model is net
    assert get_report(wrapped) is rep and rep.by_action("fused")
    with torch.no_grad():
        a = wrapped(xs[0])
        b = wrapped(xs[0])
        reset(dense)
        ref = dense(xs[0])
    torch.testing.assert_close(a, ref)
    torch.testing.assert_close(b, ref)
    assert wrapped.calls == {"replays": 0, "captures": 0, "warmup": 0, "cpu": 2, "training": 0, "hooks": 0}
    wrapped.train()
    with torch.no_grad():
        wrapped(xs[0])
    assert wrapped.calls["cpu"] == 3  # the first reason that applies is counted
    assert pickle.loads(pickle.dumps(wrapped)).calls["cpu"] == 0


@pytest.mark.parametrize("how", ["dtype", "lazy"])
def test_cuda_graph_wrapper_does_not_take_sparseflow_hooks_for_user_hooks(sj_twins, how):
    """The input cast of ``dtype=`` and the lazy optimization are pre-hooks on the model: they must not keep the
    graph wrapper from replaying (it replays only while no module has a user's hook); a user's hook does."""
    net, _, xs = sj_twins
    if how == "dtype":
        wrapped = optimize(net, xs[0], mode="torch", dtype=torch.float32, cuda_graph=True)
        model = wrapped.model
        assert any(isinstance(h, CastInputs) for h in model._forward_pre_hooks.values())
    else:
        wrapped = optimize(net, mode="torch", cuda_graph=True)
        model = wrapped.model
        assert model._forward_pre_hooks
    assert not wrapped._hooked()
    assert not module_hooks(model) and not has_hooks(*model.modules())
    handle = model.register_forward_hook(lambda m, a, y: None)
    wrapped.reset_graphs()
    assert wrapped._hooked() and has_hooks(model)
    handle.remove()


def test_not_optimized_model_has_no_report():
    net = small_sj_net()
    assert get_report(net) is None and not is_optimized(net)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_optimized_resnet_copies(resnet, how):
    """An optimized spiking ResNet (fx-rewritten blocks, bypassed modules) survives deepcopy and pickling."""
    _, base, xs = resnet
    net, dense = copy.deepcopy(base), copy.deepcopy(base)
    opt = optimize(net, xs[0], mode="torch")
    if how == "deepcopy":
        clone = copy.deepcopy(opt)
    else:
        buf = io.BytesIO()
        torch.save(opt, buf)
        buf.seek(0)
        clone = torch.load(buf, weights_only=False)
    assert list(clone.state_dict()) == list(dense.state_dict())
    assert sum(isinstance(m, SparseConv2d) for m in clone.modules()) == sum(
        isinstance(m, SparseConv2d) for m in opt.modules())
    for m in clone.modules():
        if isinstance(m, SparseConv2d):
            assert m.fused_neuron is None or any(m.fused_neuron is x for x in clone.modules())
    compare_calls(clone, dense, xs)


# --------------------------------------------------------------------------------------- restore


def test_restore_nn_modules():
    """restore(): plain modules again (no SparseConv2d, no bypass, no accelerated neuron), same outputs."""
    torch.manual_seed(0)
    net = small_nn_net(residual=False)
    steps = [torch.randn(2, 3, 14, 14) for _ in range(2)]
    calibrate_bns(net, steps, forward=lambda s: run_steps(net, s))
    dense = copy.deepcopy(net)
    optimize(net, steps[0])
    assert any(isinstance(m, SparseConv2d) for m in net.modules())
    out = restore(net)
    assert out is net and not is_optimized(net)
    for m in net.modules():
        assert not isinstance(m, (SparseConv2d, fx.GraphModule)) and fused_forward(m) is None
        assert not is_bypassed(m) and not is_accelerated(m)
    assert [type(m) for m in net.modules()] == [type(m) for m in dense.modules()]
    compare_calls(net, dense, [steps, steps[::-1], steps], forward=run_steps)


BUG_RESTORE_FX = (
    "Regression (fixed): restore() of a model whose residual block was rewritten with torch.fx puts a plain "
    "Conv2d back into the GraphModule, whose code still calls conv(x, residual=...) (TypeError); the original block "
    "class is not restored either"
)
BUG_RESTORE_SJ = (
    "Regression (fixed): restore() of a SpikingJelly model: SparseConv2d.to_dense() rebuilds layer.Conv2d without its "
    "_step_mode, so the restored model raises AttributeError"
)


def test_restore_residual_block():
    torch.manual_seed(0)
    net = small_nn_net(residual=True)
    steps = [torch.randn(2, 3, 14, 14) for _ in range(2)]
    calibrate_bns(net, steps, forward=lambda s: run_steps(net, s))
    dense = copy.deepcopy(net)
    optimize(net, steps[0])
    block = net[3]
    assert type(block) is ResidualBlock and fused_forward(block) is not None
    restore(net)
    assert net[3] is block and fused_forward(block) is None and type(block.conv2) is nn.Conv2d
    compare_calls(net, dense, [steps, steps[::-1], steps], forward=run_steps)


def test_restore_spikingjelly_net(sj_twins):
    net, dense, xs = sj_twins
    optimize(net, xs[0])
    restore(net)
    assert not any(isinstance(m, SparseConv2d) for m in net.modules())
    compare_calls(net, dense, xs)


def test_residual_block_fused_single_step():
    """neuron(bn(conv(x)) + x) in a block of plain torch layers with single-step neurons: fused through fx."""
    torch.manual_seed(0)
    net = small_nn_net(residual=True)
    steps = [torch.randn(2, 3, 14, 14) for _ in range(3)]
    calibrate_bns(net, steps, forward=lambda s: run_steps(net, s))
    dense = copy.deepcopy(net)
    opt, rep = optimize(net, steps[0], return_report=True)
    e = entries(rep)
    assert e["3.conv2"].action == "fused" and "+residual" in e["3.conv2"].detail
    assert e["3.conv1"].action == "fused"
    assert type(opt[3]) is ResidualBlock and fused_forward(opt[3]) is not None
    assert list(opt.state_dict()) == list(dense.state_dict())
    assert_report_covers(rep, dense)
    compare_calls(opt, dense, [steps, steps[::-1], steps], forward=run_steps)


# ------------------------------------------------------------------------------- what is left alone


def test_model_without_spiking_modules_unchanged():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    x = torch.randn(2, 3, 16, 16)
    ref = net(x)
    before = [(n, type(m), id(m)) for n, m in net.named_modules()]
    opt, rep = optimize(net, x, return_report=True)
    assert [(n, type(m), id(m)) for n, m in opt.named_modules()] == before
    assert any("no spiking modules" in n for n in rep.notes)
    assert all(e.action == "left" for e in rep.layers)
    torch.testing.assert_close(opt(x), ref)


def test_reflect_padding_conv_left_with_reason():
    torch.manual_seed(0)
    net = nn.Sequential(
        layer.Conv2d(3, 8, 3, padding=1), layer.BatchNorm2d(8), neuron.LIFNode(),
        layer.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), layer.BatchNorm2d(8), neuron.LIFNode(),
        layer.Conv2d(8, 8, 3, padding=1), layer.BatchNorm2d(8), neuron.IFNode(),
    )
    functional.set_step_mode(net, "m")
    net.eval()
    x = torch.randn(2, 1, 3, 14, 14)
    calibrate_bns(net, x)
    dense = copy.deepcopy(net)
    opt, rep = optimize(net, x, return_report=True)
    e = entries(rep)
    assert e["3"].action == "left" and "padding_mode" in e["3"].reason
    assert not isinstance(opt[3], SparseConv2d)
    assert e["6"].action == "fused"
    compare_calls(opt, dense, [x, torch.randn_like(x), x])


def test_non_integer_spike_path_left():
    """A conv fed by spikes scaled by 0.5 (not spikes any more) is left with the reason."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv0 = layer.Conv2d(3, 8, 3, padding=1, step_mode="m")
            self.sn0 = neuron.LIFNode(step_mode="m")
            self.conv1 = layer.Conv2d(8, 8, 3, padding=1, step_mode="m")
            self.sn1 = neuron.LIFNode(step_mode="m")

        def forward(self, x):
            return self.sn1(self.conv1(self.sn0(self.conv0(x)) * 0.5))

    net = Net().eval()
    with torch.no_grad():
        net.conv1.weight.mul_(6)
    x = torch.randn(2, 1, 3, 14, 14) * 3
    dense = copy.deepcopy(net)
    opt, rep = optimize(net, x, return_report=True)
    e = entries(rep)
    # not spikes: no skipping, but conv -> neuron still runs as one fused (dense) layer
    assert e["conv1"].action == "fused" and "integer" in e["conv1"].reason and opt.conv1.block_size == "dense"
    compare_calls(opt, dense, [x, x, x])


# ------------------------------------------------------------------------------------------ snnTorch


def test_snntorch_sequential():
    torch.manual_seed(0)
    net = snntorch_net()
    steps = [torch.randn(2, 3, 14, 14) for _ in range(3)]
    calibrate_bns(net, steps, forward=lambda s: run_steps(net, s))
    dense = copy.deepcopy(net)
    opt, rep = optimize(net, steps[0], return_report=True)
    e = entries(rep)
    assert e["0"].action == "fused" and e["0"].detail.endswith("dense input")  # image stem: fused, no skipping
    assert e["3"].action == "fused" and e["6"].action == "fused"
    assert "2" not in e
    assert all(is_bypassed(opt[i]) for i in (4, 5, 7, 8))
    assert_report_covers(rep, dense)
    compare_calls(opt, dense, [steps, steps[::-1], steps], forward=run_steps)
    assert isinstance(opt[5], snntorch.Leaky) and opt[5].mem.shape == (2, 16, 14, 14)


# --------------------------------------------------------------------------------- ResNets (32x32)

RESNETS = ["spiking_resnet18", "sew_resnet18"]


@pytest.fixture(scope="module", params=RESNETS)
def resnet(request):
    return request.param, *build_resnet(request.param)


def test_resnet_full_model_torch_mode(resnet, monkeypatch):
    """Whole model optimized (cuDNN conv + fused BatchNorm/neuron kernel path, fast under the interpreter)."""
    kind, base, xs = resnet
    net, dense = copy.deepcopy(base), copy.deepcopy(base)
    opt, rep = optimize(net, xs[0], mode="torch", return_report=True)
    e = entries(rep)
    assert_report_covers(rep, dense)
    assert e["conv1"].action == "left" and "image" in e["conv1"].reason
    fused = rep.by_action("fused")
    if kind == "spiking_resnet18":
        residual = [x for x in fused if "+residual" in x.detail]
        assert len(residual) == 8 and all(x.name.endswith("conv2") for x in residual)
        for lname in ("layer1", "layer2", "layer3", "layer4"):
            for block in getattr(opt, lname):
                assert type(block).__name__ == "BasicBlock" and fused_forward(block) is not None
        assert len(fused) == 16
    else:
        assert len(fused) == 19 and not any("+residual" in x.detail for x in fused)
        # SEW's ADD connection (identity + sn2(bn2(conv2(x)))) goes into conv2's epilogue, once per block
        skip = [x for x in fused if "skip connection's add" in x.detail]
        assert len(skip) == 8 and all(x.name.endswith("conv2") for x in skip), [x.name for x in skip]
        for lname in ("layer1", "layer2", "layer3", "layer4"):
            for block in getattr(opt, lname):
                assert type(block).__name__ == "BasicBlock"
                assert any(n.kwargs.get("residual_after") for n in fused_forward(block).gm.graph.nodes)
    a, b = opt.state_dict(), dense.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    compare_calls(opt, dense, xs)
    # the folded BatchNorms and the neurons do not run their own forward any more
    ran = spy_forward(monkeypatch, (layer.BatchNorm2d, neuron.LIFNode))
    reset(opt)
    with torch.no_grad():
        opt(xs[0])
    ran_names = {n for n, m in opt.named_modules() if any(m is r for r in ran)}
    folded = {bn for bn, _ in rep.folded}
    assert not (folded & ran_names)
    assert not (set(spiking_modules(opt)) & ran_names)
    assert "bn1" in ran_names
    restore(opt)  # the rewritten blocks and every drop-in give their original modules back
    assert [type(m) for m in opt.modules()] == [type(m) for m in dense.modules()]
    reset(opt)
    reset(dense)
    compare_calls(opt, dense, xs[:1])


def test_resnet_kernels_front_layers(resnet):
    """The Triton kernels (default mode) on layer1-2; layer3-4 excluded to keep the interpreter fast."""
    _, base, xs = resnet
    net, dense = copy.deepcopy(base), copy.deepcopy(base)
    opt, rep = optimize(net, xs[0], return_report=True,
                        filter_fn=lambda m, n: not n.startswith(("layer3", "layer4")))
    e = entries(rep)
    assert_report_covers(rep, dense)
    assert e["layer1.0.conv1"].action == "fused" and e["layer2.0.conv1"].action == "fused"
    assert e["layer4.1.conv2"].reason == "excluded by filter_fn"
    compare_calls(opt, dense, xs)
    paths = {x.name: x.path for x in get_report(opt).layers if x.action == "fused"}
    assert paths and all(p in ("fused_dense", "fused_sparse") for p in paths.values()), paths


def test_plain_cnn_with_pool_is_left_unchanged():
    """No spiking neuron anywhere: not even the handlers that need no spikes (max pools) touch the model."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(8 * 4 * 4, 3)).eval()
    before = [(n, type(m)) for n, m in net.named_modules()]
    opt, rep = optimize(net, torch.randn(2, 3, 8, 8), return_report=True)
    assert [(n, type(m)) for n, m in opt.named_modules()] == before
    assert "no spiking modules found: model unchanged" in rep.notes
    assert not rep.replaced and {e.name: e.action for e in rep.layers} == {"0": "left", "4": "left"}


def test_max_pool_after_neurons_is_reported_as_kernel(sj_twins):
    net, dense, xs = sj_twins
    net = nn.Sequential(net, nn.MaxPool2d(2))  # pools the spikes of the net's last neuron
    dense = nn.Sequential(dense, nn.MaxPool2d(2))
    opt, rep = optimize(net, xs[0], return_report=True)
    e = {x.name: x for x in rep.layers}["1"]
    assert e.action == "kernel" and e.block_size is None and "max pool" in e.detail
    compare_calls(opt, dense, xs)
