"""SparseConvTranspose2d (nn.ConvTranspose2d drop-in) against the dense module: kernels 2/3/4 with stride 2,
output_padding and output_size=, [N, C, H, W] and [T, N, C, H, W] inputs, every path, BatchNorm folding,
training fallback, to_dense, state_dict, new weights and copies."""

from __future__ import annotations

import copy

import pytest
import torch
from spikingjelly.activation_based import layer
from torch import nn

from sparseflow_ops import is_bypassed
from sparseflow_ops.conv_transpose import SparseConvTranspose2d


def spikes(*shape, density=0.3):
    return (torch.rand(*shape) < density).float()


def rel(y, ref):
    return ((y.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


# name -> (C, CO, k, stride, padding, output_padding, bias)
CONVS = {
    "k2-s2": (16, 8, 2, 2, 0, 0, True),
    "k3-s2-p1-op1": (20, 6, 3, 2, 1, 1, False),
    "k4-s2-p1": (16, 8, 4, 2, 1, 0, True),
}


@pytest.mark.parametrize("mode", ["sparse", "dense", "torch"])
@pytest.mark.parametrize("name", list(CONVS), ids=list(CONVS))
def test_matches_dense_module(name, mode):
    C, CO, k, s, p, op, bias = CONVS[name]
    conv = nn.ConvTranspose2d(C, CO, k, s, p, op, bias=bias).eval()
    m = SparseConvTranspose2d.from_dense(conv, mode=mode)
    assert isinstance(m, nn.ConvTranspose2d) and m.weight is conv.weight
    x = spikes(2, 1, C, 5, 6)
    with torch.no_grad():
        y = m(x)
        ref = conv(x.flatten(0, 1))
    assert y.shape == (2, 1, *ref.shape[1:])
    assert rel(y.flatten(0, 1), ref) < 1e-5
    assert m.last_path == mode


def test_output_size_argument():
    conv = nn.ConvTranspose2d(16, 4, 3, 2, 1).eval()
    m = SparseConvTranspose2d.from_dense(conv, mode="sparse")
    x = spikes(1, 16, 5, 4)
    with torch.no_grad():
        for size in ([9, 7], [10, 8]):
            ref = conv(x, output_size=size)
            y = m(x, output_size=size)
            assert y.shape == ref.shape and rel(y, ref) < 1e-5


def test_folded_batchnorm():
    conv = layer.ConvTranspose2d(16, 8, 2, 2, bias=False, step_mode="m").eval()
    bn = layer.BatchNorm2d(8, step_mode="m").eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    x = spikes(2, 1, 16, 4, 5)
    with torch.no_grad():
        ref = bn(conv(x))
        m = SparseConvTranspose2d.from_dense(conv, bn, mode="sparse")
        assert is_bypassed(bn) and m.kind() == "conv_transpose+bn"
        assert rel(bn(m(x)), ref) < 1e-5
    d = m.to_dense()
    assert type(d) is layer.ConvTranspose2d and d.step_mode == "m" and not is_bypassed(bn)
    assert list(d.state_dict()) == list(conv.state_dict())


@pytest.mark.autograd
def test_training_new_weights_and_copies():
    conv = nn.ConvTranspose2d(16, 4, 4, 2, 1)
    m = SparseConvTranspose2d.from_dense(conv, mode="sparse")
    x = spikes(1, 16, 4, 4)
    y = m.train()(x)
    assert m.last_path == "torch"
    y.sum().backward()
    assert conv.weight.grad is not None
    m.eval()
    with torch.no_grad():
        conv.weight.mul_(-1.5)
        assert rel(m(x), conv(x)) < 1e-5 and m.last_path == "sparse"
        assert rel(copy.deepcopy(m)(x), conv(x)) < 1e-5


@pytest.mark.parametrize("case", ["groups", "dilation", "not-convt", "bn-size"])
def test_from_dense_errors(case):
    conv, bn, err = nn.ConvTranspose2d(4, 4, 2, 2), None, ValueError
    if case == "groups":
        conv = nn.ConvTranspose2d(4, 4, 2, 2, groups=2)
    elif case == "dilation":
        conv = nn.ConvTranspose2d(4, 4, 2, 2, dilation=2)
    elif case == "not-convt":
        conv, err = nn.Conv2d(4, 4, 2), TypeError
    elif case == "bn-size":
        bn = nn.BatchNorm2d(3).eval()
    with pytest.raises(err):
        SparseConvTranspose2d.from_dense(conv, bn)


def test_compiled_path_uses_registered_op(monkeypatch):
    """The forward torch.compile traces: torch.ops.sparseflow.conv_transpose2d with the eager path."""
    import sparseflow_ops.conv_transpose as oct_
    import sparseflow_ops.depthwise as odw

    conv = nn.ConvTranspose2d(16, 8, 3, 2, 1, 1).eval()
    m = SparseConvTranspose2d.from_dense(conv, mode="sparse")
    x = spikes(1, 16, 4, 5)
    with torch.no_grad():
        m(x)
        monkeypatch.setattr(odw, "compiling", lambda: True)
        monkeypatch.setattr(oct_, "sparse_conv_transpose2d", lambda *a, **k: pytest.fail("eager launcher"))
        assert rel(m(x), conv(x)) < 1e-5 and m.last_path == "sparse"
