"""Small helpers shared by the launchers: device checks, dtype maps, argument normalisation."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INT32_MAX = 2**31 - 1

TORCH_TO_TL = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}

SUPPORTED_DTYPES = tuple(TORCH_TO_TL)


def interpreter_active() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def can_run_triton(t: torch.Tensor) -> bool:
    """Kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter."""
    return t.is_cuda or (t.device.type == "cpu" and interpreter_active())


def require_triton_device(op: str, *tensors: torch.Tensor | None) -> torch.device:
    """Check that all tensors sit on one device that can run Triton kernels; return it."""
    present = [t for t in tensors if t is not None]
    dev = present[0].device
    for t in present[1:]:
        if t.device != dev:
            raise ValueError(f"{op}: all tensors must be on one device, got {dev} and {t.device}")
    if not can_run_triton(present[0]):
        raise RuntimeError(
            f"{op}: Triton kernels need a CUDA tensor (got device '{dev}'); on the CPU set "
            "TRITON_INTERPRET=1 before importing triton, or use the dense torch op"
        )
    return dev


def require_dtype(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{op}: {name} has dtype {t.dtype}; supported are float32, float16 and bfloat16"
        )
    if t.dtype == torch.bfloat16 and t.device.type == "cpu":
        raise TypeError(
            f"{op}: bfloat16 kernels need a CUDA GPU (the Triton CPU interpreter cannot run them); "
            "use float32 or float16 on the CPU"
        )


def require_bias(op: str, bias: torch.Tensor | None, n: int, dtype: torch.dtype) -> None:
    """A bias, when given, is ``[n]`` in the input's ``dtype``."""
    if bias is None:
        return
    if bias.dim() != 1 or bias.shape[0] != n:
        raise ValueError(f"{op}: bias must have shape [{n}], got {tuple(bias.shape)}")
    if bias.dtype != dtype:
        raise TypeError(f"{op}: input dtype {dtype} and bias dtype {bias.dtype} differ")


def require_int32_indexable(op: str, *tensors: torch.Tensor | None) -> None:
    """Offsets inside the kernels are 32-bit: refuse tensors whose largest offset would overflow, either in
    the tensor itself or in a contiguous tensor of its shape (an output the kernel allocates like it; this
    also catches broadcast inputs made by ``expand``, whose own offsets are small)."""
    for t in tensors:
        if t is None:
            continue
        n = t.numel()
        if type(n) is int and (n == 0 or (n <= INT32_MAX and t.is_contiguous())):
            continue  # (the common case, checked in C++: a dense tensor spans its element count)
        if any(isinstance(v, torch.SymInt) for v in (*t.shape, *t.stride())):
            # a traced dynamic batch: the element count, which the tracer proves over the batch's range (a span
            # over symbolic strides holds min/max terms it cannot prove, and would fail the export)
            span = n - 1
        else:
            span = max(sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())), n - 1)
        if span > INT32_MAX:
            raise ValueError(
                f"{op}: a tensor of shape {tuple(t.shape)} spans {span} elements, past the int32 index "
                "range the kernels use; split the batch into smaller calls"
            )


def require_int32_numel(op: str, name: str, shape) -> None:
    """Refuse, before allocating it, a kernel output of ``shape`` with offsets past the int32 range."""
    numel = 1
    for s in shape:
        numel = numel * s  # (symbolic sizes stay symbolic: a traced batch is not specialized here)
    if numel - 1 > INT32_MAX:
        raise ValueError(
            f"{op}: the {name} of shape {tuple(int(s) for s in shape)} would hold {numel} elements, past the "
            "int32 index range the kernels use; split the batch into smaller calls"
        )


