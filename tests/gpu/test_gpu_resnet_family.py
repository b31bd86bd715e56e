"""GPU checks of the spiking-ResNet-family work (run on the device machine by scripts/gpu_check.sh): sparse_batch_norm2d
in fp32/fp16/bf16 and both layouts (SparseBatchNorm2d's GPU test is in the ops suite), the ResNet convolutions (7x7
stem, 1x1 stride 1/2, 3x3 on 0/1/2 inputs) at real sizes, optimize() on the model family against the dense models,
and block_size="auto"."""

import copy
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparseflow_kernels import prescan, sparse_batch_norm2d, sparse_conv2d

# fp32 references without TF32 (cuDNN allows it by default): exactness is judged against real fp32
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.usefixtures("strict_fp32")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = ["fp32", "fp16", "bf16"]
BN_TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
CONV_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def counts(shape, density, g, dtype, channels_last):
    """0/1/2 values with silent (sample, channel) planes, like SEW-ResNet ADD outputs."""
    x = (torch.rand(shape, generator=g, device="cuda") < density).float()
    x = x + (torch.rand(shape, generator=g, device="cuda") < density / 2).float()
    x = x * (torch.rand(*shape[:2], 1, 1, generator=g, device="cuda") < 0.6).float()
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def bn_stats(C, g, dtype):
    mk = lambda lo, hi: (torch.rand(C, generator=g, device="cuda") * (hi - lo) + lo).to(dtype)
    return mk(-0.5, 0.5), mk(0.2, 2.0), mk(0.5, 1.5), mk(-0.5, 0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("seed", range(6))
def test_sparse_batch_norm2d_sweep(dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(32, 64, 56, 56), (32, 128, 28, 28), (32, 256, 14, 14), (32, 512, 7, 7), (3, 37, 13, 11),
              (1, 1, 1, 1)]
    N, C, H, W = shapes[seed]
    x = counts((N, C, H, W), [0.05, 0.2, 0.0, 1.0, 0.3, 0.5][seed], g, dtype, seed % 2 == 0)
    mean, var, w, b = bn_stats(C, g, dtype)
    ref = F.batch_norm(x.double(), mean.double(), var.double(), w.double(), b.double(), False, 0.0, 1e-5)
    for occ in (None, prescan(x, 8, 16), prescan(x, 16, 16)):
        y = sparse_batch_norm2d(x, mean, var, w, b, 1e-5, occupancy=occ)
        assert y.dtype == dtype and y.shape == x.shape
        assert rel(y, ref) < BN_TOL[dtype]
        if seed % 2 == 0:
            assert y.is_contiguous(memory_format=torch.channels_last)


def test_sparse_batch_norm2d_nan_inf():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = counts((4, 32, 20, 20), 0.1, g, torch.float16, True)
    x[0, 3, 5, 5], x[2, 31, 19, 0], x[3, 7, 0, 19] = float("nan"), float("inf"), -float("inf")
    mean, var, w, b = bn_stats(32, g, torch.float16)
    y = sparse_batch_norm2d(x, mean, var, w, b, occupancy=prescan(x, 8, 16))
    ref = F.batch_norm(x.float(), mean.float(), var.float(), w.float(), b.float(), False, 0.0, 1e-5)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))


