"""``optimize(model)``: find the layers that consume spikes and put SparseFlow's modules in their place.

What it does, in order:

1. Analysis (``analyzer.analyze``): one forward of a copy of the model on the example inputs (or, without
   them, on the first real input: the model is optimized lazily on its first call).
2. Every ``nn.Conv2d`` whose input is spikes becomes a :class:`~sparseflow_ops.SparseConv2d`. When its output
   feeds only an eval-mode BatchNorm2d, the BatchNorm is folded into it; when that BatchNorm's output feeds only
   a supported spiking neuron, the neuron runs fused in the same kernel (over all T steps). Folded and fused
   modules stay in the model, bypassed, so ``state_dict`` keys and neuron state (``reset_net``) are unchanged.
3. Spiking neurons not fused into a convolution run on the multi-step Triton kernel (``neurons=True``).
4. Layers that produce spikes for sparse consumers write their output's occupancy (no prescan downstream).

It works **in place** and returns the same model object (``inplace=False`` optimizes a deep copy). The report
is ``sparseflow_core.get_report(model)`` (also ``optimize(..., return_report=True)``); ``restore(model)``
puts the original modules back.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from sparseflow_ops import (
    SparseConv2d,
    SparseModule,
    accelerate_neuron,
    adopt_neurons,
    is_accelerated,
    is_bypassed,
    neuron_support,
    restore_neuron,
    standalone_neuron_support,
)
from sparseflow_ops.pool import TritonMaxPool2d

from .accounting import account_compute_layers, explain_unfolded_bns, new_entry, unchanged_report
from .analyzer import Analysis, analyze
from .arguments import NUMERICS, CastInputs, cast_inputs, check_arguments  # noqa: F401 (NUMERICS: re-export)
from .blocks import (
    AUTO_CANDIDATES,
    dense_reason,
    install_auto_block_size,
    remove_auto_block_size,
    select_block_size,
)
from .fx_fusion import (
    _is_add,
    common_parent,
    fuse_residual,
    fuse_skip_add,
    install_fused_forward,
    remove_fused_forward,
    trace_block,
)
from .handlers import HandlerContext
from .registry import find_op_handler, is_spiking_module
from .report import LayerEntry, OptimizeReport, user_type

REPORT_ATTR = "_sparseflow_report"
ORIGINAL_BLOCK_ATTR = "_sparseflow_original_block"


def _parent(model: nn.Module, name: str):
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def get_report(model: nn.Module) -> OptimizeReport | None:
    """The report of the last ``optimize`` of ``model`` (kernel paths refreshed), or None."""
    rep = model.__dict__.get(REPORT_ATTR)
    return rep.refresh(model) if rep is not None else None


def is_optimized(model: nn.Module) -> bool:
    return REPORT_ATTR in model.__dict__ or any(isinstance(m, SparseModule) for m in model.modules())


def _hooks(m: nn.Module) -> str:
    """The kinds of hooks registered on ``m`` (or on every module), '' when none. A replacement module would
    drop them, and a fused or folded module would hand them other values: such modules are left as they are."""
    from torch.nn.modules import module as _mm

    kinds = [k for k, d in (("forward", "_forward_hooks"), ("forward pre", "_forward_pre_hooks"),
                            ("backward", "_backward_hooks"), ("backward pre", "_backward_pre_hooks"))
             if getattr(m, d, None)]
    kinds += [f"global {k}" for k, d in (("forward", "_global_forward_hooks"),
                                         ("forward pre", "_global_forward_pre_hooks")) if getattr(_mm, d, None)]
    # optimize()'s own lazy pre-hook on the model is not the user's
    ours = (_LazyOptimize, CastInputs)
    if "forward pre" in kinds and all(isinstance(h, ours) for h in m._forward_pre_hooks.values()):
        kinds.remove("forward pre")
    return ", ".join(kinds)


def _conv_problem(conv: nn.Conv2d) -> str | None:
    hooks = _hooks(conv)
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


def _chain(an: Analysis, model: nn.Module, conv_name: str, conv: nn.Conv2d):
    """(bn, bn_name, neuron, neuron_name, note) of a pure conv -> bn -> neuron chain after ``conv``."""
    bn = bn_name = neuron = neuron_name = None
    user, why = an.sole_user(conv_name)
    if user is None:
        return None, None, None, None, f"no fusion: conv {why}"
    m = model.get_submodule(user)
    if isinstance(m, nn.BatchNorm2d):
        if m.training:
            return None, None, None, None, f"no fusion: {user} is in training mode"
        if _hooks(m):
            return None, None, None, None, f"no fusion: {user} has {_hooks(m)} hooks"
        if not m.track_running_stats or m.running_mean is None:
            return None, None, None, None, (f"no fusion: {user} has no running statistics (it normalises with "
                                            "each batch's statistics)")
        if m.num_features != conv.out_channels:
            return None, None, None, None, f"no fusion: {user} has {m.num_features} features"
        ok, why = an.chained(conv_name, user)
        if not ok:
            return None, None, None, None, f"no fusion: {why}"
        bn, bn_name = m, user
        user, why = an.sole_user(bn_name)
        if user is None:
            return bn, bn_name, None, None, f"no neuron fused: batchnorm {why}"
        m = model.get_submodule(user)
    elif not is_spiking_module(m):
        return None, None, None, None, f"no fusion: output feeds {type(m).__name__} {user}"
    if is_spiking_module(m):
        adapter, why = neuron_support(m)
        if adapter is None:
            return bn, bn_name, None, None, f"neuron {user} not fused: {why}"
        if _hooks(m):
            return bn, bn_name, None, None, f"neuron {user} not fused: it has {_hooks(m)} hooks"
        ok, why = an.chained(bn_name or conv_name, user)
        if not ok:
            return bn, bn_name, None, None, f"neuron {user} not fused: {why}"
        c_out = an.first(bn_name or conv_name).out_shape
        n_in = an.first(user).in_shape
        conv_in = an.first(conv_name).in_shape
        shape_ok = (n_in == c_out) or (len(conv_in) == 4 and len(n_in) == 5 and n_in[0] * n_in[1] == c_out[0]
                                      and tuple(n_in[2:]) == tuple(c_out[1:]))
        calls = zip(an.calls[conv_name], an.calls[bn_name or conv_name], an.calls[user])
        if shape_ok and any((c.in_shape, b.out_shape, n.in_shape) != (conv_in, c_out, n_in) for c, b, n in calls):
            return bn, bn_name, None, None, f"neuron {user} not fused: calls of different shapes"
        if not shape_ok:
            return bn, bn_name, None, None, f"neuron {user} sees a reshaped view {n_in} of {c_out}"
        if conv.dilation != (1, 1):
            return bn, bn_name, None, None, "neuron not fused: dilated convolution"
        neuron, neuron_name = m, user
    return bn, bn_name, neuron, neuron_name, ""


def optimize(
    model: nn.Module,
    example_inputs=None,
    *,
    block_size=None,
    mode: str = "auto",
    dtype: torch.dtype | None = None,
    fuse: bool = True,
    neurons: bool = True,
    filter_fn=None,
    inplace: bool = True,
    cuda_graph: bool = False,
    write_occupancy: bool = False,
    numerics: str = "fast",
    return_report: bool = False,
):
    """Swap the layers of ``model`` that consume spikes for SparseFlow's sparse / fused modules.

    ``example_inputs``: a tensor or a tuple of positional arguments for one forward (any batch size; the
    analysis runs on a copy). None: the model is optimized on its first call, with that call's input.
    Every argument is checked first (TypeError / ValueError naming it and its allowed values).
    ``block_size``: None for the default rule by input height (>= 56: 16, 14-55: 8, < 14: dense), an int (4, 8
    or 16), ``"dense"``, ``"auto"`` (time the candidates on each layer's first CUDA call per shape, cached; the
    default rule on the CPU), or a dict {layer name: size}. ``mode``: ``"auto"`` (measure each layer's paths on
    its first CUDA call and keep the fastest), ``"sparse"``, ``"dense"`` (SparseFlow's kernels without skipping) or
    ``"torch"``. ``dtype``: convert the model's parameters and buffers (``torch.float16`` or ``torch.bfloat16``)
    first; its floating-point inputs are then cast to ``dtype`` on every call (the example inputs, the lazy first
    call and every later call alike; integer and boolean inputs pass as they are); ``restore`` removes the cast.
    ``fuse``: fuse conv -> BatchNorm -> neuron chains; ``neurons``: run the remaining neurons on the kernel.
    ``filter_fn(module, fqn) -> bool``: only layers it accepts are touched.
    ``write_occupancy``: fused layers write the occupancy of their spikes for sparse consumers (otherwise
    each sparse consumer runs its own one-pass prescan).
    ``numerics``: ``"fast"`` (default: BatchNorm folded into the weights, layouts and kernels chosen by speed;
    every layer gives the dense layer's result up to the order of its fp32 sums) or ``"faithful"`` (the dense
    model's own arithmetic, bit for bit: convolutions and BatchNorm run as the dense modules run them, on their
    unfolded weights and in their memory layout, and only the neurons, with the residual adds of fused chains,
    the max pools and Spikformer's attention run on SparseFlow's kernels, whose results are the dense ones exactly;
    ops whose kernels would sum in another order are left dense and the report says so). Use it to check a model
    against its dense fp32 outputs; it is slower than ``"fast"`` (no folding, no fused convolutions).
    ``cuda_graph``: return a :class:`~sparseflow_core.cuda_graph.CudaGraphModel` around the model, which
    captures the forward once per input shape and replays it (every call then starts from reset neuron
    state; see its docstring).
    Returns the model (and the :class:`OptimizeReport` when ``return_report``).
    """
    check_arguments(model, block_size=block_size, mode=mode, dtype=dtype, fuse=fuse, neurons=neurons,
                    filter_fn=filter_fn, inplace=inplace, cuda_graph=cuda_graph, write_occupancy=write_occupancy,
                    numerics=numerics, return_report=return_report)
    if cuda_graph:
        model, rep = optimize(model, example_inputs, block_size=block_size, mode=mode, dtype=dtype, fuse=fuse,
                              neurons=neurons, filter_fn=filter_fn, inplace=inplace,
                              write_occupancy=write_occupancy, numerics=numerics, return_report=True)
        from .cuda_graph import CudaGraphModel

        wrapped = CudaGraphModel(model)
        wrapped.__dict__[REPORT_ATTR] = rep
        return (wrapped, rep) if return_report else wrapped
    if not inplace:
        try:
            model = copy.deepcopy(model)
        except Exception as e:
            raise TypeError(f"optimize(inplace=False) optimizes a deep copy, but the model cannot be deep-copied "
                            f"({type(e).__name__}: {e}); use inplace=True") from e
        adopt_neurons(model)  # (snnTorch's utils.reset finds neurons through a list the copies are not in)
    if dtype is not None:
        model.to(dtype)
        CastInputs.install(model, dtype)
    if is_optimized(model):
        rep = get_report(model) or OptimizeReport()
        if "already optimized: left unchanged" not in rep.notes:
            rep.notes.append("already optimized: left unchanged")
        return (model, rep) if return_report else model
    opts = dict(block_size=block_size, mode=mode, fuse=fuse, neurons=neurons, filter_fn=filter_fn,
                write_occupancy=write_occupancy and numerics == "fast", numerics=numerics)
    if example_inputs is None:
        _LazyOptimize.install(model, opts)
        rep = OptimizeReport(notes=["pending: optimized on the first forward call"])
        model.__dict__[REPORT_ATTR] = rep
        return (model, rep) if return_report else model
    if dtype is not None:
        example_inputs = cast_inputs(example_inputs, dtype)
    rep = _optimize_now(model, example_inputs, **opts)
    return (model, rep) if return_report else model


class _LazyOptimize:
    """Forward pre-hook that optimizes the model with its first real input, then removes itself (the input cast of
    ``dtype=``, :class:`~sparseflow_core.arguments.CastInputs`, runs before it and stays)."""

    def __init__(self, opts):
        self.opts = opts
        self.hook_id = None

    @classmethod
    def install(cls, model, opts):
        hook = cls(opts)
        handle = model.register_forward_pre_hook(hook)
        hook.hook_id = handle.id

    def __call__(self, model, args):
        model._forward_pre_hooks.pop(self.hook_id, None)
        model.__dict__.pop(REPORT_ATTR, None)
        _optimize_now(model, args, **self.opts)
        return None


def _block_for(block_size, name, in_shape):
    if isinstance(block_size, dict):
        if name in block_size:
            return block_size[name]
        block_size = None
    if block_size is None:
        return select_block_size(in_shape[-2])
    return block_size


def _optimize_now(model, example_inputs, *, block_size, mode, fuse, neurons, filter_fn,
                  write_occupancy=False, numerics="fast") -> OptimizeReport:
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    if not any(is_spiking_module(m) for m in model.modules()):
        rep = unchanged_report(model)
        model.__dict__[REPORT_ATTR] = rep
        return rep
    an = analyze(model, example_inputs)
    rep = OptimizeReport()
    if not an.copied:
        rep.notes.append(f"the model could not be deep-copied ({an.copy_error}): it was analysed itself and its "
                         "state (tensors, buffers, neuron memories, random generators) put back afterwards")
    if any(t.dtype == torch.bfloat16 and not t.is_cuda
           for t in (example_inputs if isinstance(example_inputs, tuple) else (example_inputs,))
           if isinstance(t, torch.Tensor)):
        rep.notes.append("bfloat16 on the CPU: the Triton interpreter cannot run bfloat16 kernels, so the layers "
                         "run their dense torch ops until they get CUDA tensors (bfloat16 kernels need a GPU)")
    faithful = numerics == "faithful"
    fused_neurons: set[str] = set()
    replaced: dict[str, SparseConv2d] = {}
    deferred: list = []
    auto_names: set[str] = set()
    _run_handlers(model, an, rep, block_size, mode, filter_fn, faithful)
    named = dict(model.named_modules())
    for name, m in named.items():
        if not isinstance(m, nn.Conv2d) or isinstance(m, SparseModule) or find_op_handler(m) is not None:
            continue
        info = an.first(name)
        entry = new_entry(rep, name, m, info, filter_fn)
        if entry.reason:
            continue
        ok, why = an.spike_fed(name)
        problem = _conv_problem(m)
        if not ok:
            # not fed by spikes (e.g. the stem on the image): nothing to skip, but a conv -> BN -> neuron chain
            # still runs as one fused spiking layer (no BatchNorm pass, no membrane round trips)
            if fuse and not problem and info is not None and (mode != "torch"):
                bn, bn_name, neuron, neuron_name, _note = _chain(an, model, name, m)
                if neuron is not None:
                    time_steps = None
                    if len(info.in_shape) == 4 and len(an.first(neuron_name).in_shape) == 5:
                        time_steps = an.first(neuron_name).in_shape[0]
                    new = SparseConv2d.from_dense(m, bn, neuron, block_size="dense", mode=mode,
                                                  time_steps=time_steps)
                    parent, child = _parent(model, name)
                    setattr(parent, child, new)
                    replaced[name] = new
                    if bn is not None:
                        rep.folded.append((bn_name, name))
                    fused_neurons.add(neuron_name)
                    entry.action = "fused"
                    entry.detail = f"{new.kind()} ({', '.join(n for n in (bn_name, neuron_name) if n)}), dense input"
                    entry.reason = f"no skipping: {why}"
                    continue
                if bn is not None:
                    # conv -> BN (-> e.g. a max pool before the neuron, Spikformer's patch stem): the BN folded
                    # into the convolution's weights (one channels_last cuDNN call instead of conv + BN passes)
                    new = SparseConv2d.from_dense(m, bn, None, block_size="dense", mode=mode)
                    parent, child = _parent(model, name)
                    setattr(parent, child, new)
                    replaced[name] = new
                    rep.folded.append((bn_name, name))
                    entry.action = "sparse"
                    entry.detail = f"conv+bn ({bn_name}), dense input"
                    entry.reason = f"no skipping: {why}" + (f"; {_note}" if _note else "")
                    continue
            entry.reason = why
            continue
        if problem:
            entry.reason = problem
            continue
        bs = _block_for(block_size, name, info.in_shape)
        if bs == "auto":  # measured on the first CUDA call (blocks.AutoBlockSize); start from the default rule
            bs = select_block_size(info.in_shape[-2])
            auto_names.add(name)
        entry.block_size = bs
        if info.block_density:
            entry.block_density = info.block_density.get(bs if isinstance(bs, int) else 8)
        bn = bn_name = neuron = neuron_name = None
        note = ""
        if fuse:
            bn, bn_name, neuron, neuron_name, note = _chain(an, model, name, m)
            if bn is not None and neuron is None and "batchnorm output" in note:
                deferred.append((name, m, bn, bn_name, bs, entry, note))  # maybe a residual chain
                continue
        if neuron is None and bs == "dense" and name not in auto_names:
            entry.reason = dense_reason(block_size, name, info.in_shape[-2]) + (f"; {note}" if note else "")
            entry.block_size = None
            continue
        time_steps = None
        if neuron is not None and len(info.in_shape) == 4 and len(an.first(neuron_name).in_shape) == 5:
            time_steps = an.first(neuron_name).in_shape[0]
        new = SparseConv2d.from_dense(m, bn, neuron, block_size=bs, mode=mode, time_steps=time_steps)
        parent, child = _parent(model, name)
        setattr(parent, child, new)
        replaced[name] = new
        if bn is not None:
            rep.folded.append((bn_name, name))
        if neuron is not None:
            fused_neurons.add(neuron_name)
            entry.action = "fused"
            entry.detail = f"{new.kind()} ({', '.join(n for n in (bn_name, neuron_name) if n)})"
        else:
            entry.action = "sparse"
            entry.detail = new.kind() + (f" ({bn_name})" if bn_name else "")
        entry.reason = note
    if deferred:
        _fuse_residual_chains(model, an, deferred, replaced, fused_neurons, rep, mode, block_size)
        named = dict(model.named_modules())
    if fuse and _fuse_skip_adds(model, an, replaced, rep):
        named = dict(model.named_modules())
    # BatchNorms folded into a convolution: listed in rep.folded, not as layers the BatchNorm handler declined
    folded_bns = {b for b, _ in rep.folded}
    rep.layers[:] = [e for e in rep.layers if not (e.action == "left" and e.name in folded_bns)]
    for name in sorted(auto_names & set(replaced)):
        install_auto_block_size(replaced[name], replaced[name].block_size)
        entry = next(e for e in rep.layers if e.name == name)
        entry.block_size = f"auto (default {entry.block_size})"
    if auto_names:
        rep.notes.append("block_size='auto': each replaced convolution times block sizes "
                         f"{', '.join(map(str, AUTO_CANDIDATES))} on its first CUDA call per input shape and keeps "
                         "the fastest; on the CPU (and during CUDA graph capture) the default rule is used")
    # neurons that are not fused: the multi-step kernel, in place
    for name, m in named.items():
        if not is_spiking_module(m) or name in fused_neurons or is_bypassed(m):
            continue  # (bypassed: fused into a layer a handler made, which reports it)
        entry = LayerEntry(name=name, type=user_type(m), action="left")
        rep.add(entry)
        if not neurons:
            entry.reason = "neurons=False"
            continue
        if filter_fn is not None and not filter_fn(m, name):
            entry.reason = "excluded by filter_fn"
            continue
        if an.first(name) is None:
            entry.reason = "not called in the example forward"
            continue
        adapter, why = standalone_neuron_support(m)
        if adapter is None:
            entry.reason = why
            continue
        if not is_accelerated(m):
            accelerate_neuron(m, preserve_layout=faithful)
        entry.action = "neuron-kernel"
        entry.detail = ("Triton neuron step (snnTorch's arithmetic)" if adapter.step_forward
                        else "multi-step Triton neuron")
    # producers of spikes for sparse consumers write the occupancy of their output (opt-in: measured on the
    # H100, the epilogue write cost more than the consumer's own one-pass prescan; see docs/design.md)
    for new in (replaced.values() if write_occupancy else ()):
        if new.fused_neuron is None:
            continue
        neuron_name = next(n for n, mm in named.items() if mm is new.fused_neuron)
        info = an.first(neuron_name)
        consumers = {u.name for u in an.uses.get(info.out_root, []) if u.kind == "module"}
        # (handler-made consumers such as depthwise / transposed convolutions say so with accepts_occupancy)
        if any((c in replaced and replaced[c].block_size not in ("dense", None) and
                replaced[c].kernel_size in ((3, 3), (1, 1))) or getattr(named.get(c), "accepts_occupancy", False)
               for c in consumers):
            new.write_occupancy = True
    if faithful:
        for m in model.modules():
            if isinstance(m, SparseModule):
                m.numerics = "faithful"
        rep.notes.append("numerics='faithful': convolutions and BatchNorms run as in the dense model (unfolded "
                         "weights, its layouts); neurons, residual adds, max pools and attention products on "
                         "SparseFlow's kernels, with the dense model's fp32 results bit for bit")
    else:
        _defer_shifts_to_pools(an, named, replaced, rep)
    account_compute_layers(model, an, rep)
    explain_unfolded_bns(rep)
    rep.layers.sort(key=lambda e: order.get(e.name, len(order)))  # model order
    if not rep.replaced and not rep.by_action("neuron-kernel"):
        rep.notes.append("no layer consumes spikes in a supported way: model unchanged")
    model.__dict__[REPORT_ATTR] = rep
    _invalidate_reset_cache(model)
    return rep


def _defer_shifts_to_pools(an, named, replaced, rep) -> None:
    """conv -> BN (folded) -> max pool: on its cuDNN paths the convolution leaves the folded bias to the pool,
    which adds it after the max (the same value; Spikformer's patch stem: no separate bias pass over the
    4x larger conv output)."""
    for bn_name, conv_name in rep.folded:
        conv = replaced.get(conv_name)
        if conv is None or conv.fused_neuron is not None:
            continue
        user, _ = an.sole_user(bn_name)
        if user is not None and isinstance(named.get(user), TritonMaxPool2d):
            conv.defer_shift = True
            entry = next((e for e in rep.layers if e.name == conv_name), None)
            if entry is not None:
                entry.detail = (entry.detail or "") + f"; bias added after the max pool {user}"


def _first_inner_call(an, name):
    """A container module (an attention block) has no call record of its own: the first recorded call of a
    leaf inside it stands for its input (handlers of containers check spikes on their own children)."""
    prefix = name + "."
    return next((calls[0] for n, calls in an.calls.items() if n.startswith(prefix) and calls), None)


def _run_handlers(model, an, rep, block_size, mode, filter_fn, faithful=False) -> None:
    """Modules with a registered op handler (Linear, attention, depthwise conv, ...), outermost first; with
    ``faithful`` (numerics="faithful") only the handlers whose modules reproduce the dense result bit for bit."""
    done: list[str] = []
    snn = any(is_spiking_module(m) for m in model.modules())
    for name, m in list(model.named_modules()):
        if not name or isinstance(m, SparseModule) or any(name.startswith(d + ".") for d in done):
            continue
        handler = find_op_handler(m)
        if handler is None:
            continue
        info = an.first(name) or _first_inner_call(an, name)
        entry = new_entry(rep, name, m, info, filter_fn)
        if entry.reason:
            continue
        if info is None:
            entry.reason = "not called in the example forward"
            continue
        if not snn:  # a model without spiking neurons is left exactly as it is
            entry.reason = "no spiking modules in the model"
            continue
        if handler.needs_spikes:
            ok, why = an.spike_fed(name)
            if not ok:
                entry.reason = why
                continue
        if _hooks(m):
            entry.reason = f"has {_hooks(m)} hooks, which a replacement module would drop"
            continue
        if any(parametrize.is_parametrized(x) for x in m.modules()):
            entry.reason = ("parametrized weights (weight_norm / spectral_norm: computed from other tensors on "
                            "every call)")
            continue
        if faithful and not handler.faithful:
            entry.reason = (f"numerics='faithful': left dense ({handler.name}: SparseFlow's kernel would sum in "
                            "another order than the dense op)")
            continue
        bs = _block_for(block_size, name, info.in_shape) if len(info.in_shape or ()) >= 3 else block_size
        if bs == "auto":  # handlers get the default rule (block_size="auto" is measured for convolutions)
            bs = _block_for(None, name, info.in_shape) if len(info.in_shape or ()) >= 3 else None
        entry.block_size = bs if not isinstance(bs, dict) else None
        try:
            new, text = handler.replace(m, HandlerContext(model, an, name, entry.block_size, mode))
        except (NotImplementedError, ValueError, TypeError) as e:
            new, text = None, f"{handler.name}: {e}"
        if new is None:
            entry.reason, entry.block_size = text, None
            continue
        parent, child = _parent(model, name)
        setattr(parent, child, new)
        bn = new.__dict__.get("_bn")
        bn_name = next((n for n, x in model.named_modules() if x is bn), None) if bn is not None else None
        if bn_name is not None:
            rep.folded.append((bn_name, name))
        if not handler.descend:
            done.append(name)
        entry.action, entry.detail = handler.action, text or handler.name
        if not handler.uses_blocks:
            entry.block_size = None


def _fuse_residual_chains(model, an, deferred, replaced, fused_neurons, rep, mode, block_size=None):
    """Second pass: ``neuron(bn(conv(x)) + identity)`` chains, fused by rewriting their block's forward with fx
    (the block object stays: ``fx_fusion.FusedBlockForward`` runs the rewritten graph where it is exact)."""
    by_block: dict[str, list] = {}
    for item in deferred:
        by_block.setdefault(common_parent(item[0], item[3]), []).append(item)
    # deepest blocks first: an outer block's trace then calls a rewritten inner block as one module
    for parent in sorted(by_block, key=lambda p: -p.count(".") - bool(p)):
        items = by_block[parent]
        gm = None
        block = model.get_submodule(parent) if parent else model
        trace_why = ""
        if parent and any(m.training for m in block.modules()):
            trace_why = "the block is in training mode (its forward is traced in eval mode)"
        elif parent:
            gm, trace_why = trace_block(block)
        for (name, conv, bn, bn_name, bs, entry, note) in items:
            why = "residual add in the model's top-level forward" if not parent else ""
            neuron_rel = _residual_neuron(gm, _rel(name, parent), _rel(bn_name, parent)) if gm else None
            neuron = block.get_submodule(neuron_rel) if neuron_rel else None
            neuron_name = f"{parent}.{neuron_rel}" if neuron_rel else None
            if not why and neuron is None:
                why = trace_why or "the batchnorm output does not go through an add into a neuron"
            if neuron is not None and not why:
                adapter, w2 = neuron_support(neuron)
                c_out, n_in = an.first(bn_name).out_shape, (an.first(neuron_name) or an.first(bn_name)).in_shape
                if adapter is None:
                    why = w2
                elif _hooks(neuron):
                    why = f"neuron has {_hooks(neuron)} hooks"
                elif tuple(n_in) != tuple(c_out):
                    why = f"neuron sees a reshaped view {n_in} of {c_out}"
                elif conv.dilation != (1, 1):
                    why = "dilated convolution"
                else:
                    why = an.residual_fed(bn_name, neuron_name)[1]
            if not why:
                new = SparseConv2d.from_dense(conv, bn, neuron, block_size=bs, mode=mode)
                new.residual_chain = True  # called by the block's own forward (no residual): the conv alone
                holders = (_parent(gm, _rel(name, parent)), _parent(model, name))
                for sub_parent, child in holders:
                    setattr(sub_parent, child, new)
                res_gm, why = fuse_residual(block, gm, _rel(name, parent), _rel(bn_name, parent), neuron_rel)
                if res_gm is None:
                    for sub_parent, child in holders:
                        setattr(sub_parent, child, conv)
                    new.to_dense()
                else:
                    replaced[name] = new
                    fused_neurons.add(neuron_name)
                    rep.folded.append((bn_name, name))
                    entry.action, entry.detail = "fused", f"{new.kind()}+residual ({bn_name}, {neuron_name})"
                    entry.reason = ""
                    continue
            # fall back: conv with the batchnorm folded, the add and neuron stay as they are
            if bs == "dense":
                entry.reason = f"{dense_reason(block_size, name, entry.in_shape[-2])}; {note}; residual: {why}"
                entry.block_size = None
                continue
            new = SparseConv2d.from_dense(conv, bn, None, block_size=bs, mode=mode)
            p, c = _parent(model, name)
            setattr(p, c, new)
            replaced[name] = new
            rep.folded.append((bn_name, name))
            entry.action, entry.detail, entry.reason = "sparse", f"conv+bn ({bn_name})", f"residual: {why}"
        if gm is not None and any(e[0] in replaced and replaced[e[0]].fused_neuron is not None for e in items):
            install_fused_forward(block, gm)


def _fuse_skip_adds(model, an, replaced, rep) -> bool:
    """Third pass: ``neuron(bn(conv(x))) + identity`` (SEW-ResNet's ADD connection): the add goes into the fused
    layer's epilogue (``residual_after``), by rewriting the block with fx. True if any block was rewritten.
    An add that broadcasts (an identity of another shape) stays where it is."""
    named = dict(model.named_modules())
    owner = {id(m): n for n, m in named.items()}
    by_block: dict[str, list] = {}
    for name, new in replaced.items():
        neuron = new.fused_neuron
        neuron_name = owner.get(id(neuron)) if neuron is not None else None
        if neuron_name is None:
            continue
        shapes = an.add_broadcasts({c.out_root for c in an.calls.get(neuron_name, [])})
        if shapes:
            entry = next((e for e in rep.layers if e.name == name), None)
            if entry is not None:
                entry.reason = "; ".join(r for r in (entry.reason, f"the add after {neuron_name} broadcasts "
                                                     f"({shapes}): it stays a separate add") if r)
            continue
        parent = common_parent(name, neuron_name)
        if parent and name in named:
            by_block.setdefault(parent, []).append((name, neuron_name))
    changed = False
    for parent in sorted(by_block, key=lambda p: -p.count(".")):
        block = model.get_submodule(parent)
        if any(m.training for m in block.modules()):
            continue  # (its forward is traced in eval mode only)
        gm, _why = trace_block(block)  # (a block the residual pass rewrote: its graph)
        if gm is None:
            continue
        fused = []
        for name, neuron_name in by_block[parent]:
            if not fuse_skip_add(block, gm, _rel(name, parent), _rel(neuron_name, parent)):
                fused.append(name)
        if not fused:
            continue
        install_fused_forward(block, gm)
        changed = True
        for name in fused:
            entry = next((e for e in rep.layers if e.name == name), None)
            if entry is not None:
                entry.detail = (entry.detail or "") + "; + the skip connection's add after the neuron (in the epilogue)"
    return changed


def _rel(name: str, parent: str) -> str:
    return name[len(parent) + 1:] if parent else name


def _residual_neuron(gm, conv_rel, bn_rel):
    """Name of the module called on ``bn(conv(x)) + identity`` in the traced block, if any."""
    if gm is None:
        return None
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    bn = nodes.get(bn_rel)
    if bn is None or len(bn.users) != 1:
        return None
    add = next(iter(bn.users))
    if not _is_add(add) or len(add.users) != 1:
        return None
    nxt = next(iter(add.users))
    if nxt.op != "call_module":
        return None
    m = gm.get_submodule(nxt.target)
    return nxt.target if is_spiking_module(m) else None


def _invalidate_reset_cache(model):
    try:
        from spikingjelly.activation_based.functional import net_config

        inv = getattr(net_config, "invalidate_reset_cache", None)
        if inv is not None:
            inv(model)
    except Exception:  # SpikingJelly is optional
        pass


def restore(model: nn.Module) -> nn.Module:
    """Undo ``optimize``: the original dense modules back in place (same parameter objects), in place."""
    for m in model.modules():  # blocks whose chains ran fused: their own forward again
        remove_fused_forward(m)
    # (a GraphModule in place of a block, from an earlier SparseFlow: the block it saved goes back)
    for name, m in list(model.named_modules()):
        holder = m.__dict__.get(ORIGINAL_BLOCK_ATTR) if name else None
        if holder is None:
            continue
        original = holder[0]
        kept = {id(x) for x in original.modules()}
        for sub in m.modules():
            if isinstance(sub, SparseConv2d) and id(sub) not in kept:
                sub.to_dense()
        parent, child = _parent(model, name)
        setattr(parent, child, original)
    undone: list[str] = []
    for name, m in list(model.named_modules()):
        if isinstance(m, SparseModule) and name and not any(name.startswith(u + ".") for u in undone):
            parent, child = _parent(model, name)
            remove_auto_block_size(m)
            setattr(parent, child, m.to_dense())
            undone.append(name)
    for m in model.modules():
        if is_accelerated(m):
            restore_neuron(m)
    for hid, hook in list(model._forward_pre_hooks.items()):
        if isinstance(hook, _LazyOptimize):
            del model._forward_pre_hooks[hid]
    CastInputs.remove(model)
    model.__dict__.pop(REPORT_ATTR, None)
    _invalidate_reset_cache(model)
    return model
