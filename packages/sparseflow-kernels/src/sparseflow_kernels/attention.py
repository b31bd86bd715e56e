"""Spiking self-attention kernels (no softmax): the products of Spikformer's SSA and the Spike-driven
Transformer's Hadamard attention, skipping blocks whose spikes are all zero.

* :func:`ssa_attention` - SpikingJelly ``SpikingSelfAttention``: per (sample, head), with ``q``, ``k``, ``v``
  of shape ``[D, L]`` (head channels x tokens), ``out = (v @ k^T) @ q * scale``. One program per (sample,
  head): pass 1 accumulates the ``[D, D]`` matrix ``v @ k^T`` over token blocks, skipping blocks where ``k`` or
  ``v`` is all zero; pass 2 writes ``kv @ q * scale`` per token block (zeros, without a product, where ``q``
  is all zero). Spikes are 0/1, so both products are exact integers in fp32: pass 2 runs in fp32
  (``tf32x3``, exact for integers below 2^21) whatever the input dtype.
* :func:`channel_dot` - ``SpikeDrivenSelfAttention``'s ``sum over tokens of k * v`` per (sample, channel), the
  input of its ``attn_lif``; the output ``q * attn`` is one broadcast multiply in the caller.
* :func:`qk_token_attention` - QKFormer's token Q-K attention (SpikingJelly ``QKAttention``, ``qka_type="token"``):
  per (step, sample, head, token) the sum of ``q`` over the head's channels, its ``attn_lif`` over the steps with
  the membrane in registers, and ``attn * k``, in one kernel that reads the ``qk`` spikes once.

NaN and Inf count as non-zero (never skipped), so they propagate as in the dense op; a zero block is skipped only
when the dense product with it is zero too (``0 * Inf = NaN``: a zero ``k`` block next to an Inf or NaN in ``v``,
or a zero ``q`` block when ``v @ k^T`` is not finite, is computed).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._epilogue_jit import _neuron_scalars, _neuron_step, pdl_enter
from ._utils import (
    cdiv,
    dot_precision,
    launch,
    next_pow2,
    require_dtype,
    require_int32_indexable,
    require_triton_device,
)
from .neuron import NeuronSpec
from .tiling import channel_dot_tile, qk_token_tile


def new_output(shape, dtype, device) -> torch.Tensor:
    """The output buffer of the kernels (one place, so that tests can poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _any_nonzero(x):
    return tl.max(tl.max((x != 0).to(tl.int32), axis=1), axis=0)


@triton.jit
def _any_nonfinite(x):
    return tl.max(tl.max(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), axis=1), axis=0)


