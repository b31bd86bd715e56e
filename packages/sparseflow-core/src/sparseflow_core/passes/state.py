"""The state one ``optimize()`` call hands from pass to pass.

:class:`Options` holds the user's choices (checked by ``arguments.check_arguments``); :class:`OptimizeState` the
model, its analysis, the report being written, and what the passes have replaced, fused and left for later.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..analyzer import Analysis
from ..blocks import select_block_size
from ..report import LayerEntry, OptimizeReport


@dataclass(frozen=True)
class Options:
    """``optimize()``'s arguments that steer the passes (see its docstring)."""

    block_size: object = None
    mode: str = "auto"
    fuse: bool = True
    neurons: bool = True
    filter_fn: object = None
    write_occupancy: bool = False
    numerics: str = "fast"

    @property
    def faithful(self) -> bool:
        return self.numerics == "faithful"


@dataclass
class OptimizeState:
    """What the passes share: read ``model``, ``analysis`` and ``options``; write ``report`` and the rest."""

    model: nn.Module
    analysis: Analysis
    options: Options
    report: OptimizeReport = field(default_factory=OptimizeReport)
    #: the position of each module name in the model as given (the report's order)
    order: dict = field(default_factory=dict)
    #: the model's modules by name: taken after the handlers, taken again after a pass that rewrote blocks
    named: dict = field(default_factory=dict)
    #: convolutions replaced by SparseConv2d (by the chains, residual passes), by name
    replaced: dict = field(default_factory=dict)
    #: neurons running fused in a replaced convolution
    fused_neurons: set = field(default_factory=set)
    #: conv -> BN chains whose BatchNorm output goes into an add: (name, conv, bn, bn_name, bs, entry, note) items
    #: for the residual pass
    deferred: list = field(default_factory=list)
    #: why a neuron reading a residual sum is not fused into the layer writing it, by neuron name (its report entry)
    neuron_notes: dict = field(default_factory=dict)
    #: convolutions whose block size is measured on their first CUDA call (block_size="auto")
    auto_names: set = field(default_factory=set)
    #: whether the example input repeats one frame over its steps by stride 0 (a static image)
    static_example: bool = False

    def refresh_named(self) -> None:
        self.named = dict(self.model.named_modules())

    def entry(self, name: str) -> LayerEntry | None:
        """The report entry of the module ``name``, or None."""
        return next((e for e in self.report.layers if e.name == name), None)

    def put(self, name: str, new: nn.Module) -> None:
        """Put ``new`` in the model in place of the module ``name``."""
        parent, child = parent_and_child(self.model, name)
        setattr(parent, child, new)

    def block_for(self, name: str, in_shape):
        """The block size for the layer ``name``: the user's (per layer from a dict), else the default rule."""
        block_size = self.options.block_size
        if isinstance(block_size, dict):
            if name in block_size:
                return block_size[name]
            block_size = None
        if block_size is None:
            return select_block_size(in_shape[-2])
        return block_size


def parent_and_child(model: nn.Module, name: str):
    """(the module holding ``name``, its attribute name there)."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child
