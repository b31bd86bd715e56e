"""SparseFlow core: the spiking-module registry, the data-flow analyzer, the replacer and ``optimize()``."""

from .analyzer import Analysis, analyze
from .blocks import select_block_size
from .cuda_graph import CudaGraphModel, cuda_graph, reset_states
from .optimize import get_report, is_optimized, optimize, restore
from .profiler import LayerProfile, ProfileReport, profile
from .registry import is_spiking_module, register_spiking_module, spiking_types, unregister_spiking_module
from .report import LayerEntry, OptimizeReport

__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "CudaGraphModel",
    "LayerEntry",
    "LayerProfile",
    "OptimizeReport",
    "ProfileReport",
    "analyze",
    "cuda_graph",
    "get_report",
    "is_optimized",
    "is_spiking_module",
    "optimize",
    "profile",
    "register_spiking_module",
    "reset_states",
    "restore",
    "select_block_size",
    "spiking_types",
    "unregister_spiking_module",
]