@triton.jit
def _ssa_kernel(
    q_ptr, sqb, sqh, sqd, sql,
    k_ptr, skb, skh, skd, skl,
    v_ptr, svb, svh, svd, svl,
    y_ptr, syb, syh, syd, syl,
    H, D, L, scale,
    D_P2: tl.constexpr, BLOCK_L: tl.constexpr, SPARSE: tl.constexpr,
    PREC: tl.constexpr, PREC32: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_enter(PDL)
    pid = tl.program_id(0)
    h = pid % H
    b = pid // H
    d = tl.arange(0, D_P2)
    d_ok = d < D
    lo = tl.arange(0, BLOCK_L)
    qb = q_ptr + b * sqb + h * sqh
    kb = k_ptr + b * skb + h * skh
    vb = v_ptr + b * svb + h * svh
    yb = y_ptr + b * syb + h * syh
    kv = tl.zeros([D_P2, D_P2], dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        ll = l0 + lo
        m = d_ok[:, None] & (ll < L)[None, :]
        vt = tl.load(vb + d[:, None] * svd + ll[None, :] * svl, mask=m, other=0.0)  # [D, BL]
        kt = tl.load(kb + ll[:, None] * skl + d[None, :] * skd,
                     mask=(ll < L)[:, None] & d_ok[None, :], other=0.0)  # [BL, D]
        if SPARSE:
            # skipped only where the dense product is exactly zero: v all zero and k finite, or the reverse
            hit = ((_any_nonzero(vt) | _any_nonfinite(kt))
                   & (_any_nonzero(kt) | _any_nonfinite(vt)))
            if hit != 0:
                kv = tl.dot(vt, kt, kv, input_precision=PREC)
        else:
            kv = tl.dot(vt, kt, kv, input_precision=PREC)
    # the padding rows / columns (d >= D) are 0 * v or k * 0: NaN next to an Inf, which pass 2 would spread
    kv = tl.where(d_ok[:, None] & d_ok[None, :], kv, 0.0)
    kv_bad = _any_nonfinite(kv)  # a zero q block then gives NaN (0 * Inf) in the dense op: not skipped
    for l0 in range(0, L, BLOCK_L):
        ll = l0 + lo
        m = d_ok[:, None] & (ll < L)[None, :]
        qt = tl.load(qb + d[:, None] * sqd + ll[None, :] * sql, mask=m, other=0.0)  # [D, BL]
        out = tl.zeros([D_P2, BLOCK_L], dtype=tl.float32)
        if SPARSE:
            if (_any_nonzero(qt) | kv_bad) != 0:
                out = tl.dot(kv, qt.to(tl.float32), out, input_precision=PREC32)
        else:
            out = tl.dot(kv, qt.to(tl.float32), out, input_precision=PREC32)
        out = out * scale
        tl.store(yb + d[:, None] * syd + ll[None, :] * syl, out.to(y_ptr.dtype.element_ty), mask=m)


def _as_bhdl(t: torch.Tensor) -> torch.Tensor:
    """``[..., H, D, L]`` -> ``[B, H, D, L]`` (a view when the leading dims merge, else a copy)."""
    if t.dim() == 3:
        return t.unsqueeze(0)
    return t.reshape(-1, *t.shape[-3:])


def ssa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    block_l: int = 32,
    fp32_precision: str = "tf32x3",
    dense: bool = False,
) -> torch.Tensor:
    """Spikformer's spiking self-attention ``(v @ k^T) @ q * scale`` over ``[..., H, D, L]`` tensors
    (``D`` = head channels, ``L`` = tokens; any strides, e.g. the q/k/v slices of one qkv tensor), as
    SpikingJelly's ``SpikingSelfAttention._ssa_kernel_torch``. Returns ``[..., H, D, L]`` contiguous (or
    fills ``out``). Skips token blocks where the spikes are all zero (``dense=True``: never)."""
    op = "ssa_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        require_dtype(op, name, t)
        if t.dim() < 3:
            raise ValueError(f"{op}: {name} must be [..., H, D, L], got shape {tuple(t.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"{op}: q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if block_l < 16 or block_l & (block_l - 1):
        raise ValueError(f"{op}: block_l must be a power of two >= 16, got {block_l}")
    require_triton_device(op, q, k, v, out)
    shape = q.shape
    if out is None:
        out = new_output(shape, q.dtype, q.device)
    elif tuple(out.shape) != tuple(shape) or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"{op}: out must be a contiguous {tuple(shape)} {q.dtype} tensor, got "
                         f"{tuple(out.shape)} {out.dtype}")
    H, D, L = shape[-3:]
    q4, k4, v4 = _as_bhdl(q), _as_bhdl(k), _as_bhdl(v)
    y4 = out.view(-1, H, D, L)
    require_int32_indexable(op, q4, k4, v4, y4)
    B = q4.shape[0]
    if B * H == 0 or D == 0 or L == 0:
        return out.zero_() if out.numel() else out
    prec = dot_precision(q.dtype, fp32_precision)
    prec32 = dot_precision(torch.float32, "tf32x3" if fp32_precision == "tf32" else fp32_precision)
    d_p2 = max(16, next_pow2(D))
    launch(_ssa_kernel)[(B * H,)](
        q4, *q4.stride(), k4, *k4.stride(), v4, *v4.stride(), y4, *y4.stride(),
        H, D, L, float(scale),
        D_P2=d_p2, BLOCK_L=block_l, SPARSE=not dense, PREC=prec, PREC32=prec32,
        num_warps=4 if d_p2 <= 64 else 8,
    )
    return out


@triton.jit
def _channel_dot_kernel(
    a_ptr, sab, sac, sal, b_ptr, sbb, sbc, sbl, y_ptr, syb, syc,
    C, L, NUM_CB,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_enter(PDL)
    pid = tl.program_id(0)
    cb = pid % NUM_CB
    bi = pid // NUM_CB
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    lo = tl.arange(0, BLOCK_L)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        ll = l0 + lo
        m = c_ok[:, None] & (ll < L)[None, :]
        a = tl.load(a_ptr + bi * sab + c[:, None] * sac + ll[None, :] * sal, mask=m, other=0.0)
        bb = tl.load(b_ptr + bi * sbb + c[:, None] * sbc + ll[None, :] * sbl, mask=m, other=0.0)
        acc += tl.sum(a.to(tl.float32) * bb.to(tl.float32), axis=1)
    tl.store(y_ptr + bi * syb + c * syc, acc.to(y_ptr.dtype.element_ty), mask=c_ok)


def channel_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b)`` summed over all dims after the second: ``[B, C, ...]`` -> ``[B, C]`` in ``a``'s dtype,
    accumulated in fp32 (exact for spike counts below 2^24). The Spike-driven Transformer's
    ``(k * v).sum(tokens)`` per (sample, channel), read straight from the ``[T*N, C, H, W]`` maps."""
    op = "channel_dot"
    require_dtype(op, "a", a)
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"{op}: a and b must match, got {tuple(a.shape)} {a.dtype} and {tuple(b.shape)} {b.dtype}")
    if a.dim() < 2:
        raise ValueError(f"{op}: expected [B, C, ...], got {tuple(a.shape)}")
    require_triton_device(op, a, b)
    B, C = a.shape[:2]
    a3, b3 = a.reshape(B, C, -1), b.reshape(B, C, -1)
    require_int32_indexable(op, a3, b3)
    L = a3.shape[2]
    y = new_output((B, C), a.dtype, a.device)
    if y.numel() == 0:
        return y
    block_c, block_l = channel_dot_tile(C, L, a3.stride(1) == 1)
    num_cb = cdiv(C, block_c)
    launch(_channel_dot_kernel)[(B * num_cb,)](
        a3, *a3.stride(), b3, *b3.stride(), y, *y.stride(), C, L, num_cb,
        BLOCK_C=block_c, BLOCK_L=block_l, num_warps=4,
    )
    return y


@triton.jit
def _qk_token_kernel(
    qk_ptr, sqt, sqn, sqc, sql,
    y_ptr, syt, syn, syc, syl,
    v_ptr, svn, svh, svl,
    vo_ptr, son, soh, sol,
    T, C, L, D,
    leak, v_th, v_reset, v_init,
    NEURON: tl.constexpr, HARD_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr,
    HAS_V: tl.constexpr, STORE_V: tl.constexpr, D_P2: tl.constexpr, BLOCK_L: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """A program owns ``[D_P2 head channels, BLOCK_L tokens]`` of one (sample, head) and loops over the steps: the
    sum of ``q`` over the head's channels (fp32, rounded to the input's dtype as the dense sum), the neuron step on
    it, and ``spike * k`` stored."""
    pdl_enter(PDL)
    leak, v_th, v_reset, v_init = _neuron_scalars(leak, v_th, v_reset, v_init)
    n = tl.program_id(2).to(tl.int64)
    h = tl.program_id(1)
    tok = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    d = tl.arange(0, D_P2)
    tok_ok = tok < L
    ok = (d < D)[:, None] & tok_ok[None, :]
    ch = h * D + d
    qo = n * sqn + ch[:, None] * sqc + tok[None, :] * sql
    ko = qo + C * sqc
    yo = n * syn + ch[:, None] * syc + tok[None, :] * syl
    if HAS_V:
        v = tl.load(v_ptr + n * svn + h * svh + tok * svl, mask=tok_ok, other=0.0).to(tl.float32)
    else:
        v = tl.full([BLOCK_L], v_init, dtype=tl.float32)
    for t in range(T):
        q = tl.load(qk_ptr + t * sqt + qo, mask=ok, other=0.0)
        z = tl.sum(q.to(tl.float32), axis=0).to(q.dtype).to(tl.float32)
        spike, v = _neuron_step(z, v, leak, v_th, v_reset, NEURON, HARD_RESET, DECAY_INPUT)
        k = tl.load(qk_ptr + t * sqt + ko, mask=ok, other=0.0)
        y = spike.to(k.dtype)[None, :] * k
        tl.store(y_ptr + t * syt + yo, y.to(y_ptr.dtype.element_ty), mask=ok)
    if STORE_V:
        tl.store(vo_ptr + n * son + h * soh + tok * sol, v.to(vo_ptr.dtype.element_ty), mask=tok_ok)


def qk_token_attention(
    qk: torch.Tensor,
    num_heads: int,
    neuron: NeuronSpec | str = "lif",
    *,
    v: torch.Tensor | None = None,
    return_v: bool = False,
    v_dtype: torch.dtype | None = None,
    **neuron_kwargs,
):
    """QKFormer's token attention over ``qk`` ``[T, N, 2C, L]`` (``q``: channels ``[0, C)``, ``k``: ``[C, 2C)``,
    ``C / num_heads`` channels a head): ``attn = neuron(q summed over each head's channels)`` over the steps, and
    ``attn * k`` returned ``[T, N, C, L]`` in ``qk``'s dtype and channel order (channels innermost per token when
    ``qk``'s are). ``v``: the neuron's initial membrane ``[N, num_heads, 1, L]`` (None: its initial value);
    ``return_v``: also the final one, in ``v_dtype`` (``qk``'s by default).

    The sum is accumulated in fp32 and rounded to ``qk``'s dtype, the neuron runs on that in fp32 (the multi-step
    neuron kernel's arithmetic, :func:`~sparseflow_kernels.multistep_neuron`), so for spikes (head sums exact in
    fp32) the result is the dense ``attn_lif(q.sum(...)) * k`` with the neuron on that kernel, bit for bit."""
    op = "qk_token_attention"
    spec = NeuronSpec.make(neuron, **neuron_kwargs)
    require_dtype(op, "qk", qk)
    if qk.dim() != 4:
        raise ValueError(f"{op}: expected qk of shape [T, N, 2C, L], got {tuple(qk.shape)}")
    T, N, C2, L = qk.shape
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"{op}: num_heads must be a positive int, got {num_heads!r}")
    if C2 % (2 * num_heads):
        raise ValueError(f"{op}: qk's {C2} channels are not 2 x num_heads ({num_heads}) x head channels")
    C, D = C2 // 2, C2 // (2 * num_heads)
    if v is not None and tuple(v.shape) != (N, num_heads, 1, L):
        raise ValueError(f"{op}: v must have shape {(N, num_heads, 1, L)}, got {tuple(v.shape)}")
    v_dtype = v_dtype or qk.dtype
    if v_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{op}: v_dtype must be float32, float16 or bfloat16, got {v_dtype}")
    require_triton_device(op, qk, v)
    require_int32_indexable(op, qk)
    if qk.stride(2) == 1 and qk.stride(3) == C2:  # channels innermost per token: the fused projection's output
        y = new_output((T, N, L, C), qk.dtype, qk.device).permute(0, 1, 3, 2)
    else:
        y = new_output((T, N, C, L), qk.dtype, qk.device)
    v_out = new_output((N, num_heads, 1, L), v_dtype, qk.device) if return_v else None
    if y.numel():
        d_p2, block_l = qk_token_tile(D, L)
        v0 = v if v is not None else y[0, :, :num_heads, :1]
        vo = v_out if v_out is not None else y[0, :, :num_heads, :1]
        ka = spec.kernel_args()
        launch(_qk_token_kernel)[(cdiv(L, block_l), num_heads, N)](
            qk, *qk.stride(), y, *y.stride(), v0, v0.stride(0), v0.stride(1), v0.stride(-1),
            vo, vo.stride(0), vo.stride(1), vo.stride(-1), T, C, L, D,
            ka["leak"], ka["v_threshold"], ka["v_reset"], ka["v_init"],
            NEURON=ka["neuron"], HARD_RESET=ka["hard_reset"], DECAY_INPUT=ka["decay_input"],
            HAS_V=v is not None, STORE_V=return_v, D_P2=d_p2, BLOCK_L=block_l, num_warps=4,
        )
    elif v_out is not None:  # (no step: the membrane is the initial one)
        v_out.copy_(v if v is not None else torch.full_like(v_out, spec.v_init))
    return (y, v_out) if return_v else y
