"""Neuron modules on the Triton multi-step kernel, in place.

:func:`accelerate_neuron` replaces the *instance* ``forward`` of a SpikingJelly or snnTorch neuron with
:class:`KernelNeuronForward`: in eval mode the whole sequence (``[T, N, ...]`` in multi-step mode, one
step per call otherwise) goes through one kernel with the membrane in registers; the module keeps its
class, parameters and state (``v`` / ``mem``), so ``reset_net``, ``state_dict`` and repeated calls behave as
before. In training mode, on tensors the kernels can't take, or with extra arguments, the module's own
``forward`` runs.
"""

from __future__ import annotations

import torch
from torch import nn

from sparseflow_kernels import multistep_neuron
from sparseflow_kernels.library import compiling, neuron_args

from ._common import kernels_can_run, notice_once
from .neurons import find_adapter, neuron_support


class KernelNeuronForward:
    """Instance ``forward`` running a neuron module on the multi-step kernel (see module docstring)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self._spec = None
        self._spec_key = None

    def __call__(self, x, *args, **kwargs):
        m = self.module
        if args or kwargs or m.training or not isinstance(x, torch.Tensor) or not kernels_can_run(x):
            if isinstance(x, torch.Tensor) and not x.is_cuda and not m.training:
                notice_once("cpu-neuron", "sparseflow: CPU tensors run the neurons' own torch code")
            return type(m).forward(m, x, *args, **kwargs)
        adapter = find_adapter(m)
        key = adapter.spec_key(m)
        if key is None or key != self._spec_key or self._spec is None:
            self._spec, self._spec_key = adapter.spec(m), key
        multistep = adapter.is_multistep(m)
        if multistep and x.dim() < 2:
            raise ValueError(f"{type(m).__name__} in multi-step mode expects [T, N, ...], got {tuple(x.shape)}")
        x5 = x if multistep else x.unsqueeze(0)
        v0 = adapter.get_v(m, x5.shape[1:], x.device)
        if compiling():  # the registered op: torch.compile keeps it in its graph
            spikes, v = torch.ops.sparseflow.multistep_neuron(x5, None, None, None, v0, *neuron_args(self._spec),
                                                              x.dtype)
        else:
            spikes, v = multistep_neuron(x5, self._spec, v=v0, return_v=True, v_dtype=x.dtype)
        adapter.set_v(m, v, x.dtype)
        return spikes if multistep else spikes[0]

    def __getstate__(self):
        return {"module": self.module}

    def __setstate__(self, state):
        self.module = state["module"]
        self._spec = None
        self._spec_key = None


def accelerate_neuron(module: nn.Module) -> nn.Module:
    """Run ``module`` (a supported neuron) on the kernel from now on; raises ValueError with the reason
    if it is not supported."""
    adapter, why = neuron_support(module)
    if adapter is None:
        raise ValueError(f"{type(module).__name__}: {why}")
    module.forward = KernelNeuronForward(module)
    return module


def restore_neuron(module: nn.Module) -> nn.Module:
    if isinstance(module.__dict__.get("forward"), KernelNeuronForward):
        del module.__dict__["forward"]
    return module


def is_accelerated(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), KernelNeuronForward)
