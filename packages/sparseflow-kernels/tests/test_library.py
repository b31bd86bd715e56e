"""The registered operators (torch.ops.sparseflow.*) equal the functional API they wrap."""

import pytest
import torch
import torch.nn.functional as F

import sparseflow_kernels.library as lib
from sparseflow_kernels import NeuronSpec, multistep_neuron, sparse_conv2d, spiking_conv2d
from sparseflow_kernels.conv import ConvConfig
from sparseflow_kernels.naive import as_float64, conv2d_reference


def _spikes(*shape):
    x = (torch.rand(*shape) < 0.3).float()
    x[..., 0, 0] = 2.0  # non-binary
    return x


@pytest.mark.parametrize("neuron", [NeuronSpec.make("lif", tau=2.0), NeuronSpec.make("if", v_reset=None),
                                    NeuronSpec.make("leaky", beta=0.8)], ids=["lif", "if-soft", "leaky"])
@pytest.mark.parametrize("cudnn", [False, True], ids=["fused", "cudnn"])
def test_spiking_conv2d_op(neuron, cudnn):
    T, N, C, CO, H, W = 2, 1, 5, 6, 7, 6
    x = _spikes(T, N, C, H, W)
    w = torch.randn(CO, C, 3, 3) * 0.5
    b = torch.randn(CO)
    scale, shift = torch.rand(CO) + 0.5, torch.randn(CO) * 0.1
    v = torch.randn(N, CO, H, W) * 0.3
    cfg = ConvConfig(4, 4, 16, 16)
    ref_s, ref_v = spiking_conv2d(x, w, b, 1, 1, scale=scale, shift=shift, neuron=neuron, v=v, return_v=True,
                                  path="cudnn" if cudnn else "fused", config=cfg)
    s, vv = torch.ops.sparseflow.spiking_conv2d(x, w, b, [1, 1], [1, 1], scale, shift, None, v, None,
                                                *lib.neuron_args(neuron), list(cfg.key()), cudnn, False,
                                                torch.float32, False)
    torch.testing.assert_close(s, ref_s, rtol=0, atol=0)
    torch.testing.assert_close(vv, ref_v, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_conv2d_op(dense):
    x = _spikes(2, 5, 9, 7)
    w = torch.randn(4, 5, 3, 3)
    ref = conv2d_reference(*as_float64(x, w), None, 2, 1).float()
    y = torch.ops.sparseflow.conv2d(x, w, None, [2, 2], [1, 1], [1, 1], None, None, None, [], dense)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, sparse_conv2d(x, w, None, 2, 1, dense=dense), rtol=0, atol=0)


def test_multistep_neuron_op_and_pool_op():
    x = torch.randn(3, 2, 4, 5, 5)
    spec = NeuronSpec.make("lif", tau=1.5, v_reset=None)
    s, v = torch.ops.sparseflow.multistep_neuron(x, None, None, None, None, *lib.neuron_args(spec),
                                                 torch.float16)
    rs, rv = multistep_neuron(x, spec, return_v=True)
    torch.testing.assert_close(s, rs, rtol=0, atol=0)
    assert v.dtype == torch.float16
    torch.testing.assert_close(v.float(), rv, rtol=1e-3, atol=1e-3)
    p = torch.ops.sparseflow.max_pool2d(s[0], [3, 3], [2, 2], [1, 1], [1, 1], False)
    torch.testing.assert_close(p, F.max_pool2d(s[0], 3, 2, 1), rtol=0, atol=0)


def test_ops_are_registered_for_compile():
    for name in ("spiking_conv2d", "conv2d", "multistep_neuron", "max_pool2d"):
        op = getattr(torch.ops.sparseflow, name)
        assert op.default._schema.name == f"sparseflow::{name}"
    assert lib.compiling() is False


class _Recorder:
    """Stands for a kernel (or its ``wrap_triton`` wrapper): records which one a launch went through."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.name, grid))


@pytest.mark.parametrize("interpreted", [False, True], ids=["compiled", "interpreted"])
def test_launch_goes_through_wrap_triton_only_while_traced(interpreted):
    """An eager launch on real tensors calls the kernel itself (the higher-order op of ``wrap_triton`` costs more
    CPU than most of these kernels take on the GPU); a launch traced with fake tensors goes through the wrapper
    (or, under the interpreter, launches nothing)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from sparseflow_kernels._utils import _Launch

    log = []
    la = _Launch.__new__(_Launch)
    la.kernel, la.interpreted, la.traceable = _Recorder("kernel", log), interpreted, _Recorder("wrap_triton", log)
    la[(3,)](torch.zeros(2), 1, flag=True)
    la[(3,)](torch.nn.Parameter(torch.zeros(2)), 1)
    assert log == [("kernel", (3,))] * 2
    with FakeTensorMode():  # export's shape pass, Inductor's fake propagation
        assert la[(4,)](7, torch.zeros(2)) is None
    # make_fx over real tensors: a proxy mode records the launch, whose tensors are real
    make_fx(lambda x: (la[(5,)](x), x + 1)[1])(torch.zeros(2))
    traced = [] if interpreted else [("wrap_triton", (4,)), ("wrap_triton", (5,))]
    assert log == [("kernel", (3,))] * 2 + traced
