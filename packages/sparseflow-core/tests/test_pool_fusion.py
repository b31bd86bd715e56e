"""optimize() on conv -> BatchNorm -> neuron -> MaxPool2d chains (spiking VGGs, DVS networks, ResNet stems): the
spiking layer returns the pooled spikes on its kernel paths (the neuron and the pool in one pass after cuDNN's
convolution, or the fused kernel then the pool) and the pool module hands them through; everywhere else the pool
runs itself. Compared with the dense model (a deep copy, fresh random real inputs) over calls and a reset."""

from __future__ import annotations

import copy

import pytest
import torch
from sf_core_nets import calibrate_bns, compare_calls
from spikingjelly.activation_based import functional, layer, neuron
from torch import nn

from sparseflow_core import force_path, get_report, optimize, restore
from sparseflow_ops import SparseConv2d, is_bypassed

T, N = 3, 2


def pooled_net():
    """Event frames in; conv/BN/PLIF -> pool 2, conv/BN/LIF -> pool 3 stride 2 padding 1 (overlapping windows),
    conv/BN/IF -> pool 2 on a 3 x 3 map (its last row and column in no window: not fused), a spiking head."""
    net = nn.Sequential(
        layer.Conv2d(2, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8), neuron.ParametricLIFNode(init_tau=2.0),
        layer.MaxPool2d(2, 2),
        layer.Conv2d(8, 12, 3, padding=1), layer.BatchNorm2d(12), neuron.LIFNode(tau=2.0), layer.MaxPool2d(3, 2, 1),
        layer.Conv2d(12, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8), neuron.IFNode(), layer.MaxPool2d(2, 2),
        layer.Flatten(), layer.Linear(8, 5), neuron.LIFNode(tau=2.0),
    )
    functional.set_step_mode(net, "m")
    return net.eval()


def built(seed=0):
    torch.manual_seed(seed)
    net = pooled_net()
    xs = [torch.rand(T, N, 2, 12, 12) * 2 for _ in range(3)]
    calibrate_bns(net, xs[0])
    return net, copy.deepcopy(net), xs


@pytest.mark.parametrize("path", ["fused_dense", "cudnn", "cudnn_then_pool"])
def test_pool_after_the_neuron_runs_in_the_spiking_layer(path):
    net, dense, xs = built()
    keys = list(net.state_dict())
    net, rep = optimize(net, xs[0], return_report=True)
    entries = {e.name: e for e in rep.layers}
    for conv, pool in (("0", "3"), ("4", "7")):
        m = net.get_submodule(conv)
        assert isinstance(m, SparseConv2d) and m.kind() == "conv+bn+neuron+pool"
        assert m.fused_pool is net.get_submodule(pool) and is_bypassed(m.fused_pool)
        assert entries[conv].detail.startswith(f"conv+bn+neuron+pool ({int(conv) + 1}, {int(conv) + 2}, {pool})")
    assert net[8].kind() == "conv+bn+neuron" and not is_bypassed(net[11])
    assert "max pool 11 not fused: the last of the 3 rows is in no window (kernel 2, stride 2, padding 0)" in \
        entries["8"].reason
    assert list(net.state_dict()) == keys
    with torch.no_grad(), force_path({"spiking": path}):
        compare_calls(net, dense, xs)
        assert net[0].last_path == path and net[4].last_path == path
        assert not any(m._pool_pending for m in (net[0], net[4]))
        functional.reset_net(net)
        functional.reset_net(dense)
        y = net[3](net[2](net[1](net[0](xs[1]))))  # the chain called as the model calls it
        assert torch.equal(y, dense[3](dense[2](dense[1](dense[0](xs[1])))))
        assert y.shape == (T, N, 8, 6, 6)


def test_a_hook_on_the_pool_hands_the_chain_back_to_its_modules():
    net, dense, xs = built(1)
    optimize(net, xs[0])
    seen, want = [], []
    net[3].register_forward_hook(lambda m, i, o: seen.append((i[0].shape, o.clone())))
    dense[3].register_forward_hook(lambda m, i, o: want.append((i[0].shape, o.clone())))
    with torch.no_grad():
        compare_calls(net, dense, xs)
    assert net[0].last_path == "torch"  # (the chain runs through its modules; the pool sees the full map)
    assert len(seen) == len(want) == 3
    assert all(a[0] == b[0] == (T, N, 8, 12, 12) and torch.equal(a[1], b[1]) for a, b in zip(seen, want))


