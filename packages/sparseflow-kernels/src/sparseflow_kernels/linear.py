"""``sparse_linear``: ``F.linear`` semantics (any leading shape), computing only over non-zero K blocks.

Two kernels:

* prescan (:func:`linear_block_flags`): for every tile of ``BLOCK_M`` rows and every block of ``BLOCK_K``
  input features, one int8 flag: 1 when any element of the block is non-zero (NaN and Inf count as
  non-zero, so they reach the GEMM and propagate as in the dense op).
* GEMM: one program per (row tile, ``BLOCK_N`` output features). It reads its tile's flags, lists the
  active K blocks in registers (``conv._compact``) and runs ``tl.dot`` over those only, accumulating in
  fp32; the epilogue stores ``acc * scale + shift`` (bias, or an eval-mode BatchNorm folded in).

Rows are addressed as ``(r // L) * s_b + (r % L) * s_l`` with features at stride ``s_k``, so one kernel
serves ``[M, K]`` matrices (``L = M``) and ``Conv1d(kernel_size=1)`` projections over ``[B, C, L]``
(rows = (b, l), features = channels) without a transpose copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._epilogue_jit import pdl_enter
from ._occupancy_jit import _visit_group, _visit_list
from ._utils import (
    cdiv,
    dot_precision,
    launch,
    next_pow2,
    require_bias,
    require_dtype,
    require_int32_indexable,
    require_triton_device,
)
from .sparse_conv import fold_affine
from .tiling import MAX_K_BLOCKS, LinearConfig, default_linear_config

__all__ = ["MAX_K_BLOCKS", "LinearConfig", "default_linear_config", "linear_block_flags", "sparse_conv1x1",
           "sparse_linear"]

@triton.jit
def _linear_prescan_kernel(
    x_ptr, flags_ptr, M, K, L, sxb, sxl, sxk, NKB,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, KB_PER_PROG: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_enter(PDL)
    mt = tl.program_id(0)
    kg = tl.program_id(1)
    r = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    roff = (r // L) * sxb + (r % L) * sxl
    BK: tl.constexpr = BLOCK_K * KB_PER_PROG
    k = kg * BK + tl.arange(0, BK)
    x = tl.load(x_ptr + roff[:, None] + k[None, :] * sxk, mask=(r < M)[:, None] & (k < K)[None, :], other=0.0)
    nz = tl.max((x != 0).to(tl.int32), axis=0)  # [BK]
    f = tl.max(tl.reshape(nz, [KB_PER_PROG, BLOCK_K]), axis=1)
    kb = kg * KB_PER_PROG + tl.arange(0, KB_PER_PROG)
    tl.store(flags_ptr + mt * NKB + kb, f.to(tl.int8), mask=kb < NKB)


@triton.jit
def _linear_kernel(
    x_ptr, sxb, sxl, sxk,
    w_ptr, N_PAD,
    y_ptr, syb, syl, syn,
    flags_ptr, scale_ptr, shift_ptr,
    M, K, N, L, NKB, NUM_N,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NKB_P2: tl.constexpr,
    SPARSE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, PREC: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_enter(PDL)
    pid = tl.program_id(0)
    nt = pid % NUM_N
    mt = pid // NUM_N
    r = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = r < M
    xrow = x_ptr + ((r // L) * sxb + (r % L) * sxl)
    n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    ck = tl.arange(0, BLOCK_K)
    slots = tl.arange(0, NKB_P2)
    f = tl.zeros([NKB_P2], dtype=tl.int32)
    if SPARSE:
        f = tl.load(flags_ptr + mt * NKB + slots, mask=slots < NKB, other=0).to(tl.int32)
    idx, n_blocks = _visit_list(f, NKB, SPARSE, NKB_P2)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i in range(n_blocks):
        kk = _visit_group(i, idx, SPARSE, NKB_P2) * BLOCK_K + ck
        a = tl.load(xrow[:, None] + kk[None, :] * sxk, mask=r_ok[:, None] & (kk < K)[None, :], other=0.0)
        wt = tl.load(w_ptr + kk[:, None] * N_PAD + n[None, :])
        acc = tl.dot(a.to(wt.dtype), wt, acc, input_precision=PREC)
    n_ok = n < N
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + n, mask=n_ok, other=1.0)[None, :]
    if HAS_SHIFT:
        acc = acc + tl.load(shift_ptr + n, mask=n_ok, other=0.0)[None, :]
    yp = y_ptr + ((r // L) * syb + (r % L) * syl)[:, None] + n[None, :] * syn
    tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=r_ok[:, None] & n_ok[None, :])


def pack_linear_weight(weight: torch.Tensor, block_k: int, block_n: int, dtype: torch.dtype) -> torch.Tensor:
    """``[N, K]`` (or a ``[N, K, 1]`` Conv1d weight) -> ``[K_PAD, N_PAD]`` in ``dtype``, zero-padded so the
    kernel loads ``[BLOCK_K, BLOCK_N]`` tiles without masks."""
    w = weight.detach()
    if w.dim() == 3:
        w = w[:, :, 0]
    N, K = w.shape
    k_pad = cdiv(K, block_k) * block_k
    n_pad = cdiv(N, block_n) * block_n
    packed = torch.zeros((k_pad, n_pad), dtype=dtype, device=w.device)
    packed[:K, :N] = w.t().to(dtype)
    return packed


def new_output(shape, dtype, device) -> torch.Tensor:
    """The output buffer of the GEMMs (one place, so that tests can poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _rows_view(x: torch.Tensor, layout: str):
    """(M, K, L, s_b, s_l, s_k) of ``x`` read as GEMM rows: ``"rows"`` = [M, K], ``"ncl"`` = [B, C, L]."""
    if layout == "rows":
        M, K = x.shape
        return M, K, max(M, 1), 0, x.stride(0), x.stride(1)
    B, C, L = x.shape
    return B * L, C, max(L, 1), x.stride(0), x.stride(2), x.stride(1)


def _block_flags(x, layout, block_m, block_k):
    M, K, L, sb, sl, sk = _rows_view(x, layout)
    mt, nkb = cdiv(M, block_m), cdiv(K, block_k)
    flags = new_output((mt, nkb), torch.int8, x.device)
    if flags.numel():
        kpp = max(1, min(next_pow2(nkb), 64 // block_k))  # a [block_m, 64] tile per program
        grid = (mt, cdiv(nkb, kpp))
        launch(_linear_prescan_kernel)[grid](x, flags, M, K, L, sb, sl, sk, nkb,
                                     BLOCK_M=block_m, BLOCK_K=block_k, KB_PER_PROG=kpp, num_warps=4)
    return flags


def linear_block_flags(x: torch.Tensor, block_m: int = 64, block_k: int = 32, layout: str = "rows") -> torch.Tensor:
    """int8 ``[ceil(M / block_m), ceil(K / block_k)]``: 1 where a (row tile, K block) of the GEMM's ``[M, K]`` input
    holds a non-zero. Its mean is the block density the GEMM sees. ``layout="rows"``: ``x`` viewed as ``[M, K]`` (all
    leading dims flattened), as the linear kernel reads it; ``"ncl"``: ``x`` is a Conv1d input ``[B, K, L]``, rows
    ``M = B * L``, as the 1x1 convolution reads it."""
    op = "linear_block_flags"
    require_dtype(op, "x", x)
    require_triton_device(op, x)
    if layout == "rows":
        x = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    elif layout == "ncl":
        if x.dim() != 3:
            raise ValueError(f"{op}: layout='ncl' takes a [B, K, L] input, got shape {tuple(x.shape)}")
    else:
        raise ValueError(f"{op}: layout must be 'rows' or 'ncl', got {layout!r}")
    require_int32_indexable(op, x)
    return _block_flags(x, layout, block_m, block_k)


def _check_common(op, x, weight, bias, K, N):
    require_dtype(op, "input", x)
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: input dtype {x.dtype} and weight dtype {weight.dtype} differ")
    require_bias(op, bias, N, x.dtype)


def _fold(bias, scale, shift, N, op):
    for name, p in (("scale", scale), ("shift", shift)):
        if p is not None and (p.dim() != 1 or p.shape[0] != N):
            raise ValueError(f"{op}: {name} must have shape [{N}], got {tuple(p.shape)}")
    return fold_affine(bias, scale, shift)


def _launch(op, x, layout, weight, bias, out, N, *, config, packed_weight, scale, shift, fp32_precision,
            dense, flags):
    M, K, L, sxb, sxl, sxk = _rows_view(x, layout)
    cfg = config or default_linear_config(K, N)
    nkb = cdiv(K, cfg.block_k)
    if nkb > MAX_K_BLOCKS:
        raise ValueError(f"{op}: {K} features make more than {MAX_K_BLOCKS} blocks of {cfg.block_k}")
    if out.dim() == 2:
        syb, syl, syn = 0, out.stride(0), out.stride(1)
    else:
        syb, syl, syn = out.stride(0), out.stride(2), out.stride(1)
    if M == 0 or N == 0:
        return out
    w = packed_weight
    if w is None:
        w = pack_linear_weight(weight, cfg.block_k, cfg.block_n, x.dtype)
    elif (w.shape[0] < nkb * cfg.block_k or w.shape[1] < cdiv(N, cfg.block_n) * cfg.block_n
          or w.dtype != x.dtype or not w.is_contiguous()):
        raise ValueError(f"{op}: packed_weight {tuple(w.shape)} {w.dtype} does not fit {cfg} and dtype {x.dtype}")
    sc, sh = _fold(bias, scale, shift, N, op)
    sparse = not dense
    if sparse:
        if flags is None:
            flags = _block_flags(x, layout, cfg.block_m, cfg.block_k)
        elif tuple(flags.shape) != (cdiv(M, cfg.block_m), nkb):
            raise ValueError(f"{op}: block flags of shape {tuple(flags.shape)} do not match {cfg} for M={M}, K={K}")
    num_n = cdiv(N, cfg.block_n)
    grid = (cdiv(M, cfg.block_m) * num_n,)
    stage_bytes = (cfg.block_m * cfg.block_k + cfg.block_k * cfg.block_n) * x.element_size()
    num_stages = max(1, min(cfg.num_stages, (160 * 1024) // max(1, stage_bytes)))
    launch(_linear_kernel)[grid](
        x, sxb, sxl, sxk, w, w.shape[1], out, syb, syl, syn,
        flags if sparse else out, sc if sc is not None else out, sh if sh is not None else out,
        M, K, N, L, nkb, num_n,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, NKB_P2=next_pow2(nkb),
        SPARSE=sparse, HAS_SCALE=sc is not None, HAS_SHIFT=sh is not None,
        PREC=dot_precision(x.dtype, fp32_precision), num_warps=cfg.num_warps, num_stages=num_stages,
    )
    return out


def sparse_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, config: LinearConfig | None = None,
    packed_weight: torch.Tensor | None = None, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
    flags: torch.Tensor | None = None, fp32_precision: str = "tf32x3", dense: bool = False,
) -> torch.Tensor:
    """``torch.nn.functional.linear(x, weight, bias)`` that skips all-zero blocks of ``x``.

    ``x`` ``[..., K]`` (any leading shape, any strides), ``weight`` ``[N, K]``, ``bias`` ``[N]``; returns
    ``[..., N]`` in ``x``'s dtype. A prescan marks which (``block_m`` rows, ``block_k`` features) blocks of
    ``x`` hold non-zeros (``flags`` from :func:`linear_block_flags` replaces it); the GEMM then visits only
    those. The result is the dense op's for any input: zeros only save work. Accumulation is fp32;
    fp32 inputs use ``fp32_precision`` (``"tf32x3"``: fp32 accuracy on tensor cores; ``"ieee"``;
    ``"tf32"``). ``scale``/``shift`` (``[N]``) give ``(x @ W^T + bias) * scale + shift`` (a folded
    BatchNorm1d). ``dense=True`` runs the same GEMM over every block (no prescan).
    """
    op = "sparse_linear"
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D [out_features, in_features], got {tuple(weight.shape)}")
    N, K = weight.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"{op}: input of shape {tuple(x.shape)} does not end in in_features={K}")
    _check_common(op, x, weight, bias, K, N)
    require_triton_device(op, x, weight, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    require_int32_indexable(op, x2)
    out = new_output((x2.shape[0], N), x.dtype, x.device)
    _launch(op, x2, "rows", weight, bias, out, N, config=config, packed_weight=packed_weight, scale=scale,
            shift=shift, fp32_precision=fp32_precision, dense=dense, flags=flags)
    return out.view(*lead, N)


def sparse_conv1x1(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
    config: LinearConfig | None = None, packed_weight: torch.Tensor | None = None,
    scale: torch.Tensor | None = None, shift: torch.Tensor | None = None, flags: torch.Tensor | None = None,
    fp32_precision: str = "tf32x3", dense: bool = False,
) -> torch.Tensor:
    """``F.conv1d(x, weight, bias)`` for a kernel of size 1 (stride 1, no padding, groups 1): the same
    sparse GEMM as :func:`sparse_linear` reading ``x`` ``[B, C, L]`` (or ``[C, L]``) in place, rows = (b, l).
    ``weight`` ``[C_out, C]`` or ``[C_out, C, 1]``. Returns ``[B, C_out, L]`` (contiguous)."""
    op = "sparse_conv1x1"
    if weight.dim() == 3:
        if weight.shape[2] != 1:
            raise ValueError(f"{op}: kernel size must be 1, got weight {tuple(weight.shape)}")
        weight = weight[:, :, 0]
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be [C_out, C_in] or [C_out, C_in, 1], got {tuple(weight.shape)}")
    N, K = weight.shape
    unbatched = x.dim() == 2
    if unbatched:
        x = x.unsqueeze(0)
    if x.dim() != 3 or x.shape[1] != K:
        raise ValueError(f"{op}: expected input [B, {K}, L] (or [{K}, L]), got {tuple(x.shape)}")
    _check_common(op, x, weight, bias, K, N)
    require_triton_device(op, x, weight, bias)
    require_int32_indexable(op, x)
    out = new_output((x.shape[0], N, x.shape[2]), x.dtype, x.device)
    require_int32_indexable(op, out)
    _launch(op, x, "ncl", weight, bias, out, N, config=config, packed_weight=packed_weight, scale=scale,
            shift=shift, fp32_precision=fp32_precision, dense=dense, flags=flags)
    return out.squeeze(0) if unbatched else out
