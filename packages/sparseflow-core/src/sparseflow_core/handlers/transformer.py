"""Handlers of spiking Transformers: ``nn.Linear``, ``nn.Conv1d(kernel_size=1)`` projections (with the
BatchNorm1d they feed folded), SpikingJelly's spiking self-attention modules and ``nn.MultiheadAttention``.

The attention handlers replace the whole attention module by a subclass that keeps its children (same
``state_dict`` keys, neuron state and ``reset_net``): Spikformer's ``SpikingSelfAttention`` gets sparse
projections and the SSA product on the Triton kernel; the Spike-driven Transformer's
``SpikeDrivenSelfAttention`` gets its Hadamard attention on the kernel (its 1x1 convolutions stay children
that the convolution pass of ``optimize`` fuses with their BatchNorm and neuron).
"""

from __future__ import annotations

from torch import nn

from sparseflow_ops import (
    SparseConv1d,
    SparseLinear,
    SparseMultiheadAttention,
    SparseSpikeDrivenSelfAttention,
    SparseSpikingSelfAttention,
)

from ..registry import OpHandler, register_op_handler


def _mode(ctx) -> str:
    return ctx.mode if ctx.mode in ("auto", "sparse", "dense", "torch") else "auto"


def _folded_bn(ctx, features: int):
    """The eval-mode BatchNorm1d that alone uses the module's whole output, unchanged, or None (and why)."""
    user, why = ctx.analysis.sole_user(ctx.name)
    if user is None:
        return None, f"BatchNorm not folded: output {why}"
    bn = ctx.model.get_submodule(user)
    if not isinstance(bn, nn.BatchNorm1d):
        return None, ""
    if bn.training or not bn.track_running_stats or bn.running_mean is None or bn.num_features != features:
        return None, f"BatchNorm {user} not folded (training mode, no running stats or other features)"
    return bn, user


def _replace_linear(m: nn.Linear, ctx):
    new = SparseLinear.from_dense(m, mode=_mode(ctx))
    return new, "sparse linear"


def _replace_conv1d(m: nn.Conv1d, ctx):
    why = SparseConv1d.problem(m)
    if why:
        return None, why
    bn, bn_name = _folded_bn(ctx, m.out_channels)
    info = ctx.info
    if bn is not None and info is not None and info.out_shape is not None and len(info.out_shape) != 3:
        bn, bn_name = None, "BatchNorm not folded: output is not [N, C, L]"
    new = SparseConv1d.from_dense(m, bn, mode=_mode(ctx))
    if bn is not None:
        return new, f"sparse conv1x1+bn ({bn_name})"
    return new, "sparse conv1x1" + (f"; {bn_name}" if bn_name else "")


def _replace_ssa(m, ctx):
    an = ctx.analysis
    projections = ["proj_conv_bn"]  # fed by attn_lif: always spikes
    ok, why = an.spike_fed(f"{ctx.name}.qkv_conv_bn.0")
    if ok:
        projections.insert(0, "qkv_conv_bn")
    new = SparseSpikingSelfAttention.from_dense(m, mode=_mode(ctx), projections=projections)
    return new, f"{new.kind()}" + ("" if ok else f" (qkv projection dense: {why})")


def _replace_sdsa(m, ctx):
    new = SparseSpikeDrivenSelfAttention.from_dense(m, mode=_mode(ctx))
    return new, "spike-driven attention kernel (1x1 convs fused by the conv pass)"


def _replace_mha(m, ctx):
    why = SparseMultiheadAttention.unsupported(m)
    if why:
        return None, f"stays dense: {why}"
    return SparseMultiheadAttention.from_dense(m, mode=_mode(ctx)), "sparse in/out projections + SDPA"


register_op_handler(nn.Linear, OpHandler("linear", _replace_linear))
register_op_handler(nn.Conv1d, OpHandler("conv1x1", _replace_conv1d, accepts=lambda m: m.kernel_size == (1,)))
register_op_handler(nn.MultiheadAttention, OpHandler("mha", _replace_mha))
if SparseSpikingSelfAttention is not None:
    from sparseflow_ops.attention import SpikeDrivenSelfAttention, SpikingSelfAttention

    register_op_handler(SpikingSelfAttention, OpHandler("ssa", _replace_ssa, needs_spikes=False))
    register_op_handler(SpikeDrivenSelfAttention, OpHandler("sdsa", _replace_sdsa, needs_spikes=False))
