"""Helpers shared by the modules: where kernels can run, one-time notices, caches keyed by tensor versions,
and the occupancy a producer attaches to the spikes it returns."""

from __future__ import annotations

import logging
import math
import threading

import torch
from torch.nn.modules import module as _mm

from sparseflow_kernels import Occupancy, can_run_triton, repeated_over_steps
from sparseflow_kernels.library import compiling, exporting

logger = logging.getLogger("sparseflow")
_NOTICES: set[str] = set()
_NOTICE_LOCK = threading.Lock()

OCC_ATTR = "_sparseflow_occupancy"


def __getattr__(name):
    # the base class of the drop-ins lives in .base, which builds on these helpers
    if name == "SparseModule":
        from .base import SparseModule

        return SparseModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def notice_once(key: str, msg: str) -> None:
    """Log ``msg`` (warning level) the first time ``key`` is seen in this process."""
    with _NOTICE_LOCK:
        if key in _NOTICES:
            return
        _NOTICES.add(key)
    logger.warning(msg)


def kernels_can_run(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on ``x``: a device they run on (CUDA, or the CPU under the interpreter) and
    a dtype they compute in. bfloat16 needs a GPU: the interpreter cannot run bfloat16 kernels, so CPU bfloat16
    tensors run the dense torch ops (said once per process)."""
    if not can_run_triton(x) or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if not x.is_cuda and compiling() and not exporting():
        # Inductor compiles Triton kernels for CUDA only: the interpreter's kernels inside a graph it compiles for
        # the CPU would not run (their outputs stay uninitialised), so a compiled CPU model runs the dense torch ops
        # (torch.export keeps the operators: its program runs them as they are)
        notice_once("cpu-compile", "sparseflow: under torch.compile, CPU tensors run the dense torch ops (Inductor "
                    "compiles the Triton kernels for CUDA only)")
        return False
    if x.dtype == torch.bfloat16 and not x.is_cuda:
        notice_once("cpu-bf16", "sparseflow: bfloat16 kernels need a GPU (the Triton interpreter cannot run them): "
                    "CPU bfloat16 tensors run the dense torch ops")
        return False
    return not needs_autograd(x)


def kernels_take(x: torch.Tensor, weight: torch.Tensor, op: str = "sparseflow") -> bool:
    """Whether a module's Triton kernels can run on ``x`` with ``weight``: a device they run on, a supported dtype,
    and the weight's dtype. An input whose dtype differs from the weight's (outside autocast) is refused with a
    RuntimeError naming both, as the dense layer refuses it; other inputs the kernels cannot take run the dense
    torch op (said once per process, with the reason)."""
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise RuntimeError(f"{op}: input dtype {x.dtype} does not match the weight dtype {weight.dtype} (the dense "
                           f"layer refuses it too): give the model {weight.dtype} inputs")
    if kernels_can_run(x) and x.dtype == weight.dtype:
        return not needs_autograd(x, weight)
    if not can_run_triton(x):
        notice_once("cpu-dense", "sparseflow: CPU tensors run the dense torch ops (Triton kernels "
                    "need CUDA, or TRITON_INTERPRET=1 on the CPU)")
    elif x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        notice_once(f"dtype-dense-{x.dtype}", f"sparseflow: {x.dtype} inputs run the dense torch ops (the kernels "
                    "take float32, float16 and bfloat16)")
    return False


#: attribute that marks a hook as SparseFlow's own observer (the profiler's timing hooks): it sees the values the
#: optimized model computes, so it does not send a fused chain back to its dense modules
OBSERVER_ATTR = "_sparseflow_observer"
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOK_DICTS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                      "_global_backward_pre_hooks")


def _user_hooks(hooks) -> bool:
    return bool(hooks) and any(not getattr(h, OBSERVER_ATTR, False) for h in hooks.values())


def has_hooks(*modules) -> bool:
    """Whether any of ``modules`` (None entries skipped) has a forward, forward-pre, backward or backward-pre hook,
    or a global module hook is registered (SparseFlow's observer hooks aside). A fused module whose chain has one
    runs the chain through its dense modules, so that every hook sees what it sees in the dense model. A few
    dictionary look-ups per call (no iteration when no hook is registered)."""
    for name in _GLOBAL_HOOK_DICTS:
        if _user_hooks(getattr(_mm, name, None)):
            return True
    for m in modules:
        if m is None:
            continue
        for name in _HOOK_DICTS:
            if _user_hooks(getattr(m, name, None)):
                return True
    return False


def _params(source):
    if source is None:
        return ()
    return (source,) if isinstance(source, torch.Tensor) else source.parameters()


def needs_autograd(x: torch.Tensor, *sources) -> bool:
    """Whether this call must record autograd: grad mode is on and ``x``, or a tensor or a module's parameter among
    ``sources``, requires grad. The kernels are inference-only (their outputs carry no graph), so such a call runs
    the dense torch ops, whose gradients are the dense model's; said once per process."""
    if not torch.is_grad_enabled():
        return False
    if not (x.requires_grad or any(p.requires_grad for s in sources for p in _params(s))):
        return False
    notice_once("autograd-dense", "sparseflow: autograd is recording (an input or parameter requires grad): the "
                "optimized layers run the dense torch ops, whose gradients are exact; run inference under "
                "torch.no_grad() or torch.inference_mode() for SparseFlow's kernels")
    return True


def residual_as(op: str, residual: torch.Tensor | None, shape) -> torch.Tensor | None:
    """``residual`` reshaped to the output ``shape`` of a fused layer (None stays None); ValueError naming ``op``
    when it holds another number of elements."""
    if residual is None:
        return None
    if residual.numel() != math.prod(shape):
        raise ValueError(f"{op}: residual of shape {tuple(residual.shape)} does not match the output {tuple(shape)}")
    return residual.reshape(shape)


def tensor_version(t: torch.Tensor | None):
    """``t._version`` (shared by a tensor and its views), or None for inference-mode tensors."""
    if t is None:
        return None
    try:
        return t._version
    except RuntimeError:
        return None


def version_key(*tensors) -> tuple:
    """A key that changes when any tensor is replaced or modified in place (load_state_dict, .to, ...)."""
    key = []
    for t in tensors:
        if t is None:
            key.append(None)
        else:
            key.append((t.data_ptr(), t.dtype, t.device, tuple(t.shape), tensor_version(t)))
    return tuple(key)


class VersionCache:
    """Values derived from a module's tensors (a packed weight, a folded affine), recomputed when their key (the
    tensors' versions and the variant asked for) is new. Up to ``MAX_ENTRIES`` variants are kept, the least
    recently used dropped first: a CUDA graph captured at one batch size holds the pointer to the packed weight it
    ran with, and the dispatch at another batch size may pick a tiling that packs the weight otherwise; a cache of
    one value would free the first packing under the graph that still reads it."""

    MAX_ENTRIES = 8
    __slots__ = ("entries",)

    def __init__(self):
        self.entries = {}

    def get(self, key, compute):
        value = self.entries.pop(key, None)
        if value is None:
            value = compute()
            while len(self.entries) >= self.MAX_ENTRIES:
                del self.entries[next(iter(self.entries))]
        self.entries[key] = value  # (last: the most recently used)
        return value

    def __getstate__(self):  # caches are not persisted (device tensors, stale keys)
        return {}

    def __setstate__(self, state):
        self.entries = {}

    def __deepcopy__(self, memo):
        return VersionCache()


def attach_occupancy(spikes: torch.Tensor, flat: torch.Tensor, occ: Occupancy) -> None:
    """Remember ``occ`` (the occupancy of ``flat``, a [T*N, C, H, W] view of ``spikes``) on ``spikes`` and
    its base, valid while the memory is not modified in place (version counters are shared by views)."""
    version = tensor_version(spikes)
    if version is None:
        return
    rec = (occ, version, flat.data_ptr(), tuple(flat.shape), tuple(flat.stride()))
    for t in (spikes, spikes._base):
        if t is not None:
            setattr(t, OCC_ATTR, rec)


def find_occupancy(x: torch.Tensor, flat: torch.Tensor) -> Occupancy | None:
    """The occupancy a producer attached to ``x`` (or its base), if ``flat`` (``x`` viewed as
    [T*N, C, H, W]) is exactly the producer's view: same memory, shape, strides, and no write since."""
    version = tensor_version(x)
    if version is None:
        return None
    for t in (x, x._base):
        rec = getattr(t, OCC_ATTR, None) if t is not None else None
        if rec is None:
            continue
        occ, v, ptr, shape, stride = rec
        if (v == version and ptr == flat.data_ptr() and shape == tuple(flat.shape)
                and stride == tuple(flat.stride())):
            return occ
    return None


SHIFT_ATTR = "_sparseflow_pending_shift"


def attach_shift(y: torch.Tensor, shift: torch.Tensor) -> bool:
    """Mark ``y`` as still owing a per-channel ``shift`` (a folded bias) that the max pool consuming it adds after
    pooling; valid while ``y``'s memory is not modified in place. False (nothing attached) for tensors without
    a version counter (inference mode): the caller adds the shift itself."""
    version = tensor_version(y)
    if version is None:
        return False
    rec = (shift, version, y.data_ptr(), y.shape[-3])
    for t in (y, y._base):
        if t is not None:
            setattr(t, SHIFT_ATTR, rec)
    return True


def take_shift(x: torch.Tensor) -> torch.Tensor | None:
    """The shift a producer attached to ``x`` (or its base) for the same memory, unmodified since; None if none."""
    version = tensor_version(x)
    if version is None:
        return None
    for t in (x, x._base):
        rec = getattr(t, SHIFT_ATTR, None) if t is not None else None
        if rec is not None:
            shift, v, ptr, channels = rec
            if v == version and ptr == x.data_ptr() and x.dim() >= 3 and x.shape[-3] == channels:
                return shift
    return None


def passes_repeated(x: torch.Tensor) -> bool:
    """Whether a layer may compute ``x`` ``[T, N, ...]`` once per frame and hand its result on repeated by stride 0
    (a static passthrough): ``x`` repeats one frame over its steps by stride 0, and ``torch.export`` is not tracing
    the call (the exported program must hold for any input of the example's shape)."""
    return repeated_over_steps(x) and not exporting()
