"""Replaying a model's forward as a CUDA graph, for fixed input shapes (``optimize(..., cuda_graph=True)``).

A spiking network at batch 8 launches hundreds of small kernels per forward; captured once and replayed,
the launches cost almost nothing. :class:`CudaGraphModel` wraps a model: the first calls for a new input
shape run eagerly (they also let each layer measure and cache its kernel path), then the forward is
captured and later calls copy the input into the captured buffer and replay.

Semantics: every call starts from reset neuron state, as SNN inference over one sample does (the wrapper
resets the network's neurons before capturing, and the captured graph never reads the state again). The
outputs are the captured buffers: the next call overwrites them, so clone what you keep. New weights
(``load_state_dict``) need a new capture: call :meth:`CudaGraphModel.reset_graphs`.

A replay runs no Python, so no module hook and no autograd: while any module of the model has a hook (a
SpikingJelly monitor, say; SparseFlow's profiler aside), while autograd must record (an input or parameter requiring
grad under grad mode), and in training mode, the call runs the model eagerly instead (hooks see the dense model's
values, gradients are the dense model's). The hook check is one pass over the modules' hook dictionaries.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from sparseflow_ops import has_hooks, needs_autograd

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


class CudaGraphModel(nn.Module):
    def __init__(self, model: nn.Module, warmup: int = 2):
        super().__init__()
        self.model = model
        self.warmup = warmup
        self.train(model.training)
        self.__dict__["_graphs"] = {}
        self.__dict__["_seen"] = {}

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
        if not x.is_cuda or self.model.training or needs_autograd(x, self.model) or self._hooked():
            reset_states(self.model)
            return self.model(x)
        key = (tuple(x.shape), x.dtype, x.device)
        entry = self._graphs.get(key)
        if entry is None:
            n = self._seen.get(key, 0)
            self._seen[key] = n + 1
            reset_states(self.model)
            if n < self.warmup:
                return self.model(x)
            static_in = x.clone()
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
            graph.replay()
            return static_out
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out

    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state)
        state["_graphs"] = {}
        state["_seen"] = {}
        state.pop("_hook_dicts", None)
        return state


def cuda_graph(model: nn.Module, warmup: int = 2) -> CudaGraphModel:
    """Wrap ``model`` so that its forward is captured once per input shape and replayed (see module doc)."""
    return CudaGraphModel(model, warmup)
