"""sparse_linear / sparse_conv1x1 against float64 F.linear / F.conv1d: leading shapes, odd sizes (M = 1, K
not a multiple of the block, K < 16, N = 1), input kinds, bias or none, configs, strided inputs, the affine
epilogue, the prescan flags, NaN/Inf propagation and argument errors. Runs under TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparseflow_kernels import LinearConfig, linear_block_flags, sparse_conv1x1, sparse_linear
from sparseflow_kernels import linear as klinear
from sparseflow_kernels.naive import as_float64, conv1x1_reference, linear_reference

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Outputs start as NaN and block flags as 0 (= skip): an unwritten element or flag shows up."""
    real = klinear.new_output

    def poisoned(shape, dtype, device):
        t = real(shape, dtype, device)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(0)

    monkeypatch.setattr(klinear, "new_output", poisoned)


def make_input(kind, shape, dtype=torch.float32):
    if kind == "spikes":
        return (torch.rand(shape) < 0.2).to(dtype)
    if kind == "counts012":  # sums of spikes (residual adds)
        return (torch.randint(0, 3, shape) * (torch.rand(shape) < 0.3)).to(dtype)
    if kind == "real-sparse":
        return (torch.randn(shape) * (torch.rand(shape) < 0.3)).to(dtype)
    if kind == "ones":
        return torch.ones(shape, dtype=dtype)
    if kind == "block-sparse":  # whole row tiles / feature blocks silent, the rest spikes
        x = (torch.rand(shape) < 0.5).float()
        x.view(-1, shape[-1])[: max(1, x.numel() // shape[-1] // 2), :] = 0
        x[..., : shape[-1] // 2] = 0
        return x.to(dtype)
    raise ValueError(kind)


def check(y, ref, dtype):
    assert y.shape == ref.shape, (tuple(y.shape), tuple(ref.shape))
    assert y.dtype == dtype
    assert torch.isfinite(y).all(), "NaN in the output of a finite input (unwritten element)"
    err = (y.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1.0)
    assert err < TOL[dtype], f"relative error {err:.2e}"


# (x shape, N): M = 1, odd K (not a multiple of 16/32), K < 16, K = 16 exactly, N = 1, 3-D and 4-D inputs
SHAPES = {
    "M1-K37-N19": ((1, 37), 19),
    "M70-K100-N40": ((70, 100), 40),
    "K5-N3": ((9, 5), 3),
    "K16-N16": ((17, 16), 16),
    "N1": ((13, 48), 1),
    "3d-T2-N3-K50": ((2, 3, 50), 33),
    "4d-T2-B3-L7-K40": ((2, 3, 7, 40), 24),
    "1d-K29": ((29,), 7),
}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kind", ["spikes", "counts012", "real-sparse", "block-sparse"])
@pytest.mark.parametrize("shape,N", list(SHAPES.values()), ids=list(SHAPES))
def test_linear_matches_f_linear(shape, N, kind, bias):
    K = shape[-1]
    x = make_input(kind, shape)
    w, b = torch.randn(N, K) / K**0.5, (torch.randn(N) if bias else None)
    check(sparse_linear(x, w, b), linear_reference(*as_float64(x, w, b)), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("kind", ["spikes", "ones", "real-sparse"])
def test_linear_dtypes(dtype, kind):
    x = make_input(kind, (3, 11, 70), dtype)
    w, b = (torch.randn(45, 70) / 70**0.5).to(dtype), torch.randn(45).to(dtype)
    check(sparse_linear(x, w, b), linear_reference(*as_float64(x, w, b)), dtype)


@pytest.mark.parametrize("cfg", [LinearConfig(16, 16, 16), LinearConfig(32, 64, 32), LinearConfig(64, 128, 64)],
                         ids=["m16n16k16", "m32n64k32", "m64n128k64"])
def test_linear_configs_and_dense(cfg):
    x = make_input("block-sparse", (77, 130))
    w, b = torch.randn(90, 130) / 130**0.5, torch.randn(90)
    ref = linear_reference(*as_float64(x, w, b))
    check(sparse_linear(x, w, b, config=cfg), ref, torch.float32)
    check(sparse_linear(x, w, b, config=cfg, dense=True), ref, torch.float32)


def test_all_zero_input_gives_bias_and_zeros():
    x = torch.zeros(5, 40)
    x[0, 0] = 1.0  # not only zeros: one active block elsewhere
    w, b = torch.randn(20, 40), torch.randn(20)
    y = sparse_linear(x, w, b)
    check(y, linear_reference(*as_float64(x, w, b)), torch.float32)
    assert torch.equal(sparse_linear(torch.zeros(3, 40), w, None), torch.zeros(3, 20))


def test_strided_inputs():
    base = make_input("counts012", (40, 30))
    x = base.t()  # [30, 40], feature stride 30
    w, b = torch.randn(12, 40), torch.randn(12)
    check(sparse_linear(x, w, b), linear_reference(*as_float64(x, w, b)), torch.float32)
    x = make_input("spikes", (6, 50))[:, ::2]  # every other feature
    w = torch.randn(9, 25)
    check(sparse_linear(x, w), linear_reference(*as_float64(x, w)), torch.float32)


def test_affine_epilogue():
    x = make_input("spikes", (21, 33))
    w, b = torch.randn(18, 33), torch.randn(18)
    scale, shift = torch.rand(18) + 0.5, torch.randn(18)
    ref = linear_reference(*as_float64(x, w, b, scale, shift))
    check(sparse_linear(x, w, b, scale=scale, shift=shift), ref, torch.float32)


def test_flags_match_torch_blocks_and_are_trusted():
    x = make_input("block-sparse", (70, 100))
    flags = linear_block_flags(x, 16, 32)
    nz = F.pad((x != 0).float(), (0, 128 - 100, 0, 80 - 70))
    want = nz.view(5, 16, 4, 32).amax(dim=(1, 3)).to(torch.int8)
    assert torch.equal(flags, want)
    assert 0 < flags.float().mean() < 1
    w = torch.randn(8, 100)
    cfg = LinearConfig(16, 16, 32)
    # the GEMM visits only flagged blocks: with every flag cleared the product is skipped entirely
    y = sparse_linear(x, w, config=cfg, flags=torch.zeros_like(flags))
    assert torch.equal(y, torch.zeros_like(y))
    check(sparse_linear(x, w, config=cfg, flags=flags), linear_reference(*as_float64(x, w)), torch.float32)


def test_flags_of_a_conv1d_input_are_the_flags_of_its_token_rows():
    x = make_input("block-sparse", (3, 40, 11))  # [B, K, L]: rows are the B * L tokens
    rows = x.transpose(1, 2).reshape(-1, 40).contiguous()
    assert torch.equal(linear_block_flags(x, 16, 16, layout="ncl"), linear_block_flags(rows, 16, 16))
    with pytest.raises(ValueError, match="layout='ncl' takes a \\[B, K, L\\] input"):
        linear_block_flags(rows, 16, 16, layout="ncl")
    with pytest.raises(ValueError, match="layout must be 'rows' or 'ncl'"):
        linear_block_flags(x, 16, 16, layout="nlc")


@pytest.mark.parametrize("special", ["nan", "inf", "-inf"])
def test_nan_inf_propagate_like_dense(special):
    x = make_input("spikes", (20, 70))
    x[3, 65] = float(special)
    w, b = torch.randn(10, 70), torch.randn(10)
    y, ref = sparse_linear(x, w, b), F.linear(x, w, b)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(torch.isinf(y), torch.isinf(ref))
    fin = torch.isfinite(ref)
    assert torch.allclose(y[fin], ref[fin], atol=1e-4)


def test_empty_rows():
    w = torch.randn(4, 8)
    assert sparse_linear(torch.zeros(0, 8), w).shape == (0, 4)


CONV_SHAPES = {"B3-C37-L29-CO20": (3, 37, 29, 20), "B1-C16-L1-CO5": (1, 16, 1, 5), "B2-C5-L70-CO33": (2, 5, 70, 33)}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("geo", list(CONV_SHAPES.values()), ids=list(CONV_SHAPES))
def test_conv1x1_matches_f_conv1d(geo, bias):
    B, C, L, CO = geo
    x = make_input("counts012", (B, C, L))
    w, b = torch.randn(CO, C, 1) / C**0.5, (torch.randn(CO) if bias else None)
    ref = conv1x1_reference(*as_float64(x, w, b))
    check(sparse_conv1x1(x, w, b), ref, torch.float32)
    check(sparse_conv1x1(x[0], w[:, :, 0], b), ref[0], torch.float32)  # unbatched, 2-D weight


def test_conv1x1_strided_and_fp16():
    x = make_input("spikes", (2, 40, 30)).transpose(1, 2).contiguous().transpose(1, 2)  # channels fastest
    w = torch.randn(24, 40, 1)
    ref = conv1x1_reference(*as_float64(x, w))
    check(sparse_conv1x1(x, w), ref, torch.float32)
    check(sparse_conv1x1(x.half(), w.half()), conv1x1_reference(*as_float64(x, w.half())), torch.float16)


def test_errors_name_the_problem():
    x, w = torch.ones(4, 10), torch.ones(5, 10)
    with pytest.raises(ValueError, match="in_features=9"):
        sparse_linear(x, torch.ones(5, 9))
    with pytest.raises(ValueError, match="weight must be 2-D"):
        sparse_linear(x, torch.ones(5, 10, 1))
    with pytest.raises(TypeError, match="dtype"):
        sparse_linear(x.half(), w)
    with pytest.raises(ValueError, match="bias must have shape"):
        sparse_linear(x, w, torch.ones(4))
    with pytest.raises(TypeError, match="supported are"):
        sparse_linear(x.double(), w.double())
    with pytest.raises(ValueError, match="kernel size must be 1"):
        sparse_conv1x1(torch.ones(1, 10, 3), torch.ones(5, 10, 3))
    with pytest.raises(ValueError, match=r"expected input \[B, 10, L\]"):
        sparse_conv1x1(torch.ones(1, 9, 3), torch.ones(5, 10, 1))
    with pytest.raises(ValueError, match="power of two"):
        LinearConfig(block_m=24)
    with pytest.raises(ValueError, match="packed_weight"):
        sparse_linear(x, w, packed_weight=torch.zeros(4, 4))
    with pytest.raises(ValueError, match="block flags"):
        sparse_linear(x, w, flags=torch.ones(3, 3, dtype=torch.int8))
