"""Adapters between neuron modules of SNN frameworks and the kernels' :class:`NeuronSpec`.

An adapter knows, for one neuron class, (1) whether an instance can run in the Triton kernels with exactly
its own semantics (and if not, why), (2) its parameters as a ``NeuronSpec``, and (3) how to read and write
its membrane state so that a fused layer continues from, and leaves behind, the same state the module
would have had (SpikingJelly ``v`` memory reset by ``functional.reset_net``; snnTorch ``mem`` buffer).

Adapters are registered by class (``register_neuron_adapter``); lookup walks the MRO, so subclasses of
a supported class are accepted only when they do not override the methods that define the dynamics.
"""

from __future__ import annotations

import contextlib
import math
import threading

import torch
from torch import nn

from sparseflow_kernels import NeuronSpec

_ADAPTERS: dict[type, NeuronAdapter] = {}


class Unsupported(Exception):
    """Raised by an adapter when a neuron instance cannot run in the kernels; the message says why."""


class NeuronAdapter:
    """Base adapter. Subclasses implement ``spec``, and name their membrane's attribute (``membrane_attr``) if it is
    not ``v``."""

    #: names of methods that define the dynamics; a subclass overriding one is not accepted
    dynamics_methods: tuple[str, ...] = ()
    time_major_multistep = True
    #: the adapter runs each call itself (``step(m, x, args, kwargs)``), not the multi-step kernel
    step_forward = False

    def check(self, m: nn.Module) -> None:
        base = self.registered_class
        for name in self.dynamics_methods:
            if getattr(type(m), name, None) is not getattr(base, name, None):
                raise Unsupported(f"{type(m).__name__} overrides {name}() of {base.__name__}")

    def spec(self, m: nn.Module) -> NeuronSpec:
        raise NotImplementedError

    def spec_key(self, m: nn.Module):
        """A value that changes when ``spec(m)`` may change (None: recompute every call, it is cheap)."""
        return None

    def is_multistep(self, m: nn.Module) -> bool:
        return getattr(m, "step_mode", "s") == "m"

    #: the attribute holding the membrane that ``get_v`` / ``set_v`` read and write
    membrane_attr = "v"

    def get_v(self, m: nn.Module, shape, device) -> torch.Tensor | None:
        """The membrane as the kernels' initial state (fp32 on ``device``), or None where it is not a tensor of
        ``shape`` (the frameworks then (re)start from their initial value)."""
        v = getattr(m, self.membrane_attr)
        if isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(shape):
            return v.to(device=device, dtype=torch.float32)
        return None

    def adopt(self, m: nn.Module) -> None:
        """Make a copied neuron known to its framework's bookkeeping (see :func:`adopt_neurons`)."""

    def set_v(self, m: nn.Module, v: torch.Tensor, dtype: torch.dtype) -> None:
        setattr(m, self.membrane_attr, v.to(dtype))

    def restore_layout(self, m: nn.Module, x) -> None:
        """Before ``m`` runs its own forward on ``x`` (its drop-in off the kernels: training mode, hooks, CPU): its
        membrane in the layout the dense neuron gives it, that of one step of its input. The fused kernels store it
        channels innermost, as their spikes; the values are the same, but what the neuron's outputs meet next (a
        random mask in training, say) follows the layout."""
        v = getattr(m, self.membrane_attr, None)
        if not isinstance(v, torch.Tensor) or not isinstance(x, torch.Tensor) or x.dim() < v.dim():
            return
        step = x[(0,) * (x.dim() - v.dim())]
        if step.shape == v.shape and step.stride() != v.stride():
            setattr(m, self.membrane_attr, torch.empty_like(step, dtype=v.dtype).copy_(v))


def register_neuron_adapter(cls: type, adapter: NeuronAdapter) -> None:
    adapter.registered_class = cls
    _ADAPTERS[cls] = adapter


