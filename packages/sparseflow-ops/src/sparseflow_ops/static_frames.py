"""Frame-wise containers on a static input: the modules computed once per sample instead of once per step.

SpikingJelly's ``SeqToANNContainer`` runs single-step modules on a multi-step input ``[T, N, ...]`` flattened to
``[T*N, ...]`` (Spikformer's patch stem: ``Conv2d -> BatchNorm2d -> MaxPool2d``). When every module in it handles
each frame on its own (convolutions, BatchNorm in eval mode, pools, ...) and the input repeats one frame over the
steps by stride 0 (a static image, ``frame.expand(T, ...)``), flattening would copy the frame T times and compute
it T times. :class:`StaticFramesForward`, the container's instance ``forward``, runs the modules on ``x[0]``
(``[N, ...]``) instead and returns the result repeated by stride 0: equal frames give equal outputs (up to the
rounding of a convolution algorithm picked for another batch size). Every other call (an input whose steps are in
memory, a module in training mode or with hooks, extra arguments, and while ``torch.export`` traces it: the program
must hold for any input of the example's shape) runs the container's own ``forward``.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import has_hooks, passes_repeated

#: modules that compute each sample of a batch on its own in eval mode
FRAME_WISE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.MaxPool1d,
              nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Identity, nn.Dropout, nn.Flatten,
              nn.Linear, nn.ReLU)


def frame_wise_problem(container: nn.Module) -> str:
    """'' when ``container`` (an ``nn.Sequential`` run on ``[T*N, ...]``) may run on one frame per sample, else why
    not."""
    if not isinstance(container, nn.Sequential) or not len(container):
        return f"{type(container).__name__} is not a non-empty nn.Sequential"
    for name, m in container.named_children():
        if not isinstance(m, FRAME_WISE):
            return f"{name} ({type(m).__name__}) is not known to compute each frame on its own"
        if getattr(m, "inplace", False):
            return f"{name} ({type(m).__name__}) writes in place"
    return ""


class StaticFramesForward:
    """Instance ``forward`` of a frame-wise container (module docstring)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, x, *args, **kwargs):
        m = self.module
        if (not args and not kwargs and isinstance(x, torch.Tensor) and x.dim() >= 3 and passes_repeated(x)
                and not any(c.training or has_hooks(c) for c in m.children())):
            y = nn.Sequential.forward(m, x[0])
            return y.unsqueeze(0).expand(x.shape[0], *y.shape)
        return type(m).forward(m, x, *args, **kwargs)


def run_static_frames_once(container: nn.Module) -> None:
    """Install :class:`StaticFramesForward` on ``container``; ValueError naming the module that is not frame-wise."""
    why = frame_wise_problem(container)
    if why:
        raise ValueError(f"run_static_frames_once: {why}")
    container.forward = StaticFramesForward(container)


def runs_static_frames_once(container: nn.Module) -> bool:
    return isinstance(container.__dict__.get("forward"), StaticFramesForward)


def remove_static_frames(container: nn.Module) -> None:
    """The container's own ``forward`` again."""
    if runs_static_frames_once(container):
        del container.__dict__["forward"]
