"""Depthwise and grouped convolution (``F.conv2d`` with ``groups > 1``) that skips silent tiles.

Depthwise convolution (``groups == C``, channel multiplier ``M = C_out / C``) does a handful of FMAs per input
element: it is memory-bound, so the gain of sparsity is not *reading* the tiles of the input that hold only
zeros. The direct kernel below gives each program one output tile (``TILE_H x TILE_W`` pixels) of
``BLOCK_C`` output channels; its prologue ORs the edge codes of the input tiles under its receptive field (the
same 9-bit codes and halo rule as :mod:`sparseflow_kernels.conv`, written by :func:`~.occupancy.prescan` with
one code per ``group`` input channels) and, when none is set, skips the whole tap loop and stores
``bias`` (``shift``) only. Otherwise it accumulates in fp32 over the ``C/groups`` input channels and
``KH x KW`` taps of each output channel with CUDA-core FMAs (no tensor cores: a depthwise tap is a per-channel
scale). Any ``groups`` works here; for ``C/groups >= 16`` input channels per group :func:`grouped_conv2d`
runs the tensor-core implicit-GEMM kernel of :mod:`~.conv` once per group instead (channel-sliced views of
the input and output, weights packed per group).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._epilogue_jit import _channel_affine, pdl_enter
from ._occupancy_jit import _block_of, _receptive_groups, _tile_pixels
from ._utils import (
    cdiv,
    dot_precision,
    launch,
    next_pow2,
    require_int32_indexable,
    require_triton_device,
)
from .conv import launch_conv, pack_weight
from .occupancy import Occupancy, prescan
from .sparse_conv import conv_output_size, empty_like_layout, fold_affine, normalize_conv_args
from .tiling import (
    TENSOR_CORE_MIN_CG,
    ConvConfig,
    DepthwiseConfig,
    default_config,
    default_depthwise_config,
    occupancy_group,
    require_conv_groups_fit,
)

__all__ = ["TENSOR_CORE_MIN_CG", "DepthwiseConfig", "default_depthwise_config", "grouped_conv2d", "occupancy_group"]

@triton.jit
def _tile_active(occ_ptr, b, th, tw, sob, soh, sow, g_lo, g_hi, NG, H, W, PAD_H, PAD_W,
                 TILE_H: tl.constexpr, TILE_W: tl.constexpr, OCC_H: tl.constexpr, OCC_W: tl.constexpr,
                 KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                 DH: tl.constexpr, DW: tl.constexpr, GSPAN: tl.constexpr):
    """int32 [GSPAN]: 1 where occupancy group ``g_lo + i`` (up to ``g_hi``) is non-zero in the receptive field of
    output tile (th, tw) of sample ``b`` (edge-exact halo), else 0."""
    g = g_lo + tl.arange(0, GSPAN)
    return _receptive_groups(tl.zeros([GSPAN], dtype=tl.int32), g, (g <= g_hi) & (g < NG), occ_ptr, b, th, tw,
                             sob, soh, sow, H, W, PAD_H, PAD_W, TILE_H, TILE_W, OCC_H, OCC_W, KH, KW, SH, SW, DH, DW)


@triton.jit
def _direct_kernel(
    x_ptr, sxb, sxc, sxh, sxw,
    w_ptr, swo, swi, swh, sww,
    y_ptr, syb, syc, syh, syw,
    scale_ptr, shift_ptr,
    occ_ptr, sob, soh, sow,
    C, H, W, CO, OH, OW, CG, COG, TILES_H, TILES_W, NUM_CB, NG, OCC_GROUP,
    PAD_H, PAD_W,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_C: tl.constexpr,
    SPARSE: tl.constexpr, OCC_H: tl.constexpr, OCC_W: tl.constexpr, GSPAN: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_enter(PDL)
    cb, b, th, tw = _block_of(tl.program_id(0), NUM_CB, TILES_H, TILES_W)

    P: tl.constexpr = TILE_H * TILE_W
    co = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    co_ok = co < CO
    cin0 = (co // COG) * CG  # first input channel of each output channel's group
    oh, ow, row_ok = _tile_pixels(th, tw, OH, OW, TILE_H, TILE_W)
    out_ok = row_ok[:, None] & co_ok[None, :]
    ih0 = oh * SH - PAD_H
    iw0 = ow * SW - PAD_W

    n_iter = CG  # input channels per group (1 for depthwise); each visits the KH x KW taps, unrolled
    ch_ok = co_ok
    if SPARSE:
        co_last = tl.minimum(cb * BLOCK_C + BLOCK_C, CO) - 1
        g_lo = ((cb * BLOCK_C) // COG) * CG // OCC_GROUP
        g_hi = ((co_last // COG) * CG + CG - 1) // OCC_GROUP
        active = _tile_active(occ_ptr, b, th, tw, sob, soh, sow, g_lo, g_hi, NG, H, W, PAD_H, PAD_W,
                              TILE_H, TILE_W, OCC_H, OCC_W, KH, KW, SH, SW, DH, DW, GSPAN)
        # silent tile: no load at all; otherwise the channels of silent groups are masked off the loads (a
        # masked-off 32-byte sector is not read)
        n_iter = n_iter * tl.max(active, axis=0)
        if CG == 1:
            gsel = cin0 // OCC_GROUP - g_lo  # [BLOCK_C]: the group slot of each output channel's input
            hit = gsel[:, None] == tl.arange(0, GSPAN)[None, :]
            ch_ok = co_ok & (tl.sum(tl.where(hit, active[None, :], 0), axis=1) != 0)

    acc = tl.zeros([P, BLOCK_C], dtype=tl.float32)
    xb = x_ptr + b * sxb
    for j in range(n_iter):
        for tap in tl.static_range(KH * KW):
            kh = tap // KW
            kw = tap % KW
            ih = ih0 + kh * DH
            iw = iw0 + kw * DW
            ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            ci = cin0 + j
            xv = tl.load(xb + (ih * sxh + iw * sxw)[:, None] + (ci * sxc)[None, :],
                         mask=ok[:, None] & ch_ok[None, :], other=0.0)
            wv = tl.load(w_ptr + co * swo + j * swi + kh * swh + kw * sww, mask=co_ok, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    z = _channel_affine(acc, scale_ptr, shift_ptr, co, co_ok, HAS_SCALE, HAS_SHIFT)
    yp = y_ptr + b * syb + (oh * syh + ow * syw)[:, None] + co[None, :] * syc
    tl.store(yp, z.to(y_ptr.dtype.element_ty), mask=out_ok)


def normalize_grouped_args(op, x, weight, bias, stride, padding, dilation, groups):
    """Validate ``F.conv2d``-style arguments with ``groups``; return (stride, padding, dilation) as pairs."""
    return normalize_conv_args(op, x, weight, bias, stride, padding, dilation, groups, allow_groups=True)


def grouped_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1,
    groups: int = 1, *, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
    occupancy: Occupancy | None = None, config: DepthwiseConfig | ConvConfig | None = None, block_size=None,
    path: str = "auto", fp32_precision: str = "tf32x3", dense: bool = False,
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)`` skipping the silent tiles of ``x``.

    ``path``: ``"direct"`` (the CUDA-core kernel of this module, any groups; depthwise), ``"gemm"`` (the
    tensor-core conv kernel once per group) or ``"auto"`` (``gemm`` from ``C/groups >= 16``).
    ``scale``/``shift`` (``[C_out]``) give ``(conv + bias) * scale + shift`` (a folded eval BatchNorm).
    ``occupancy``: the input's occupancy from its producer (its group must be the one the kernel needs);
    ``dense=True`` visits every tile (no prescan). Inputs ``[N, C, H, W]`` or unbatched ``[C, H, W]``, fp32 /
    fp16 / bf16, any strides; the output keeps the input's layout (channels_last stays channels_last).
    """
    op = "grouped_conv2d"
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    stride, padding, dilation = normalize_grouped_args(op, x, weight, bias, stride, padding, dilation, groups)
    require_triton_device(op, x, weight, bias, scale, shift)
    require_int32_indexable(op, x)
    N, _, H, W = x.shape
    CO, CG, KH, KW = weight.shape
    COG = CO // groups
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None and (t.dim() != 1 or t.shape[0] != CO):
            raise ValueError(f"{op}: {name} must have shape [{CO}], got {tuple(t.shape)}")
    if path not in ("auto", "direct", "gemm"):
        raise ValueError(f"{op}: path must be 'auto', 'direct' or 'gemm', got {path!r}")
    if path == "auto":
        path = "gemm" if CG >= TENSOR_CORE_MIN_CG and groups > 1 else "direct"
    if isinstance(config, ConvConfig):
        path = "gemm"
    elif isinstance(config, DepthwiseConfig):
        path = "direct"
    OH = conv_output_size(H, KH, stride[0], padding[0], dilation[0])
    OW = conv_output_size(W, KW, stride[1], padding[1], dilation[1])
    out = empty_like_layout(x, (N, CO, OH, OW))
    require_int32_indexable(op, out)
    if N == 0 or CO == 0:
        return out.squeeze(0) if unbatched else out
    sc, sh = fold_affine(bias, scale, shift)
    if path == "gemm":
        _grouped_gemm(op, x, weight, groups, stride, padding, dilation, out, sc, sh, config, block_size,
                      dot_precision(x.dtype, fp32_precision), dense)
    else:
        cfg = config or default_depthwise_config(CO, block_size, _is_channels_last(x))
        occ = None
        gspan = 1
        og = occupancy_group(cfg, CG, COG, x.element_size())
        if not dense:
            if occupancy is not None:
                occupancy.check_matches(op, x.shape, occupancy.group)
                occ = occupancy
            else:
                occ = prescan(x, (cfg.tile_h, cfg.tile_w), og)
            og = occ.group
            # occupancy groups one block of outputs can touch
            span_in = (cfg.block_c // max(1, COG) + 2) * CG
            gspan = next_pow2(span_in // og + 2)
        launch_direct(x, weight, out, stride, padding, dilation, CG, COG, cfg, sc, sh, occ, og, gspan)
    return out.squeeze(0) if unbatched else out


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last)


def launch_direct(x, weight, out, stride, padding, dilation, CG, COG, cfg: DepthwiseConfig, scale, shift,
                  occ: Occupancy | None, occ_group: int, gspan: int):
    N, C, H, W = x.shape
    _, CO, OH, OW = out.shape
    KH, KW = weight.shape[2:]
    tiles_h, tiles_w = cdiv(OH, cfg.tile_h), cdiv(OW, cfg.tile_w)
    num_cb = cdiv(CO, cfg.block_c)
    if occ is not None:
        codes, otile, ng = occ.codes, occ.tile, occ.num_groups
    else:
        codes, otile, ng = out, (1, 1), 1
    grid = (N * tiles_h * tiles_w * num_cb,)
    launch(_direct_kernel)[grid](
        x, *x.stride(),
        weight, *weight.stride(),
        out, *out.stride(),
        scale if scale is not None else out, shift if shift is not None else out,
        codes, *(codes.stride()[:3]),
        C, H, W, CO, OH, OW, CG, COG, tiles_h, tiles_w, num_cb, ng, occ_group,
        padding[0], padding[1],
        KH=KH, KW=KW, SH=stride[0], SW=stride[1], DH=dilation[0], DW=dilation[1],
        TILE_H=cfg.tile_h, TILE_W=cfg.tile_w, BLOCK_C=cfg.block_c,
        SPARSE=occ is not None, OCC_H=otile[0], OCC_W=otile[1], GSPAN=gspan,
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
        num_warps=cfg.num_warps,
    )
    return out


def pack_grouped_weight(weight: torch.Tensor, groups: int, block_k: int, block_n: int, dtype) -> list:
    """One tensor-core packing (:func:`~.conv.pack_weight`) per group."""
    COG = weight.shape[0] // groups
    return [pack_weight(weight[g * COG:(g + 1) * COG], block_k, block_n, dtype) for g in range(groups)]


def _grouped_gemm(op, x, weight, groups, stride, padding, dilation, out, sc, sh, config, block_size, prec, dense):
    """The tensor-core conv kernel once per group, on channel slices (views) of the input and output."""
    N = x.shape[0]
    CO, CG, KH, KW = weight.shape
    COG = CO // groups
    cfg = config if isinstance(config, ConvConfig) else default_config(CG, COG, block_size)
    if cfg.t_in_m:
        raise ValueError(f"{op}: t_in_m configs are for spiking_conv2d (no time axis here)")
    require_conv_groups_fit(op, CG, cfg, per_group=True)
    packed = pack_grouped_weight(weight, groups, cfg.block_k, cfg.block_n, x.dtype)
    for g in range(groups):
        xs = x[:, g * CG:(g + 1) * CG]
        ys = out[:, g * COG:(g + 1) * COG]
        occ = None if dense else prescan(xs, (cfg.tile_h, cfg.tile_w), cfg.block_k)
        s = sc[g * COG:(g + 1) * COG] if sc is not None else None
        t = sh[g * COG:(g + 1) * COG] if sh is not None else None
        launch_conv(xs, packed[g], COG, KH, KW, stride, padding, dilation, T=1, N=N, out=ys, cfg=cfg,
                    prec=prec, scale=s, shift=t, occ=occ)
    return out