class _FrozenSpec(NeuronAdapter):
    """An adapter whose ``spec`` is fixed (see :func:`frozen_specs`); everything else is the wrapped adapter's."""

    def __init__(self, adapter: NeuronAdapter, spec: NeuronSpec):
        self.adapter = adapter
        self.frozen = spec

    def spec(self, m):
        return self.frozen

    def spec_key(self, m):
        return ("frozen", self.frozen)

    def __getattr__(self, name):
        return getattr(self.__dict__["adapter"], name)

    def check(self, m):
        return self.adapter.check(m)

    def is_multistep(self, m):
        return self.adapter.is_multistep(m)

    def get_v(self, m, shape, device):
        return self.adapter.get_v(m, shape, device)

    def set_v(self, m, v, dtype):
        return self.adapter.set_v(m, v, dtype)

    def restore_layout(self, m, x):
        return self.adapter.restore_layout(m, x)


_FROZEN: dict[int, _FrozenSpec] = {}


@contextlib.contextmanager
def frozen_specs(model: nn.Module):
    """Within the block, every supported neuron of ``model`` reports the ``NeuronSpec`` it has on entry, read
    from its real parameters: ``torch.export`` traces parameters as fake tensors, whose values (a PLIF's
    learnt decay) cannot become the kernels' Python scalars. The exported program holds the specs as constants."""
    added = []
    for m in model.modules():
        adapter = find_adapter(m)
        if adapter is None or id(m) in _FROZEN:
            continue
        try:
            adapter.check(m)
            spec = adapter.spec(m)
        except Unsupported:
            continue
        _FROZEN[id(m)] = _FrozenSpec(adapter, spec)
        added.append(id(m))
    try:
        yield
    finally:
        for k in added:
            _FROZEN.pop(k, None)


def find_adapter(m: nn.Module) -> NeuronAdapter | None:
    if _FROZEN:
        frozen = _FROZEN.get(id(m))
        if frozen is not None:
            return frozen
    _register_builtin()
    for klass in type(m).__mro__:
        if klass in _ADAPTERS:
            return _ADAPTERS[klass]
    return None


def neuron_support(m: nn.Module) -> tuple[NeuronAdapter | None, str | None]:
    """(adapter, None) when ``m`` runs in the multi-step kernel, so that it can also be fused into the layer
    before it, else (None, reason). See :func:`standalone_neuron_support` for the neurons that run on a kernel
    of their own (snnTorch's explicit-state calls)."""
    adapter = find_adapter(m)
    if adapter is None:
        return None, f"no kernel for neuron type {type(m).__name__}"
    try:
        adapter.check(m)
        adapter.spec(m)
    except Unsupported as e:
        return None, str(e)
    return adapter, None


def standalone_neuron_support(m: nn.Module) -> tuple[NeuronAdapter | None, str | None]:
    """(adapter, None) when ``m`` runs on a kernel as a module of its own (``accelerate_neuron``), else (None,
    reason): the multi-step kernel, or the adapter's own ``step`` (``step_forward``: snnTorch's one-step calls
    with their explicit ``(spk, mem)`` state, which take more options than the fused kernels)."""
    adapter = find_adapter(m)
    if adapter is None or not adapter.step_forward:
        return neuron_support(m)
    try:
        adapter.check(m)
    except Unsupported as e:
        return None, str(e)
    return adapter, None


def adopt_neurons(model: nn.Module) -> None:
    """Let each neuron's framework know the neurons of ``model``, a deep copy: snnTorch resets hidden states
    (``utils.reset(net)``, ``Leaky.reset_hidden()``) through a class-level list of the neurons its constructors
    made, which copies are not in; without this, ``utils.reset`` on an optimized copy would reset the original."""
    for m in model.modules():
        adapter = find_adapter(m)
        if adapter is not None:
            adapter.adopt(m)


def _float(v) -> float:
    if isinstance(v, torch.Tensor):
        return float(v.detach().float().reshape(-1)[0]) if v.numel() == 1 else math.nan
    return float(v)