def pair(v, name: str, op: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return (int(v[0]), int(v[1]))
    raise ValueError(f"{op}: {name} must be an int or a pair of ints, got {v!r}")


def cdiv(a, b):
    """``ceil(a / b)``, as ``triton.cdiv`` computes it (plain Python: a launcher runs it on every call, and
    ``triton.cdiv`` is a Triton constexpr function, several times slower to call)."""
    return (a + b - 1) // b


def next_power_of_2(n):
    """The smallest power of two ``>= n`` (0 for 0), as ``triton.next_power_of_2`` computes it (plain Python for
    ints, see :func:`cdiv`)."""
    if type(n) is not int:
        return triton.next_power_of_2(n)
    return 0 if n == 0 else 1 << (n - 1).bit_length()


def next_pow2(n: int) -> int:
    return next_power_of_2(max(1, int(n)))


def dot_precision(dtype: torch.dtype, fp32_precision: str) -> str:
    """Tensor-core mode for ``tl.dot``: fp16/bf16 operands ignore it; fp32 uses ``fp32_precision``.

    ``"tf32x3"`` (the default for fp32) splits each operand in two TF32 halves and keeps fp32 accuracy
    (about 1e-6 relative) on tensor cores; ``"ieee"`` is exact fp32 FMA; ``"tf32"`` is fastest and about 1e-3.
    """
    if fp32_precision not in ("tf32x3", "tf32", "ieee"):
        raise ValueError(f"fp32_precision must be 'tf32x3', 'tf32' or 'ieee', got {fp32_precision!r}")
    if dtype != torch.float32:
        return "tf32"
    if interpreter_active():
        return "ieee"
    return fp32_precision


def _traced(args) -> bool:
    """Whether this launch is being traced: ``torch.compile`` / ``torch.export`` (compiling), a fake-tensor or
    proxy dispatch mode active (``make_fx``, export's shape pass, Inductor's fake propagation), or, in case
    neither says so, the first tensor among ``args`` fake or functional. Each test is a C++ call or a type check."""
    if torch.compiler.is_compiling():
        return True
    keys = torch._C._TorchDispatchModeKey
    if torch._C._get_dispatch_mode(keys.FAKE) is not None or torch._C._get_dispatch_mode(keys.PROXY) is not None:
        return True
    a = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if a is None or type(a) in (torch.Tensor, torch.nn.Parameter):
        return False
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(a)


def repeated_over_steps(x: torch.Tensor) -> bool:
    """Whether ``x`` ``[T, N, ...]`` holds one input for every step by construction: more than one step, stride 0
    over them (``frame.expand(T, ...)``), so every step reads the same memory."""
    return x.dim() >= 2 and x.shape[0] > 1 and x.stride(0) == 0


def _env_pdl() -> bool:
    return os.environ.get("SPARSEFLOW_PDL", "0").strip() == "1"


_PDL = _env_pdl()
_PDL_CAPABLE: dict = {}


def set_pdl(enabled: bool) -> bool:
    """Turn programmatic dependent launch on or off for the kernels launched from now on (a CUDA graph keeps the
    launches it captured); return the previous setting. The default is off, unless ``SPARSEFLOW_PDL=1`` was set when
    ``sparseflow_kernels`` was imported: on an H100, CUDA graphs of whole models ran no faster with it
    (``sparseflow_fp16_pdl_on_ms`` in ``benchmarks/results/h100/e2e.json``)."""
    global _PDL
    previous, _PDL = _PDL, bool(enabled)
    return previous


def _pdl_capable(device: torch.device) -> bool:
    """Whether ``device`` is a CUDA GPU of compute capability 9.0 or newer (cached per device)."""
    if device.type != "cuda":
        return False
    got = _PDL_CAPABLE.get(device)
    if got is None:
        got = _PDL_CAPABLE[device] = torch.cuda.get_device_capability(device)[0] >= 9
    return got


def pdl_enabled(device: torch.device | str) -> bool:
    """Whether kernels on ``device`` launch with programmatic dependent launch: a CUDA GPU of compute capability 9.0
    or newer (Hopper), not the CPU interpreter, and the switch on (:func:`set_pdl`, ``SPARSEFLOW_PDL``). Such a
    kernel may be scheduled while the kernel before it in the stream finishes; each of its programs first waits for
    that kernel to complete (``pdl_enter``), so no program reads or writes memory before the previous kernel's
    writes are visible."""
    if not isinstance(device, torch.device):
        device = torch.device(device)
    return _PDL and not interpreter_active() and _pdl_capable(device)


class _Launch:
    """A kernel launcher that goes through ``torch.library.wrap_triton`` only while it is traced.

    Traced (``torch.compile``, ``torch.export``, ``make_fx``: the ``sparseflow::`` operators' launchers), a launch
    must be a ``triton_kernel_wrapper`` node of the graph, so it goes through ``wrap_triton``. Called eagerly on
    real tensors, it launches the kernel directly: the wrapper's higher-order-op dispatch costs about 0.3 ms of
    CPU per launch (measured on the H200's host), more than most of these kernels take on the GPU. Under the CPU
    interpreter (whose interpreted kernels ``wrap_triton`` does not take), a traced launch launches nothing: the
    operator's outputs are allocated by the launcher, and the kernel runs when the traced program runs."""

    pdl = False  # whether the kernel declares ``PDL`` (and runs compiled)

    def __init__(self, kernel):
        self.kernel = kernel
        self.interpreted = interpreter_active()
        # a kernel declaring ``PDL`` (last, default False: see :func:`pdl_enabled`) launches eagerly with
        # programmatic dependent launch where the GPU has it; traced and interpreted launches keep the default
        self.pdl = not self.interpreted and "PDL" in kernel.arg_names
        if not self.interpreted:
            from torch.library import wrap_triton

            self.traceable = wrap_triton(kernel)

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            if not _traced((*args, *kwargs.values())):
                if self.pdl and _PDL:  # (the switch first: off, a launch scans no arguments)
                    a = next((a for a in args if isinstance(a, torch.Tensor)), None)
                    if a is not None and _pdl_capable(a.device):
                        return self.kernel[grid](*args, **kwargs, PDL=True, launch_pdl=True)
                return self.kernel[grid](*args, **kwargs)
            return None if self.interpreted else self.traceable[grid](*args, **kwargs)

        return call


_LAUNCHERS: dict = {}


def launch(kernel) -> _Launch:
    """``kernel``'s launcher (made once per kernel): ``launch(kernel)[grid](*args)`` launches it directly when
    called eagerly and through ``torch.library.wrap_triton`` while ``torch.compile`` / ``torch.export`` trace it
    (see :class:`_Launch`)."""
    got = _LAUNCHERS.get(kernel)
    if got is None:
        got = _LAUNCHERS[kernel] = _Launch(kernel)
    return got


_MULTIPROCESSORS: dict = {}


def multiprocessors(device: torch.device) -> int:
    """The GPU's multiprocessors (streaming multiprocessors); 1 for the CPU interpreter."""
    if device.type != "cuda":
        return 1
    if device not in _MULTIPROCESSORS:
        _MULTIPROCESSORS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _MULTIPROCESSORS[device]
