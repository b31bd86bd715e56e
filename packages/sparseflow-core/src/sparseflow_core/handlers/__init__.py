"""Built-in op handlers: every module in this package registers its handlers on import.

A handler module (e.g. ``handlers/linear.py``) calls
``registry.register_op_handler(nn.Linear, OpHandler("linear", replace))`` at import time; this package
imports all of them, so adding a handler needs no edit anywhere else.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass

from torch import nn

from ..hooks import module_hooks  # (the handlers' hook check: the one the passes use)
from ..registry import is_spiking_module

#: readers that leave their input as it is (unless built with ``inplace=True``)
_READ_ONLY = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Linear,
              nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
              nn.AdaptiveMaxPool2d, nn.Flatten, nn.Identity)


def static_writer(analysis, model: nn.Module, name: str) -> str:
    """'' when an output of ``name`` may be handed on repeated over the steps by stride 0 (a static input's frame
    computed once): no reader of it writes into it, which every step would share; else that reader, named."""
    def reads_only(n: str) -> bool:
        m = model.get_submodule(n)
        return (is_spiking_module(m) or isinstance(m, _READ_ONLY)) and not getattr(m, "inplace", False)

    return analysis.writing_reader(name, reads_only)


@dataclass
class HandlerContext:
    """What a handler's ``replace`` gets besides the module."""

    model: nn.Module
    analysis: object  # sparseflow_core.analyzer.Analysis
    name: str  # the module's fully qualified name in ``model``
    block_size: object  # int, "dense", or None (the handler's own default)
    mode: str  # "auto", "sparse", "dense", "torch"
    state: object = None  # handlers of the chains stage: the optimize state (sparseflow_core.passes.state)
    entry: object = None  # handlers of the chains stage: the module's report entry, which they fill

    @property
    def info(self):
        """The analyzer's record of the module's first call (in_shape, out_shape, densities)."""
        return self.analysis.first(self.name)

    def foldable_bn(self, bn_type: type, features: int):
        """(BatchNorm, its name): the eval-mode ``bn_type`` with running statistics that alone takes this module's
        whole output, unchanged, so that it can be folded into the module; else (None, why not) ("" when the sole
        user is not a BatchNorm at all)."""
        user, why = self.analysis.sole_user(self.name)
        if user is None:
            return None, f"no BatchNorm folded: output {why}"
        bn = self.model.get_submodule(user)
        if not isinstance(bn, bn_type):
            return None, ""
        if bn.training:
            return None, f"no BatchNorm folded: {user} is in training mode"
        if not bn.track_running_stats or bn.running_mean is None or bn.num_features != features:
            return None, f"no BatchNorm folded: {user} has no usable running statistics"
        if module_hooks(bn):
            return None, f"no BatchNorm folded: {user} has {module_hooks(bn)} hooks"
        ok, why = self.analysis.chained(self.name, user)
        if not ok:
            return None, f"no BatchNorm folded: {why}"
        return bn, user


# (in name order: ``conv2d`` registers before ``grouped_transposed``, whose ``groups > 1`` handler, registered
# later, then wins for those convolutions)
for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
