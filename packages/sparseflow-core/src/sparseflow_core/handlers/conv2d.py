"""``nn.Conv2d`` -> :class:`~sparseflow_ops.SparseConv2d`, with the conv -> BatchNorm -> neuron chain after it fused.

When the convolution's output feeds only an eval-mode BatchNorm2d, the BatchNorm is folded into it; when that
BatchNorm's output feeds only a supported spiking neuron, the neuron runs fused in the same kernel (over all T
steps). Folded and fused modules stay in the model, bypassed, so ``state_dict`` keys and neuron state
(``reset_net``) are unchanged. A convolution whose input is not spikes (the stem on the image) skips nothing but
still runs its chain as one fused layer. A chain whose BatchNorm output goes into an add is left to the residual
pass (``state.deferred``).

The handler runs in the ``"chains"`` stage (``passes/chains.py``), after the other handlers: it reads the
optimize state from ``ctx.state`` and fills the report entry ``ctx.entry``. Grouped convolutions (``groups > 1``)
have their own handler (``grouped_transposed.py``), registered after this one.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from sparseflow_ops import SparseConv2d, neuron_support
from sparseflow_ops.conv import pool_problem

from ..blocks import dense_reason, select_block_size
from ..hooks import module_hooks
from ..registry import OpHandler, is_spiking_module, register_op_handler
from . import static_writer


def conv_problem(conv: nn.Conv2d) -> str | None:
    """Why ``conv`` cannot become a SparseConv2d, or None."""
    hooks = module_hooks(conv)
    if hooks:
        return f"has {hooks} hooks, which a replacement module would drop"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only 'zeros' is supported)"
    if conv.groups != 1:
        return f"groups={conv.groups} (grouped/depthwise convolution not supported yet)"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r} given as a string"
    if parametrize.is_parametrized(conv):
        return (f"parametrized {', '.join(conv.parametrizations)} (weight_norm / spectral_norm: computed from "
                "other tensors on every call)")
    if conv.weight.is_complex():
        return "complex weights"
    if conv.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"weight dtype {conv.weight.dtype}"
    return None


def conv_chain(an, model: nn.Module, conv_name: str, conv: nn.Conv2d):
    """(bn, bn_name, neuron, neuron_name, note) of a pure conv -> bn -> neuron chain after ``conv``."""
    bn = bn_name = None
    user, why = an.sole_user(conv_name)
    if user is None:
        return None, None, None, None, f"no fusion: conv {why}"
    m = model.get_submodule(user)
    if isinstance(m, nn.BatchNorm2d):
        why = _bn_problem(an, conv_name, conv, user, m)
        if why:
            return None, None, None, None, f"no fusion: {why}"
        bn, bn_name = m, user
        user, why = an.sole_user(bn_name)
        if user is None:
            return bn, bn_name, None, None, f"no neuron fused: batchnorm {why}"
        m = model.get_submodule(user)
    elif not is_spiking_module(m):
        return None, None, None, None, f"no fusion: output feeds {type(m).__name__} {user}"
    if not is_spiking_module(m):
        return bn, bn_name, None, None, ""
    why = _neuron_problem(an, conv_name, conv, bn_name, user, m)
    if why:
        return bn, bn_name, None, None, why
    return bn, bn_name, m, user, ""


def _bn_problem(an, conv_name, conv, user, bn) -> str:
    if bn.training:
        return f"{user} is in training mode"
    if module_hooks(bn):
        return f"{user} has {module_hooks(bn)} hooks"
    if not bn.track_running_stats or bn.running_mean is None:
        return f"{user} has no running statistics (it normalises with each batch's statistics)"
    if bn.num_features != conv.out_channels:
        return f"{user} has {bn.num_features} features"
    ok, why = an.chained(conv_name, user)
    return "" if ok else why


def _neuron_problem(an, conv_name, conv, bn_name, user, neuron) -> str:
    adapter, why = neuron_support(neuron)
    if adapter is None:
        return f"neuron {user} not fused: {why}"
    if module_hooks(neuron):
        return f"neuron {user} not fused: it has {module_hooks(neuron)} hooks"
    ok, why = an.chained(bn_name or conv_name, user)
    if not ok:
        return f"neuron {user} not fused: {why}"
    c_out = an.first(bn_name or conv_name).out_shape
    n_in = an.first(user).in_shape
    conv_in = an.first(conv_name).in_shape
    shape_ok = (n_in == c_out) or (len(conv_in) == 4 and len(n_in) == 5 and n_in[0] * n_in[1] == c_out[0]
                                  and tuple(n_in[2:]) == tuple(c_out[1:]))
    calls = zip(an.calls[conv_name], an.calls[bn_name or conv_name], an.calls[user])
    if shape_ok and any((c.in_shape, b.out_shape, n.in_shape) != (conv_in, c_out, n_in) for c, b, n in calls):
        return f"neuron {user} not fused: calls of different shapes"
    if not shape_ok:
        return f"neuron {user} sees a reshaped view {n_in} of {c_out}"
    if conv.dilation != (1, 1):
        return "neuron not fused: dilated convolution"
    return ""


def chain_pool(an, model: nn.Module, neuron_name: str):
    """(pool, pool_name, note): the max pool that alone reads the neuron's spikes, where the spiking layer can pool
    them itself (:meth:`SparseConv2d.from_dense`'s ``pool``); else (None, None, why not, or '' when no max pool
    reads them)."""
    user, _why = an.sole_user(neuron_name)
    if user is None:
        return None, None, ""
    pool = model.get_submodule(user)
    if not isinstance(pool, nn.MaxPool2d):
        return None, None, ""
    n_out, p_in = an.first(neuron_name).out_shape, an.first(user).in_shape
    why = pool_problem(pool, tuple(n_out[-2:]) if n_out is not None else None)
    if not why and module_hooks(pool):
        why = f"it has {module_hooks(pool)} hooks"
    if not why:
        _ok, why = an.chained(neuron_name, user)
    if not why and (n_out is None or tuple(p_in) != tuple(n_out)):
        why = f"it sees a reshaped view {p_in} of the spikes {n_out}"
    multi = getattr(pool, "multi_step", getattr(pool, "step_mode", "s") == "m")
    if not why and (len(n_out) == 5) != bool(multi):
        why = "its step mode does not match the spikes' shape"
    if why:
        return None, None, f"max pool {user} not fused: {why}"
    return pool, user, ""


def _fuse(st, conv, name, info, chain, block_size):
    """(the SparseConv2d of ``conv`` with its chain (bn, bn_name, neuron, neuron_name) folded / fused in, the name
    of the max pool after the neuron that it pools for, or None, and why a max pool there is not fused, or '')."""
    bn, bn_name, neuron, neuron_name = chain
    time_steps = None
    if neuron is not None and len(info.in_shape) == 4 and len(st.analysis.first(neuron_name).in_shape) == 5:
        time_steps = st.analysis.first(neuron_name).in_shape[0]  # [T*N, ...] into the conv, [T, N, ...] neuron
    pool = pool_name = None
    pool_note = ""
    if neuron is not None and time_steps is None:  # (not where the model reshapes the spikes between the two)
        pool, pool_name, pool_note = chain_pool(st.analysis, st.model, neuron_name)
    new = SparseConv2d.from_dense(conv, bn, neuron, block_size=block_size, mode=st.options.mode,
                                  time_steps=time_steps, pool=pool)
    if bn is not None:
        st.report.folded.append((bn_name, name))
    if neuron is not None:
        st.fused_neurons.add(neuron_name)
    if pool is not None:
        entry = st.entry(pool_name)
        if entry is not None:
            entry.detail = (entry.detail or "") + f"; pooled by {name} where its kernels run (one pass with the neuron)"
    return new, pool_name, pool_note


def _names(*names) -> str:
    return ", ".join(n for n in names if n)


def _replace_dense_input(conv, ctx, why):
    """A convolution not fed by spikes (e.g. the stem on the image): nothing to skip, but a conv -> BN -> neuron
    chain still runs as one fused spiking layer (no BatchNorm pass, no membrane round trips)."""
    st, name, entry, info = ctx.state, ctx.name, ctx.entry, ctx.info
    if not (st.options.fuse and not conv_problem(conv) and info is not None and st.options.mode != "torch"):
        return None, why
    bn, bn_name, neuron, neuron_name, note = conv_chain(st.analysis, st.model, name, conv)
    if neuron is None and bn is None:
        return None, why
    # (conv -> BN, then e.g. a max pool before the neuron, Spikformer's patch stem: the BN folded into the
    # convolution's weights, one channels_last cuDNN call instead of conv + BN passes)
    new, pool_name, pool_note = _fuse(st, conv, name, info, (bn, bn_name, neuron, neuron_name), "dense")
    if neuron is not None:
        entry.action = "fused"
        entry.detail = f"{new.kind()} ({_names(bn_name, neuron_name, pool_name)}), dense input"
        entry.reason = f"no skipping: {why}" + (f"; {pool_note}" if pool_note else "")
    else:
        entry.action = "sparse"
        entry.detail = f"conv+bn ({bn_name}), dense input"
        entry.reason = f"no skipping: {why}" + (f"; {note}" if note else "")
        # a static input's frame convolved once and handed on repeated by stride 0: only where no reader writes
        # into the output (every step would share that write)
        writer = static_writer(st.analysis, st.model, bn_name or name)
        new.static_passthrough = not writer
        if writer:
            entry.reason += f"; a static input is convolved at every step: {writer}"
    return new, entry.detail


def _replace(conv: nn.Conv2d, ctx):
    st, name, entry, info = ctx.state, ctx.name, ctx.entry, ctx.info
    ok, why = st.analysis.spike_fed(name)
    if not ok:
        new, text = _replace_dense_input(conv, ctx, why)
        entry.reason = entry.reason if new is not None else text
        return new, text
    problem = conv_problem(conv)
    if problem:
        entry.reason = problem
        return None, problem
    bs = st.block_for(name, info.in_shape)
    if bs == "auto":  # measured on the first CUDA call (blocks.AutoBlockSize); start from the default rule
        bs = select_block_size(info.in_shape[-2])
        st.auto_names.add(name)
    entry.block_size = bs
    if info.block_density:
        entry.block_density = info.block_density.get(bs if isinstance(bs, int) else 8)
    bn = bn_name = neuron = neuron_name = None
    note = ""
    if st.options.fuse:
        bn, bn_name, neuron, neuron_name, note = conv_chain(st.analysis, st.model, name, conv)
        if bn is not None and neuron is None and "batchnorm output" in note:
            st.deferred.append((name, conv, bn, bn_name, bs, entry, note))  # maybe a residual chain
            return None, note
    if neuron is None and bs == "dense" and name not in st.auto_names:
        entry.reason = dense_reason(st.options.block_size, name, info.in_shape[-2]) + (f"; {note}" if note else "")
        entry.block_size = None
        return None, entry.reason
    new, pool_name, pool_note = _fuse(st, conv, name, info, (bn, bn_name, neuron, neuron_name), bs)
    if neuron is not None:
        entry.action = "fused"
        entry.detail = f"{new.kind()} ({_names(bn_name, neuron_name, pool_name)})"
    else:
        entry.action = "sparse"
        entry.detail = new.kind() + (f" ({bn_name})" if bn_name else "")
    entry.reason = "; ".join(n for n in (note, pool_note) if n)
    return new, entry.detail


CONV2D_HANDLER = register_op_handler(nn.Conv2d, OpHandler("conv2d", _replace, needs_spikes=False, faithful=True,
                                                          stage="chains"))
