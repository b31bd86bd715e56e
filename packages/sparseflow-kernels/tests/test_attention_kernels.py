"""ssa_attention (Spikformer's ``(v @ k^T) @ q * scale``) and channel_dot (the Spike-driven Transformer's
``sum over tokens of k * v``) against float64 torch: head sizes below, at and above 16/32, token counts not
a multiple of the block, strided q/k/v slices of one qkv tensor, input kinds, dtypes, the ``out`` buffer,
zero-block skipping, NaN/Inf and errors. Runs under TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch

from sparseflow_kernels import attention as kattn
from sparseflow_kernels import channel_dot, ssa_attention
from sparseflow_kernels.naive import channel_dot_reference, ssa_reference

TOL = {torch.float32: 1e-6, torch.float16: 1e-3}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    real = kattn.new_output
    monkeypatch.setattr(kattn, "new_output", lambda *a: real(*a).fill_(float("nan")))


def make(kind, shape, dtype=torch.float32):
    if kind == "spikes":
        return (torch.rand(shape) < 0.25).to(dtype)
    if kind == "counts012":
        return (torch.randint(0, 3, shape) * (torch.rand(shape) < 0.3)).to(dtype)
    if kind == "real":
        return torch.randn(shape).to(dtype)
    if kind == "ones":
        return torch.ones(shape, dtype=dtype)
    if kind == "token-blocks-silent":  # whole token blocks zero (skipped), others spikes
        x = (torch.rand(shape) < 0.4).to(dtype)
        x[..., 8:40] = 0
        return x
    raise ValueError(kind)


def qkv_views(T, N, H, D, L, kind, dtype=torch.float32):
    """q, k, v as SpikingJelly slices them out of one [T, N, 3*H*D, L] tensor (strided views)."""
    qkv = make(kind, (T, N, 3 * H * D, L), dtype).reshape(T, N, 3, H, D, L)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def check(y, ref, dtype):
    assert y.shape == ref.shape and y.dtype == dtype
    assert torch.isfinite(y).all(), "NaN in the output (unwritten element)"
    err = (y.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1.0)
    assert err < TOL[dtype], f"relative error {err:.2e}"


GEOS = {  # (T, N, H, D, L)
    "D20-L37": (2, 2, 3, 20, 37),
    "D32-L64": (1, 2, 2, 32, 64),
    "D1-L1": (1, 1, 2, 1, 1),
    "D33-L17": (1, 1, 1, 33, 17),
    "D16-L70": (2, 1, 1, 16, 70),
}


@pytest.mark.parametrize("kind", ["spikes", "counts012", "token-blocks-silent"])
@pytest.mark.parametrize("geo", list(GEOS.values()), ids=list(GEOS))
def test_ssa_matches_reference(geo, kind):
    q, k, v = qkv_views(*geo, kind)
    ref = ssa_reference(q.double(), k.double(), v.double(), 0.125)
    y = ssa_attention(q, k, v, 0.125)
    check(y, ref, torch.float32)
    assert torch.equal(y.double(), ref)  # integer sums times a power of two: exact
    check(ssa_attention(q, k, v, 0.125, dense=True), ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("kind", ["spikes", "ones", "real"])
def test_ssa_dtypes_and_kinds(dtype, kind):
    q, k, v = (make(kind, (2, 3, 24, 29), dtype) for _ in range(3))
    ref = ssa_reference(q.double(), k.double(), v.double(), 0.25)  # fp16 products are exact in fp32
    check(ssa_attention(q, k, v, 0.25), ref, dtype)


def test_ssa_out_buffer_and_block_size():
    q, k, v = (make("spikes", (2, 2, 20, 45)) for _ in range(3))
    out = torch.full((2, 2, 20, 45), float("nan"))
    y = ssa_attention(q, k, v, 0.5, out=out, block_l=16)
    assert y is out
    check(out, ssa_reference(q.double(), k.double(), v.double(), 0.5), torch.float32)


def test_ssa_zero_inputs_and_skipping():
    q = make("spikes", (1, 2, 16, 40))
    k, v = torch.zeros_like(q), make("spikes", (1, 2, 16, 40))
    assert torch.equal(ssa_attention(q, k, v, 0.125), torch.zeros_like(q))
    # q silent in a token block: those outputs are zero, the others exact
    k = make("spikes", (1, 2, 16, 40))
    q[..., :32] = 0
    y = ssa_attention(q, k, v, 0.125)
    assert torch.equal(y.double(), ssa_reference(q.double(), k.double(), v.double(), 0.125))


@pytest.mark.parametrize("where", ["q", "k"])
def test_ssa_nan_propagates_like_dense(where):
    q, k, v = (make("spikes", (1, 1, 16, 40)) for _ in range(3))
    (q if where == "q" else k)[0, 0, 3, 35] = float("nan")
    y = ssa_attention(q, k, v, 0.125)
    ref = ssa_reference(q, k, v, 0.125)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.isnan(ref).any()
    fin = ~torch.isnan(ref)
    assert torch.equal(y[fin], ref[fin])


def test_ssa_errors():
    q = torch.ones(2, 4, 8)
    with pytest.raises(ValueError, match="shapes differ"):
        ssa_attention(q, q, torch.ones(2, 4, 9), 0.1)
    with pytest.raises(TypeError, match="dtypes differ"):
        ssa_attention(q, q, q.half(), 0.1)
    with pytest.raises(ValueError, match=r"\[..., H, D, L\]"):
        ssa_attention(torch.ones(4, 8), torch.ones(4, 8), torch.ones(4, 8), 0.1)
    with pytest.raises(ValueError, match="block_l"):
        ssa_attention(q, q, q, 0.1, block_l=24)
    with pytest.raises(ValueError, match="out must be"):
        ssa_attention(q, q, q, 0.1, out=torch.empty(2, 4, 9))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(6, 40, 7, 9), (1, 3, 1, 1), (4, 70, 200)], ids=["5x7x9maps", "1px", "L200"])
def test_channel_dot(shape, dtype):
    a, b = make("spikes", shape, dtype), make("counts012", shape, dtype)
    ref = channel_dot_reference(a.double(), b.double())
    y = channel_dot(a, b)
    assert torch.equal(y.double(), ref)
    assert y.dtype == dtype


def test_channel_dot_strided_nan_and_errors():
    a = make("spikes", (3, 8, 5, 6)).permute(0, 1, 3, 2)
    b = make("spikes", (3, 8, 6, 5))
    assert torch.equal(channel_dot(a, b), (a * b).flatten(2).sum(-1))
    a = a.clone()
    a[1, 2, 0, 0] = float("nan")
    y = channel_dot(a, b)
    assert torch.isnan(y[1, 2]) and torch.isnan(y).sum() == 1
    with pytest.raises(ValueError, match="must match"):
        channel_dot(a, b[:, :4])
    with pytest.raises(ValueError, match=r"\[B, C, ...\]"):
        channel_dot(torch.ones(4), torch.ones(4))
