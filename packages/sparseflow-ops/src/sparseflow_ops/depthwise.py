"""``SparseGroupedConv2d``: a drop-in ``nn.Conv2d`` with ``groups > 1`` (depthwise included) on SparseFlow's
kernels (:func:`sparseflow_kernels.depthwise.grouped_conv2d`).

Depthwise convolutions (``groups == in_channels``, any channel multiplier) and grouped ones with few channels
per group run the direct kernel that skips silent input tiles; groups of 16 or more input channels run the
tensor-core conv kernel once per group. An eval-mode BatchNorm fed only by the convolution can be folded in
(``bn=``): it becomes the kernel's per-channel scale/shift and is bypassed (it stays in the model, as with
:class:`~sparseflow_ops.SparseConv2d`). Each call picks, per input shape and dtype, the fastest of the sparse
kernel, the same kernel without skipping and cuDNN by measurement (``mode`` forces one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparseflow_kernels.depthwise import TENSOR_CORE_MIN_CG, default_depthwise_config, grouped_conv2d
from sparseflow_kernels.library import compiling

from ._common import find_occupancy
from .base import SparseModule, bn_affine, check_dense, check_foldable_bn, check_mode


class TileSkippingConv(SparseModule):
    """What the grouped and transposed drop-ins share: their construction (folded BatchNorm, bypassed) and
    :meth:`_run`, the forward over named paths."""

    def __init__(self, *args, block_size=None, mode: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_dropin(block_size, mode)

    _dense_cls: type  # the dense module class it replaces

    @classmethod
    def from_dense(cls, conv: nn.Module, bn: nn.BatchNorm2d | None = None, *, block_size=None, mode: str = "auto"):
        """Wrap ``conv`` (sharing its parameters); with ``bn`` (an eval BatchNorm fed only by ``conv``) it is
        folded and bypassed. The caller puts the new module where ``conv`` was."""
        check_dense(conv, cls._dense_cls, cls._problem)
        check_foldable_bn(bn, conv.out_channels)
        new = cls(*cls._init_args(conv), device="meta", block_size=block_size, mode=mode)
        check_mode(mode)
        return new._adopt(conv, bn)

    def to_dense(self) -> nn.Module:
        """The plain convolution back (same parameters); a folded BatchNorm runs on its own again."""
        return self._dense_copy(self._dense_cls)

    def _run(self, x: torch.Tensor, dense_fn, kernel_fn, key, op_fn=None):
        """Shared forward: [N, C, H, W] or [T, N, C, H, W]; ``kernel_fn(flat, occ, dense, scale, shift)``,
        ``dense_fn(flat)`` (the torch op, without the folded BatchNorm) and ``op_fn(flat, dense, scale, shift)``
        (the registered ``torch.ops.sparseflow`` operator, taken under ``torch.compile`` with the path the eager
        dispatch chose - run the model once eagerly before compiling - else cuDNN)."""
        if x.dim() not in (4, 5):
            raise ValueError(f"{type(self).__name__} expects [N, C, H, W] or [T, N, C, H, W], got {tuple(x.shape)}")
        five = x.dim() == 5
        flat = x.flatten(0, 1) if five else x
        self._pending = False
        if not self._use_kernels(x) or self.faithful:
            # the dense convolution (faithful numerics too: a folded BatchNorm runs on its own)
            self.last_path = "torch"
            y = dense_fn(flat)
        elif compiling() and op_fn is not None:
            bn = self.folded_bn
            scale, shift = bn_affine(bn) if bn is not None else (None, None)
            path = self.last_path or "torch"
            if path in ("sparse", "dense"):
                y = op_fn(flat, path == "dense", scale, shift)
            else:
                y = dense_fn(flat)
                if scale is not None:
                    y = (y.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(y.dtype)
            self._pending = bn is not None
        else:
            scale, shift = self._affine()
            occ = find_occupancy(x, flat)

            def run_torch():
                y = dense_fn(flat)
                if scale is not None:
                    y = torch.addcmul(shift.view(1, -1, 1, 1), y, scale.view(1, -1, 1, 1)).to(y.dtype)
                return y

            cands = {"dense": lambda: kernel_fn(flat, None, True, scale, shift), "torch": run_torch}
            if self.block_size != "dense":
                cands["sparse"] = lambda: kernel_fn(flat, occ, False, scale, shift)
            full_key = (*key, tuple(flat.shape), flat.stride(), x.dtype, occ is not None, scale is not None,
                        self.block_size)
            y = self._dispatch(full_key, cands, x)
            self._pending = self.folded_bn is not None
        return y.view(*x.shape[:2], *y.shape[1:]) if five else y


class SparseGroupedConv2d(TileSkippingConv, nn.Conv2d):
    """Drop-in ``nn.Conv2d`` with ``groups > 1`` (same parameters, ``state_dict`` keys and ``isinstance``);
    see the module docstring. Inputs ``[N, C, H, W]`` or multi-step ``[T, N, C, H, W]``."""

    _dense_cls = nn.Conv2d

    @staticmethod
    def _problem(conv: nn.Conv2d) -> str | None:
        """Why ``conv`` cannot run here, or None."""
        if conv.groups < 2:
            return f"groups={conv.groups}: use SparseConv2d for ungrouped convolutions"
        if conv.padding_mode != "zeros":
            return f"padding_mode={conv.padding_mode!r} is not supported (only 'zeros')"
        if isinstance(conv.padding, str):
            return f"padding={conv.padding!r} strings are not supported"
        return None

    @staticmethod
    def _init_args(conv: nn.Conv2d) -> tuple:
        return (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode)

    @property
    def is_depthwise(self) -> bool:
        return self.groups == self.in_channels

    @property
    def _kind(self) -> str:
        return "depthwise" if self.is_depthwise else "grouped"

    @property
    def accepts_occupancy(self) -> bool:
        """The sparse path reads a producer's occupancy of any tile and channel group (``optimize(...,
        write_occupancy=True)`` then has the fused layer before it write one: no prescan here)."""
        return self.block_size != "dense" and self._path() == "direct"

    def _path(self) -> str:
        return "gemm" if self.in_channels // self.groups >= TENSOR_CORE_MIN_CG else "direct"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self._path()
        bs = self.block_size if isinstance(self.block_size, int) else None
        def config_for(flat):
            """``block_size`` tiles for channels_last inputs; NCHW inputs get the row-wise default tiles."""
            if path != "direct":
                return None
            if flat.shape[1] > 1 and flat.is_contiguous(memory_format=torch.channels_last):
                return default_depthwise_config(self.out_channels, bs, True)
            return default_depthwise_config(self.out_channels, None, False)

        def dense_fn(flat):
            return F.conv2d(flat, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

        def kernel_fn(flat, occ, dense, scale, shift):
            return grouped_conv2d(flat, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                  self.groups, scale=scale, shift=shift, occupancy=occ if path == "direct" else None,
                                  config=config_for(flat), block_size=bs, path=path, dense=dense)

        def op_fn(flat, dense, scale, shift):
            return torch.ops.sparseflow.grouped_conv2d(flat, self.weight, self.bias, list(self.stride),
                                                       list(self.padding), list(self.dilation), self.groups, scale,
                                                       shift, path, dense)

        key = ("grouped", self.out_channels, self.groups, self.kernel_size, self.stride, self.padding,
               self.dilation, path)
        return self._run(x, dense_fn, kernel_fn, key, op_fn)
