"""Handlers of spiking Transformers: ``nn.Linear``, ``nn.Conv1d(kernel_size=1)`` projections (with the
BatchNorm1d they feed folded), SpikingJelly's spiking self-attention modules and ``nn.MultiheadAttention``.

The attention handlers replace the whole attention module by a subclass that keeps its children (same
``state_dict`` keys, neuron state and ``reset_net``): Spikformer's ``SpikingSelfAttention`` gets sparse
projections and the SSA product on the Triton kernel; the Spike-driven Transformer's
``SpikeDrivenSelfAttention`` gets its Hadamard attention on the kernel (its 1x1 convolutions stay children
that the convolution pass of ``optimize`` fuses with their BatchNorm and neuron); QKFormer's ``QKAttention`` gets its
token attention (head sums, ``attn_lif``, ``attn * k``) as one kernel, its projections handled as children.
"""

from __future__ import annotations

from torch import nn

from sparseflow_ops import (
    SparseConv1d,
    SparseLinear,
    SparseMultiheadAttention,
    SparseQKAttention,
    SparseSpikeDrivenSelfAttention,
    SparseSpikformerBlock,
    SparseSpikingSelfAttention,
    neuron_support,
)
from sparseflow_ops.neurons import find_adapter

from ..registry import OpHandler, is_spiking_module, register_op_handler
from . import module_hooks


def _mode(ctx) -> str:
    return ctx.mode if ctx.mode in ("auto", "sparse", "dense", "torch") else "auto"


def _fusible_neuron(ctx, src: str, conv_name: str):
    """(neuron, its name, time_steps, note): the spiking neuron that alone takes ``src``'s whole output (the
    BatchNorm after a projection, or the projection itself), if it can run fused; else (None, None, None, why)."""
    an = ctx.analysis
    user, why = an.sole_user(src)
    if user is None:
        return None, None, None, f"no neuron fused: output {why}"
    m = ctx.model.get_submodule(user)
    if not is_spiking_module(m):
        return None, None, None, ""
    adapter, why = neuron_support(m)
    if adapter is None:
        return None, None, None, f"neuron {user} not fused: {why}"
    if module_hooks(m):
        return None, None, None, f"neuron {user} not fused: it has {module_hooks(m)} hooks"
    ok, why = an.chained(src, user)
    if not ok:
        return None, None, None, f"neuron {user} not fused: {why}"
    n_in, out, conv_in = an.first(user).in_shape, an.first(src).out_shape, an.first(conv_name).in_shape
    multistep = find_adapter(m).is_multistep(m)
    if multistep and len(n_in) == 4 and len(conv_in) == 3 and n_in[0] * n_in[1] == out[0] and \
            tuple(n_in[2:]) == tuple(out[1:]):
        return m, user, n_in[0], ""  # SeqToANNContainer: [T*N, C, L] in the projection, [T, N, C, L] in the neuron
    if tuple(n_in) == tuple(out) and (len(n_in) == 4 if multistep else len(n_in) == 3):
        return m, user, None, ""
    return None, None, None, f"neuron {user} not fused: it sees a reshaped view {n_in} of {out}"


def _replace_linear(m: nn.Linear, ctx):
    new = SparseLinear.from_dense(m, mode=_mode(ctx))
    return new, "sparse linear"


def _bn_channel_problem(bn: nn.BatchNorm1d, out_shape) -> str:
    """Why ``bn`` would not normalise the channels of a projection's output ``out_shape`` (the dim before the
    tokens), or ''. A single-step BatchNorm1d normalises dim 1: the channels of ``[N, C, L]`` (of an unbatched
    ``[C, L]`` it would be the tokens). A multi-step SpikingJelly one (``step_mode="m"``) merges the two leading
    dims first: the channels of ``[T, N, C, L]`` (of ``[T*N, C, L]`` it would be the tokens)."""
    multistep = getattr(bn, "step_mode", "s") == "m"
    want = 4 if multistep else 3
    if len(out_shape) == want:
        return ""
    kind = "the multi-step BatchNorm1d" if multistep else "the BatchNorm1d"
    return f"{kind} normalises the last dim of the output {tuple(out_shape)}, not its channels"


