"""SparseFlow core: the spiking-module registry, the data-flow analyzer, the replacer and ``optimize()``."""

from sparseflow_kernels import force_path

from .analyzer import Analysis, analyze
from .blocks import select_block_size
from .cuda_graph import CudaGraphModel, cuda_graph, reset_states
from .export import ExportedModel, export
from .handlers import HandlerContext
from .optimize import get_report, is_optimized, optimize, restore
from .profiler import LayerProfile, ProfileReport, profile
from .registry import (
    OpHandler,
    find_op_handler,
    is_spiking_module,
    register_op_handler,
    register_spiking_module,
    spiking_types,
    unregister_op_handler,
    unregister_spiking_module,
)
from .report import LayerEntry, OptimizeReport

__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "CudaGraphModel",
    "ExportedModel",
    "HandlerContext",
    "LayerEntry",
    "LayerProfile",
    "OpHandler",
    "OptimizeReport",
    "ProfileReport",
    "analyze",
    "cuda_graph",
    "export",
    "find_op_handler",
    "force_path",
    "get_report",
    "is_optimized",
    "is_spiking_module",
    "optimize",
    "profile",
    "register_op_handler",
    "register_spiking_module",
    "reset_states",
    "restore",
    "select_block_size",
    "spiking_types",
    "unregister_op_handler",
    "unregister_spiking_module",
]
