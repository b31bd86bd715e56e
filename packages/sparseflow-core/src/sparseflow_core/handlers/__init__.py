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


@dataclass
class HandlerContext:
    """What a handler's ``replace`` gets besides the module."""

    model: nn.Module
    analysis: object  # sparseflow_core.analyzer.Analysis
    name: str  # the module's fully qualified name in ``model``
    block_size: object  # int, "dense", or None (the handler's own default)
    mode: str  # "auto", "sparse", "dense", "torch"

    @property
    def info(self):
        """The analyzer's record of the module's first call (in_shape, out_shape, densities)."""
        return self.analysis.first(self.name)


def module_hooks(m: nn.Module) -> str:
    """The kinds of hooks on ``m`` that keep it from being fused or replaced ('' when none): ``optimize``'s own
    check (forward, pre, backward and global hooks), for handlers that fuse a module next to the one they get."""
    from ..optimize import _hooks  # (optimize imports this package)

    return _hooks(m)


for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
