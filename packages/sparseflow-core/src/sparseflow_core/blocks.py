"""Block size selection: the spatial tile edge a sparse layer skips at, from its input feature map.

* :func:`select_block_size` - the default rule by input height (>= 56: 16, 14-55: 8, < 14: dense).
* ``block_size="auto"`` in ``optimize()`` - :class:`AutoBlockSize`, a forward pre-hook on each replaced
  ``SparseConv2d``: on the first CUDA call for each input shape it times the layer with every candidate of
  :data:`AUTO_CANDIDATES` (a few runs each, neuron state saved and put back) and keeps the fastest; the choice
  is cached per (layer geometry, input shape, strides, dtype) for the whole process, in the kernels' one dispatch
  cache (namespace ``"block_size"`` of :mod:`sparseflow_kernels.dispatch`). On the CPU, and while a
  CUDA graph is being captured, nothing is timed: the layer keeps the default rule's size (the report says so).
"""

from __future__ import annotations

import torch

from sparseflow_kernels import dispatch, tiling

#: what ``block_size="auto"`` measures: 8x8 and 16x16 skip tiles, and the layer's dense route
AUTO_CANDIDATES = tiling.AUTO_CANDIDATES

#: the namespace of the block-size choices in the dispatch cache
_NAMESPACE = "block_size"

#: the default rule's smallest input height with a sparse block size (smaller maps run the dense op)
SPARSE_MIN_HEIGHT = tiling.SPARSE_MIN_HEIGHT


def select_block_size(height: int) -> int | str:
    """Default rule: H >= 56 -> 16, 14 <= H < 56 -> 8, smaller -> ``"dense"`` (too few blocks to skip)."""
    return tiling.select_block_size(height)


def dense_reason(block_size, name: str, height: int) -> str:
    """Why a layer runs the dense op: the user's ``block_size`` said so, or the default rule (small map)."""
    if block_size == "dense" or (isinstance(block_size, dict) and block_size.get(name) == "dense"):
        return "block_size='dense': the dense op"
    return (f"feature map of {height} px (under {SPARSE_MIN_HEIGHT} px): too few blocks to skip, the dense op is "
            "faster")


def auto_choices() -> dict:
    """The cached winners: {key: block size}."""
    return dispatch.choices(_NAMESPACE)


def set_auto_choices(choices: dict) -> None:
    """Put cached winners back ({key: block size}, as :func:`auto_choices` returns them); a key already cached
    is overwritten."""
    for key, size in choices.items():
        dispatch.set_choice(key, size, _NAMESPACE)


def auto_timings() -> dict:
    """The measured medians (ms) per key and candidate."""
    return dispatch.timings(namespace=_NAMESPACE)


def clear_auto_cache() -> None:
    dispatch.clear_cache(_NAMESPACE)


def _key(module, x: torch.Tensor, has_residual: bool) -> tuple:
    return (type(module).__name__, module.in_channels, module.out_channels, module.kernel_size, module.stride,
            module.padding, module.dilation, module.kind(), tuple(x.shape), x.stride(), x.dtype, has_residual)


def _neuron_state(neuron):
    """A copy of a neuron's state attributes (tensors cloned), to put back after timing runs."""
    if neuron is None:
        return None
    saved = {}
    for k, v in vars(neuron).items():
        if isinstance(v, torch.Tensor):
            saved[k] = v.clone()
        elif k == "_memories" and isinstance(v, dict):
            saved[k] = {mk: (mv.clone() if isinstance(mv, torch.Tensor) else mv) for mk, mv in v.items()}
    return saved


def _put_back(neuron, saved) -> None:
    if neuron is None or saved is None:
        return
    for k, v in saved.items():
        if k == "_memories":
            neuron.__dict__["_memories"].update(v)
        else:
            neuron.__dict__[k] = v


def measure_block_size(module, args, kwargs=None, candidates=AUTO_CANDIDATES, reps: int = 5):
    """Time ``module.forward(*args, **kwargs)`` with each candidate block size (``mode="sparse"`` forced so that the
    candidate's own route runs); returns (winner, {candidate: ms}). The module's block size, mode and neuron
    state are as before afterwards."""
    neuron = getattr(module, "fused_neuron", None)
    saved = _neuron_state(neuron)
    old_bs, old_mode = module.block_size, module.mode
    results = {}
    try:
        module.mode = "sparse"
        for cand in candidates:
            module.block_size = cand
            try:
                results[cand] = dispatch.time_ms(lambda: module.forward(*args, **(kwargs or {})), warmup=2, reps=reps)
            except Exception:  # a candidate that does not compile or fit is not one
                results[cand] = float("inf")
    finally:
        module.block_size, module.mode = old_bs, old_mode
        module.__dict__["_pending"] = False
        _put_back(neuron, saved)
    best = min(results, key=results.get)
    return (best if results[best] != float("inf") else old_bs), results


class AutoBlockSize:
    """Forward pre-hook of a ``SparseConv2d`` optimized with ``block_size="auto"`` (see the module docstring).

    ``default`` is the default rule's size for the layer (used on the CPU); ``last`` records the size and how it
    was chosen on the latest call ("measured", "cached" or "default rule (no CUDA timing)").
    """

    def __init__(self, default):
        self.default = default
        self.last: tuple | None = None

    def __call__(self, module, args, kwargs):
        from sparseflow_ops import SparseConv2d

        if not isinstance(module, SparseConv2d) or not args or not isinstance(args[0], torch.Tensor):
            return None
        x = args[0]
        if not x.is_cuda or torch.cuda.is_current_stream_capturing() or module.training:
            module.block_size = self.default
            self.last = (self.default, "default rule (no CUDA timing)")
            return None
        res = args[1] if len(args) > 1 else kwargs.get("residual")
        key = _key(module, x, res is not None)
        hit = dispatch.cached(key, _NAMESPACE)
        if hit is not None:
            module.block_size = hit
            self.last = (hit, "cached")
            return None
        best, results = measure_block_size(module, args, kwargs)
        dispatch.record(key, best, results, _NAMESPACE)
        module.block_size = best
        self.last = (best, "measured")
        return None


def install_auto_block_size(module, default) -> AutoBlockSize:
    """Put an :class:`AutoBlockSize` hook on ``module`` (a ``SparseConv2d``), starting at ``default``."""
    remove_auto_block_size(module)
    hook = AutoBlockSize(default)
    module.block_size = default
    module.register_forward_pre_hook(hook, with_kwargs=True)
    return hook


def auto_hook(module) -> AutoBlockSize | None:
    for h in module._forward_pre_hooks.values():
        if isinstance(h, AutoBlockSize):
            return h
    return None


def remove_auto_block_size(module) -> None:
    for hid, h in list(module._forward_pre_hooks.items()):
        if isinstance(h, AutoBlockSize):
            del module._forward_pre_hooks[hid]
            getattr(module, "_forward_pre_hooks_with_kwargs", {}).pop(hid, None)
