"""GPU correctness of the spiking-Transformer paths (run on the device machine by scripts/gpu_check.sh):
sparse_linear / sparse_conv1x1 sweeps (fp32/fp16/bf16, odd shapes, strided and channels-last-like inputs),
the attention kernels, the drop-in modules, and optimize() on spikformer_ti / sdt_8_384 at 224 px."""

import copy

import pytest
import torch
import torch.nn.functional as F

from sparseflow_kernels import (
    LinearConfig,
    channel_dot,
    linear_block_flags,
    sparse_conv1x1,
    sparse_linear,
    ssa_attention,
)
from sparseflow_kernels.naive import ssa_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = ["fp32", "fp16", "bf16"]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1.0))


def spikes(shape, density, g, dtype, counts=False):
    x = (torch.rand(shape, generator=g, device="cuda") < density).float()
    if counts:
        x = x * torch.randint(1, 3, shape, generator=g, device="cuda").float()
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("seed", range(10))
def test_sparse_linear_random_sweep(dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    gc = torch.Generator().manual_seed(seed)
    pick = lambda opts: opts[int(torch.randint(len(opts), (1,), generator=gc))]
    lead = pick([(1,), (7,), (4, 8, 196), (2, 3, 49), (6272,)])
    K, N = pick([5, 37, 256, 384, 1024, 1536]), pick([1, 19, 256, 384, 1000])
    density = pick([0.0, 0.02, 0.15, 0.4, 1.0])
    x = spikes((*lead, K), density, g, dtype, counts=bool(seed % 2))
    w = (torch.randn(N, K, generator=g, device="cuda") / K**0.5).to(dtype)
    b = torch.randn(N, generator=g, device="cuda").to(dtype) if seed % 3 else None
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    for cfg in (None, LinearConfig(32, 64, 32), LinearConfig(128, 128, 64, num_warps=8)):
        for dense in (False, True):
            y = sparse_linear(x, w, b, config=cfg, dense=dense)
            assert y.shape == ref.shape and y.dtype == dtype and torch.isfinite(y).all()
            assert rel(y, ref) < TOL[dtype], (cfg, dense, rel(y, ref))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_sparse_conv1x1_spikformer_shapes(dtype):
    g = torch.Generator(device="cuda").manual_seed(1)
    for C, CO in ((256, 768), (256, 1024), (1024, 256)):
        x = spikes((32, C, 196), 0.15, g, dtype, counts=True)
        w = (torch.randn(CO, C, 1, generator=g, device="cuda") / C**0.5).to(dtype)
        ref = F.conv1d(x.double(), w.double())
        y = sparse_conv1x1(x, w)
        assert rel(y, ref) < TOL[dtype]
        y = sparse_conv1x1(x.transpose(1, 2).contiguous().transpose(1, 2), w)  # channels fastest
        assert rel(y, ref) < TOL[dtype]


def test_linear_flags_skip_and_nan():
    g = torch.Generator(device="cuda").manual_seed(2)
    x = spikes((300, 200), 0.3, g, torch.float16)
    x[:128] = 0
    x[:, 64:160] = 0
    flags = linear_block_flags(x, 64, 32)
    assert 0 < flags.float().mean() < 1
    w = torch.randn(70, 200, device="cuda").half()
    assert torch.equal(sparse_linear(x, w, config=LinearConfig(64, 64, 32), flags=torch.zeros_like(flags)),
                       torch.zeros(300, 70, device="cuda", dtype=torch.float16))
    x[200, 199] = float("nan")
    y, ref = sparse_linear(x, w), F.linear(x, w)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("D,L", [(32, 196), (48, 64), (16, 1), (64, 197)])
def test_ssa_attention(dtype, D, L):
    g = torch.Generator(device="cuda").manual_seed(D + L)
    qkv = spikes((4, 8, 3 * 4 * D, L), 0.2, g, dtype).reshape(4, 8, 3, 4, D, L)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    ref = ssa_reference(q.double(), k.double(), v.double(), 0.125)
    for dense in (False, True):
        y = ssa_attention(q, k, v, 0.125, dense=dense)
        if dtype == torch.float32 or (dtype == torch.float16 and ref.abs().max() <= 256):
            assert torch.equal(y.double(), ref)  # exact integers (x 1/8), rounded once
        else:
            assert rel(y, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_channel_dot(dtype):
    g = torch.Generator(device="cuda").manual_seed(3)
    a, b = spikes((32, 384, 7, 7), 0.2, g, dtype), spikes((32, 384, 7, 7), 0.3, g, dtype)
    assert torch.equal(channel_dot(a, b).double(), (a.double() * b.double()).flatten(2).sum(-1))
    a = a.contiguous(memory_format=torch.channels_last)
    assert torch.equal(channel_dot(a, b).double(), (a.double() * b.double()).flatten(2).sum(-1))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_modules_match(dtype, strict_fp32):
    # strict_fp32: the dense reference in true fp32 (cuDNN's default TF32 1x1 convolutions flip spikes at threshold:
    # 0.1 relative error on SSA measured on the H200 with TF32 on, 0.0 with it off)
    from spikingjelly.activation_based import functional
    from spikingjelly.activation_based.layer.attention import SpikeDrivenSelfAttention, SpikingSelfAttention
    from torch import nn

    from sparseflow_ops import SparseMultiheadAttention, SparseSpikeDrivenSelfAttention, SparseSpikingSelfAttention

    torch.manual_seed(0)
    for dense_mod, sparse_cls, x in (
        (SpikingSelfAttention(256, 8), SparseSpikingSelfAttention, torch.rand(4, 8, 256, 196) < 0.2),
        (SpikeDrivenSelfAttention(384, 8), SparseSpikeDrivenSelfAttention, (torch.rand(4, 8, 384, 14, 14) < 0.3) * 3.0),
    ):
        for m in dense_mod.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_var.uniform_(0.01, 0.05)
                m.bias.data.uniform_(-0.3, 0.6)
        functional.set_step_mode(dense_mod, "m")
        dense_mod = dense_mod.cuda().to(dtype).eval()
        ref = copy.deepcopy(dense_mod)
        sp = sparse_cls.from_dense(dense_mod)
        x = x.to("cuda", dtype)
        with torch.no_grad():
            y, r = sp(x), ref(x)
        assert sp.last_path in ("sparse", "torch")
        if dtype == torch.float32:
            assert rel(y, r) < 1e-4, rel(y, r)
        else:  # fp16/bf16 BatchNorm rounding can flip a few threshold ties in the neurons
            assert (y != r).float().mean() < 0.02
    mha = nn.MultiheadAttention(384, 8, batch_first=True).cuda().to(dtype).eval()
    sp = SparseMultiheadAttention.from_dense(copy.deepcopy(mha))
    x = (torch.rand(8, 197, 384, device="cuda") < 0.2).to(dtype)
    kpm = torch.zeros(8, 197, dtype=torch.bool, device="cuda")
    kpm[:, -5:] = True
    with torch.no_grad():
        y, _ = sp(x, x, x, need_weights=False, key_padding_mask=kpm)
        r, _ = mha(x, x, x, need_weights=False, key_padding_mask=kpm)
    assert rel(y, r) < (1e-4 if dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("name", ["spikformer_ti", "sdt_8_384"])
def test_optimize_real_models_fp32(name):
    """optimize() on the real models (T=4, N=2, 224 px, recalibrated BatchNorm): logits within 1e-3."""
    from spikingjelly.activation_based import functional

    from sparseflow_bench.models import prepared_model
    from sparseflow_core import optimize, restore
    from sparseflow_ops import SparseModule

    model, x = prepared_model(name, 4, 2, 224, torch.device("cuda"), calib_images=8)
    ref = copy.deepcopy(model)
    ref64 = copy.deepcopy(model).double()
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the dense fp32 reference in true fp32 (cuDNN defaults to TF32)
    try:
        with torch.no_grad():
            r64 = ref64(x.double())
            r = ref(x).double()
            functional.reset_net(ref)
            optimize(model, x)
            assert any(isinstance(m, SparseModule) for m in model.modules())
            y = model(x).double()
            functional.reset_net(model)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    err = float((y - r64).norm() / r64.norm())
    err_dense = float((r - r64).norm() / r64.norm())
    print(f"{name}: logits rel err vs float64: sparseflow fp32 {err:.2e}, dense fp32 {err_dense:.2e}")
    # spikes at threshold flip under any change of fp32 summation order and random-weight networks amplify
    # them: SparseFlow must be as exact as the dense fp32 model itself (and within 1e-3 where that is)
    assert err < max(1e-3, 2 * err_dense), (err, err_dense)
    restore(model)
    assert not any(isinstance(m, SparseModule) for m in model.modules())
