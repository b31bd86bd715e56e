"""SparseFlow kernels: Triton prescan, sparse convolution, fused spiking layers and neurons.

Depends only on torch and triton. Kernels run on CUDA tensors, or on the CPU under ``TRITON_INTERPRET=1``.
"""

from .conv import ConvConfig
from .neuron import NeuronSpec, multistep_neuron
from .occupancy import Occupancy, prescan
from .sparse_conv import default_config, sparse_conv2d
from .spiking import spiking_conv2d

__version__ = "0.1.0"

__all__ = [
    "ConvConfig",
    "NeuronSpec",
    "Occupancy",
    "default_config",
    "multistep_neuron",
    "prescan",
    "sparse_conv2d",
    "spiking_conv2d",
]
