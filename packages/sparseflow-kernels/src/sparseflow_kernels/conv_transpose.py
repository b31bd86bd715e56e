"""``sparse_conv_transpose2d``: ``F.conv_transpose2d`` semantics (groups 1, dilation 1) over non-zero blocks.

Gather formulation, one output *phase* at a time. With stride ``S`` the outputs ``oh = ph + S * i`` of one
phase ``ph`` (``0 <= ph < S``) receive only the taps ``kh = (ph + P) mod S + t * S`` (``t < ceil(KH / S)``),
from input rows ``ih = i + (ph + P - kh0) / S - t``: a stride-1 convolution of the input with a
``ceil(KH/S) x ceil(KW/S)`` sub-kernel (taps reversed). Each program computes one tile of one phase for
``BLOCK_N`` output channels as an implicit GEMM on tensor cores (``tl.dot``, fp32 accumulation), with the
prologue of :mod:`~.conv`: the channel groups that are non-zero in the input rows and columns the tile reads
(edge-exact halo, from the input's :class:`~.occupancy.Occupancy`), the rest are never loaded. No atomics,
no scatter: every output element is written once, so the result is deterministic. Taps that fall past the
kernel (``KH`` not a multiple of ``S``) are masked on the input side, so an Inf in ``x`` reaches exactly the
outputs it reaches in the dense op.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._epilogue_jit import _channel_affine, pdl_enter
from ._occupancy_jit import _active_groups, _visit_group, _visit_list
from ._utils import (
    cdiv,
    dot_precision,
    launch,
    next_power_of_2,
    pair,
    require_bias,
    require_dtype,
    require_int32_indexable,
    require_triton_device,
)
from .occupancy import Occupancy, input_occupancy
from .sparse_conv import empty_like_layout, fold_affine
from .tiling import ConvConfig, default_config, require_conv_groups_fit


def conv_transpose_output_size(size, k, s, p, op, d=1):
    return (size - 1) * s - 2 * p + d * (k - 1) + op + 1


def pack_transpose_weight(weight: torch.Tensor, stride, padding, block_k: int, block_n: int, dtype) -> torch.Tensor:
    """``[C, CO, KH, KW]`` -> ``[SH*SW, KTH*KTW, C_PAD, CO_PAD]``: per output phase, its sub-kernel's taps
    (``t``-th tap of phase ``ph`` is ``kh = (ph + pad) % S + t * S``; taps past the kernel are zero)."""
    C, CO, KH, KW = weight.shape
    SH, SW = stride
    kth, ktw = cdiv(KH, SH), cdiv(KW, SW)
    c_pad = cdiv(C, block_k) * block_k
    co_pad = cdiv(CO, block_n) * block_n
    packed = torch.zeros((SH * SW, kth * ktw, c_pad, co_pad), dtype=dtype, device=weight.device)
    w = weight.detach().to(dtype)
    for ph in range(SH):
        for pw in range(SW):
            f_h, f_w = (ph + padding[0]) % SH, (pw + padding[1]) % SW
            for th in range(kth):
                for tw in range(ktw):
                    kh, kw = f_h + th * SH, f_w + tw * SW
                    if kh < KH and kw < KW:
                        packed[ph * SW + pw, th * ktw + tw, :C, :CO] = w[:, :, kh, kw]
    return packed


@triton.jit
def _convt_kernel(
    x_ptr, sxb, sxc, sxh, sxw, w_ptr, C_PAD, CO_PAD,  # input [N, C, H, W], weights [SH*SW, KTH*KTW, C_PAD, CO_PAD]
    y_ptr, syb, syc, syh, syw, scale_ptr, shift_ptr,  # output [N, CO, OH, OW] and its epilogue
    occ_ptr, sob, soth, sotw,
    C, H, W, CO, OH, OW, TILES_H, TILES_W, NUM_CB, NG, PAD_H, PAD_W,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    KTH: tl.constexpr, KTW: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPARSE: tl.constexpr, OCC_H: tl.constexpr, OCC_W: tl.constexpr, NG_P2: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, PREC: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_enter(PDL)
    pid = tl.program_id(0)
    cb = pid % NUM_CB
    rest = pid // NUM_CB
    tw = rest % TILES_W
    rest = rest // TILES_W
    th = rest % TILES_H
    rest = rest // TILES_H
    phase = rest % (SH * SW)
    b = rest // (SH * SW)
    ph = phase // SW
    pw = phase % SW
    f_h = (ph + PAD_H) % SH
    f_w = (pw + PAD_W) % SW
    base_h = (ph + PAD_H - f_h) // SH
    base_w = (pw + PAD_W - f_w) // SW

    P: tl.constexpr = TILE_H * TILE_W
    KT: tl.constexpr = KTH * KTW
    co = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < CO
    p = tl.arange(0, P)
    i = th * TILE_H + p // TILE_W
    j = tw * TILE_W + p % TILE_W
    oh = ph + SH * i
    ow = pw + SW * j
    row_ok = (oh < OH) & (ow < OW)
    ih0 = i + base_h
    iw0 = j + base_w

    act = tl.zeros([NG_P2], dtype=tl.int32)
    if SPARSE:
        # input rows ih0 - (KTH-1) .. ih0 of the tile = a stride-1 conv with padding KTH-1-base_h
        act = _active_groups(act, occ_ptr, b, th, tw, sob, soth, sotw, NG, H, W,
                             KTH - 1 - base_h, KTW - 1 - base_w, TILE_H, TILE_W, OCC_H, OCC_W,
                             KTH, KTW, 1, 1, 1, 1, NG_P2)
    idx, n_groups = _visit_list(act, NG, SPARSE, NG_P2)

    acc = tl.zeros([P, BLOCK_N], dtype=tl.float32)
    ck = tl.arange(0, BLOCK_K)
    xb = x_ptr + b * sxb
    wb = w_ptr + phase * (KT * C_PAD * CO_PAD)
    for it in range(n_groups * KT):
        c0 = _visit_group(it // KT, idx, SPARSE, NG_P2) * BLOCK_K
        tap = it % KT
        t_h = tap // KTW
        t_w = tap % KTW
        tap_ok = (f_h + t_h * SH < KH) & (f_w + t_w * SW < KW)
        ih = ih0 - t_h
        iw = iw0 - t_w
        ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W) & tap_ok
        cc = c0 + ck
        a = tl.load(xb + (ih * sxh + iw * sxw)[:, None] + cc[None, :] * sxc,
                    mask=ok[:, None] & (cc < C)[None, :], other=0.0)
        wt = tl.load(wb + ((tap * C_PAD + cc) * CO_PAD)[:, None] + co[None, :])
        acc = tl.dot(a.to(wt.dtype), wt, acc, input_precision=PREC)
    z = _channel_affine(acc, scale_ptr, shift_ptr, co, co_ok, HAS_SCALE, HAS_SHIFT)
    yp = y_ptr + b * syb + (oh * syh + ow * syw)[:, None] + co[None, :] * syc
    tl.store(yp, z.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & co_ok[None, :])


def normalize_transpose_args(op, x, weight, bias, stride, padding, output_padding, groups, dilation):
    if x.dim() != 4:
        raise ValueError(f"{op}: expected input of shape [N, C, H, W], got {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"{op}: expected weight of shape [C_in, C_out, KH, KW], got {tuple(weight.shape)}")
    require_dtype(op, "input", x)
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: input dtype {x.dtype} and weight dtype {weight.dtype} differ")
    if groups != 1:
        raise NotImplementedError(f"{op}: groups={groups} is not supported (only groups=1)")
    if pair(dilation, "dilation", op) != (1, 1):
        raise NotImplementedError(f"{op}: dilation {dilation} is not supported (only 1)")
    if x.shape[1] != weight.shape[0]:
        raise ValueError(f"{op}: input has {x.shape[1]} channels but weight expects {weight.shape[0]}")
    require_bias(op, bias, weight.shape[1], x.dtype)
    stride = pair(stride, "stride", op)
    padding = pair(padding, "padding", op)
    output_padding = pair(output_padding, "output_padding", op)
    if min(stride) < 1:
        raise ValueError(f"{op}: stride must be >= 1, got {stride}")
    if min(padding) < 0 or min(output_padding) < 0:
        raise ValueError(f"{op}: negative padding {padding} or output_padding {output_padding}")
    if output_padding[0] >= stride[0] or output_padding[1] >= stride[1]:
        raise ValueError(f"{op}: output_padding {output_padding} must be smaller than the stride {stride}")
    KH, KW = weight.shape[2:]
    OH = conv_transpose_output_size(x.shape[2], KH, stride[0], padding[0], output_padding[0])
    OW = conv_transpose_output_size(x.shape[3], KW, stride[1], padding[1], output_padding[1])
    if OH < 1 or OW < 1:
        raise ValueError(f"{op}: padding {padding} leaves an empty output ({OH} x {OW})")
    return stride, padding, output_padding, (OH, OW)


def sparse_conv_transpose2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0, output_padding=0,
    groups: int = 1, dilation=1, *, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
    occupancy: Occupancy | None = None, config: ConvConfig | None = None, block_size=None,
    packed_weight: torch.Tensor | None = None, fp32_precision: str = "tf32x3", dense: bool = False,
) -> torch.Tensor:
    """``F.conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups=1, dilation=1)``
    computing only over the non-zero (tile, channel group) blocks of ``x``; see the module docstring.

    ``scale``/``shift`` (``[C_out]``): ``(convT + bias) * scale + shift`` (a folded eval BatchNorm).
    ``dense=True`` runs the same kernel over every block (no prescan). The output keeps ``x``'s layout.
    """
    op = "sparse_conv_transpose2d"
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    stride, padding, output_padding, (OH, OW) = normalize_transpose_args(
        op, x, weight, bias, stride, padding, output_padding, groups, dilation)
    require_triton_device(op, x, weight, bias, scale, shift)
    require_int32_indexable(op, x)
    N, C = x.shape[:2]
    _, CO, KH, KW = weight.shape
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None and (t.dim() != 1 or t.shape[0] != CO):
            raise ValueError(f"{op}: {name} must have shape [{CO}], got {tuple(t.shape)}")
    cfg = config or default_config(C, CO, block_size)
    if cfg.t_in_m:
        raise ValueError(f"{op}: t_in_m configs are for spiking_conv2d")
    require_conv_groups_fit(op, C, cfg)
    out = empty_like_layout(x, (N, CO, OH, OW))
    require_int32_indexable(op, out)
    if N == 0 or CO == 0:
        return out.squeeze(0) if unbatched else out
    w = packed_weight if packed_weight is not None else pack_transpose_weight(
        weight, stride, padding, cfg.block_k, cfg.block_n, x.dtype)
    occ = input_occupancy(op, x, occupancy, (cfg.tile_h, cfg.tile_w), cfg.block_k, dense)
    sc, sh = fold_affine(bias, scale, shift)
    launch_conv_transpose(x, w, out, KH, KW, stride, padding, cfg, dot_precision(x.dtype, fp32_precision),
                          sc, sh, occ)
    return out.squeeze(0) if unbatched else out


def launch_conv_transpose(x, w_packed, out, KH, KW, stride, padding, cfg: ConvConfig, prec, scale, shift, occ):
    N, C, H, W = x.shape
    _, CO, OH, OW = out.shape
    SH, SW = stride
    tiles_h = cdiv(cdiv(OH, SH), cfg.tile_h)
    tiles_w = cdiv(cdiv(OW, SW), cfg.tile_w)
    num_cb = cdiv(CO, cfg.block_n)
    ng = cdiv(C, cfg.block_k)
    if occ is not None:
        codes, otile = occ.codes, occ.tile
    else:
        codes, otile = out, (1, 1)
    grid = (N * SH * SW * tiles_h * tiles_w * num_cb,)
    launch(_convt_kernel)[grid](
        x, *x.stride(),
        w_packed, w_packed.shape[2], w_packed.shape[3],
        out, *out.stride(),
        scale if scale is not None else out, shift if shift is not None else out,
        codes, *(codes.stride()[:3]),
        C, H, W, CO, OH, OW, tiles_h, tiles_w, num_cb, ng, padding[0], padding[1],
        KH=KH, KW=KW, SH=SH, SW=SW, KTH=cdiv(KH, SH), KTW=cdiv(KW, SW),
        TILE_H=cfg.tile_h, TILE_W=cfg.tile_w, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        SPARSE=occ is not None, OCC_H=otile[0], OCC_W=otile[1], NG_P2=next_power_of_2(ng),
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, PREC=prec,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out

