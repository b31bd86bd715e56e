"""Eval-mode BatchNorm2d that skips reading all-zero blocks of its input.

``y = (x - mean) * scale + bias`` per channel, with ``scale = weight / sqrt(running_var + eps)``: the formula of
``nn.BatchNorm2d`` in eval mode, in fp32, rounded once to the input's dtype. One program handles a
(sample, ``TILE_H`` x ``TILE_W`` tile, ``BLOCK_C`` channels) block. Given an
:class:`~sparseflow_kernels.occupancy.Occupancy` of ``x`` (from the layer that produced it, or a prescan), the
loads of every 16-channel group whose tile is all zero are masked off: the block writes the per-channel constant
``bias - mean * scale`` (computed from ``x = 0`` exactly as the dense op does) without touching the input.
Without an occupancy it reads everything (a prescan would read the input as well, so it is not run).

NaN and Inf count as non-zero in the occupancy, so they reach the arithmetic and propagate as in the dense op.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._epilogue_jit import pdl_enter
from ._occupancy_jit import _tile_of, _tile_pixels
from ._utils import cdiv, launch, next_pow2, require_dtype, require_int32_indexable, require_triton_device
from .occupancy import Occupancy
from .sparse_conv import empty_like_layout
from .tiling import batchnorm_tile


@triton.jit
def _bn_kernel(
    x_ptr, y_ptr, mean_ptr, scale_ptr, bias_ptr, occ_ptr,
    C, H, W, TILES_H, TILES_W,
    sxb, sxc, sxh, sxw,
    syb, syc, syh, syw,
    sob, soh, sow,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr,
    HAS_OCC: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_enter(PDL)
    pid = tl.program_id(0)
    cb = tl.program_id(1)
    b, th, tw = _tile_of(pid, TILES_H, TILES_W)
    oh, ow, pix_ok = _tile_pixels(th, tw, H, W, TILE_H, TILE_W)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0)
    scale = tl.load(scale_ptr + c, mask=c_ok, other=0.0)
    bias = tl.load(bias_ptr + c, mask=c_ok, other=0.0)
    ok = pix_ok[:, None] & c_ok[None, :]
    ld = ok
    if HAS_OCC:
        # the code of each channel's group (GROUP consecutive lanes share one, a cached load)
        code = tl.load(occ_ptr + b * sob + th * soh + tw * sow + c // GROUP, mask=c_ok, other=0)
        ld = ld & ((code.to(tl.int32) & 1) != 0)[None, :]
    x = tl.load(x_ptr + b * sxb + (oh * sxh + ow * sxw)[:, None] + c[None, :] * sxc, mask=ld, other=0.0)
    y = (x.to(tl.float32) - mean[None, :]) * scale[None, :] + bias[None, :]
    tl.store(y_ptr + b * syb + (oh * syh + ow * syw)[:, None] + c[None, :] * syc,
             y.to(y_ptr.dtype.element_ty), mask=ok)


def bn_eval_affine(running_mean, running_var, weight=None, bias=None, eps: float = 1e-5):
    """(mean, scale, bias) in fp32 ``[C]``: eval BatchNorm as ``(x - mean) * scale + bias``."""
    mean = running_mean.detach().float()
    scale = torch.rsqrt(running_var.detach().float() + eps)
    if weight is not None:
        scale = scale * weight.detach().float()
    b = bias.detach().float() if bias is not None else torch.zeros_like(mean)
    return mean.contiguous(), scale.contiguous(), b.contiguous()


def batch_norm_affine(
    x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, *,
    occupancy: Occupancy | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(x - mean) * scale + bias`` per channel of ``x`` ``[B, C, H, W]`` (fp32 ``[C]`` vectors, see
    :func:`bn_eval_affine`), skipping the reads of all-zero blocks marked in ``occupancy``."""
    op = "sparse_batch_norm2d"
    if x.dim() != 4:
        raise ValueError(f"{op}: expected input of shape [N, C, H, W], got {tuple(x.shape)}")
    require_dtype(op, "input", x)
    require_triton_device(op, x, mean, scale, bias)
    require_int32_indexable(op, x)
    B, C, H, W = x.shape
    for name, v in (("mean", mean), ("scale", scale), ("bias", bias)):
        if v.dim() != 1 or v.shape[0] != C or v.dtype != torch.float32:
            raise ValueError(f"{op}: {name} must be float32 of shape [{C}], got {v.dtype} {tuple(v.shape)}")
    if out is None:
        out = empty_like_layout(x, (B, C, H, W))
    elif out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"{op}: out must be {x.dtype} of shape {tuple(x.shape)} on {x.device}")
    require_int32_indexable(op, out)
    if x.numel() == 0:
        return out
    if occupancy is not None:
        occupancy.check_matches(op, x.shape, occupancy.group)
        th, tw = occupancy.tile
        group = occupancy.group
        block_c = max(group, min(64, next_pow2(C)))
        codes = occupancy.codes
    else:
        th, tw, block_c = batchnorm_tile(C, W, x.stride(1) == 1)
        group = 16
        codes = out
    tiles_h, tiles_w = cdiv(H, th), cdiv(W, tw)
    grid = (B * tiles_h * tiles_w, cdiv(C, block_c))
    launch(_bn_kernel)[grid](
        x, out, mean.contiguous(), scale.contiguous(), bias.contiguous(), codes,
        C, H, W, tiles_h, tiles_w,
        *x.stride(), *out.stride(), *(codes.stride()[:3]),
        TILE_H=th, TILE_W=tw, BLOCK_C=block_c, GROUP=group, HAS_OCC=occupancy is not None,
        num_warps=4,
    )
    return out


def sparse_batch_norm2d(
    x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
    weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5, *,
    occupancy: Occupancy | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.batch_norm(x, running_mean, running_var, weight, bias, training=False, eps=eps)`` for
    ``[N, C, H, W]`` inputs; all-zero blocks marked in ``occupancy`` are written without being read."""
    op = "sparse_batch_norm2d"
    if x.dim() != 4:
        raise ValueError(f"{op}: expected input of shape [N, C, H, W], got {tuple(x.shape)}")
    C = x.shape[1]
    for name, v in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        if v is not None and (v.dim() != 1 or v.shape[0] != C):
            raise ValueError(f"{op}: {name} must have shape [{C}], got {tuple(v.shape)}")
    if running_mean is None or running_var is None:
        raise ValueError(f"{op}: eval-mode BatchNorm needs running_mean and running_var")
    if eps < 0:
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")
    mean, scale, b = bn_eval_affine(running_mean, running_var, weight, bias, eps)
    return batch_norm_affine(x, mean, scale, b, occupancy=occupancy, out=out)
