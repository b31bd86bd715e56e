"""SparseFlow kernels: Triton prescan, sparse convolution, fused spiking layers and neurons.

Depends only on torch and triton. Kernels run on CUDA tensors, or on the CPU under ``TRITON_INTERPRET=1``.
"""

from . import library  # noqa: F401  (registers the torch.ops.sparseflow operators)
from ._utils import can_run_triton, pdl_enabled, set_pdl
from .attention import channel_dot, qk_token_attention, ssa_attention
from .batchnorm import sparse_batch_norm2d
from .conv import ConvConfig
from .conv_transpose import sparse_conv_transpose2d
from .depthwise import DepthwiseConfig, grouped_conv2d
from .dispatch import force_path
from .linear import LinearConfig, linear_block_flags, sparse_conv1x1, sparse_linear
from .neuron import NeuronSpec, multistep_neuron
from .occupancy import Occupancy, prescan
from .sparse_conv import default_config, sparse_conv2d
from .spiking import repeated_over_steps, spiking_conv2d

__version__ = "0.1.0"

__all__ = [
    "ConvConfig",
    "DepthwiseConfig",
    "LinearConfig",
    "NeuronSpec",
    "Occupancy",
    "can_run_triton",
    "channel_dot",
    "default_config",
    "force_path",
    "grouped_conv2d",
    "linear_block_flags",
    "multistep_neuron",
    "pdl_enabled",
    "prescan",
    "qk_token_attention",
    "repeated_over_steps",
    "set_pdl",
    "sparse_batch_norm2d",
    "sparse_conv1x1",
    "sparse_conv2d",
    "sparse_conv_transpose2d",
    "sparse_linear",
    "spiking_conv2d",
    "ssa_attention",
]