def test_restore_gives_the_pool_its_own_forward_back():
    net, dense, xs = built(2)
    optimize(net, xs[0])
    with torch.no_grad():
        net(xs[0])
    restore(net)
    assert type(net[0]) is layer.Conv2d and not any(is_bypassed(m) for m in net.modules())
    functional.reset_net(net)
    functional.reset_net(dense)
    with torch.no_grad():
        compare_calls(net, dense, xs)


@pytest.mark.parametrize("path", ["cudnn_static", "cudnn_static_then_pool", "im2col_pair_static",
                                  "fused_dense_static", "im2col_8x8_static"])
def test_static_image_stem_pooled_once_per_frame_convolution(path):
    """A ResNet-style stem (image conv -> BN -> LIF -> max pool 3 / 2 / 1) on a frame repeated by stride 0: the
    convolution runs once (cuDNN's or the im2col kernel's, then the neuron and the pool over T in one kernel, or the
    neuron's then the pool's; or the fused kernel's tiles, each convolving its frame once, then the pool)."""
    torch.manual_seed(3)
    net = nn.Sequential(layer.Conv2d(3, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8), neuron.LIFNode(),
                        layer.MaxPool2d(3, 2, 1), layer.Flatten(), layer.Linear(8 * 4 * 4, 4))
    functional.set_step_mode(net, "m")
    net.eval()
    frames = [torch.rand(N, 3, 8, 8) * 2 for _ in range(3)]
    xs = [f.unsqueeze(0).expand(T, *f.shape) for f in frames]
    calibrate_bns(net, xs[0].contiguous())
    dense = copy.deepcopy(net)
    optimize(net, xs[0])
    assert net[0].kind() == "conv+bn+neuron+pool"
    with torch.no_grad(), force_path({"spiking": path}):
        compare_calls(net, dense, xs)
    assert net[0].last_path == path and get_report(net) is not None


def test_profiler_times_the_dense_chain_with_its_pool():
    """The dense op the profiler times for a pooling layer is conv -> BN -> neuron -> pool (the pool only where the
    layer pooled in that call): the dense model's output, and the layer's own."""
    from sparseflow_core.profiler import dense_op

    net, dense, xs = built(4)
    optimize(net, xs[0])

    def chain(n):  # the first n modules of the dense model, from a reset state
        functional.reset_net(dense)
        y = xs[1]
        for m in dense[:n]:
            y = m(y)
        return y

    with torch.no_grad():
        want = chain(4)
        assert torch.equal(dense_op(net[0])(xs[1]), want)
        assert torch.equal(dense_op(net[0], True, False)(xs[1]), chain(3))
        assert torch.equal(dense_op(net[0], False)(xs[1]), chain(1))
        functional.reset_net(net)
        got = net[0](xs[1])
        assert net[0]._pool_pending and torch.equal(got, want)
        net[3](got)
        assert not net[0]._pool_pending


@pytest.mark.parametrize("path", ["fused_dense", "cudnn_then_pool"])
def test_compiled_branch_pools_with_the_pool_module(monkeypatch, path):
    """Under torch.compile a pooling layer runs its registered spiking operator on the path the eager dispatch chose
    (a pool after the neuron left to the pool module's own operator): the eager optimized model's outputs."""
    import sparseflow_ops.conv as oc
    import sparseflow_ops.pool as op

    net, _dense, xs = built(5)
    optimize(net, xs[0])
    with torch.no_grad(), force_path({"spiking": path}):
        functional.reset_net(net)
        ref = [net(x) for x in xs]
        assert net[0].last_path == path
    for mod in (oc, op):
        monkeypatch.setattr(mod, "compiling", lambda: True)
    with torch.no_grad():
        functional.reset_net(net)
        got = [net(x) for x in xs]
    assert not net[0]._pool_pending and all(torch.equal(a, b) for a, b in zip(got, ref))


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_saved_pooling_model_keeps_its_chain(how):
    import pickle

    net, dense, xs = built(6)
    optimize(net, xs[0])
    with torch.no_grad():
        net(xs[0])
    functional.reset_net(net)
    loaded = pickle.loads(pickle.dumps(net)) if how == "pickle" else copy.deepcopy(net)
    assert loaded[0].fused_pool is loaded[3] and is_bypassed(loaded[3]) and not loaded[0]._pool_pending
    with torch.no_grad():
        compare_calls(loaded, dense, xs)


def test_train_mode_after_pooling_calls_runs_the_dense_chain():
    """After kernel calls, train(): the chain runs through its modules (the pool too, on the full map), as the dense
    model in train mode, over calls and a reset."""
    net, dense, xs = built(7)
    optimize(net, xs[0])
    with torch.no_grad():
        compare_calls(net, dense, xs)
        net.train()
        dense.train()
        compare_calls(net, dense, xs)
    assert net[0].last_path == "torch" and not net[0]._pool_pending
