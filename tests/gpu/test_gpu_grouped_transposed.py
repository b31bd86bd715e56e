"""GPU correctness of the grouped/depthwise and transposed convolutions (run on the device machine by
scripts/gpu_check.sh): randomized sweeps of grouped_conv2d (depthwise with channel multiplier 1/2, 3x3/5x5,
stride 1/2; grouped through the tensor-core path) and sparse_conv_transpose2d (stride 2, kernels 2/3/4, padding,
output_padding) against float64 torch, fp32/fp16/bf16, contiguous and channels_last, model-sized shapes, NaN/Inf,
the modules, and optimize() on the spiking MobileNetV2 and U-Net (outputs vs dense < 1e-3)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from sparseflow_kernels import ConvConfig
from sparseflow_kernels.conv_transpose import sparse_conv_transpose2d
from sparseflow_kernels.depthwise import DepthwiseConfig, grouped_conv2d

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def spikes_like(shape, density, g, dtype, channels_last, kind):
    x = (torch.rand(shape, generator=g, device="cuda") < density).float()
    if kind == "counts":
        x = x * torch.randint(1, 3, shape, generator=g, device="cuda").float()
    elif kind == "real":
        x = x * torch.randn(shape, generator=g, device="cuda")
    # silent regions: whole tiles and channel ranges the kernels must skip exactly
    h0 = int(torch.randint(0, shape[2], (1,), generator=g, device="cuda"))
    x[:, :, :h0] = 0
    c0 = int(torch.randint(0, shape[1], (1,), generator=g, device="cuda"))
    x[:, c0: c0 + shape[1] // 3] = 0
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def pick(g, seq):
    return seq[int(torch.randint(0, len(seq), (1,), generator=g, device="cuda"))]


DW_CFGS = [None, DepthwiseConfig(8, 8, 32, 4), DepthwiseConfig(4, 8, 64, 4), DepthwiseConfig(8, 8, 64, 8),
           DepthwiseConfig(4, 4, 64, 2), DepthwiseConfig(16, 16, 16, 8)]


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("seed", range(10))
def test_depthwise_random_sweep(dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dt = DTYPES[dtype]
    C = pick(g, [1, 3, 32, 96, 144, 257])
    M = pick(g, [1, 2])
    k = pick(g, [3, 5])
    s = pick(g, [1, 2])
    p = pick(g, [k // 2, 0, k // 2 + 1])
    N = pick(g, [1, 2, 5])
    H, W = pick(g, [7, 17, 33, 64]), pick(g, [5, 16, 31, 70])
    if H + 2 * p < k or W + 2 * p < k:
        p = k // 2
    x = spikes_like((N, C, H, W), pick(g, [0.02, 0.1, 0.3]), g, dt, seed % 2 == 0, pick(g, ["int", "counts", "real"]))
    w = (torch.randn(C * M, 1, k, k, generator=g, device="cuda") / k).to(dt)
    b = torch.randn(C * M, generator=g, device="cuda").to(dt) if seed % 3 else None
    y = grouped_conv2d(x, w, b, s, p, 1, C, config=pick(g, DW_CFGS))
    ref = F.conv2d(x.double(), w.double(), None if b is None else b.double(), s, p, 1, C)
    assert y.shape == ref.shape and y.dtype == dt
    assert torch.isfinite(y).all()
    assert rel(y, ref) < TOL[dt]
    if C > 1:  # the output keeps the input's layout
        assert y.is_contiguous(memory_format=torch.channels_last) == (seed % 2 == 0)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("groups,C,CO", [(2, 64, 64), (4, 128, 64), (3, 48, 96), (8, 32, 32)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_grouped_paths(dtype, groups, C, CO, channels_last):
    g = torch.Generator(device="cuda").manual_seed(groups * 1000 + C)
    dt = DTYPES[dtype]
    x = spikes_like((3, C, 29, 30), 0.15, g, dt, channels_last, "counts")
    w = (torch.randn(CO, C // groups, 3, 3, generator=g, device="cuda") / 6).to(dt)
    b = torch.randn(CO, generator=g, device="cuda").to(dt)
    ref = F.conv2d(x.double(), w.double(), b.double(), 2, 1, 1, groups)
    for path in ("direct", "gemm"):
        y = grouped_conv2d(x, w, b, 2, 1, 1, groups, path=path)
        assert rel(y, ref) < TOL[dt], path
        y = grouped_conv2d(x, w, b, 2, 1, 1, groups, path=path, dense=True)
        assert rel(y, ref) < TOL[dt], path + " dense"


CT_CFGS = [None, ConvConfig(8, 8, 64, 16), ConvConfig(8, 8, 64, 32), ConvConfig(16, 8, 64, 32, num_warps=8),
           ConvConfig(4, 8, 128, 32)]


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("seed", range(10))
def test_conv_transpose_random_sweep(dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(100 + seed)
    dt = DTYPES[dtype]
    k = pick(g, [2, 3, 4])
    s = pick(g, [2, 2, 2, 1, 3])
    p = pick(g, [0, 1, 2]) if k > 2 else 0
    op = pick(g, list(range(s)))
    C, CO = pick(g, [16, 37, 64, 128]), pick(g, [1, 24, 64, 130])
    N, H, W = pick(g, [1, 2, 4]), pick(g, [4, 9, 16, 33]), pick(g, [3, 8, 17, 32])
    x = spikes_like((N, C, H, W), pick(g, [0.02, 0.1, 0.3]), g, dt, seed % 2 == 1, pick(g, ["int", "counts", "real"]))
    w = (torch.randn(C, CO, k, k, generator=g, device="cuda") / (C ** 0.5)).to(dt)
    b = torch.randn(CO, generator=g, device="cuda").to(dt) if seed % 3 else None
    ref = F.conv_transpose2d(x.double(), w.double(), None if b is None else b.double(), s, p, op)
    if ref.shape[-1] < 1 or ref.shape[-2] < 1:
        pytest.skip("empty output")
    y = sparse_conv_transpose2d(x, w, b, s, p, op, config=pick(g, CT_CFGS))
    assert y.shape == ref.shape and y.dtype == dt
    assert torch.isfinite(y).all()
    assert rel(y, ref) < TOL[dt]


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_model_sized_shapes(dtype):
    """MobileNetV2's first expanded depthwise layer and a U-Net decoder upsampling at T*N = 32."""
    dt = DTYPES[dtype]
    g = torch.Generator(device="cuda").manual_seed(7)
    x = spikes_like((32, 96, 112, 112), 0.1, g, dt, True, "int")
    w = (torch.randn(96, 1, 3, 3, generator=g, device="cuda") / 3).to(dt)
    y = grouped_conv2d(x, w, None, 2, 1, 1, 96)
    assert rel(y, F.conv2d(x.double(), w.double(), None, 2, 1, 1, 96)) < TOL[dt]
    x = spikes_like((32, 256, 32, 32), 0.1, g, dt, True, "int")
    w = (torch.randn(256, 128, 2, 2, generator=g, device="cuda") / 16).to(dt)
    y = sparse_conv_transpose2d(x, w, None, 2)
    assert rel(y, F.conv_transpose2d(x.double(), w.double(), None, 2)) < TOL[dt]


