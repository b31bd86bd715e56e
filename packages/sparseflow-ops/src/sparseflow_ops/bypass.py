"""Bypassed modules and dense adoption: how a drop-in takes over the modules it replaces, and gives them back.

A fused drop-in (a convolution with the BatchNorm it feeds folded in, and the spiking neuron after it) leaves the
BatchNorm and neuron modules in the model (``state_dict`` keys, parameters, buffers and ``reset()`` unchanged);
only their instance ``forward`` is replaced by :class:`Bypass`, which hands the input through when the drop-in
upstream did their work in this call (its ``_pending`` flag, closed by the last module of the chain), and runs
their own ``forward`` otherwise (training mode, CPU without Triton, hooks, faithful numerics).

:func:`adopt_dense` lets a new drop-in share a dense module's parameters and bypass its chain; :func:`dense_copy`
is the inverse (``to_dense``): the dense module back, its chain running on its own again.
"""

from __future__ import annotations

import torch
from torch import nn

from .neurons import find_adapter


class Bypass:
    """Instance ``forward`` of a module whose work a drop-in upstream (``owner``) has taken over."""

    flag = "_pending"  # (the default of an instance pickled before it had one)

    def __init__(self, module: nn.Module, owner: nn.Module, last: bool, flag: str = "_pending"):
        self.module = module
        self.owner = owner
        self.last = last  # the neuron closes the handshake
        # the owner's flag this module follows: "_pending" (BatchNorm and neuron), "_pool_pending" (a max pool after
        # the neuron, which the owner pools on some of its paths only)
        self.flag = flag

    def __call__(self, x, *args, **kwargs):
        if getattr(self.owner, self.flag, False):
            if self.last:
                setattr(self.owner, self.flag, False)
            if self.last and self.flag == "_pending":
                T = self.owner.time_steps
                if T and isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] != T:
                    raise RuntimeError(
                        f"{type(self.module).__name__}: got {x.shape[0]} time steps, but the fused layer before it "
                        f"was optimized for T={T} on a flattened [T*N, ...] batch; run sparseflow.optimize again "
                        "for the new T")
            return x
        if self.last:  # a neuron running its own forward: its membrane as the dense neuron keeps it
            adapter = find_adapter(self.module)
            if adapter is not None:
                adapter.restore_layout(self.module, x)
        return type(self.module).forward(self.module, x, *args, **kwargs)


def install_bypass(module: nn.Module, owner: nn.Module, last: bool, flag: str = "_pending") -> None:
    module.forward = Bypass(module, owner, last, flag)


def remove_bypass(module: nn.Module) -> None:
    if isinstance(module.__dict__.get("forward"), Bypass):
        del module.__dict__["forward"]


def is_bypassed(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), Bypass)


def adopt_dense(new: nn.Module, dense: nn.Module, bn: nn.Module | None, neuron: nn.Module | None = None,
                pool: nn.Module | None = None) -> None:
    """Let the drop-in ``new`` take over ``dense``'s parameters, train/eval mode, SpikingJelly step mode and class
    (for ``to_dense``); fold ``bn`` (kept as ``_bn``) and fuse ``neuron`` (kept as ``_neuron``), both bypassed, the
    last of the chain closing the hand-over; ``pool`` (kept as ``_pool``, the max pool after the neuron) is
    bypassed on its own flag, ``_pool_pending``, which ``new`` sets on the calls that return pooled spikes."""
    new.weight = dense.weight
    new.bias = dense.bias
    new.training = dense.training
    if hasattr(dense, "step_mode"):
        new.step_mode = dense.step_mode
    new.__dict__["_original_class"] = type(dense)
    new.__dict__["_bn"] = bn
    new.__dict__["_neuron"] = neuron
    if bn is not None:
        install_bypass(bn, new, last=neuron is None)
    if neuron is not None:
        install_bypass(neuron, new, last=True)
    new.__dict__["_pool"] = pool
    if pool is not None:
        install_bypass(pool, new, last=True, flag="_pool_pending")


def dense_copy(module: nn.Module, default_cls: type, runtime: tuple) -> nn.Module:
    """The dense module ``module`` took over (its original class, else ``default_cls``) with the same parameters
    and state, without the drop-in's ``runtime`` attributes; the folded BatchNorm and fused neuron run on their
    own again."""
    for m in (module.__dict__.get("_bn"), module.__dict__.get("_neuron"), module.__dict__.get("_pool")):
        if m is not None:
            remove_bypass(m)
    klass = module.__dict__.get("_original_class", default_cls)
    m = klass.__new__(klass)
    nn.Module.__init__(m)
    for k, v in module.__dict__.items():
        if k not in runtime:
            m.__dict__[k] = v
    if "step_mode" in module.__dict__:
        m.step_mode = module.__dict__["step_mode"]  # through the framework's property (SpikingJelly)
    return m
