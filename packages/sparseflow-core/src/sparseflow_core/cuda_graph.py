"""Replaying a model's forward as a CUDA graph, for fixed input shapes (``optimize(..., cuda_graph=True)``).

A spiking network at batch 8 launches hundreds of small kernels per forward; captured once and replayed,
the launches cost almost nothing. :class:`CudaGraphModel` wraps a model: the first calls for a new input
shape run eagerly (they also let each layer measure and cache its kernel path), then the forward is
captured and later calls copy the input into the captured buffer and replay.

Semantics: every call starts from reset neuron state, as SNN inference over one sample does (the wrapper
resets the network's neurons before capturing, and the captured graph never reads the state again). The
outputs are the captured buffers: the next call overwrites them, so clone what you keep. New weights
(``load_state_dict``) need a new capture: call :meth:`CudaGraphModel.reset_graphs`.

An input repeated over its first axis by stride 0 (``frame.expand(T, ...)``, or any input of a model optimized with
``static_input=True``) is captured so: the graph's input buffer holds one frame, and the stem convolves it once.

A replay runs no Python, so no module hook and no autograd. While any module of the model has a hook (a
SpikingJelly monitor, say; SparseFlow's profiler aside), and in training mode, the call runs the model eagerly
instead (hooks see the dense model's values; training computes as the dense model does). The hook check is one pass
over the modules' hook dictionaries. A graph model is for inference: in eval mode it replays under grad mode too
(so that forgetting ``torch.no_grad()`` costs no speed), and a ``backward()`` through its output raises an error
that says so; for gradients, call the wrapped model (``.model``) or ``sparseflow.restore`` it.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from sparseflow_kernels import repeated_over_steps
from sparseflow_ops import has_hooks

from .arguments import StaticInput

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def reset_states(model: nn.Module) -> None:
    """Reset every stateful module (SpikingJelly ``reset()``, snnTorch ``reset_mem()``)."""
    for m in model.modules():
        if m is model:
            continue
        fn = getattr(m, "reset", None) or getattr(m, "reset_mem", None)
        if callable(fn):
            with contextlib.suppress(TypeError):
                fn()


def _new_calls() -> dict:
    """How a :class:`CudaGraphModel`'s calls ran: ``replays`` of a captured graph, ``captures``, eager ``warmup``
    calls of a new shape, and eager calls because the input is on the CPU, the model is ``training`` or has
    ``hooks``."""
    return dict.fromkeys(("replays", "captures", "warmup", "cpu", "training", "hooks"), 0)


class CudaGraphModel(nn.Module):
    """See the module doc. ``calls``: how the calls ran (replays, captures and eager calls, each reason counted)."""

    def __init__(self, model: nn.Module, warmup: int = 2):
        super().__init__()
        self.model = model
        self.warmup = warmup
        self.train(model.training)
        self.__dict__["_graphs"] = {}
        self.__dict__["_seen"] = {}
        self.__dict__["calls"] = _new_calls()

    def reset_graphs(self) -> None:
        self._graphs.clear()
        self._seen.clear()
        self.__dict__.pop("_hook_dicts", None)

    def _hooked(self) -> bool:
        """Whether a module of the model has a hook (or a global module hook is registered), SparseFlow's own
        observers aside; the modules' hook dictionaries are collected once (they live as long as the modules)."""
        dicts = self.__dict__.get("_hook_dicts")
        if dicts is None:
            dicts = self.__dict__["_hook_dicts"] = tuple(getattr(m, n) for m in self.model.modules()
                                                         for n in _HOOK_DICTS if hasattr(m, n))
        return (any(dicts) and has_hooks(*self.model.modules())) or has_hooks()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        why = "cpu" if not x.is_cuda else "training" if self.model.training else "hooks" if self._hooked() else None
        if why is not None:
            self.calls[why] += 1
            reset_states(self.model)
            return self.model(x)
        x = StaticInput.apply(self.model, x)  # (optimize(static_input=True): checked here, outside the capture)
        anchor = self._grad_anchor(x)
        with torch.no_grad():
            out = self._replay(x)
        return out if anchor is None else _InferenceOnly.apply(out, anchor)

    def _grad_anchor(self, x: torch.Tensor) -> torch.Tensor | None:
        """Under grad mode, a tensor that requires grad (the input, or a parameter): the output is tied to it so that
        a ``backward()`` reaches :class:`_InferenceOnly` and fails with a clear error. None when nothing records."""
        if not torch.is_grad_enabled():
            return None
        if x.requires_grad:
            return x
        return next((p for p in self.model.parameters() if p.requires_grad), None)

    def _replay(self, x: torch.Tensor) -> torch.Tensor:
        # an input repeated over its first axis by stride 0 (the same image at every step) is kept so in the graph's
        # input buffer, which then holds one frame: the layers that convolve it convolve it once
        static = repeated_over_steps(x)
        key = (tuple(x.shape), x.dtype, x.device, static)
        entry = self._graphs.get(key)
        if entry is None:
            n = self._seen.get(key, 0)
            self._seen[key] = n + 1
            reset_states(self.model)
            if n < self.warmup:
                self.calls["warmup"] += 1
                return self.model(x)
            static_in = x[:1].clone().expand(x.shape) if static else x.clone()
            torch.cuda.synchronize()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # one more eager call on the capture stream
                reset_states(self.model)
                self.model(static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            reset_states(self.model)
            with torch.cuda.graph(graph):
                static_out = self.model(static_in)
            entry = self._graphs[key] = (graph, static_in, static_out)
            self.calls["captures"] += 1
            graph.replay()
            return static_out
        graph, static_in, static_out = entry
        if static:
            static_in[:1].copy_(x[:1])
        else:
            static_in.copy_(x)
        graph.replay()
        self.calls["replays"] += 1
        return static_out

    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state)
        state["_graphs"] = {}
        state["_seen"] = {}
        state["calls"] = _new_calls()
        state.pop("_hook_dicts", None)
        return state


class _InferenceOnly(torch.autograd.Function):
    """Identity on a CUDA-graph model's output whose backward raises: a replay records no autograd graph."""

    @staticmethod
    def forward(ctx, out, anchor):
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(
            "sparseflow: backward() through a CUDA-graph model (optimize(..., cuda_graph=True)): a graph replay is "
            "inference only and records no gradients. For gradients call the wrapped model (model.model), which "
            "gives the dense model's gradients, or use sparseflow.restore(model.model); run inference under "
            "torch.no_grad() or torch.inference_mode()")


def cuda_graph(model: nn.Module, warmup: int = 2) -> CudaGraphModel:
    """Wrap ``model`` so that its forward is captured once per input shape and replayed (see module doc)."""
    return CudaGraphModel(model, warmup)