def _replace_conv1d(m: nn.Conv1d, ctx):
    why = SparseConv1d.problem(m)
    if why:
        return None, why
    bn, bn_name = ctx.foldable_bn(nn.BatchNorm1d, m.out_channels)
    info = ctx.info
    if bn is not None and info is not None and info.out_shape is not None:
        why = _bn_channel_problem(bn, info.out_shape)
        if why:
            bn, bn_name = None, f"BatchNorm not folded: {why}"
    neuron = neuron_name = steps = None
    note = ""
    if bn is not None or not bn_name:  # BatchNorm folded, or no BatchNorm after the projection
        neuron, neuron_name, steps, note = _fusible_neuron(ctx, bn_name if bn is not None else ctx.name, ctx.name)
    new = SparseConv1d.from_dense(m, bn, neuron, mode=_mode(ctx), time_steps=steps)
    fused = ", ".join(n for n in ((bn_name if bn is not None else None), neuron_name) if n)
    text = f"sparse {new.kind()}" + (f" ({fused})" if fused else "")
    notes = [n for n in ((bn_name if bn is None else ""), note) if n]
    return new, text + "".join(f"; {n}" for n in notes)


def _replace_ssa(m, ctx):
    an = ctx.analysis
    projections = ["proj_conv_bn"]  # fed by attn_lif: always spikes
    ok, why = an.spike_fed(f"{ctx.name}.qkv_conv_bn.0")
    if ok:
        projections.insert(0, "qkv_conv_bn")
    neurons, notes = {}, []
    for pname, lif in (("qkv_conv_bn", "qkv_lif"), ("proj_conv_bn", "proj_lif")):
        neuron = getattr(m, lif, None)
        info = an.first(f"{ctx.name}.{lif}")
        adapter, nwhy = neuron_support(neuron) if neuron is not None else (None, "missing")
        if adapter is None or info is None or len(info.in_shape) != 4 or not adapter.is_multistep(neuron):
            notes.append(f"{lif} not fused: {nwhy or 'not a multi-step [T, N, C, L] neuron'}")
        elif module_hooks(neuron):
            notes.append(f"{lif} not fused: it has {module_hooks(neuron)} hooks")
        else:
            neurons[pname] = info.in_shape[0]
    new = SparseSpikingSelfAttention.from_dense(m, mode=_mode(ctx), projections=projections, neurons=neurons)
    if not ok:
        notes.insert(0, f"qkv projection dense: {why}")
    return new, new.kind() + (f" ({'; '.join(notes)})" if notes else "")


def _replace_spikformer_block(m, ctx):
    new = SparseSpikformerBlock.from_dense(m, mode=_mode(ctx))
    return new, "skip connections added in the epilogues of the fused projections that end attn and mlp"


def _replace_sdsa(m, ctx):
    new = SparseSpikeDrivenSelfAttention.from_dense(m, mode=_mode(ctx))
    return new, "spike-driven attention kernel (1x1 convs fused by the conv pass)"


def _replace_qka(m, ctx):
    new = SparseQKAttention.from_dense(m, mode=_mode(ctx))
    if m.qka_type != "token":
        return new, "qk attention: channel attention runs as the module's own ops; a skip add goes into the fused " \
                    "output projection"
    return new, "qk attention: the head sums of q, attn_lif and attn * k in one kernel (token attention)"


def _replace_mha(m, ctx):
    why = SparseMultiheadAttention.unsupported(m)
    if why:
        return None, f"stays dense: {why}"
    return SparseMultiheadAttention.from_dense(m, mode=_mode(ctx)), "sparse in/out projections + SDPA"


register_op_handler(nn.Linear, OpHandler("linear", _replace_linear))
register_op_handler(nn.Conv1d, OpHandler("conv1x1", _replace_conv1d, accepts=lambda m: m.kernel_size == (1,),
                                                faithful=True))
register_op_handler(nn.MultiheadAttention, OpHandler("mha", _replace_mha))
if SparseSpikingSelfAttention is not None:
    from sparseflow_ops.attention import SpikeDrivenSelfAttention, SpikingSelfAttention

    register_op_handler(SpikingSelfAttention, OpHandler("ssa", _replace_ssa, needs_spikes=False, faithful=True))
    register_op_handler(SpikeDrivenSelfAttention, OpHandler("sdsa", _replace_sdsa, needs_spikes=False))
if SparseSpikformerBlock is not None:
    from sparseflow_ops.attention import SpikformerBlock

    register_op_handler(SpikformerBlock, OpHandler("spikformer-block", _replace_spikformer_block,
                                                   needs_spikes=False, action="kernel", uses_blocks=False,
                                                   descend=True, faithful=True))
if SparseQKAttention is not None:
    from sparseflow_ops.attention import QKAttention

    register_op_handler(QKAttention, OpHandler("qka", _replace_qka, needs_spikes=False, action="kernel",
                                               uses_blocks=False, descend=True, faithful=True))
