"""``nn.BatchNorm2d`` fed by spikes (after a neuron or a residual add of spikes) -> ``SparseBatchNorm2d``.

A BatchNorm fed by a convolution is not this handler's: the ``nn.Conv2d`` handler (``conv2d.py``, in the chains
pass, which runs after the other handlers) folds it into the ``SparseConv2d`` it follows (``report.folded``), or
leaves it with that convolution when the convolution stays dense. So the handler declines every BatchNorm whose
input is produced by an ``nn.Conv2d``, and every one whose input the analyzer did not prove to be spikes.
"""

from __future__ import annotations

from torch import nn

from sparseflow_ops import SparseBatchNorm2d

from ..registry import OpHandler, register_op_handler

_MODES = {"auto": "auto", "sparse": "sparse", "dense": "sparse", "torch": "torch"}


def _replace(m: nn.BatchNorm2d, ctx):
    info = ctx.info
    an = ctx.analysis
    prod = info.producer if info is not None else None
    if prod is not None and issubclass(an.types.get(prod, type(None)), nn.Conv2d):
        return None, f"fed by convolution {prod}"  # folded into it when it is replaced (optimize says which)
    ok, why = an.spike_fed(ctx.name)
    if not ok:
        return None, why
    if m.training:
        return None, "training mode (batch statistics): stays nn.BatchNorm2d"
    if not m.track_running_stats or m.running_mean is None:
        return None, "no running statistics (normalises with batch statistics in eval)"
    if len(info.in_shape) not in (4, 5):
        return None, f"input of shape {info.in_shape} (expects [N, C, H, W] or [T, N, C, H, W])"
    return SparseBatchNorm2d.from_dense(m, mode=_MODES.get(ctx.mode, "auto")), "sparse batchnorm (zero blocks unread)"


register_op_handler(nn.BatchNorm2d, OpHandler("batchnorm", _replace, needs_spikes=False))
