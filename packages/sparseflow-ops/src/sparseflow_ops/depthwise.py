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

from sparseflow_kernels import dispatch as kdispatch
from sparseflow_kernels.depthwise import TENSOR_CORE_MIN_CG, default_depthwise_config, grouped_conv2d
from sparseflow_kernels.library import compiling

from ._common import SparseModule, VersionCache, find_occupancy, has_hooks, kernels_take, needs_autograd
from .conv import MODES, adopt_dense, bn_affine, bn_key, dense_copy

_RUNTIME = ("_bn", "_pending", "_acache", "_wcache", "_original_class", "block_size", "mode", "time_steps", "last_path",
            "step_mode")


def check_foldable_bn(bn, channels: int) -> None:
    if not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(f"bn must be an nn.BatchNorm2d, got {type(bn).__name__}")
    if bn.num_features != channels:
        raise ValueError(f"bn has {bn.num_features} features, the convolution {channels} outputs")
    if not bn.track_running_stats or bn.running_mean is None:
        raise ValueError("BatchNorm without running statistics cannot be folded")


class FoldedBNMixin:
    """Runtime of the grouped and transposed drop-ins: folded BatchNorm (bypassed), dispatch, fallback, restore."""

    def _init_runtime(self):
        self.__dict__["_pending"] = False
        self.__dict__["_acache"] = VersionCache()
        self.last_path: str | None = None

    def _affine(self):
        bn = self.__dict__.get("_bn")
        if bn is None:
            return None, None
        return self._acache.get(bn_key(bn), lambda: bn_affine(bn))

    @property
    def folded_bn(self):
        return self.__dict__.get("_bn")

    def kind(self) -> str:
        return self._kind_name + ("+bn" if self.folded_bn is not None else "")

    def _attach(self, src: nn.Module, bn, block_size, mode):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.block_size = block_size
        self.mode = mode
        self.time_steps = None
        adopt_dense(self, src, bn)

    def _dense_copy(self, default_cls):
        return dense_copy(self, default_cls, _RUNTIME)

    def __setstate__(self, state):
        super().__setstate__(state)
        if "_pending" not in self.__dict__:
            self._init_runtime()

    def _use_kernels(self, x: torch.Tensor) -> bool:
        bn = self.folded_bn
        if self.training or (bn is not None and bn.training):
            return False
        if bn is not None and has_hooks(self, bn):
            return False  # conv and BatchNorm run as two modules: each hook sees what it sees in the dense model
        return kernels_take(x, self.weight, type(self).__name__) and not needs_autograd(x, self, bn)

    def _choose(self, key, cands, x):
        if self.mode != "auto":
            return self.mode if self.mode in cands else "dense"
        return kdispatch.choose(key, cands, fallback="sparse" if "sparse" in cands else "dense", device=x.device)

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
        if not self._use_kernels(x):
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
            path = self._choose(full_key, cands, x)
            self.last_path = path
            y = cands[path]()
            self._pending = self.folded_bn is not None
        return y.view(*x.shape[:2], *y.shape[1:]) if five else y


class SparseGroupedConv2d(FoldedBNMixin, SparseModule, nn.Conv2d):
    """Drop-in ``nn.Conv2d`` with ``groups > 1`` (same parameters, ``state_dict`` keys and ``isinstance``);
    see the module docstring. Inputs ``[N, C, H, W]`` or multi-step ``[T, N, C, H, W]``."""

    _kind_name = "grouped"

    def __init__(self, *args, block_size=None, mode: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.block_size = block_size
        self.mode = mode
        self.time_steps: int | None = None
        self.__dict__["_bn"] = None
        self._init_runtime()

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, *, block_size=None,
                   mode: str = "auto") -> SparseGroupedConv2d:
        """Wrap ``conv`` (sharing its parameters); with ``bn`` (an eval BatchNorm fed only by ``conv``) it is
        folded and bypassed. The caller puts the new module where ``conv`` was."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_dense expects an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups < 2:
            raise ValueError(f"groups={conv.groups}: use SparseConv2d for ungrouped convolutions")
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported (only 'zeros')")
        if isinstance(conv.padding, str):
            raise ValueError(f"padding={conv.padding!r} strings are not supported")
        if bn is not None:
            check_foldable_bn(bn, conv.out_channels)
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                  device="meta", block_size=block_size, mode=mode)
        new._attach(conv, bn, block_size, mode)
        return new

    def to_dense(self) -> nn.Conv2d:
        """The plain convolution back (same parameters); a folded BatchNorm runs on its own again."""
        return self._dense_copy(nn.Conv2d)

    @property
    def is_depthwise(self) -> bool:
        return self.groups == self.in_channels

    def kind(self) -> str:
        return ("depthwise" if self.is_depthwise else "grouped") + ("+bn" if self.folded_bn is not None else "")

    def extra_repr(self):
        return super().extra_repr() + f", fused={self.kind()}, block_size={self.block_size}, mode={self.mode}"

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
