"""SparseBatchNorm2d against nn.BatchNorm2d / SpikingJelly layer.BatchNorm2d: eval results (float64 reference),
occupancy from the producer, training mode identical to the dense module (running statistics included),
state_dict / to_dense round trips, cache invalidation and errors. Runs under TRITON_INTERPRET=1."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from spikingjelly.activation_based import layer
from torch import nn

from sparseflow_kernels import prescan
from sparseflow_kernels.naive import as_float64, batch_norm2d_reference
from sparseflow_ops import SparseBatchNorm2d, SparseModule
from sparseflow_ops._common import attach_occupancy

TOL = {torch.float32: 1e-6, torch.float16: 1e-3}


def spike_counts(*shape, dtype=torch.float32):
    """0/1/2 values (SEW-ResNet ADD outputs), with silent (sample, channel) planes."""
    x = (torch.rand(shape) < 0.2).float() + (torch.rand(shape) < 0.1).float()
    return (x * (torch.rand(*shape[:-2], 1, 1) < 0.6)).to(dtype)


def make_bn(C, cls=nn.BatchNorm2d, **kw):
    bn = cls(C, **kw)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(C) * 0.3)
        bn.running_var.copy_(torch.rand(C) + 0.2)
        if bn.weight is not None:
            bn.weight.copy_(torch.randn(C))
            bn.bias.copy_(torch.randn(C))
    return bn.eval()


def ref_eval(bn, x):
    """The kernels' float64 reference for ``bn``'s statistics and parameters, over [N, C, H, W] or [T, N, ...]."""
    flat = x.flatten(0, 1) if x.dim() == 5 else x
    y = batch_norm2d_reference(*as_float64(flat, bn.running_mean, bn.running_var, bn.weight, bn.bias), bn.eps)
    return y.view(x.shape)


def rel(y, ref):
    return float((y.detach().double() - ref.detach()).norm() / ref.detach().norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_eval_matches_batchnorm(dtype, affine):
    bn = make_bn(37, affine=affine).to(dtype)
    sbn = SparseBatchNorm2d.from_dense(copy.deepcopy(bn))
    x = spike_counts(2, 37, 11, 13, dtype=dtype)
    y = sbn(x)
    assert sbn.last_path == "kernel" and y.dtype == dtype
    assert rel(y, ref_eval(bn, x)) < TOL[dtype]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_eval_with_producer_occupancy(layout):
    """Spikes that carry their producer's occupancy: all-zero blocks are written without being read."""
    bn = make_bn(20)
    sbn = SparseBatchNorm2d.from_dense(bn)
    x = spike_counts(2, 20, 16, 9)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    attach_occupancy(x, x, prescan(x, 8, 16))
    y = sbn(x)
    assert sbn.last_path == "sparse"
    assert rel(y, ref_eval(bn, x)) < 1e-6
    x.mul_(2.0)  # written after the producer: the occupancy no longer applies
    y2 = sbn(x)
    assert sbn.last_path == "kernel" and rel(y2, ref_eval(bn, x)) < 1e-6


def test_spikingjelly_multistep_5d():
    bn = make_bn(24, cls=layer.BatchNorm2d, step_mode="m")
    sbn = SparseBatchNorm2d.from_dense(bn)
    x = spike_counts(2, 3, 24, 9, 7)  # [T, N, C, H, W]
    attach_occupancy(x, x.flatten(0, 1), prescan(x.flatten(0, 1), 8, 16))
    y = sbn(x)
    assert y.shape == x.shape and sbn.last_path == "sparse"
    assert rel(y, ref_eval(bn, x)) < 1e-6
    with pytest.raises(ValueError, match=r"\[T, N, C, H, W\]"):
        sbn(x[0])  # a 4-D input to a multi-step BatchNorm: SpikingJelly's own error
    back = sbn.to_dense()
    assert type(back) is layer.BatchNorm2d and back.step_mode == "m"
    torch.testing.assert_close(back(x), y, rtol=1e-5, atol=1e-5)


def test_training_mode_is_batchnorm():
    torch.manual_seed(0)
    bn = make_bn(16).train()
    twin = copy.deepcopy(bn)
    sbn = SparseBatchNorm2d.from_dense(bn)
    assert sbn.training
    for _ in range(2):
        x = spike_counts(3, 16, 7, 5)
        y, ref = sbn(x), twin(x)
        assert sbn.last_path == "torch"
        torch.testing.assert_close(y, ref, rtol=0, atol=0)
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(sbn, k), getattr(twin, k), rtol=0, atol=0)
    sbn.eval()
    twin.eval()
    x = spike_counts(2, 16, 7, 5)
    assert rel(sbn(x), ref_eval(twin, x)) < 1e-6 and sbn.last_path == "kernel"


def test_no_running_stats_uses_batch_statistics():
    bn = nn.BatchNorm2d(8, track_running_stats=False).eval()
    sbn = SparseBatchNorm2d.from_dense(copy.deepcopy(bn))
    x = spike_counts(2, 8, 5, 5) + torch.rand(2, 8, 5, 5)
    torch.testing.assert_close(sbn(x), bn(x))
    assert sbn.last_path == "torch"


