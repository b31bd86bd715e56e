"""snnTorch ``Leaky`` and ``Synaptic`` on SparseFlow's kernels, in every calling style snnTorch offers.

snnTorch neurons take one time step per call. Their usual style passes the state explicitly
(``init_hidden=False``)::

    mem = lif.init_leaky()              # or lif.reset_mem(), or nothing (snnTorch starts from zeros)
    for step in range(T):
        spk, mem = lif(conv(x[step]), mem)

and the other keeps it in the module (``init_hidden=True``; ``utils.reset(net)`` clears it), returning ``spk``, or
``(spk, mem)`` for an ``output=True`` layer; ``Synaptic`` adds the synaptic current (``spk, syn, mem``). Each call
runs :func:`sparseflow_kernels.snntorch_step.snntorch_step`, which repeats snnTorch's arithmetic op for op (its
order, its dtypes, no fused multiply-adds), so the spikes and states equal snnTorch's bit for bit; the module's
``mem`` / ``syn`` hold the new state afterwards, as snnTorch leaves them. Training mode, calls that need
gradients, ``torch.compile`` tracing and inputs the kernel does not take run snnTorch's own ``forward``.

Only ``init_hidden=True`` ``Leaky`` neurons without ``output``, with a reset by subtraction or to zero, one scalar
``beta`` and ``threshold``, ``reset_delay=True`` and ``graded_spikes_factor=1`` can also be fused into the
convolution before them (:meth:`_SnnLeaky.spec`); the others run here, next to it.
"""

from __future__ import annotations

import torch
from torch import nn

from sparseflow_kernels import NeuronSpec
from sparseflow_kernels.library import compiling
from sparseflow_kernels.snntorch_step import snntorch_step, step_plan

from ._common import VersionCache, kernels_can_run, version_key
from .neurons import NeuronAdapter, Unsupported, _float

#: snnTorch surrogate-gradient factories whose forward is the Heaviside step ``(x > 0).float()``
_HEAVISIDE_FACTORIES = {"straight_through_estimator", "triangular", "fast_sigmoid", "atan", "heaviside", "sigmoid",
                        "spike_rate_escape", "SSO", "SFS", "custom_surrogate"}
_RESET_NAMES = ("subtract", "zero", "none")
_STATE_FUNCTIONS = (("_base_sub", "subtract"), ("_base_zero", "zero"), ("_base_int", "none"))


def _reset_of(m: nn.Module) -> str | None:
    """The reset snnTorch's forward applies: its ``state_function``, chosen by the constructor (assigning
    ``reset_mechanism`` later changes only the ``reset_delay=False`` branch; None when the two disagree). Read
    without touching the ``reset_mechanism_val`` buffer (a device sync)."""
    fn = getattr(getattr(m, "state_function", None), "__func__", None)
    for name, reset in _STATE_FUNCTIONS:
        if fn is not None and fn is getattr(type(m), name, None):
            return reset if getattr(m, "_reset_mechanism", reset) == reset else None
    return None


def _heaviside_spike_grad(m: nn.Module) -> bool:
    sg = getattr(m, "spike_grad", None)
    qual = getattr(sg, "__qualname__", "")
    if qual == "SpikingNeuron._surrogate_bypass":  # surrogate_disable=True
        return True
    parts = qual.split(".")
    return (getattr(sg, "__module__", None) == "snntorch.surrogate" and len(parts) == 3
            and parts[0] in _HEAVISIDE_FACTORIES and parts[1:] == ["<locals>", "inner"])


def _one_value(t) -> bool:
    return isinstance(t, torch.Tensor) and t.numel() == 1


