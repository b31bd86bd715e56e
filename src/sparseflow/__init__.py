"""SparseFlow: plug-and-play sparse inference for spiking neural networks.

    import sparseflow
    model = sparseflow.optimize(model)

This meta-package re-exports the public API of ``sparseflow_core``. The names are
resolved lazily, on first access, so ``import sparseflow`` is cheap and works even
where ``sparseflow_core`` (or torch) cannot be imported yet.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public names re-exported from sparseflow_core.
_CORE_EXPORTS = (
    "optimize", "restore", "profile", "register_spiking_module", "OptimizeReport", "get_report", "cuda_graph",
    "analyze", "export", "force_path",
)

__all__ = [
    "OptimizeReport",
    "__version__",
    "analyze",
    "cuda_graph",
    "export",
    "force_path",
    "get_report",
    "optimize",
    "profile",
    "register_spiking_module",
    "restore",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from sparseflow_core import (
        OptimizeReport,
        analyze,
        cuda_graph,
        export,
        force_path,
        get_report,
        optimize,
        profile,
        register_spiking_module,
        restore,
    )


def __getattr__(name: str) -> Any:
    if name not in _CORE_EXPORTS:
        raise AttributeError(f"module 'sparseflow' has no attribute {name!r}")
    core = importlib.import_module("sparseflow_core")
    try:
        value = getattr(core, name)
    except AttributeError:
        raise AttributeError(
            f"sparseflow.{name} is re-exported from sparseflow_core, but sparseflow_core "
            f"({getattr(core, '__file__', '?')}) does not define {name!r}"
        ) from None
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
