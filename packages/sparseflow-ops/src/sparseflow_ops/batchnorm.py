"""``SparseBatchNorm2d``: a drop-in ``nn.BatchNorm2d`` for a BatchNorm that consumes spikes.

A BatchNorm right after a spiking neuron (or a residual add of spikes) cannot be folded into a convolution. In
eval mode it runs :func:`sparseflow_kernels.batchnorm.batch_norm_affine`: the per-channel affine of
``nn.BatchNorm2d`` in fp32, where every (sample, tile, 16-channel group) block that the producer's occupancy marks
as all zero writes the per-channel constant ``bias - mean * weight / sqrt(var + eps)`` without reading the input.
Without an occupancy attached to its input it reads every block (still one fused pass). ``mode="auto"`` times the
kernel against ``nn.BatchNorm2d`` on the first CUDA call per input shape and keeps the faster (always the kernel
on the CPU interpreter); ``"sparse"`` forces the kernel, ``"torch"`` the dense op.

Training mode, batch statistics in eval (``track_running_stats=False``), tensors the kernels cannot run on
(CPU without the interpreter, float64), numerics="faithful" and anything else ``nn.BatchNorm2d`` would reject
take ``nn.BatchNorm2d``'s own forward, so results and errors are the dense module's.
"""

from __future__ import annotations

import torch
from torch import nn

from sparseflow_kernels.batchnorm import batch_norm_affine, bn_eval_affine

from ._common import find_occupancy, kernels_can_run, needs_autograd, notice_once, version_key
from .base import SparseModule


class SparseBatchNorm2d(SparseModule, nn.BatchNorm2d):
    """Drop-in ``nn.BatchNorm2d`` (same parameters, buffers and ``state_dict`` keys). Inputs ``[N, C, H, W]``,
    or ``[T, N, C, H, W]`` when wrapping a multi-step SpikingJelly ``layer.BatchNorm2d``."""

    _runtime = ("_pending", "_acache", "_original_class", "_original_dict", "mode", "last_path", "step_mode",
                "numerics")
    _kind = "batchnorm2d"

    def __init__(self, *args, mode: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        if mode not in ("auto", "sparse", "torch"):
            raise ValueError(f"mode must be 'auto', 'sparse' or 'torch', got {mode!r}")
        self.mode = mode
        self._init_runtime()

    @classmethod
    def from_dense(cls, bn: nn.BatchNorm2d, *, mode: str = "auto") -> SparseBatchNorm2d:
        """Wrap ``bn`` (sharing its parameters and buffers); the caller puts the result where ``bn`` was."""
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"from_dense expects an nn.BatchNorm2d, got {type(bn).__name__}")
        if isinstance(bn, SparseModule):
            raise TypeError("from_dense: the module is already a SparseFlow module")
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta",
                  mode=mode)
        for k in ("weight", "bias"):
            new._parameters[k] = bn._parameters.get(k)
        for k in ("running_mean", "running_var", "num_batches_tracked"):
            new._buffers[k] = bn._buffers.get(k)
        new.training = bn.training
        new.__dict__["_original_class"] = type(bn)
        new.__dict__["_original_dict"] = {k: v for k, v in bn.__dict__.items() if k not in new.__dict__}
        if hasattr(bn, "step_mode"):
            new.__dict__["step_mode"] = bn.step_mode
        return new

    def to_dense(self) -> nn.BatchNorm2d:
        """The original BatchNorm class back, holding the same parameters and buffers."""
        klass = self.__dict__.get("_original_class", nn.BatchNorm2d)
        bn = klass.__new__(klass)
        nn.Module.__init__(bn)
        for k, v in self.__dict__.get("_original_dict", {}).items():
            bn.__dict__[k] = v
        for k, v in self.__dict__.items():
            if k not in self._runtime:
                bn.__dict__[k] = v
        if "step_mode" in self.__dict__:
            bn.step_mode = self.__dict__["step_mode"]
        return bn

    def _repr_fields(self) -> dict:
        return {"mode": self.mode}

    # ---------------------------------------------------------------------------------------- running
    def _multistep(self) -> bool:
        return self.__dict__.get("step_mode") == "m"

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        if self._multistep():
            if x.dim() != 5:
                raise ValueError(f"expected x with shape [T, N, C, H, W], but got x with shape {x.shape}!")
            y = nn.BatchNorm2d.forward(self, x.flatten(0, 1))
            return y.view(x.shape)
        return nn.BatchNorm2d.forward(self, x)

    def _use_kernels(self, x: torch.Tensor) -> bool:
        """Whether this call runs the kernel (eval mode with running statistics, an input the dense module takes
        and the kernels run on, no autograd); numerics="faithful" runs the dense module."""
        if self.faithful or self.mode == "torch" or self.training:
            return False
        if not self.track_running_stats or self.running_mean is None:
            return False
        if x.dim() != (5 if self._multistep() else 4) or x.shape[-3] != self.num_features:
            return False  # the dense module raises its own error
        if needs_autograd(x, self):
            return False
        if not kernels_can_run(x):
            if not x.is_cuda:
                notice_once("cpu-dense", "sparseflow: CPU tensors run the dense torch ops (Triton kernels "
                            "need CUDA, or TRITON_INTERPRET=1 on the CPU)")
            return False
        w = self.weight if self.weight is not None else self.running_mean
        return w.device == x.device

    def _affine(self):
        # (num_batches_tracked: a training-mode forward moves the running statistics without bumping their versions)
        key = (*version_key(self.weight, self.bias, self.running_mean, self.running_var, self.num_batches_tracked),
               self.eps)
        return self._acache.get(key, lambda: bn_eval_affine(self.running_mean, self.running_var, self.weight,
                                                            self.bias, self.eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._use_kernels(x):
            self.last_path = "torch"
            return self._dense(x)
        flat = x.flatten(0, 1) if x.dim() == 5 else x
        occ = find_occupancy(x, flat)
        mean, scale, bias = self._affine()
        kernel = "sparse" if occ is not None else "kernel"
        cands = {kernel: lambda: batch_norm_affine(flat, mean, scale, bias, occupancy=occ),
                 "torch": lambda: nn.BatchNorm2d.forward(self, flat)}
        key = ("batchnorm", tuple(flat.shape), flat.stride(), x.dtype, occ is not None)
        y = self._dispatch(key, cands, x, fallback=kernel, default=kernel, forced={"sparse": kernel})
        return y.view(x.shape) if x.dim() == 5 else y
