"""Max pools run on a one-pass Triton kernel that keeps the input's layout (channels_last spikes, and the
channels_last conv outputs that Spikformer's patch stem pools before its neurons). Exact for any input."""

from __future__ import annotations

from torch import nn

from sparseflow_ops.pool import TritonMaxPool2d

from ..registry import OpHandler, register_op_handler
from . import static_writer


def _replace(m: nn.MaxPool2d, ctx):
    if ctx.mode == "torch":
        return None, "mode='torch'"
    new = TritonMaxPool2d.from_dense(m)
    # a static input's frame (its stem convolved once) pooled once and handed on repeated by stride 0: only where
    # no reader writes into the output; said in the report where the pool reads a stem's output, not spikes
    writer = static_writer(ctx.analysis, ctx.model, ctx.name)
    new.static_passthrough = not writer
    detail = "max pool (Triton, layout kept)"
    if writer and new.multi_step and not ctx.analysis.spike_fed(ctx.name)[0]:
        detail += f"; a static input is pooled at every step: {writer}"
    return new, detail


register_op_handler(nn.MaxPool2d, OpHandler("maxpool2d", _replace, accepts=lambda m: not m.return_indices,
                                                needs_spikes=False, action="kernel", uses_blocks=False,
                                                faithful=True))
