"""``optimize()``'s arguments, checked before anything is touched, and the input cast of ``dtype=``.

Every argument gets an error that names it and its allowed values (``block_size=7`` used to fail deep inside a
kernel configuration, ``block_size='huge'`` was accepted).
"""

from __future__ import annotations

import torch
from torch import nn

from sparseflow_kernels import repeated_over_steps

from .hooks import OwnPreHook

#: the skip-tile edges the sparse kernels take (``block_size`` ints)
BLOCK_SIZES = (4, 8, 16)
#: the block_size strings: the dense op everywhere, or measured per layer
BLOCK_WORDS = ("dense", "auto")
MODES = ("auto", "sparse", "dense", "torch")
NUMERICS = ("fast", "faithful")
#: the dtypes the kernels compute in
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_BLOCK_ALLOWED = f"None, {', '.join(map(repr, BLOCK_WORDS))}, one of {', '.join(map(str, BLOCK_SIZES))}"


def _block_ok(v) -> bool:
    if isinstance(v, bool):
        return False
    return v in BLOCK_SIZES if isinstance(v, int) else (isinstance(v, str) and v in BLOCK_WORDS)


def check_arguments(model, *, block_size, mode, dtype, fuse, neurons, filter_fn, inplace, cuda_graph,
                    write_occupancy, numerics, return_report, static_input=False) -> None:
    """Raise TypeError / ValueError naming the first bad argument of ``optimize()`` and what it accepts."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(block_size, dict):
        names = {n for n, _ in model.named_modules()}
        for k, v in block_size.items():
            if not isinstance(k, str) or k not in names:
                raise ValueError(f"optimize: block_size names {k!r}, which is not a module of the model (keys are "
                                 "names from model.named_modules())")
            if not (_block_ok(v) or v is None):
                raise ValueError(f"optimize: block_size[{k!r}] must be {_BLOCK_ALLOWED}; got {v!r}")
    elif not (block_size is None or _block_ok(block_size)):
        raise ValueError(f"optimize: block_size must be {_BLOCK_ALLOWED} or a dict of them by layer name; "
                         f"got {block_size!r}")
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(numerics, str) or numerics not in NUMERICS:
        raise ValueError(f"numerics must be one of {NUMERICS}, got {numerics!r}")
    if dtype is not None and dtype not in DTYPES:
        raise TypeError(f"optimize: dtype must be None or one of torch.float32, torch.float16, torch.bfloat16; "
                        f"got {dtype!r}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"optimize: filter_fn must be None or a callable (module, name) -> bool; got "
                        f"{type(filter_fn).__name__}")
    for name, v in (("fuse", fuse), ("neurons", neurons), ("inplace", inplace), ("cuda_graph", cuda_graph),
                    ("write_occupancy", write_occupancy), ("return_report", return_report),
                    ("static_input", static_input)):
        if not isinstance(v, bool):
            raise TypeError(f"optimize: {name} must be True or False, got {v!r}")


def cast_inputs(inputs, dtype):
    """Floating-point tensors of ``inputs`` (a tensor, or a tuple / list of them) in ``dtype``; others as given. A
    tensor repeated over its first axis by stride 0 stays so (:func:`~sparseflow_kernels.repeated_over_steps`)."""
    if isinstance(inputs, torch.Tensor):
        if not inputs.is_floating_point() or inputs.dtype == dtype:
            return inputs
        if repeated_over_steps(inputs):  # one frame cast, still repeated by stride 0 (the stem convolves it once)
            return inputs[:1].to(dtype).expand(inputs.shape)
        return inputs.to(dtype)
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(cast_inputs(i, dtype) for i in inputs)
    return inputs


class CastInputs(OwnPreHook):
    """Forward pre-hook of a model optimized with ``dtype=``: its floating-point inputs are cast to that dtype on
    every call (the model's parameters are in it), integer and boolean inputs are passed as they are."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __call__(self, model, args):
        return cast_inputs(args, self.dtype)


class StaticInput(OwnPreHook):
    """Forward pre-hook of a model optimized with ``static_input=True``: its first input ``[T, N, ...]`` must hold
    the same frame at every step; it is checked (one comparison on the device and a synchronization; an input
    already repeated by stride 0 needs none) and passed on as ``x[:1].expand(...)``, so that the layers reading it
    convolve one frame. An input whose steps differ raises ValueError: the model would otherwise compute something
    else than the dense model."""

    def __call__(self, model, args):
        if not args or not isinstance(args[0], torch.Tensor):
            raise ValueError("optimize(static_input=True): the model's first argument must be the input tensor "
                             f"[T, N, ...], got {type(args[0]).__name__ if args else 'no argument'}")
        return (self.repeat(args[0]), *args[1:])

    @staticmethod
    def repeat(x: torch.Tensor) -> torch.Tensor:
        """``x`` as one frame repeated by stride 0, after checking that its steps are equal."""
        if x.dim() < 2 or x.shape[0] < 2 or repeated_over_steps(x):
            return x
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("optimize(static_input=True): the input cannot be checked during CUDA graph capture; "
                               "pass it repeated by stride 0 (frame.expand(T, ...)) or use cuda_graph=True, which "
                               "checks it before replaying")
        first = x[:1].expand(x.shape)
        if not torch.equal(x, first):
            raise ValueError("optimize(static_input=True): the input's time steps differ (x[t] != x[0] for some t), "
                             "so its convolutions cannot be computed once; optimize without static_input")
        return first

    @classmethod
    def apply(cls, model: nn.Module, x):
        """``x`` as the model's hook passes it on, if the model has one; else ``x``."""
        if any(isinstance(h, cls) for h in model._forward_pre_hooks.values()) and isinstance(x, torch.Tensor):
            return cls.repeat(x)
        return x
