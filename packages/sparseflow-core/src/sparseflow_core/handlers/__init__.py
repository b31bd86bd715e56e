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
