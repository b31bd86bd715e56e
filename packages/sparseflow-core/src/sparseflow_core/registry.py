"""What SparseFlow knows about module types: which emit spikes, which are leaves of the data-flow graph.

* Spiking modules: SpikingJelly ``neuron.BaseNode`` (and ``SimpleBaseNode``) with every subclass, snnTorch
  ``SpikingNeuron`` subclasses, and whatever users add with :func:`register_spiking_module`. Their outputs are
  the spike sources the analyzer follows; a module returning a tuple has its spikes first (snnTorch's
  ``spk, mem = lif(cur, mem)``, ``spk, syn, mem`` of ``Synaptic``), and only that tensor is followed.
* Which of those the kernels can *run* is a separate question answered by ``sparseflow_ops.neuron_support`` (fused
  into the layer before) and ``sparseflow_ops.standalone_neuron_support`` (as a module of its own).
* Op handlers (:func:`register_op_handler`, keyed by module type like torchao's ``quantize_`` handlers): how
  ``optimize()`` replaces a spike-fed module of a given type (Linear, attention, depthwise or transposed
  convolution, ...). ``nn.Conv2d`` is one of them too (``handlers/conv2d.py``), in the ``"chains"`` stage: it
  fuses the conv -> BN -> neuron chain after the convolution, after the other handlers ran.

The registries are guarded by a lock; lookups walk the class MRO.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

_LOCK = threading.Lock()
_SPIKING: list[type] = []
_BUILTIN_LOADED = False


def _load_builtin() -> None:
    global _BUILTIN_LOADED
    if _BUILTIN_LOADED:
        return
    with _LOCK:
        if _BUILTIN_LOADED:
            return
        try:
            from spikingjelly.activation_based.neuron import base_node

            for name in ("BaseNode", "SimpleBaseNode"):
                if hasattr(base_node, name):
                    _SPIKING.append(getattr(base_node, name))
        except Exception:  # SpikingJelly is optional
            pass
        try:
            from snntorch._neurons.neurons import SpikingNeuron

            _SPIKING.append(SpikingNeuron)
        except Exception:  # snnTorch is optional
            pass
        _BUILTIN_LOADED = True


def register_spiking_module(cls: type) -> type:
    """Declare that instances of ``cls`` (an ``nn.Module`` subclass) output spikes. Usable as a decorator."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_spiking_module expects an nn.Module subclass, got {cls!r}")
    _load_builtin()
    with _LOCK:
        if cls not in _SPIKING:
            _SPIKING.append(cls)
    return cls


def unregister_spiking_module(cls: type) -> None:
    with _LOCK:
        if cls in _SPIKING:
            _SPIKING.remove(cls)


#: the passes of ``optimize()`` that run op handlers, in order (``OpHandler.stage``)
STAGES = ("handlers", "chains")


@dataclass(frozen=True)
class OpHandler:
    """How ``optimize()`` replaces a module of a registered type.

    ``replace(module, ctx) -> (new_module | None, text)``: the replacement and a short detail for the
    report, or None and the reason the module stays as it is. ``ctx`` is a
    :class:`sparseflow_core.handlers.HandlerContext` (the model, the analysis, the module's name, the block
    size the default rule or the user chose, the mode). ``accepts(module) -> bool`` narrows the handler to
    some instances of the type (e.g. ``groups > 1`` convolutions). ``needs_spikes``: only called when the
    analyzer proved the module's input is spikes (otherwise the report says why it was left). ``action`` is
    what the report calls a replacement (``"kernel"`` for ops that only run on SparseFlow's kernels, such as
    max pools, without skipping anything), ``uses_blocks`` whether the report shows a block size for it.
    ``descend``: the replacement keeps the module's children and only changes how they are wired (a
    Transformer block fusing its skip connections into its layers), so the children still go to their own
    handlers afterwards. ``faithful``: with ``optimize(..., numerics="faithful")`` its replacement gives the dense
    module's result bit for bit (exact ops, or the dense computation in that mode); other handlers are skipped
    then. ``stage``: ``"handlers"`` (the op-handler pass, outermost module first) or ``"chains"`` (the chains pass
    after it, for handlers that fuse the modules after theirs: ``ctx.state`` is the optimize state and
    ``ctx.entry`` the module's report entry, which the handler fills; it makes its own checks (spikes, hooks), the
    pass applies ``filter_fn`` and puts the replacement in the model).
    """

    name: str
    replace: Callable
    accepts: Callable | None = None
    needs_spikes: bool = True
    action: str = "sparse"  # the report's word for a replacement: "sparse" (skips zeros) or "kernel" (no skipping)
    uses_blocks: bool = True  # whether the block size (default rule / user's) means anything for this op
    descend: bool = False  # children still handled after the module is replaced
    faithful: bool = False  # its module gives the dense result bit for bit under numerics="faithful"
    stage: str = "handlers"  # "handlers", or "chains" (after the other handlers; gets the optimize state)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"OpHandler {self.name!r}: stage must be one of {STAGES}, got {self.stage!r}")


_HANDLERS: list[tuple[type, OpHandler]] = []


def register_op_handler(cls: type, handler: OpHandler) -> OpHandler:
    """Register ``handler`` for instances of ``cls`` (and subclasses). Later registrations win."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_op_handler expects an nn.Module subclass, got {cls!r}")
    if not isinstance(handler, OpHandler):
        raise TypeError(f"register_op_handler expects an OpHandler, got {type(handler).__name__}")
    with _LOCK:
        _HANDLERS.append((cls, handler))
    return handler


def unregister_op_handler(handler: OpHandler) -> None:
    with _LOCK:
        _HANDLERS[:] = [(c, h) for c, h in _HANDLERS if h is not handler]


def find_op_handler(m: nn.Module) -> OpHandler | None:
    """The handler for ``m``: the most specific registered type in its MRO, latest registration first."""
    from . import handlers  # noqa: F401  (the built-in handlers register themselves on import)

    with _LOCK:
        items = list(reversed(_HANDLERS))
    for klass in type(m).__mro__:
        for cls, h in items:
            if cls is klass and (h.accepts is None or h.accepts(m)):
                return h
    return None


def spiking_types() -> tuple[type, ...]:
    _load_builtin()
    with _LOCK:
        return tuple(_SPIKING)


def is_spiking_module(m: nn.Module) -> bool:
    return isinstance(m, spiking_types())


#: module types treated as leaves of the data-flow graph (their internals are not followed)
LEAF_TYPES: tuple[type, ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear, nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm, nn.GroupNorm, nn.MultiheadAttention,
)


#: leaf modules whose output holds spikes when their input does (pooling by max, reshapes, dropout, padding)
SPIKE_PRESERVING_TYPES: tuple[type, ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Flatten, nn.Unflatten, nn.Identity,
    nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.PixelShuffle, nn.PixelUnshuffle,
    nn.ChannelShuffle,
)


def preserves_spikes(m: nn.Module) -> bool:
    if isinstance(m, nn.Upsample):
        return m.mode == "nearest"
    return isinstance(m, SPIKE_PRESERVING_TYPES)


def is_leaf(m: nn.Module) -> bool:
    return is_spiking_module(m) or isinstance(m, LEAF_TYPES) or next(m.children(), None) is None
