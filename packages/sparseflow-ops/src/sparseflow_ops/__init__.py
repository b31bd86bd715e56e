"""SparseFlow ops: ``nn.Module`` drop-ins built on ``sparseflow_kernels``.

* :class:`SparseConv2d` - ``nn.Conv2d`` on the sparse / fused kernels (optionally with the BatchNorm it
  feeds folded in and the spiking neuron after it fused), ``SparseConv2d.from_dense(conv, bn, neuron)``.
* :class:`SparseBatchNorm2d` - eval ``nn.BatchNorm2d`` fed by spikes: all-zero blocks are written, not read.
* :class:`SparseLinear` / :class:`SparseConv1d` - ``nn.Linear`` / ``nn.Conv1d(k=1)`` on the sparse GEMM
  (optionally with a BatchNorm1d folded in; a Conv1d also with the spiking neuron after it fused).
* :class:`SparseSpikingSelfAttention`, :class:`SparseSpikeDrivenSelfAttention`, :class:`SparseQKAttention`,
  :class:`SparseMultiheadAttention` - Spikformer / Spike-driven Transformer / QKFormer attention and
  ``nn.MultiheadAttention`` on the sparse kernels;
  :class:`SparseSpikformerBlock` - Spikformer's block with its skip connections in the fused projections.
* :class:`SparseGroupedConv2d` / :class:`SparseConvTranspose2d` - depthwise / grouped ``nn.Conv2d`` and
  ``nn.ConvTranspose2d`` on the tile-skipping kernels (optionally with the BatchNorm they feed folded in).
* :func:`accelerate_neuron` - a SpikingJelly / snnTorch neuron on the multi-step Triton kernel, in place.
* :func:`link_sum_neuron` - a layer writing a residual sum also computes the spikes of the neuron reading it.
* :func:`neuron_support` / :func:`register_neuron_adapter` - which neurons the kernels can run.
"""

from ._common import OBSERVER_ATTR, has_hooks, needs_autograd
from .attention import (
    SparseMultiheadAttention,
    SparseQKAttention,
    SparseSpikeDrivenSelfAttention,
    SparseSpikformerBlock,
    SparseSpikingSelfAttention,
)
from .base import SparseModule
from .batchnorm import SparseBatchNorm2d
from .bypass import Bypass, is_bypassed, remove_bypass
from .conv import SparseConv2d
from .conv_transpose import SparseConvTranspose2d
from .depthwise import SparseGroupedConv2d
from .linear import SparseConv1d, SparseLinear
from .neuron import KernelNeuronForward, accelerate_neuron, is_accelerated, restore_neuron
from .neurons import (
    NeuronAdapter,
    Unsupported,
    adopt_neurons,
    find_adapter,
    frozen_specs,
    neuron_support,
    register_neuron_adapter,
    standalone_neuron_support,
)
from .static_frames import (
    frame_wise_problem,
    remove_static_frames,
    run_static_frames_once,
    runs_static_frames_once,
)
from .sum_spikes import SumNeuronForward, link_sum_neuron, sum_neuron_of, sum_neuron_support

__version__ = "0.1.0"

__all__ = [
    "OBSERVER_ATTR",
    "Bypass",
    "KernelNeuronForward",
    "NeuronAdapter",
    "SparseBatchNorm2d",
    "SparseConv1d",
    "SparseConv2d",
    "SparseConvTranspose2d",
    "SparseGroupedConv2d",
    "SparseLinear",
    "SparseModule",
    "SparseMultiheadAttention",
    "SparseQKAttention",
    "SparseSpikeDrivenSelfAttention",
    "SparseSpikformerBlock",
    "SparseSpikingSelfAttention",
    "SumNeuronForward",
    "Unsupported",
    "accelerate_neuron",
    "adopt_neurons",
    "find_adapter",
    "frame_wise_problem",
    "frozen_specs",
    "has_hooks",
    "is_accelerated",
    "is_bypassed",
    "link_sum_neuron",
    "needs_autograd",
    "neuron_support",
    "register_neuron_adapter",
    "remove_bypass",
    "remove_static_frames",
    "restore_neuron",
    "run_static_frames_once",
    "runs_static_frames_once",
    "standalone_neuron_support",
    "sum_neuron_of",
    "sum_neuron_support",
]
