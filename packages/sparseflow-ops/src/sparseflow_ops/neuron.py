"""Neuron modules on the Triton multi-step kernel, in place.

:func:`accelerate_neuron` replaces the *instance* ``forward`` of a SpikingJelly or snnTorch neuron with
:class:`KernelNeuronForward`: in eval mode the whole sequence (``[T, N, ...]`` in multi-step mode, one
step per call otherwise) goes through one kernel with the membrane in registers; the module keeps its
class, parameters and state (``v`` / ``mem``), so ``reset_net``, ``state_dict`` and repeated calls behave as
before. In training mode, on tensors the kernels can't take, when autograd must record (an input or parameter
requiring grad under grad mode), or with extra arguments, the module's own ``forward`` runs. snnTorch
``Leaky`` / ``Synaptic`` calls, explicit state included (``spk, mem = lif(cur, mem)``), go to their adapter's
step kernel (:mod:`sparseflow_ops.snntorch_neurons`).
"""

from __future__ import annotations

import torch
from torch import nn

from sparseflow_kernels import multistep_neuron
from sparseflow_kernels.library import compiling, neuron_args

from ._common import VersionCache, kernels_can_run, needs_autograd, notice_once
from .neurons import find_adapter, standalone_neuron_support


def neuron_kernel(neuron: nn.Module, x5: torch.Tensor, *, spec=None, residual: torch.Tensor | None = None,
                  residual_after: bool = False, preserve_layout: bool = False, state_shape=None) -> torch.Tensor:
    """Run ``neuron`` (a supported neuron module) over ``x5`` ``[T, N, ...]`` on the multi-step kernel, from its
    stored membrane, and store the final membrane back (as the module itself would); the registered op under
    ``torch.compile``. ``residual`` is added before the neuron, or to its spikes with ``residual_after``.
    ``preserve_layout``: spikes in ``x5``'s memory layout (else channels innermost). ``state_shape``: the membrane's
    shape in the module where ``x5`` is a reshaped view of the module's input (the neuron is elementwise: its
    membrane is read and stored back reshaped alike)."""
    adapter = find_adapter(neuron)
    spec = spec or adapter.spec(neuron)
    step = tuple(x5.shape[1:])
    v0 = adapter.get_v(neuron, tuple(state_shape or step), x5.device)
    if v0 is not None and state_shape is not None:
        v0 = v0.reshape(step)
    after = residual is not None and residual_after
    if compiling():  # the registered op: torch.compile keeps it in its graph
        spikes, v = torch.ops.sparseflow.multistep_neuron(x5, None, None, residual, v0, *neuron_args(spec), x5.dtype,
                                                          after, preserve_layout)
    else:
        spikes, v = multistep_neuron(x5, spec, residual=residual, residual_after=after, v=v0, return_v=True,
                                     v_dtype=x5.dtype, preserve_layout=preserve_layout)
    adapter.set_v(neuron, v if state_shape is None else v.reshape(state_shape), x5.dtype)
    return spikes


class KernelNeuronForward:
    """Instance ``forward`` running a neuron module on the multi-step kernel (see module docstring).
    ``preserve_layout``: spikes in the input's memory layout, as the module writes them (``optimize``'s
    ``numerics="faithful"``; otherwise channels innermost, for SparseFlow's and cuDNN's fast kernels)."""

    def __init__(self, module: nn.Module, preserve_layout: bool = False):
        self.module = module
        self.preserve_layout = preserve_layout
        self._spec = None
        self._spec_key = None
        self._plan = VersionCache()  # (an adapter's step plan, kept across calls)

    def spec(self):
        """The module's neuron spec, recomputed only when its adapter's ``spec_key`` changes (a PLIF's decay is read
        from its parameter: a device sync, not to be paid per call)."""
        m = self.module
        adapter = find_adapter(m)
        key = adapter.spec_key(m)
        if key is None or key != self._spec_key or self._spec is None:
            self._spec, self._spec_key = adapter.spec(m), key
        return self._spec

    def __call__(self, x, *args, **kwargs):
        m = self.module
        adapter = find_adapter(m)
        if adapter.step_forward:  # snnTorch: one step per call, with the framework's own signature
            return adapter.step(m, x, args, kwargs, cache=self._plan)
        if (args or kwargs or m.training or not isinstance(x, torch.Tensor) or not kernels_can_run(x)
                or needs_autograd(x, m)):
            if isinstance(x, torch.Tensor) and not x.is_cuda and not m.training:
                notice_once("cpu-neuron", "sparseflow: CPU tensors run the neurons' own torch code")
            adapter.restore_layout(m, x)  # (a membrane a fused kernel stored channels innermost)
            return type(m).forward(m, x, *args, **kwargs)
        spec = self.spec()
        multistep = adapter.is_multistep(m)
        if multistep and x.dim() < 2:
            raise ValueError(f"{type(m).__name__} in multi-step mode expects [T, N, ...], got {tuple(x.shape)}")
        x5 = x if multistep else x.unsqueeze(0)
        spikes = neuron_kernel(m, x5, spec=spec, preserve_layout=self.preserve_layout)
        return spikes if multistep else spikes[0]

    def __getstate__(self):
        return {"module": self.module, "preserve_layout": self.preserve_layout}

    def __setstate__(self, state):
        self.module = state["module"]
        self.preserve_layout = state.get("preserve_layout", False)
        self._spec = None
        self._spec_key = None
        self._plan = VersionCache()


def accelerate_neuron(module: nn.Module, *, preserve_layout: bool = False) -> nn.Module:
    """Run ``module`` (a supported neuron) on the kernel from now on; raises ValueError with the reason
    if it is not supported. ``preserve_layout``: see :class:`KernelNeuronForward`."""
    adapter, why = standalone_neuron_support(module)
    if adapter is None:
        raise ValueError(f"{type(module).__name__}: {why}")
    module.forward = KernelNeuronForward(module, preserve_layout)
    return module


def restore_neuron(module: nn.Module) -> nn.Module:
    if isinstance(module.__dict__.get("forward"), KernelNeuronForward):
        del module.__dict__["forward"]
    return module


def is_accelerated(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), KernelNeuronForward)
