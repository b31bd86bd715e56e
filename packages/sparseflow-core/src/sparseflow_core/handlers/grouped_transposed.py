"""Handlers of grouped / depthwise ``nn.Conv2d`` (``groups > 1``) and ``nn.ConvTranspose2d``.

Both become SparseFlow drop-ins (:class:`~sparseflow_ops.depthwise.SparseGroupedConv2d`,
:class:`~sparseflow_ops.conv_transpose.SparseConvTranspose2d`). When the convolution's output feeds only an
eval-mode BatchNorm2d (``fuse``-style chain, checked by the analyzer), the BatchNorm is folded into the
kernel's scale/shift epilogue and bypassed; the neuron after it runs on its own (multi-step kernel).
"""

from __future__ import annotations

import torch
from torch import nn

from sparseflow_kernels import tiling
from sparseflow_ops.conv_transpose import SparseConvTranspose2d
from sparseflow_ops.depthwise import SparseGroupedConv2d

from ..registry import OpHandler, register_op_handler

#: output tile edge of the depthwise kernel at most (:data:`sparseflow_kernels.tiling.DEPTHWISE_MAX_TILE`)
DEPTHWISE_MAX_TILE = tiling.DEPTHWISE_MAX_TILE


def _weight_problem(m) -> str | None:
    if m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r} (only 'zeros' is supported)"
    if isinstance(m.padding, str):
        return f"padding={m.padding!r} given as a string"
    if m.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"weight dtype {m.weight.dtype}"
    return None


def _block(ctx, cg=None):
    """The block size of the layer (``cg``: input channels per group of a grouped conv)."""
    return ctx.block_size if cg is None else tiling.grouped_block_size(ctx.block_size, cg)


def _replace_grouped(m: nn.Conv2d, ctx):
    problem = _weight_problem(m)
    if problem:
        return None, problem
    bn, bn_name = ctx.foldable_bn(nn.BatchNorm2d, m.out_channels)
    dw = m.groups == m.in_channels
    new = SparseGroupedConv2d.from_dense(m, bn, block_size=_block(ctx, m.in_channels // m.groups), mode=ctx.mode)
    what = ("depthwise" if dw else f"grouped ({m.groups} groups)") + (f" + {bn_name} folded" if bn is not None
                                                                       else "")
    if bn is None and bn_name:
        what += f"; {bn_name}"
    return new, what


def _replace_transpose(m: nn.ConvTranspose2d, ctx):
    problem = _weight_problem(m)
    if problem:
        return None, problem
    if m.groups != 1:
        return None, f"groups={m.groups} (sparse transposed convolution supports groups=1)"
    if tuple(m.dilation) != (1, 1):
        return None, f"dilation={m.dilation} (sparse transposed convolution supports dilation 1)"
    bn, bn_name = ctx.foldable_bn(nn.BatchNorm2d, m.out_channels)
    new = SparseConvTranspose2d.from_dense(m, bn, block_size=_block(ctx), mode=ctx.mode)
    what = f"conv_transpose stride {tuple(m.stride)}" + (f" + {bn_name} folded" if bn is not None else "")
    return new, what


GROUPED_HANDLER = register_op_handler(nn.Conv2d, OpHandler("grouped_conv", _replace_grouped,
                                                           accepts=lambda m: m.groups > 1))
TRANSPOSE_HANDLER = register_op_handler(nn.ConvTranspose2d, OpHandler("conv_transpose", _replace_transpose))
