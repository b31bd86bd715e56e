"""``optimize(model)``: find the layers that consume spikes and put SparseFlow's modules in their place.

``optimize`` checks its arguments, then runs the passes of :mod:`sparseflow_core.passes` in order on one
:class:`~sparseflow_core.passes.OptimizeState`: analysis (one forward of a copy of the model on the example inputs
or, without them, on the first real input: the model is optimized lazily on its first call), the op handlers,
the conv -> BN -> neuron chains, residual chains and skip adds, the remaining neurons, occupancy, numerics and
the report. Each pass's module says what it reads and writes.

It works **in place** and returns the same model object (``inplace=False`` optimizes a deep copy). The report
is ``sparseflow_core.get_report(model)`` (also ``optimize(..., return_report=True)``); ``restore(model)``
puts the original modules back.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from sparseflow_ops import (
    SparseConv2d,
    SparseModule,
    adopt_neurons,
    is_accelerated,
    remove_static_frames,
    restore_neuron,
)

from .accounting import unchanged_report
from .arguments import NUMERICS, CastInputs, StaticInput, cast_inputs, check_arguments  # noqa: F401 (NUMERICS: re-export)
from .blocks import remove_auto_block_size
from .fx_fusion import remove_fused_forward
from .hooks import OwnPreHook
from .passes import PIPELINE, Options, analyze_model, parent_and_child
from .registry import is_spiking_module
from .report import REPORT_ATTR, OptimizeReport

ORIGINAL_BLOCK_ATTR = "_sparseflow_original_block"


def get_report(model: nn.Module) -> OptimizeReport | None:
    """The report of the last ``optimize`` of ``model`` (kernel paths refreshed), or None."""
    rep = model.__dict__.get(REPORT_ATTR)
    return rep.refresh(model) if rep is not None else None


def is_optimized(model: nn.Module) -> bool:
    return REPORT_ATTR in model.__dict__ or any(isinstance(m, SparseModule) for m in model.modules())


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
    static_input: bool = False,
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
    ``static_input``: declare that the input ``[T, N, ...]`` holds the same frame at every step (a static image
    repeated over T). Each call checks it (ValueError when the steps differ) and passes one frame repeated by stride
    0, so the layers that convolve the input (the stem) convolve N images instead of T*N (equal inputs, equal
    convolutions; cuDNN may round another batch size differently in the last bit). An input already built as
    ``frame.expand(T, ...)`` gets this without the flag, and without the check's synchronization.
    Returns the model (and the :class:`OptimizeReport` when ``return_report``).
    """
    check_arguments(model, block_size=block_size, mode=mode, dtype=dtype, fuse=fuse, neurons=neurons,
                    filter_fn=filter_fn, inplace=inplace, cuda_graph=cuda_graph, write_occupancy=write_occupancy,
                    numerics=numerics, return_report=return_report, static_input=static_input)
    if cuda_graph:
        model, rep = optimize(model, example_inputs, block_size=block_size, mode=mode, dtype=dtype, fuse=fuse,
                              neurons=neurons, filter_fn=filter_fn, inplace=inplace,
                              write_occupancy=write_occupancy, numerics=numerics, static_input=static_input,
                              return_report=True)
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
    if static_input:  # (before the cast, which keeps the stride-0 repeat and so casts one frame)
        StaticInput.install(model)
    if dtype is not None:
        model.to(dtype)
        CastInputs.install(model, dtype)
    if is_optimized(model):
        rep = get_report(model) or OptimizeReport()
        if "already optimized: left unchanged" not in rep.notes:
            rep.notes.append("already optimized: left unchanged")
        return (model, rep) if return_report else model
    opts = Options(block_size=block_size, mode=mode, fuse=fuse, neurons=neurons, filter_fn=filter_fn,
                   write_occupancy=write_occupancy and numerics == "fast", numerics=numerics)
    if example_inputs is None:
        _LazyOptimize.install(model, opts)
        rep = OptimizeReport(notes=["pending: optimized on the first forward call"])
        model.__dict__[REPORT_ATTR] = rep
        return (model, rep) if return_report else model
    if static_input:
        example_inputs = StaticInput()(model, example_inputs if isinstance(example_inputs, tuple) else
                                       (example_inputs,))
    if dtype is not None:
        example_inputs = cast_inputs(example_inputs, dtype)
    rep = _optimize_now(model, example_inputs, opts)
    return (model, rep) if return_report else model


class _LazyOptimize(OwnPreHook):
    """Forward pre-hook that optimizes the model with its first real input, then removes itself (the input cast of
    ``dtype=``, :class:`~sparseflow_core.arguments.CastInputs`, runs before it and stays)."""

    def __init__(self, opts: Options):
        self.opts = opts
        self.hook_id = None

    @classmethod
    def install(cls, model, opts: Options):
        hook = cls(opts)
        handle = model.register_forward_pre_hook(hook)
        hook.hook_id = handle.id

    def __call__(self, model, args):
        model._forward_pre_hooks.pop(self.hook_id, None)
        model.__dict__.pop(REPORT_ATTR, None)
        _optimize_now(model, args, self.opts)
        return None


def _optimize_now(model, example_inputs, opts: Options) -> OptimizeReport:
    """Run the passes (see :mod:`sparseflow_core.passes`) and keep the report on the model."""
    if not any(is_spiking_module(m) for m in model.modules()):
        rep = unchanged_report(model)
        model.__dict__[REPORT_ATTR] = rep
        return rep
    st = analyze_model(model, example_inputs, opts)
    for run_pass in PIPELINE:
        run_pass(st)
    model.__dict__[REPORT_ATTR] = st.report
    _invalidate_reset_cache(model)
    return st.report


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
    for m in model.modules():  # blocks whose chains ran fused, frame-wise containers: their own forward again
        remove_fused_forward(m)
        remove_static_frames(m)
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
        parent, child = parent_and_child(model, name)
        setattr(parent, child, original)
    undone: list[str] = []
    for name, m in list(model.named_modules()):
        if isinstance(m, SparseModule) and name and not any(name.startswith(u + ".") for u in undone):
            parent, child = parent_and_child(model, name)
            remove_auto_block_size(m)
            setattr(parent, child, m.to_dense())
            undone.append(name)
    for m in model.modules():
        if is_accelerated(m):
            restore_neuron(m)
    _LazyOptimize.remove(model)
    CastInputs.remove(model)
    StaticInput.remove(model)
    model.__dict__.pop(REPORT_ATTR, None)
    _invalidate_reset_cache(model)
    return model
