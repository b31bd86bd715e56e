"""SparseGroupedConv2d (depthwise / grouped nn.Conv2d drop-in) against the dense module it replaces: outputs on
[N, C, H, W] and multi-step [T, N, C, H, W] spikes for every path, BatchNorm folding (bypass and restore),
training fallback, to_dense, state_dict, new weights, deepcopy and pickling."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from spikingjelly.activation_based import layer
from torch import nn

from sparseflow_ops import is_bypassed
from sparseflow_ops.depthwise import SparseGroupedConv2d


def spikes(*shape, density=0.3):
    return (torch.rand(*shape) < density).float()


def rel(y, ref):
    return ((y.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


@torch.no_grad()
def random_bn(c):
    bn = nn.BatchNorm2d(c).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.uniform_(0.5, 1.5)
    bn.bias.normal_()
    return bn


# name -> (C, CO, k, stride, padding, groups)
CONVS = {
    "dw-k3-s1": (8, 8, 3, 1, 1, 8),
    "dw-m2-k3-s2": (6, 12, 3, 2, 1, 6),
    "dw-k5-s2": (5, 5, 5, 2, 2, 5),
    "grouped-direct-g2": (8, 6, 3, 1, 1, 2),
    "grouped-gemm-g2": (32, 16, 1, 1, 0, 2),
}


@pytest.mark.parametrize("mode", ["sparse", "dense", "torch", "auto"])
@pytest.mark.parametrize("name", list(CONVS), ids=list(CONVS))
def test_matches_dense_module(name, mode):
    C, CO, k, s, p, g = CONVS[name]
    conv = nn.Conv2d(C, CO, k, s, p, groups=g).eval()
    m = SparseGroupedConv2d.from_dense(conv, mode=mode)
    assert isinstance(m, nn.Conv2d) and m.weight is conv.weight
    x = spikes(2, 1, C, 8, 7)
    with torch.no_grad():
        y = m(x)
        ref = conv(x.flatten(0, 1)).view(2, 1, *conv(x[0]).shape[1:])
    assert y.shape == ref.shape
    assert rel(y, ref) < 1e-5
    assert m.last_path == ("sparse" if mode == "auto" else mode)  # auto on the CPU: the sparse kernel
    with torch.no_grad():
        assert rel(m(x[0]), conv(x[0])) < 1e-5


def test_folded_batchnorm_bypassed_and_restored():
    conv, bn = nn.Conv2d(6, 12, 3, 1, 1, groups=6, bias=False).eval(), random_bn(12)
    x = spikes(2, 6, 9, 9)
    with torch.no_grad():
        ref = bn(conv(x))
        m = SparseGroupedConv2d.from_dense(conv, bn, mode="sparse")
        assert is_bypassed(bn) and m.kind() == "depthwise+bn"
        y = bn(m(x))  # the model still calls the bypassed BatchNorm: it hands the folded result through
        assert rel(y, ref) < 1e-5
        # a BatchNorm call without the conv before it in this call runs the real BatchNorm
        z = torch.randn(2, 12, 9, 9)
        assert torch.allclose(bn(z), nn.functional.batch_norm(z, bn.running_mean, bn.running_var, bn.weight,
                                                              bn.bias, False, 0.0, bn.eps))
        d = m.to_dense()
    assert type(d) is nn.Conv2d and d.weight is conv.weight and not is_bypassed(bn)
    with torch.no_grad():
        assert rel(bn(d(x)), ref) == 0


@pytest.mark.autograd
def test_training_mode_runs_torch_with_autograd():
    conv = nn.Conv2d(4, 4, 3, 1, 1, groups=4)
    m = SparseGroupedConv2d.from_dense(conv).train()
    x = spikes(1, 4, 6, 6)
    y = m(x)
    assert m.last_path == "torch"
    y.sum().backward()
    assert conv.weight.grad is not None


def test_spikingjelly_layer_state_dict_and_copies():
    conv = layer.Conv2d(8, 16, 3, 2, 1, groups=8, step_mode="m").eval()
    m = SparseGroupedConv2d.from_dense(conv, mode="sparse")
    assert m.step_mode == "m"
    assert list(m.state_dict()) == list(conv.state_dict())
    x = spikes(2, 1, 8, 7, 7)
    with torch.no_grad():
        ref = conv(x)
        assert rel(m(x), ref) < 1e-5
        conv.weight.mul_(2)  # new weights are used (no stale cache)
        assert rel(m(x), conv(x)) < 1e-5
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        m2 = torch.load(buf, weights_only=False)
        m3 = copy.deepcopy(m)
        assert rel(m2(x), conv(x)) < 1e-5 and rel(m3(x), conv(x)) < 1e-5
    d = m.to_dense()
    assert type(d) is layer.Conv2d and d.step_mode == "m"


@pytest.mark.parametrize("case", ["groups1", "not-a-conv", "padding-mode", "bn-size", "mode"])
def test_from_dense_errors(case):
    conv, bn, kw = nn.Conv2d(4, 4, 3, groups=4), None, {}
    err = ValueError
    if case == "groups1":
        conv = nn.Conv2d(4, 4, 3)
    elif case == "not-a-conv":
        conv, err = nn.Linear(4, 4), TypeError
    elif case == "padding-mode":
        conv = nn.Conv2d(4, 4, 3, padding=1, groups=4, padding_mode="reflect")
    elif case == "bn-size":
        bn = nn.BatchNorm2d(3).eval()
    elif case == "mode":
        kw["mode"] = "fast"
    with pytest.raises(err):
        SparseGroupedConv2d.from_dense(conv, bn, **kw)


@pytest.mark.parametrize("path", ["sparse", "dense", "torch"])
def test_compiled_path_uses_registered_op(monkeypatch, path):
    """The forward torch.compile traces (the torch.ops.sparseflow operator, path of the eager dispatch), run
    eagerly here with compiling() forced true; a folded BatchNorm still hands over."""
    import sparseflow_ops.depthwise as odw

    conv, bn = nn.Conv2d(6, 12, 3, 2, 1, groups=6).eval(), random_bn(12)
    x = spikes(2, 6, 9, 9)
    with torch.no_grad():
        ref = bn(conv(x))
        m = SparseGroupedConv2d.from_dense(conv, bn, mode=path)
        m(x)
        assert m.last_path == path
        monkeypatch.setattr(odw, "compiling", lambda: True)
        monkeypatch.setattr(odw, "grouped_conv2d", lambda *a, **k: pytest.fail("eager launcher under compile"))
        y = bn(m(x))
        assert rel(y, ref) < 1e-5 and m.last_path == path