def test_modes_and_errors_of_the_dense_module():
    bn = make_bn(12)
    x = spike_counts(2, 12, 6, 6)
    for mode, path in (("sparse", "kernel"), ("torch", "torch"), ("auto", "kernel")):
        sbn = SparseBatchNorm2d.from_dense(bn, mode=mode)
        assert rel(sbn(x), ref_eval(bn, x)) < 1e-6 and sbn.last_path == path
    sbn = SparseBatchNorm2d.from_dense(bn)
    with pytest.raises(ValueError, match="expected 4D input"):  # nn.BatchNorm2d's own message
        sbn(x[0])
    with pytest.raises(RuntimeError):
        sbn(spike_counts(2, 5, 6, 6))  # wrong channel count: the dense op's error
    sbn64 = SparseBatchNorm2d.from_dense(copy.deepcopy(bn).double())
    assert rel(sbn64(x.double()), ref_eval(bn, x)) < 1e-12 and sbn64.last_path == "torch"  # no float64 kernel
    with pytest.raises(ValueError, match="mode"):
        SparseBatchNorm2d.from_dense(bn, mode="fast")
    with pytest.raises(TypeError, match=r"nn\.BatchNorm2d"):
        SparseBatchNorm2d.from_dense(nn.BatchNorm1d(4))
    with pytest.raises(TypeError, match="already"):
        SparseBatchNorm2d.from_dense(sbn)


def test_parameters_shared_state_dict_and_to_dense():
    bn = make_bn(10)
    sbn = SparseBatchNorm2d.from_dense(bn)
    assert isinstance(sbn, nn.BatchNorm2d) and isinstance(sbn, SparseModule)
    assert sbn.weight is bn.weight and sbn.running_var is bn.running_var
    assert list(sbn.state_dict()) == list(bn.state_dict())
    fresh = nn.BatchNorm2d(10)
    fresh.load_state_dict(sbn.state_dict())  # what a user saves loads into the original model
    back = sbn.to_dense()
    assert type(back) is nn.BatchNorm2d and back.weight is bn.weight and back.running_mean is bn.running_mean
    x = spike_counts(1, 10, 4, 4)
    torch.testing.assert_close(back(x), bn(x))


def test_new_statistics_are_picked_up():
    bn = make_bn(10)
    sbn = SparseBatchNorm2d.from_dense(bn)
    x = spike_counts(2, 10, 5, 5)
    sbn(x)
    with torch.no_grad():
        sbn.running_mean.add_(0.5)  # in place: the cached affine must be recomputed
    assert rel(sbn(x), ref_eval(sbn, x)) < 1e-6
    other = make_bn(10)
    sbn.load_state_dict(other.state_dict())
    assert rel(sbn(x), ref_eval(other, x)) < 1e-6


def test_pickle_and_deepcopy():
    sbn = SparseBatchNorm2d.from_dense(make_bn(6))
    x = spike_counts(1, 6, 5, 5)
    y = sbn(x)
    for clone in (copy.deepcopy(sbn), pickle.loads(pickle.dumps(sbn))):
        torch.testing.assert_close(clone(x), y, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------- on the GPU

GPU_TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_module_eval_and_train_on_gpu(dtype, strict_fp32):
    """A ResNet-sized BatchNorm on CUDA (16 x 96 x 28 x 28 channels-last 0/1/2 counts with silent planes, the
    producer's occupancy attached): eval on the path ``auto`` picks and on the kernel within tolerance of the fp32
    nn.BatchNorm2d, training is nn.BatchNorm2d itself (running statistics included)."""
    g = torch.Generator(device="cuda").manual_seed(1)
    rand = lambda *shape: torch.rand(*shape, generator=g, device="cuda")
    bn = nn.BatchNorm2d(96).cuda()
    with torch.no_grad():
        for t, (lo, hi) in zip((bn.running_mean, bn.running_var, bn.weight, bn.bias),
                               ((-0.5, 0.5), (0.2, 2.0), (0.5, 1.5), (-0.5, 0.5))):
            t.copy_(rand(96) * (hi - lo) + lo)
    bn = bn.to(dtype).eval()
    ref_bn = copy.deepcopy(bn).float()
    twin = copy.deepcopy(bn).train()
    sbn = SparseBatchNorm2d.from_dense(copy.deepcopy(bn))
    shape = (16, 96, 28, 28)
    x = (rand(*shape) < 0.1).float() + (rand(*shape) < 0.05).float()
    x = (x * (rand(16, 96, 1, 1) < 0.6).float()).to(dtype).contiguous(memory_format=torch.channels_last)
    attach_occupancy(x, x, prescan(x, 8, 16))
    with torch.no_grad():
        ref = ref_bn(x.float()).double()
        y = sbn(x)
        assert sbn.last_path in ("sparse", "torch")  # auto: the faster of the kernel and nn.BatchNorm2d
        assert rel(y, ref) < GPU_TOL[dtype] * 2
        sbn.mode = "sparse"
        assert rel(sbn(x), ref) < GPU_TOL[dtype] * 2 and sbn.last_path == "sparse"
        sbn.train()  # training: nn.BatchNorm2d itself (batch statistics, running statistics updated)
        torch.testing.assert_close(sbn(x), twin(x))
        torch.testing.assert_close(sbn.running_mean, twin.running_mean)
        assert sbn.last_path == "torch"
