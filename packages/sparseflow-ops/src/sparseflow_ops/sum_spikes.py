"""The spikes of a neuron that reads a residual sum, written by the layer that writes the sum.

In networks whose neurons come before their convolutions (MS-ResNet, pre-activation ResNets:
``x + bn(conv(lif(bn(conv(lif(x))))))``) the residual stream is a sum ``bn(conv(h)) + identity`` that one block
writes and the next block's first neuron reads (its skip connection reads it too). :func:`link_sum_neuron` lets
the layer producing the sum (a :class:`~.conv.SparseConv2d` with its BatchNorm folded, called with the other
operand as ``residual``) do the add and that neuron in one kernel (``multistep_neuron(return_sum=True)``): it
returns the sum, as the add did, and offers the spikes with the neuron's new membrane to the neuron.

The neuron's instance ``forward`` (:class:`SumNeuronForward`, a :class:`~.neuron.KernelNeuronForward`) takes them
when it is called on that very sum, unchanged since (same tensor, same version), from the membrane the layer
started from; in every other case (another input, the sum written in place, a reset in between, training mode,
extra arguments) it runs the neuron itself, on the multi-step kernel or its own ``forward``. The layer offers
nothing while the neuron or the layer cannot run on the kernels, the neuron has a hook, the operands differ in
shape or dtype, under ``torch.compile`` or with ``numerics="faithful"``: the sum is then a plain add. The neuron's
state, ``reset_net`` and repeated calls behave as unfused, and the spikes are those the neuron computes from the
stored sum, bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from sparseflow_kernels import multistep_neuron
from sparseflow_kernels.library import compiling

from ._common import has_hooks, kernels_can_run, needs_autograd, take_shift, tensor_version
from .neuron import KernelNeuronForward
from .neurons import find_adapter, standalone_neuron_support

_MISSING = object()


def _state(m: nn.Module):
    """The neuron's membrane as stored (a tensor, or SpikingJelly's initial float) and its version."""
    v = getattr(m, "v", None)
    return v, tensor_version(v) if isinstance(v, torch.Tensor) else None


class SumNeuronForward(KernelNeuronForward):
    """Instance ``forward`` of a neuron whose spikes the layer writing its input computes (module docstring)."""

    def __init__(self, module: nn.Module, preserve_layout: bool = False):
        super().__init__(module, preserve_layout)
        self.pending = None  # (sum, its version, spikes, new membrane, membrane before, its version)

    def offer(self, z: torch.Tensor, spikes: torch.Tensor, v: torch.Tensor, before) -> None:
        self.pending = (z, tensor_version(z), spikes, v, *before)

    def __call__(self, x, *args, **kwargs):
        got, self.pending = self.pending, None
        m = self.module
        if got is not None and x is got[0] and not args and not kwargs and not m.training:
            v, version = _state(m)
            if tensor_version(x) == got[1] and v is got[4] and version == got[5]:
                find_adapter(m).set_v(m, got[3], x.dtype)
                return got[2]
        return super().__call__(x, *args, **kwargs)

    def __getstate__(self):
        return {"module": self.module, "preserve_layout": self.preserve_layout}

    def __setstate__(self, state):
        super().__setstate__(state)
        self.pending = None


def sum_neuron_support(m: nn.Module) -> str:
    """'' when the spikes of ``m`` can be computed by the layer writing its input, else the reason."""
    adapter, why = standalone_neuron_support(m)
    if adapter is None:
        return why
    if adapter.step_forward or not adapter.is_multistep(m):
        return "a neuron stepped one time step per call"
    if not hasattr(m, "v"):
        return f"{type(m).__name__} keeps no membrane attribute v"
    return ""


def link_sum_neuron(layer: nn.Module, neuron: nn.Module, *, preserve_layout: bool = False) -> None:
    """Let ``layer`` (called with a ``residual``) compute the spikes of ``neuron``, which reads its sum; the neuron
    runs on the multi-step kernel whenever it does not take them (``preserve_layout``: see KernelNeuronForward)."""
    why = sum_neuron_support(neuron)
    if why:
        raise ValueError(f"{type(neuron).__name__}: {why}")
    layer.__dict__["_sum_neuron"] = neuron
    neuron.forward = SumNeuronForward(neuron, preserve_layout)


def sum_neuron_of(layer: nn.Module) -> nn.Module | None:
    """The neuron whose spikes ``layer`` computes with its sum, or None."""
    return layer.__dict__.get("_sum_neuron")


def _offers(neuron, fwd, y: torch.Tensor, residual: torch.Tensor) -> bool:
    return (isinstance(fwd, SumNeuronForward) and not fwd.preserve_layout and y.dim() == 5
            and residual.shape == y.shape and residual.dtype == y.dtype and not neuron.training
            and kernels_can_run(y) and not needs_autograd(residual, neuron) and not has_hooks(neuron)
            and not compiling() and find_adapter(neuron).is_multistep(neuron))


def takes_fused_sum(layer: nn.Module, residual: torch.Tensor) -> bool:
    """Whether the sum neuron of ``layer`` takes its spikes from the layer's kernel for a sum of ``residual``'s
    shape, dtype and device (the layer's output's): the conditions of :func:`sum_and_spikes`'s offer."""
    neuron = sum_neuron_of(layer)
    return neuron is not None and _offers(neuron, neuron.__dict__.get("forward", _MISSING), residual, residual)


def fused_sum_and_spikes(layer: nn.Module, residual: torch.Tensor, run) -> torch.Tensor:
    """``bn(conv(x)) + residual`` and the spikes of the layer's sum neuron from one kernel (the sum neuron takes
    spikes from the layer: :func:`takes_fused_sum`): ``run(spec, v0)`` returns (spikes, new membrane, sum) from the
    neuron's spec and membrane, the neuron firing from the stored sum (``spiking_conv2d(..., return_sum=True)``, or
    ``multistep_neuron(return_sum=True)`` after the convolution); the spikes are offered to the neuron, and the sum
    returned."""
    neuron = sum_neuron_of(layer)
    fwd = neuron.__dict__["forward"]
    before = _state(neuron)
    v0 = find_adapter(neuron).get_v(neuron, tuple(residual.shape[1:]), residual.device)
    spikes, v, z = run(fwd.spec(), v0)
    fwd.offer(z, spikes, v, before)
    return z


def sum_and_spikes(layer: nn.Module, y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``y + residual`` (``y``: the layer's output), the spikes of the layer's sum neuron offered to it in the same
    kernel where it can take them (module docstring). A bias the convolution left out (``attach_shift`` on ``y``:
    cuDNN's output, whose bias torch would add in a kernel of its own) is added in that kernel too, rounded as that
    add rounds it."""
    neuron = sum_neuron_of(layer)
    fwd = None if neuron is None else neuron.__dict__.get("forward", _MISSING)
    bias = None if compiling() else take_shift(y)  # (a traced convolution adds its own bias)
    bias = None if bias is None else bias.to(y.dtype)
    if neuron is None or not _offers(neuron, fwd, y, residual):
        return (y if bias is None else y.add_(bias.view(-1, 1, 1))) + residual
    return fused_sum_and_spikes(layer, residual, lambda spec, v0: multistep_neuron(
        y, spec, shift=bias, residual=residual, v=v0, return_v=True, v_dtype=y.dtype, return_sum=True,
        round_affine=True))
