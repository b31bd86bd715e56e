"""conv -> BN -> neuron -> max pool (a spiking ResNet's stem): the spiking layer runs the pool with its neuron, the
pool passes the pooled output on; outputs and neuron state are the dense model's over calls, bit for bit the unfused
optimized model's, and a hook on the pool, or a second reader of the spikes, keeps them apart."""

from __future__ import annotations

import copy

import pytest
import torch
from sf_core_nets import calibrate_bns
from spikingjelly.activation_based import functional, layer, neuron
from torch import nn

from sparseflow_core import optimize
from sparseflow_kernels import force_path
from sparseflow_ops import SparseConv2d
from sparseflow_ops.pool import TritonMaxPool2d


def stem_net():
    net = nn.Sequential(
        layer.Conv2d(3, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8), neuron.LIFNode(tau=2.0),
        layer.MaxPool2d(3, 2, 1),
        layer.Conv2d(8, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8), neuron.IFNode(),
        layer.Flatten(), layer.Linear(8 * 5 * 5, 4),
    )
    functional.set_step_mode(net, "m")
    return net


class TwoReaders(nn.Module):
    """The stem's spikes go to the pool and to a second branch: the pool cannot take them over."""

    def __init__(self):
        super().__init__()
        self.stem = stem_net()

    def forward(self, x):
        s = self.stem[2](self.stem[1](self.stem[0](x)))
        return self.stem[8](self.stem[7](self.stem[6](self.stem[5](self.stem[4](self.stem[3](s)))))), s.mean()


def _input(T=3, N=2, static=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, N, 3, 9, 9, generator=g) * 1.5 + 0.4
    return x[:1].expand(x.shape) if static else x


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    m = stem_net()
    with torch.no_grad():
        calibrate_bns(m, _input())
    functional.reset_net(m)
    return m.eval()


def _calls(model, xs, path):
    outs = []
    with torch.no_grad(), force_path({"spiking": path}):
        functional.reset_net(model)
        for x in xs:  # two calls without a reset: the membrane carries over
            outs.append(model(x).clone())
        outs.append(model[2].v.clone())
    return outs


@pytest.mark.parametrize("path,static", [("cudnn", False), ("cudnn_static", True), ("fused_dense", False)])
def test_stem_pool_fused_matches_dense_and_unfused(net, path, static):
    xs = [_input(static=static, seed=s) for s in (1, 2)]
    opt, rep = optimize(copy.deepcopy(net), xs[0], return_report=True)
    conv, pool = opt[0], opt[3]
    assert isinstance(conv, SparseConv2d) and isinstance(pool, TritonMaxPool2d) and conv.fused_pool is pool
    entry = next(e for e in rep.layers if e.name == "0")
    assert "max pool 3 run with the neuron" in entry.detail
    got = _calls(opt, xs, path)
    assert conv.last_path == path
    ref = _calls(copy.deepcopy(net), [x.contiguous() for x in xs], path)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    conv.fuse_pool(None)  # the same optimized model, the pool apart: the same bits
    apart = _calls(opt, xs, path)
    for a, b in zip(got, apart):
        assert torch.equal(a, b)


def test_hook_on_the_pool_sees_the_dense_input(net):
    x = _input(seed=3)
    opt = optimize(copy.deepcopy(net), x)
    seen = []
    opt[3].register_forward_hook(lambda m, i, o: seen.append((tuple(i[0].shape), tuple(o.shape))))
    got = _calls(opt, [x], "cudnn")
    ref = _calls(copy.deepcopy(net), [x], "cudnn")
    assert seen == [((3, 2, 8, 9, 9), (3, 2, 8, 5, 5))]
    assert torch.allclose(got[0], ref[0], atol=1e-4, rtol=1e-4)


def test_second_reader_keeps_the_pool_apart():
    torch.manual_seed(1)
    m = TwoReaders()
    x = _input(seed=4)
    with torch.no_grad():
        calibrate_bns(m, x)
    functional.reset_net(m)
    m.eval()
    opt = optimize(copy.deepcopy(m), x)
    assert opt.stem[0].fused_pool is None
    with torch.no_grad(), force_path({"spiking": "cudnn"}):
        functional.reset_net(opt)
        got = opt(x)
        functional.reset_net(m)
        ref = m(x)
    assert torch.allclose(got[0], ref[0], atol=1e-4) and torch.allclose(got[1], ref[1], atol=1e-6)
