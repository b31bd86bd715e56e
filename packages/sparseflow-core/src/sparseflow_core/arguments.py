"""``optimize()``'s arguments, checked before anything is touched, and the input cast of ``dtype=``.

Every argument gets an error that names it and its allowed values (``block_size=7`` used to fail deep inside a
kernel configuration, ``block_size='huge'`` was accepted).
"""

from __future__ import annotations

import torch
from torch import nn

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
                    write_occupancy, numerics, return_report) -> None:
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
                    ("write_occupancy", write_occupancy), ("return_report", return_report)):
        if not isinstance(v, bool):
            raise TypeError(f"optimize: {name} must be True or False, got {v!r}")


def cast_inputs(inputs, dtype):
    """Floating-point tensors of ``inputs`` (a tensor, or a tuple / list of them) in ``dtype``; others as given."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(dtype) if inputs.is_floating_point() and inputs.dtype != dtype else inputs
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

    @classmethod
    def install(cls, model: nn.Module, dtype: torch.dtype) -> None:
        cls.remove(model)
        model.register_forward_pre_hook(cls(dtype))

    @staticmethod
    def remove(model: nn.Module) -> None:
        for hid, hook in list(model._forward_pre_hooks.items()):
            if isinstance(hook, CastInputs):
                del model._forward_pre_hooks[hid]
