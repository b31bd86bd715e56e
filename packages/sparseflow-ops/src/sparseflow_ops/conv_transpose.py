"""``SparseConvTranspose2d``: a drop-in ``nn.ConvTranspose2d`` on
:func:`sparseflow_kernels.conv_transpose.sparse_conv_transpose2d` (groups 1, dilation 1, any stride, kernel,
padding and output_padding; ``output_size=`` as in torch).

The decoder of a spiking U-Net upsamples spikes: the kernel gathers, per output phase and tile, only the
non-zero (tile, channel group) blocks of the input. An eval-mode BatchNorm fed only by the transposed
convolution can be folded in (``bn=``) and is then bypassed. Each call picks the fastest of the sparse kernel,
the same kernel without skipping and cuDNN by measurement (``mode`` forces one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparseflow_kernels.conv_transpose import pack_transpose_weight, sparse_conv_transpose2d
from sparseflow_kernels.sparse_conv import default_config

from ._common import version_key
from .depthwise import TileSkippingConv


class SparseConvTranspose2d(TileSkippingConv, nn.ConvTranspose2d):
    """Drop-in ``nn.ConvTranspose2d`` (same parameters, ``state_dict`` keys and ``isinstance``); inputs
    ``[N, C, H, W]`` or multi-step ``[T, N, C, H, W]``."""

    _kind = "conv_transpose"
    _caches = ("_acache", "_wcache")

    _dense_cls = nn.ConvTranspose2d

    @staticmethod
    def _problem(conv: nn.ConvTranspose2d) -> str | None:
        """Why ``conv`` cannot run here, or None."""
        if conv.groups != 1:
            return f"groups={conv.groups} is not supported (only 1)"
        if tuple(conv.dilation) != (1, 1):
            return f"dilation={conv.dilation} is not supported (only 1)"
        if conv.padding_mode != "zeros":
            return f"padding_mode={conv.padding_mode!r} is not supported (only 'zeros')"
        return None

    @staticmethod
    def _init_args(conv: nn.ConvTranspose2d) -> tuple:
        return (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.output_padding,
                conv.groups, conv.bias is not None, conv.dilation, conv.padding_mode)

    @property
    def accepts_occupancy(self) -> bool:
        """The sparse path reads a producer's occupancy of any tile with 16-channel groups (the fused layers'),
        so ``optimize(..., write_occupancy=True)`` has the layer before it write one."""
        return self.block_size != "dense" and default_config(self.in_channels, self.out_channels).block_k == 16

    def _packed(self, cfg, dtype):
        key = (*version_key(self.weight), cfg.block_k, cfg.block_n, dtype)
        return self._wcache.get(key, lambda: pack_transpose_weight(self.weight, self.stride, self.padding,
                                                                   cfg.block_k, cfg.block_n, dtype))

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        flat_probe = x.flatten(0, 1) if x.dim() == 5 else x
        out_pad = self._output_padding(flat_probe, output_size, self.stride, self.padding, self.kernel_size, 2,
                                       self.dilation)
        out_pad = tuple(int(v) for v in out_pad)
        bs = self.block_size if isinstance(self.block_size, int) else None
        cfg = default_config(self.in_channels, self.out_channels, bs)

        def dense_fn(flat):
            return F.conv_transpose2d(flat, self.weight, self.bias, self.stride, self.padding, out_pad, self.groups,
                                      self.dilation)

        def kernel_fn(flat, occ, dense, scale, shift):
            if occ is not None and occ.group != cfg.block_k:
                occ = None
            return sparse_conv_transpose2d(flat, self.weight, self.bias, self.stride, self.padding, out_pad,
                                           scale=scale, shift=shift, occupancy=occ, config=cfg,
                                           packed_weight=self._packed(cfg, flat.dtype), dense=dense)

        def op_fn(flat, dense, scale, shift):
            return torch.ops.sparseflow.conv_transpose2d(flat, self.weight, self.bias, list(self.stride),
                                                         list(self.padding), list(out_pad), scale, shift, dense)

        key = ("conv_transpose", self.out_channels, self.kernel_size, self.stride, self.padding, out_pad)
        return self._run(x, dense_fn, kernel_fn, key, op_fn)