@pytest.mark.parametrize("special", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_nan_inf_like_dense(special, dtype):
    """Depthwise (CUDA-core FMAs): NaN and Inf exactly where the dense op has them. Transposed conv: fp16 the
    same; fp32 runs tf32x3 on tensor cores, whose operand split turns an Inf into NaN (inf - inf), so there the
    non-finite outputs are checked (same positions), as for the other tensor-core kernels."""
    dt = DTYPES[dtype]
    x = torch.zeros(2, 32, 20, 20, device="cuda")
    x[0, 3, 9, 8] = special
    x[1, 30, 0, 19] = -special
    x = x.to(dt)
    w, b = torch.randn(64, 1, 3, 3, device="cuda").to(dt), torch.randn(64, device="cuda").to(dt)
    y, ref = grouped_conv2d(x, w, b, 1, 1, 1, 32), F.conv2d(x.float(), w.float(), b.float(), 1, 1, 1, 32)
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
    wt = torch.randn(32, 16, 3, 3, device="cuda").to(dt)
    y, ref = sparse_conv_transpose2d(x, wt, None, 2, 1, 1), F.conv_transpose2d(x.float(), wt.float(), None, 2, 1, 1)
    if dt == torch.float16:
        assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
    else:
        assert torch.equal(~y.isfinite(), ~ref.isfinite())


@pytest.mark.parametrize("mode", ["sparse", "dense", "auto"])
def test_modules(mode):
    from torch import nn

    from sparseflow_ops.conv_transpose import SparseConvTranspose2d
    from sparseflow_ops.depthwise import SparseGroupedConv2d

    x = (torch.rand(4, 2, 48, 28, 28, device="cuda") < 0.1).half()
    dw = nn.Conv2d(48, 96, 5, 2, 2, groups=48).cuda().half().eval()
    ct = nn.ConvTranspose2d(48, 24, 4, 2, 1).cuda().half().eval()
    xd = x.flatten(0, 1).double()
    with torch.no_grad():
        ref = F.conv2d(xd, dw.weight.double(), dw.bias.double(), 2, 2, 1, 48)
        m = SparseGroupedConv2d.from_dense(dw, mode=mode)
        assert rel(m(x).flatten(0, 1), ref) < TOL[torch.float16] and m.last_path in ("sparse", "dense", "torch")
        ref = F.conv_transpose2d(xd, ct.weight.double(), ct.bias.double(), 2, 1)
        m = SparseConvTranspose2d.from_dense(ct, mode=mode)
        assert rel(m(x).flatten(0, 1), ref) < TOL[torch.float16] and m.last_path in ("sparse", "dense", "torch")


def test_modules_under_torch_compile():
    """After one eager call (dispatch measured), torch.compile keeps torch.ops.sparseflow.* in the graph."""
    from torch import nn

    from sparseflow_ops.conv_transpose import SparseConvTranspose2d
    from sparseflow_ops.depthwise import SparseGroupedConv2d

    torch._dynamo.reset()
    x = (torch.rand(2, 4, 32, 28, 28, device="cuda") < 0.1).half()
    net = nn.Sequential(SparseGroupedConv2d.from_dense(nn.Conv2d(32, 32, 3, 1, 1, groups=32).cuda().half().eval(),
                                                       mode="sparse"),
                        SparseConvTranspose2d.from_dense(nn.ConvTranspose2d(32, 16, 2, 2).cuda().half().eval(),
                                                         mode="sparse"))
    with torch.no_grad():
        ref = net(x)
        y = torch.compile(net)(x)
    assert rel(y, ref) < 1e-3


@pytest.mark.parametrize("name,size,kw", [
    ("spiking_mobilenetv2", 96, dict(width_mult=0.5, last_channels=256, stages=(
        (1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 32, 2, 2, 3), (6, 64, 1, 2, 5), (6, 96, 1, 1, 3)))),
    ("spiking_unet", 64, dict(base=16, depth=3)),
], ids=["mobilenetv2-96px", "unet-64px"])
@pytest.mark.parametrize("mode", ["sparse"])
def test_models_match_dense(name, size, kw, mode, strict_fp32):
    """optimize(mode="sparse") on fp32 models (a reduced MobileNetV2: every kernel variant compiles within the
    per-test timeout): outputs equal the float64 dense model's (relative error < 1e-3).

    The weights are seeded: a random, recalibrated spiking network may amplify rounding (a spike flips at an exact
    threshold tie and the change grows through the layers). ``sparseflow-bench diagnose`` on the H100 (8 seeds): the
    optimized U-Net is within 2e-8 of the dense fp32 model for 6 seeds; for 2 of them the dense fp32 model is
    itself 2.5e-3 and 5.7e-3 away from float64 and the optimized one 2.5e-3 and 9.4e-3 from dense fp32, at the
    last time step only. The test asserts that premise (dense fp32 within 1e-5 of float64 for its seed) so that
    the 1e-3 bound measures the kernels, not the network's sensitivity. ``strict_fp32``: the dense reference in
    true fp32 (cuDNN's default TF32 convolutions flip spikes at threshold, and random-weight networks amplify every
    flip)."""
    from spikingjelly.activation_based import functional

    from sparseflow_bench.data import natural_images, repeat_time
    from sparseflow_bench.models import build_model, recalibrate_bn
    from sparseflow_core import optimize
    from sparseflow_ops.conv_transpose import SparseConvTranspose2d
    from sparseflow_ops.depthwise import SparseGroupedConv2d

    T = 4
    torch.manual_seed(1)  # the same network whatever ran before in this worker
    model = build_model(name, T=T, num_classes=10, **kw).cuda()
    recalibrate_bn(model, natural_images(8, size).cuda(), T)
    x = repeat_time(natural_images(4, size, seed=1), T).cuda()

    def run(m, inp):
        functional.reset_net(m)
        with torch.no_grad():
            return m(inp).double()

    ref32 = run(model, x)
    ref = run(copy.deepcopy(model).double(), x.double())
    assert rel(ref32, ref) < 1e-5, "premise: this seed's dense fp32 model does not amplify rounding"
    opt = optimize(copy.deepcopy(model), x, mode=mode)
    kinds = {type(m) for m in opt.modules()}
    assert (SparseGroupedConv2d if name == "spiking_mobilenetv2" else SparseConvTranspose2d) in kinds
    y = run(opt, x)
    assert rel(y, ref) < 1e-3