# ------------------------------------------------------------------------------------------ SpikingJelly
class _SJAdapter(NeuronAdapter):
    dynamics_methods = ("single_step_functional_forward", "multi_step_functional_forward",
                        "multi_step_forward", "single_step_forward", "forward")

    def check(self, m):
        super().check(m)
        if getattr(m, "store_v_seq", False):
            raise Unsupported("store_v_seq=True (the voltage sequence is not produced by the kernels)")
        if getattr(m, "_neuron_precision", None) is not None:
            raise Unsupported("an explicit SpikingJelly neuron precision is set")
        vt = m.v_threshold
        if not isinstance(vt, float):
            raise Unsupported("v_threshold is not a float")
        sg = getattr(m, "surrogate_function", None)
        if sg is not None and getattr(sg, "spiking", True) is False:
            raise Unsupported("surrogate_function(spiking=False) makes the neuron output analog values, not spikes")


class _SJLIF(_SJAdapter):
    def spec(self, m):
        return NeuronSpec.make("lif", tau=float(m.tau), decay_input=bool(m.decay_input),
                               v_threshold=float(m.v_threshold), v_reset=m.v_reset)


class _SJIF(_SJAdapter):
    def spec(self, m):
        return NeuronSpec.make("if", v_threshold=float(m.v_threshold), v_reset=m.v_reset)


class _SJPLIF(_SJAdapter):
    def spec(self, m):
        q = torch.sigmoid(m.w.detach().float()).item()
        return NeuronSpec.make("plif", decay=q, decay_input=bool(m.decay_input),
                               v_threshold=float(m.v_threshold), v_reset=m.v_reset)

    def spec_key(self, m):
        return (m.w._version, m.w.data_ptr(), m.v_threshold, m.v_reset, m.decay_input)


# ------------------------------------------------------------------------------------------ snnTorch
# Leaky and Synaptic: sparseflow_ops.snntorch_neurons (their own step kernel, and Leaky's spec for fusion)


class _SnnUnsupported(NeuronAdapter):
    """snnTorch neurons whose dynamics the kernels do not implement: the reason, for the report."""

    def __init__(self, reason: str):
        self.reason = reason

    def check(self, m):
        raise Unsupported(f"snnTorch {type(m).__name__}: {self.reason}")


_SNN_UNSUPPORTED = {
    "Alpha": "two coupled state variables (excitatory and inhibitory currents); the kernels run snnTorch Leaky "
             "and Synaptic",
    "Lapicque": "RC-circuit dynamics (R, C, time_step); the kernels run snnTorch Leaky",
    "RLeaky": "recurrent weights feed the spikes back; the kernels run feed-forward neurons",
    "RSynaptic": "recurrent, with two state variables",
    "SConv2dLSTM": "a convolutional LSTM cell, not a point neuron",
    "SLSTM": "an LSTM cell, not a point neuron",
}

_BUILTIN_DONE = False
_BUILTIN_LOCK = threading.Lock()


def _register_builtin() -> None:
    """Register the adapters of the frameworks that are installed (imported on first use only). Thread-safe:
    no thread sees the registry before the built-in adapters are all in it."""
    global _BUILTIN_DONE
    if _BUILTIN_DONE:
        return
    with _BUILTIN_LOCK:
        if _BUILTIN_DONE:
            return
        try:
            from spikingjelly.activation_based import neuron as sjn
        except Exception:  # SpikingJelly is optional
            sjn = None
        if sjn is not None:
            register_neuron_adapter(sjn.LIFNode, _SJLIF())
            register_neuron_adapter(sjn.IFNode, _SJIF())
            register_neuron_adapter(sjn.ParametricLIFNode, _SJPLIF())
        try:
            import snntorch
        except Exception:
            snntorch = None
        if snntorch is not None:
            from .snntorch_neurons import _SnnLeaky, _SnnSynaptic

            register_neuron_adapter(snntorch.Leaky, _SnnLeaky())
            register_neuron_adapter(snntorch.Synaptic, _SnnSynaptic())
            for name, reason in _SNN_UNSUPPORTED.items():
                cls = getattr(snntorch, name, None)
                if isinstance(cls, type) and cls not in _ADAPTERS:
                    register_neuron_adapter(cls, _SnnUnsupported(reason))
        _BUILTIN_DONE = True
