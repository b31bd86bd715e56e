"""Max pooling in one pass over any memory layout (``F.max_pool2d`` semantics, no indices).

Why it exists: after a spiking ResNet's stem the spikes are channels_last (every fused layer writes them so),
and PyTorch's channels_last max-pool kernel took 120 us on the H100 for the [32, 64, 112, 112] fp16 map of
spiking_resnet34 (T=4, N=8), about 5x what reading and writing the map costs. This kernel vectorizes over the
innermost dimension of whichever layout the input has (channels for channels_last, width for NCHW).

Semantics are exactly ``F.max_pool2d``'s: padding counts as ``-inf``, NaN propagates (a window holding NaN gives
NaN), ``ceil_mode`` windows that would start in the right/bottom padding are dropped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._epilogue_jit import pdl_enter
from ._utils import cdiv, launch, next_power_of_2, pair, require_dtype, require_int32_indexable, require_triton_device


@triton.jit
def _max_pool2d_kernel(
    x_ptr, sxn, sxc, sxh, sxw,
    y_ptr, syn, syc, syh, syw,
    shift_ptr,
    C, H, W, OH, OW,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, HAS_SHIFT: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_enter(PDL)
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # output pixels (oh * OW + ow)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    oh = p // OW
    ow = p % OW
    p_ok = p < OH * OW
    c_ok = c < C
    acc = tl.full((BLOCK_P, BLOCK_C), float("-inf"), tl.float32)
    nan = tl.zeros((BLOCK_P, BLOCK_C), tl.int1)
    xb = x_ptr + n * sxn + c[None, :] * sxc
    for kh in tl.static_range(KH):
        ih = oh * SH - PH + kh * DH
        h_ok = (ih >= 0) & (ih < H)
        for kw in tl.static_range(KW):
            iw = ow * SW - PW + kw * DW
            ok = p_ok & h_ok & (iw >= 0) & (iw < W)
            v = tl.load(xb + (ih * sxh + iw * sxw)[:, None], mask=ok[:, None] & c_ok[None, :],
                        other=float("-inf")).to(tl.float32)
            nan = nan | (v != v)
            acc = tl.maximum(acc, v)
    if HAS_SHIFT:  # a per-channel constant commutes with max (rounding is monotone): max(x) + shift
        acc = acc + tl.load(shift_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    acc = tl.where(nan, float("nan"), acc)
    yp = y_ptr + n * syn + c[None, :] * syc + (oh * syh + ow * syw)[:, None]
    tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


def _out_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    span = size + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= size + p:  # the last window must start inside the input or left padding
        out -= 1
    return out


def max_pool2d(x: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
               shift: torch.Tensor | None = None):
    """``F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)`` for ``[N, C, H, W]`` or
    ``[C, H, W]`` inputs; the output keeps the input's memory format (channels_last or contiguous).

    ``shift`` (``[C]``): returns ``max_pool2d(x + shift[c])``, computed as ``max_pool2d(x) + shift[c]`` (the same
    value: rounding is monotone) so a convolution's bias can be added after the pool, on 4x fewer values."""
    op = "max_pool2d"
    if x.dim() not in (3, 4):
        raise ValueError(f"{op}: expected [N, C, H, W] or [C, H, W], got shape {tuple(x.shape)}")
    require_dtype(op, "x", x)
    require_triton_device(op, x)
    require_int32_indexable(op, x)
    kh, kw = pair(kernel_size, "kernel_size", op)
    sh, sw = pair(stride if stride is not None and stride != [] else (kh, kw), "stride", op)
    ph, pw = pair(padding, "padding", op)
    dh, dw = pair(dilation, "dilation", op)
    if min(kh, kw, sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"{op}: kernel_size, stride and dilation must be >= 1 and padding >= 0")
    if ph > kh // 2 or pw > kw // 2:
        raise ValueError(f"{op}: padding ({ph}, {pw}) must be at most half the kernel size ({kh}, {kw})")
    x4 = x if x.dim() == 4 else x.unsqueeze(0)
    N, C, H, W = x4.shape
    if shift is not None:
        if shift.dim() != 1 or shift.shape[0] != C:
            raise ValueError(f"{op}: shift must have shape [{C}], got {tuple(shift.shape)}")
        require_triton_device(op, shift)
    OH = _out_size(H, kh, sh, ph, dh, ceil_mode)
    OW = _out_size(W, kw, sw, pw, dw, ceil_mode)
    if OH <= 0 or OW <= 0:
        raise ValueError(f"{op}: output size {OH}x{OW} is too small for input {H}x{W}")
    cl = x4.is_contiguous(memory_format=torch.channels_last) and not x4.is_contiguous()
    y = torch.empty((N, C, OH, OW), dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last if cl else torch.contiguous_format)
    if y.numel():
        if cl:  # channels innermost: vectorize over channels
            BLOCK_C = min(64, next_power_of_2(C))
            BLOCK_P = max(1, 1024 // BLOCK_C)
        else:  # width innermost: vectorize over pixels
            BLOCK_C = 1
            BLOCK_P = min(1024, next_power_of_2(OH * OW))
        grid = (cdiv(OH * OW, BLOCK_P), cdiv(C, BLOCK_C), N)
        launch(_max_pool2d_kernel)[grid](
            x4, *x4.stride(), y, *y.stride(), shift if shift is not None else y, C, H, W, OH, OW,
            KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C,
            HAS_SHIFT=shift is not None,
            num_warps=4,
        )
    return y if x.dim() == 4 else y[0]
