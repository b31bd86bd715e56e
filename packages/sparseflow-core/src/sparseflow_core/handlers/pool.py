"""Max pools run on a one-pass Triton kernel that keeps the input's layout (channels_last spikes, and the
channels_last conv outputs that Spikformer's patch stem pools before its neurons). Exact for any input."""

from __future__ import annotations

from torch import nn

from sparseflow_ops.pool import TritonMaxPool2d

from ..registry import OpHandler, register_op_handler


def _replace(m: nn.MaxPool2d, ctx):
    if ctx.mode == "torch":
        return None, "mode='torch'"
    return TritonMaxPool2d.from_dense(m), "max pool (Triton, layout kept)"


register_op_handler(nn.MaxPool2d, OpHandler("maxpool2d", _replace, accepts=lambda m: not m.return_indices,
                                                needs_spikes=False, action="kernel", uses_blocks=False,
                                                faithful=True))
