"""``sparse_conv2d``: ``F.conv2d`` semantics, computing only over the non-zero blocks of the input."""

from __future__ import annotations

import torch

from ._utils import (
    dot_precision,
    pair,
    require_bias,
    require_dtype,
    require_int32_indexable,
    require_int32_numel,
    require_triton_device,
)
from .conv import launch_conv, pack_conv_weight
from .occupancy import Occupancy, input_occupancy, prescan
from .tiling import MAX_GROUPS, ConvConfig, default_config, require_conv_groups_fit

__all__ = ["MAX_GROUPS", "default_config", "sparse_conv2d"]

def conv_output_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def normalize_conv_args(op, x, weight, bias, stride, padding, dilation, groups, allow_groups: bool = False):
    """Validate ``F.conv2d``-style arguments; return (stride, padding, dilation) as pairs. ``allow_groups``: the
    caller implements ``groups > 1`` (grouped / depthwise convolutions), otherwise only ``groups=1`` is accepted."""
    if x.dim() != 4:
        raise ValueError(f"{op}: expected input of shape [N, C, H, W], got {tuple(x.shape)}")
    if weight.dim() != 4:
        what = "C_in/groups" if allow_groups else "C_in"
        raise ValueError(f"{op}: expected weight of shape [C_out, {what}, KH, KW], got {tuple(weight.shape)}")
    require_dtype(op, "input", x)
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: input dtype {x.dtype} and weight dtype {weight.dtype} differ")
    if allow_groups:
        if not isinstance(groups, int) or groups < 1:
            raise ValueError(f"{op}: groups must be a positive int, got {groups!r}")
        C, CO = x.shape[1], weight.shape[0]
        if C % groups or CO % groups:
            raise ValueError(f"{op}: in_channels {C} and out_channels {CO} must be divisible by groups={groups}")
        if weight.shape[1] * groups != C:
            raise ValueError(f"{op}: input has {C} channels but weight expects {weight.shape[1]} x groups={groups}")
    require_bias(op, bias, weight.shape[0], x.dtype)
    if not allow_groups:
        if groups != 1:
            raise NotImplementedError(f"{op}: groups={groups} is not supported yet (only groups=1)")
        if x.shape[1] != weight.shape[1]:
            raise ValueError(
                f"{op}: input has {x.shape[1]} channels but weight expects {weight.shape[1]} (groups=1)"
            )
    if x.shape[1] == 0 or weight.shape[0] == 0:
        raise ValueError(f"{op}: input channels and output channels must be >= 1, got weight {tuple(weight.shape)}")
    stride, dilation = pair(stride, "stride", op), pair(dilation, "dilation", op)
    if min(stride) < 1 or min(dilation) < 1:
        raise ValueError(f"{op}: stride and dilation must be >= 1, got {stride} and {dilation}")
    KH, KW = weight.shape[2:]
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError(f"{op}: padding='same' needs stride 1 (as in F.conv2d)")
            tot = (dilation[0] * (KH - 1), dilation[1] * (KW - 1))
            if tot[0] % 2 or tot[1] % 2:
                raise NotImplementedError(f"{op}: padding='same' with an even receptive field (asymmetric)")
            padding = (tot[0] // 2, tot[1] // 2)
        else:
            raise ValueError(f"{op}: padding must be 'same', 'valid', an int or a pair, got {padding!r}")
    else:
        padding = pair(padding, "padding", op)
    if min(padding) < 0:
        raise ValueError(f"{op}: negative padding {padding}")
    OH = conv_output_size(x.shape[2], KH, stride[0], padding[0], dilation[0])
    OW = conv_output_size(x.shape[3], KW, stride[1], padding[1], dilation[1])
    if OH < 1 or OW < 1:
        raise ValueError(f"{op}: kernel {KH}x{KW} is larger than the padded input {tuple(x.shape[2:])}")
    return stride, padding, dilation


def empty_like_layout(x: torch.Tensor, shape, dtype=None) -> torch.Tensor:
    """A new [B, C, H, W] tensor, channels_last if ``x`` is (the layout of the input is kept)."""
    dtype = dtype or x.dtype
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.empty(shape, dtype=dtype, device=x.device, memory_format=torch.channels_last)
    return torch.empty(shape, dtype=dtype, device=x.device)


def sparse_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1,
    groups: int = 1, *, block_size=None, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
    occupancy: Occupancy | None = None, config: ConvConfig | None = None, packed_weight: torch.Tensor | None = None,
    fp32_precision: str = "tf32x3", dense: bool = False,
) -> torch.Tensor:
    """2-D convolution with the semantics of ``torch.nn.functional.conv2d`` that skips all-zero blocks.

    A Triton prescan marks which (sample, ``block_size`` x ``block_size`` tile, 16-channel group) blocks of
    ``x`` are non-zero (``occupancy`` from the layer that produced ``x`` replaces it); the convolution then
    visits, for each output tile, only the groups that are non-zero somewhere in its receptive field.
    The result is the dense op's for any input: zeros only save work.

    Accumulation is fp32. fp16/bf16 inputs use fp16/bf16 tensor-core products; fp32 inputs use
    ``fp32_precision`` (``"tf32x3"``: fp32 accuracy on tensor cores; ``"ieee"``; ``"tf32"``).
    ``scale``/``shift`` (``[C_out]``, optional) give ``(conv + bias) * scale + shift`` in the epilogue: an
    eval-mode BatchNorm folded in without touching the weights.
    ``dense=True`` runs the same kernel over every block (no prescan).
    """
    op = "sparse_conv2d"
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    stride, padding, dilation = normalize_conv_args(op, x, weight, bias, stride, padding, dilation, groups)
    require_triton_device(op, x, weight, bias)
    require_int32_indexable(op, x)
    N, C, H, W = x.shape
    CO, _, KH, KW = weight.shape
    OH = conv_output_size(H, KH, stride[0], padding[0], dilation[0])
    OW = conv_output_size(W, KW, stride[1], padding[1], dilation[1])
    cfg = config or default_config(C, CO, block_size)
    if cfg.t_in_m:
        raise ValueError(f"{op}: t_in_m configs are for spiking_conv2d (no time axis here)")
    require_conv_groups_fit(op, C, cfg)
    require_int32_numel(op, "output", (N, CO, OH, OW))
    out = empty_like_layout(x, (N, CO, OH, OW))
    if N == 0:
        return out.squeeze(0) if unbatched else out
    w = packed_weight if packed_weight is not None else pack_conv_weight(weight, cfg, x.dtype)
    occ = None
    if not dense:  # (the prescan through this module's name: what a layer's own prescans are counted by)
        tile = (cfg.tile_h, cfg.tile_w)
        if occupancy is None:
            occ = prescan(x, tile, cfg.block_k)
        else:
            occ = input_occupancy(op, x, occupancy, tile, cfg.block_k)
    for name, p in (("scale", scale), ("shift", shift)):
        if p is not None and (p.dim() != 1 or p.shape[0] != CO):
            raise ValueError(f"{op}: {name} must have shape [{CO}], got {tuple(p.shape)}")
    sc, sh = fold_affine(bias, scale, shift)
    launch_conv(x, w, CO, KH, KW, stride, padding, dilation, T=1, N=N, out=out, cfg=cfg,
                prec=dot_precision(x.dtype, fp32_precision), scale=sc, shift=sh, occ=occ)
    return out.squeeze(0) if unbatched else out


def fold_affine(bias, scale, shift):
    """z = (conv + bias) * scale + shift  ->  conv * scale + (bias * scale + shift), in fp32."""
    sc = scale.float().contiguous() if scale is not None else None
    sh = shift.float() if shift is not None else None
    if bias is not None:
        b = bias.float()
        sh = (b * sc if sc is not None else b) + (sh if sh is not None else 0.0)
    return sc, (sh.contiguous() if sh is not None else None)