class _SnnStep(NeuronAdapter):
    """Shared by the snnTorch adapters: what the step kernel takes, and the forward that runs it."""

    state_names: tuple[str, ...] = ("mem",)
    synaptic = False
    step_forward = True  # KernelNeuronForward hands every call to step()

    def check(self, m):
        super().check(m)
        if getattr(m, "inhibition", False):
            raise Unsupported("inhibition=True: only the neuron with the largest membrane of each sample fires "
                              "(a reduction across neurons, not a pointwise neuron)")
        if getattr(m, "state_quant", False):
            raise Unsupported("state_quant is set: the membrane goes through a user quantization function")
        if not _heaviside_spike_grad(m):
            raise Unsupported("spike_grad is not one of snnTorch's surrogate functions (its forward may not be the "
                              "Heaviside step)")
        val = int(m.reset_mechanism_val)
        if val not in (0, 1, 2) or _reset_of(m) != _RESET_NAMES[val]:
            raise Unsupported(f"reset_mechanism ({m.reset_mechanism!r}) was changed after construction: snnTorch "
                              "keeps the constructor's state update and uses the new one only with reset_delay=False")
        if not _one_value(m.graded_spikes_factor):
            raise Unsupported("graded_spikes_factor is not one value")
        for name in ("beta", "threshold", "alpha"):
            t = getattr(m, name, None)
            if name == "alpha" and not self.synaptic:
                continue
            if not isinstance(t, torch.Tensor):
                raise Unsupported(f"{name} is not a tensor")
            if not t.is_floating_point() or t.dtype == torch.float64:
                raise Unsupported(f"{name} has dtype {t.dtype}; the kernel takes float32, float16 and bfloat16")

    def is_multistep(self, m):
        return False  # snnTorch modules take one time step per call

    def adopt(self, m):
        instances = getattr(type(m), "instances", None)  # SpikingNeuron.instances (utils.reset walks it)
        if isinstance(instances, list) and not any(i is m for i in instances):
            instances.append(m)

    membrane_attr = "mem"

    # -------------------------------------------------------------------------------------- the step
    def _states(self, m, args, kwargs):
        """The state tensors passed to the call (None where not passed), or None when the call is not one the
        kernel takes (extra arguments, non-tensor states)."""
        names = self.state_names
        if len(args) > len(names) or any(k not in names for k in kwargs):
            return None
        given = dict(zip(names, args))
        for k, v in kwargs.items():
            if k in given:
                return None
            given[k] = v
        states = {}
        for name in names:
            v = given.get(name)
            if v is not None and not isinstance(v, torch.Tensor):
                return None
            states[name] = v
        return states

    def step(self, m, x, args, kwargs, cache: VersionCache | None = None):
        """One call of ``m`` (``m(x, *args, **kwargs)``) on the kernel, or snnTorch's own forward where the kernel
        does not apply. ``cache``: where the parameters' :func:`step_plan` is kept between calls (without one, each
        call reads the parameters: a device sync)."""
        dense = type(m).forward
        if m.training or compiling() or not isinstance(x, torch.Tensor) or not kernels_can_run(x):
            return dense(m, x, *args, **kwargs)
        states = self._states(m, args, kwargs)
        if states is None or (m.init_hidden and any(v is not None for v in states.values())):
            return dense(m, x, *args, **kwargs)  # (snnTorch raises its TypeError for state passed with init_hidden)
        params = [m.beta, m.threshold, m.graded_spikes_factor] + ([m.alpha] if self.synaptic else [])
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)
                                        or any(v is not None and v.requires_grad for v in states.values())):
            return dense(m, x, *args, **kwargs)
        cur = {}
        for name in self.state_names:  # snnTorch: the passed state, else the stored one; zeros of the input
            v = states[name] if states[name] is not None else getattr(m, name)  # if its shape differs
            if not isinstance(v, torch.Tensor):
                return dense(m, x, *args, **kwargs)
            if v.shape != x.shape:
                if v.device != x.device:
                    return dense(m, x, *args, **kwargs)  # (snnTorch makes the zeros on the stored state's device)
                v = None
            elif v.device != x.device:
                return dense(m, x, *args, **kwargs)
            cur[name] = v
        reset = _reset_of(m)
        if reset is None:
            return dense(m, x, *args, **kwargs)
        mem, syn = cur["mem"], cur.get("syn")
        like = mem if mem is not None else x
        key = (version_key(*params), x.dtype, None if mem is None else mem.dtype, None if syn is None else syn.dtype,
               tuple(like.shape), tuple(like.stride()), like.device, reset, bool(m.reset_delay))
        try:
            plan = (cache or VersionCache()).get(key, lambda: step_plan(
                x, mem, syn, beta=m.beta, threshold=m.threshold, graded_spikes_factor=m.graded_spikes_factor,
                alpha=getattr(m, "alpha", None), reset=reset, reset_delay=bool(m.reset_delay),
                synaptic=self.synaptic))
        except (TypeError, ValueError):  # (dtypes or parameter shapes the kernel does not take)
            return dense(m, x, *args, **kwargs)
        with torch.no_grad():
            out = snntorch_step(x, mem, syn=syn, beta=m.beta, threshold=m.threshold, alpha=getattr(m, "alpha", None),
                                graded_spikes_factor=m.graded_spikes_factor, synaptic=self.synaptic, plan=plan)
        if self.synaptic:
            spk, m.syn, m.mem = out
            full = (spk, m.syn, m.mem)
        else:
            spk, m.mem = out
            full = (spk, m.mem)
        if m.output or not m.init_hidden:
            return full
        return spk


class _SnnLeaky(_SnnStep):
    dynamics_methods = ("forward", "fire", "mem_reset", "_base_state_function", "_base_sub", "_base_zero",
                        "_base_int")

    def spec(self, m):
        """The multi-step kernel's spec, for fusing the neuron into the convolution before it (a narrower set)."""
        if not getattr(m, "init_hidden", False):
            raise Unsupported("explicit state (init_hidden=False): the neuron returns (spk, mem) and runs on its own "
                              "step kernel")
        if getattr(m, "output", False):
            raise Unsupported("output=True: the neuron returns (spk, mem) and runs on its own step kernel")
        if not getattr(m, "reset_delay", True):
            raise Unsupported("reset_delay=False")
        if int(m.reset_mechanism_val) not in (0, 1):
            raise Unsupported("reset_mechanism='none'")
        if _float(m.graded_spikes_factor) != 1.0:
            raise Unsupported("graded_spikes_factor != 1")
        for name in ("beta", "threshold"):
            t = getattr(m, name)
            if isinstance(t, torch.Tensor) and t.numel() != 1:
                raise Unsupported(f"per-neuron {name} (a tensor of {t.numel()} values)")
        beta = min(max(_float(m.beta), 0.0), 1.0)
        hard = int(m.reset_mechanism_val) == 1
        return NeuronSpec.make("leaky", beta=beta, v_threshold=_float(m.threshold), v_reset=0.0 if hard else None)


class _SnnSynaptic(_SnnStep):
    dynamics_methods = ("forward", "fire", "mem_reset", "_base_state_function", "_base_state_reset_zero",
                        "_base_sub", "_base_zero", "_base_int")
    state_names = ("syn", "mem")
    synaptic = True

    def spec(self, m):
        raise Unsupported("snnTorch Synaptic has two state variables (syn, mem); the fused convolution kernels "
                          "carry one")