# (N, C, CO, H, W, k, stride, padding)
CONVS = {
    "stem-7x7-s2": (8, 3, 64, 224, 224, 7, 2, 3),
    "bottleneck-1x1-s1-256-64": (32, 256, 64, 56, 56, 1, 1, 0),
    "bottleneck-1x1-s1-64-256": (32, 64, 256, 56, 56, 1, 1, 0),
    "downsample-1x1-s2-256-512": (32, 256, 512, 56, 56, 1, 2, 0),
    "downsample-1x1-s2-odd": (5, 67, 130, 29, 31, 1, 2, 0),
    "3x3-sew-add-0/1/2": (32, 128, 128, 28, 28, 3, 1, 1),
    "5x5-s1-pad2": (4, 48, 64, 31, 29, 5, 1, 2),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("name", list(CONVS), ids=list(CONVS))
def test_resnet_convs_with_folded_bn(name, dtype):
    N, C, CO, H, W, k, s, p = CONVS[name]
    g = torch.Generator(device="cuda").manual_seed(zlib.crc32(name.encode()))
    if name.startswith("stem"):
        x = torch.randn(N, C, H, W, generator=g, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    else:
        x = counts((N, C, H, W), 0.08, g, dtype, True)
    w = (torch.randn(CO, C, k, k, generator=g, device="cuda") / (C * k * k) ** 0.5).to(dtype)
    scale = torch.rand(CO, generator=g, device="cuda") + 0.5
    shift = torch.randn(CO, generator=g, device="cuda")
    ref = F.conv2d(x.double(), w.double(), None, s, p) * scale.double().view(1, -1, 1, 1) \
        + shift.double().view(1, -1, 1, 1)
    for bs in (8, 16):
        y = sparse_conv2d(x, w, None, s, p, block_size=bs, scale=scale, shift=shift)
        assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
        assert rel(y, ref) < CONV_TOL[dtype], (bs, rel(y, ref))


def _build(name, T=2, N=2, size=64):
    from sparseflow_bench.data import natural_images, repeat_time
    from sparseflow_bench.models import build_model, recalibrate_bn

    torch.manual_seed(0)
    model = build_model(name, T=T, num_classes=10).cuda()
    recalibrate_bn(model, natural_images(4, size, seed=0).cuda(), T=T, batches=2)
    return model.eval(), repeat_time(natural_images(N, size, seed=1), T).cuda()


@pytest.mark.parametrize("name", ["sew_resnet18", "sew_resnet18_iand", "sew_resnet18_and", "spiking_resnet50",
                                  "ms_resnet18", "spiking_vgg11_bn"])
@pytest.mark.parametrize("block_size", [None, "auto"], ids=["default-rule", "auto"])
def test_optimize_family_matches_dense(name, block_size):
    from spikingjelly.activation_based import functional

    from sparseflow_core import analyze, optimize

    model, x = _build(name)
    functional.reset_net(model)
    with torch.no_grad():
        ref = model(x)
    functional.reset_net(model)
    an = analyze(model, x)
    opt = copy.deepcopy(model)
    with torch.no_grad():
        opt, rep = optimize(opt, x, block_size=block_size, return_report=True)
        functional.reset_net(opt)
        y = opt(x)
        functional.reset_net(opt)
        y2 = opt(x)
    assert rel(y, ref) < 1e-3 and rel(y2, ref) < 1e-3
    entries = {e.name: e for e in rep.layers}
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and an.spike_fed(n)[0]:
            e = entries[n]
            assert e.action in ("fused", "sparse") or e.reason, n
    a, b = opt.state_dict(), model.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_block_size_auto_measures_once_per_shape():
    from spikingjelly.activation_based import functional

    from sparseflow_core import optimize
    from sparseflow_core.blocks import AUTO_CANDIDATES, auto_hook, auto_timings, clear_auto_cache

    clear_auto_cache()
    model, x = _build("sew_resnet18", size=112)
    functional.reset_net(model)
    with torch.no_grad():
        ref = model(x)
        opt = optimize(copy.deepcopy(model), x, block_size="auto")
        functional.reset_net(opt)
        y = opt(x)
    hooks = [(n, auto_hook(m)) for n, m in opt.named_modules() if auto_hook(m) is not None]
    assert hooks and all(h.last is not None and h.last[1] in ("measured", "cached") for _, h in hooks)
    assert any(h.last[1] == "measured" for _, h in hooks)  # layers of one geometry share the first measurement
    assert all(h.last[0] in AUTO_CANDIDATES for _, h in hooks)
    assert auto_timings() and all(set(t) == set(AUTO_CANDIDATES) for t in auto_timings().values())
    assert rel(y, ref) < 1e-3
    with torch.no_grad():
        functional.reset_net(opt)
        y2 = opt(x)
    assert all(h.last[1] == "cached" for _, h in hooks) and rel(y2, ref) < 1e-3
