"""``TritonMaxPool2d``: ``nn.MaxPool2d`` on one Triton pass that keeps the input's memory format.

Used by ``optimize()`` for max pools over spikes (the spiking ResNet stem): the spikes are channels_last there,
where PyTorch's max pool is slow (see ``sparseflow_kernels.pool``). Exactly ``F.max_pool2d``'s result.
SpikingJelly multi-step layers (``step_mode='m'``, ``[T, N, C, H, W]``) pool each step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparseflow_kernels.library import compiling
from sparseflow_kernels.pool import max_pool2d

from ._common import kernels_can_run, passes_repeated, take_shift
from .base import SparseModule


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class TritonMaxPool2d(SparseModule, nn.MaxPool2d):
    """Drop-in ``nn.MaxPool2d`` (no ``return_indices``) running :func:`sparseflow_kernels.pool.max_pool2d`
    in eval and inference; training-mode calls that need autograd run ``F.max_pool2d``. Exact, so the same under
    numerics="faithful"."""

    _caches = ()
    _kind = "max_pool2d"
    # multi-step: an input repeated over the steps by stride 0 (a static image's convolution) pooled once and handed
    # on repeated so (set by optimize where no reader of the output writes into it)
    static_passthrough = False

    def _repr_fields(self) -> dict:
        return {}

    @classmethod
    def from_dense(cls, m: nn.MaxPool2d) -> TritonMaxPool2d:
        if not isinstance(m, nn.MaxPool2d):
            raise TypeError(f"from_dense expects an nn.MaxPool2d, got {type(m).__name__}")
        if m.return_indices:
            raise ValueError("return_indices=True is not supported")
        new = cls(m.kernel_size, m.stride, m.padding, m.dilation, False, m.ceil_mode)
        new.training = m.training
        new.__dict__["_original"] = m
        new.multi_step = getattr(m, "step_mode", "s") == "m"
        return new

    def to_dense(self) -> nn.Module:
        return self.__dict__.get("_original") or nn.MaxPool2d(self.kernel_size, self.stride, self.padding,
                                                               self.dilation, False, self.ceil_mode)

    def _pool(self, x: torch.Tensor, shift=None) -> torch.Tensor:
        if kernels_can_run(x) and not (torch.is_grad_enabled() and x.requires_grad) and x.dim() in (3, 4):
            if compiling():
                y = torch.ops.sparseflow.max_pool2d(x, list(_pair(self.kernel_size)), list(_pair(
                    self.stride or self.kernel_size)), list(_pair(self.padding)), list(_pair(self.dilation)),
                    self.ceil_mode)
                return y if shift is None else y + shift.to(y.dtype).view(-1, 1, 1)
            return max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode,
                              shift=shift)
        y = F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)
        return y if shift is None else y + shift.to(y.dtype).view(-1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A convolution whose folded bias was left to this pool (``SparseConv2d.defer_shift``, the producer
        attached it to its output) gets it added here, after the max: the same value, on 4x fewer elements. With
        ``static_passthrough``, a multi-step input repeated over the steps by stride 0 is pooled once per sample
        and returned repeated by stride 0, ``max_pool(x[t]) = max_pool(x[0])`` (in eval mode, and not while
        ``torch.export`` traces the call)."""
        shift = None if compiling() else take_shift(x)  # (a traced conv adds its own bias)
        if getattr(self, "multi_step", False) and x.dim() == 5:
            if self.static_passthrough and not self.training and passes_repeated(x):
                y = self._pool(x[0], shift)
                return y.unsqueeze(0).expand(x.shape[0], *y.shape)
            y = self._pool(x.flatten(0, 1), shift)
            return y.view(*x.shape[:2], *y.shape[1:])
        return self._pool(x, shift)
