"""One time step of snnTorch's ``Leaky`` and ``Synaptic`` neurons in one Triton pass, with snnTorch's arithmetic.

snnTorch neurons take one step per call and return their state (``spk, mem = lif(cur, mem)``), so the step is
the unit of work. :func:`snntorch_step` computes, for the input ``x`` and the states ``mem`` (and ``syn``)::

    reset = mem > thr                                      # from the previous membrane (reset_delay=True)
    syn   = alpha * syn + x                                # Synaptic only
    mem   = beta * mem + (syn or x) - reset * thr          # "subtract"
          = beta * ((1 - reset) * mem) + x                 # "zero" (Leaky)
          = (beta * mem + syn) * (1 - reset)               # "zero" (Synaptic: syn is not reset)
          = beta * mem + (syn or x)                        # "none"
    spk   = (mem > thr) * graded_spikes_factor
    reset_delay=False: d = spk / graded_spikes_factor - reset; mem -= d * thr ("subtract") or d * mem ("zero")

in snnTorch's order of operations and with its dtypes: each intermediate is rounded to the dtype PyTorch gives
that operation (``torch.result_type`` of the operands, 0-dim parameters included; snnTorch's spikes and resets
are fp32, so the membrane becomes fp32 after a reset by subtraction even in a half-precision model), and the
launch disables floating-point contraction (no fused multiply-add), so the spikes and states equal snnTorch's
bit for bit in fp32, fp16 and bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._epilogue_jit import _mul_rn, pdl_enter
from ._utils import SUPPORTED_DTYPES, cdiv, launch, require_int32_indexable, require_triton_device

RESETS = {"subtract": 0, "zero": 1, "none": 2}
_ROUND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_F32 = torch.float32


@triton.jit
def _rnd(v, R: tl.constexpr):
    """``v`` (fp32) rounded to fp16 (R 1) or bf16 (R 2) and back; R 0: unchanged."""
    if R == 1:
        v = v.to(tl.float16).to(tl.float32)
    elif R == 2:  # round to nearest even on the bits (the interpreter's own conversion truncates)
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & -65536
        v = tl.where(v != v, v, bits.to(tl.float32, bitcast=True))
    return v


@triton.jit
def _prm(ptr, val, offs, ok, PER: tl.constexpr):
    """A neuron parameter: per element (loaded) or one value."""
    if PER:
        return tl.load(ptr + offs, mask=ok, other=0.0).to(tl.float32)
    return tl.cast(val, tl.float32)


@triton.jit
def _snntorch_step_kernel(
    x_ptr, m_ptr, s_ptr, spk_ptr, mo_ptr, so_ptr,
    beta_ptr, thr_r_ptr, thr_f_ptr, thr_s_ptr, alpha_ptr,
    beta, thr_r, thr_f, thr_s, alpha, gsf, E,
    RESET: tl.constexpr, DELAY: tl.constexpr, SYN: tl.constexpr, HAS_M: tl.constexpr, HAS_S: tl.constexpr,
    PER_BETA: tl.constexpr, PER_THR: tl.constexpr, PER_ALPHA: tl.constexpr,
    R_SP: tl.constexpr, R_SB: tl.constexpr, R_P: tl.constexpr, R_B: tl.constexpr, BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """All tensors share one dense memory layout: element i of each lies at offset i."""
    pdl_enter(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < E
    gsf = tl.cast(gsf, tl.float32)
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_M:
        m = tl.load(m_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    else:
        m = tl.zeros([BLOCK], dtype=tl.float32)
    b = _prm(beta_ptr, beta, offs, ok, PER_BETA)
    tr = _prm(thr_r_ptr, thr_r, offs, ok, PER_THR)  # the threshold in the dtype of mem - thr (reset)
    tf = _prm(thr_f_ptr, thr_f, offs, ok, PER_THR)  # ... of the new mem - thr (fire)
    ts = _prm(thr_s_ptr, thr_s, offs, ok, PER_THR)  # ... of reset * thr (fp32)
    r = tl.where(m > tr, 1.0, 0.0)
    if SYN:
        if HAS_S:
            s = tl.load(s_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        else:
            s = tl.zeros([BLOCK], dtype=tl.float32)
        a = _prm(alpha_ptr, alpha, offs, ok, PER_ALPHA)
        s = _rnd(_mul_rn(a, s), R_SP)
        s = _rnd(s + x, R_SB)
        inp = s
    else:
        inp = x
    if RESET == 1 and not SYN:
        m = (1.0 - r) * m  # fp32 (the reset is fp32)
    h = _rnd(_mul_rn(b, m), R_P)
    h = _rnd(h + inp, R_B)
    if RESET == 0:
        h = h - r * ts  # fp32
    if RESET == 1 and SYN:
        h = _rnd(h - h * r, R_B)  # in place: keeps the dtype
    spk = tl.where(h > tf, 1.0, 0.0) * gsf
    if not DELAY:
        d = spk / gsf - r
        if RESET == 0:
            h = h - d * ts
        elif RESET == 1:
            h = h - d * h
    tl.store(spk_ptr + offs, spk.to(spk_ptr.dtype.element_ty), mask=ok)
    tl.store(mo_ptr + offs, h.to(mo_ptr.dtype.element_ty), mask=ok)
    if SYN:
        tl.store(so_ptr + offs, s.to(so_ptr.dtype.element_ty), mask=ok)


def _dt(t) -> torch.Tensor:
    """A dimensioned stand-in of dtype ``t`` for ``torch.result_type`` (intermediates are full tensors)."""
    return torch.empty(1, dtype=t)


def step_dtypes(x_dtype, mem_dtype, syn_dtype, beta, threshold, alpha, gsf, reset: str, reset_delay: bool,
                synaptic: bool) -> dict:
    """The dtype of every intermediate of snnTorch's step (PyTorch's promotion with the parameter tensors as
    they are, 0-dim or not). Raises TypeError for dtypes the kernel does not take (e.g. float64)."""
    params = {"beta": beta, "threshold": threshold, "graded_spikes_factor": gsf}
    if synaptic:
        params["alpha"] = alpha
    for name, t in params.items():
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"snntorch_step: {name} has dtype {t.dtype}; supported are float32, float16, bfloat16")
    for name, d in (("input", x_dtype), ("mem", mem_dtype), ("syn", syn_dtype)):
        if d is not None and d not in SUPPORTED_DTYPES:
            raise TypeError(f"snntorch_step: {name} has dtype {d}; supported are float32, float16, bfloat16")
    out = {}
    src = x_dtype
    if synaptic:
        out["alpha"] = torch.result_type(alpha, _dt(syn_dtype))
        out["syn"] = torch.promote_types(out["alpha"], x_dtype)
        src = out["syn"]
    m = torch.promote_types(mem_dtype, _F32) if reset == "zero" and not synaptic else mem_dtype
    out["beta"] = torch.result_type(beta, _dt(m))
    out["base"] = torch.promote_types(out["beta"], src)
    h = torch.promote_types(out["base"], _F32) if reset == "subtract" else out["base"]
    out["reset"] = torch.result_type(_dt(mem_dtype), threshold)
    out["fire"] = torch.result_type(_dt(h), threshold)
    out["sub"] = torch.result_type(_dt(_F32), threshold)
    out["spk"] = torch.result_type(_dt(_F32), gsf)
    if not reset_delay and reset != "none":
        h = torch.promote_types(h, out["spk"])
    out["mem"] = h
    for k, d in out.items():
        if d not in SUPPORTED_DTYPES:
            raise TypeError(f"snntorch_step: the {k} step would compute in {d}; supported are fp32, fp16, bf16")
    return out


def new_output(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An output buffer shaped and laid out like ``like`` (dense strides in its order)."""
    return torch.empty_like(like, dtype=dtype)


def _like(t: torch.Tensor, ref: torch.Tensor, dtype=None) -> torch.Tensor:
    """``t`` (broadcast to ``ref``'s shape) in ``ref``'s memory layout; no copy when it already is."""
    dtype = dtype or t.dtype
    if t.dtype == dtype and t.shape == ref.shape and t.stride() == ref.stride():
        return t
    return torch.empty_like(ref, dtype=dtype).copy_(t.expand(ref.shape) if t.shape != ref.shape else t)


def _param(p: torch.Tensor, dtype, ref: torch.Tensor, clamp: bool):
    """(per-element fp32 tensor or None, scalar) of a parameter converted to ``dtype`` as PyTorch does."""
    q = p.detach()
    if clamp:
        q = q.clamp(0, 1)
    q = q.to(dtype)
    if q.dim() == 0:
        return None, float(q)
    try:
        fits = torch.broadcast_shapes(q.shape, ref.shape) == ref.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"snntorch_step: a parameter of shape {tuple(p.shape)} does not broadcast to the input "
                         f"{tuple(ref.shape)}")
    return _like(q.float(), ref), 0.0


class StepPlan:
    """What one configuration of the step needs besides the tensors: the dtypes (:func:`step_dtypes`), the kernel's
    scalar parameters and, for parameters of several values, fp32 arrays laid out like the outputs. Building it
    reads the parameters' values (a device sync on CUDA): callers cache it per parameter version and layout."""

    def __init__(self, dtypes, scalars, arrays, shape, stride, reset, reset_delay, synaptic):
        self.dtypes, self.scalars, self.arrays = dtypes, scalars, arrays
        self.shape, self.stride = tuple(shape), tuple(stride)
        self.reset, self.reset_delay, self.synaptic = reset, bool(reset_delay), bool(synaptic)


def step_plan(x: torch.Tensor, mem: torch.Tensor | None, syn: torch.Tensor | None, *, beta: torch.Tensor,
              threshold: torch.Tensor, graded_spikes_factor: torch.Tensor, alpha: torch.Tensor | None = None,
              reset: str = "subtract", reset_delay: bool = True, synaptic: bool = False) -> StepPlan:
    """The :class:`StepPlan` of :func:`snntorch_step` for these inputs (only their dtypes, shape and the layout of
    ``mem``, else ``x``, matter). ValueError / TypeError name what the kernel does not take."""
    op = "snntorch_step"
    if reset not in RESETS:
        raise ValueError(f"{op}: reset must be one of {sorted(RESETS)}, got {reset!r}")
    if synaptic and alpha is None:
        raise ValueError(f"{op}: synaptic=True needs alpha")
    if graded_spikes_factor.numel() != 1:
        raise ValueError(f"{op}: graded_spikes_factor must hold one value, got shape "
                         f"{tuple(graded_spikes_factor.shape)}")
    dts = step_dtypes(x.dtype, mem.dtype if mem is not None else x.dtype,
                      (syn.dtype if syn is not None else x.dtype) if synaptic else None,
                      beta, threshold, alpha, graded_spikes_factor, reset, reset_delay, synaptic)
    # snnTorch's results take the previous membrane's memory layout (it is the first tensor operand of each step's
    # chain: beta * mem + x), x's where the step starts from zeros
    ref = torch.empty_like(mem if mem is not None else x, dtype=dts["spk"])
    pb, b = _param(beta, dts["beta"], ref, True)
    pr, tr = _param(threshold, dts["reset"], ref, False)
    pf, tf = _param(threshold, dts["fire"], ref, False)
    ps, ts = _param(threshold, dts["sub"], ref, False)
    pa, a = _param(alpha, dts["alpha"], ref, True) if synaptic else (None, 0.0)
    gsf = float(graded_spikes_factor.detach().to(dts["spk"]))
    return StepPlan(dts, (b, tr, tf, ts, a, gsf), (pb, pr, pf, ps, pa), ref.shape, ref.stride(), reset, reset_delay,
                    synaptic)


def snntorch_step(x: torch.Tensor, mem: torch.Tensor | None, *, beta: torch.Tensor, threshold: torch.Tensor,
                  graded_spikes_factor: torch.Tensor, reset: str = "subtract", reset_delay: bool = True,
                  syn: torch.Tensor | None = None, alpha: torch.Tensor | None = None, synaptic: bool = False,
                  plan: StepPlan | None = None):
    """One step of snnTorch ``Leaky`` (or ``Synaptic`` with ``synaptic=True``): returns ``(spk, mem)`` (``(spk, syn,
    mem)``). ``mem``/``syn``: the previous states shaped like ``x`` (None: zeros in ``x``'s dtype, as snnTorch
    starts). The parameters are the module's tensors (their dtypes and 0-dim-ness decide the arithmetic's dtypes,
    see :func:`step_dtypes`); tensors of several values broadcast to ``x``'s shape. Outputs take the memory layout
    snnTorch's own ops give them (``mem``'s, or ``x``'s without one). ``plan``: a cached :func:`step_plan` of the
    same configuration (else built here, which reads the parameters: a device sync)."""
    op = "snntorch_step"
    for name, t in (("mem", mem), ("syn", syn)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, the input {tuple(x.shape)}")
    require_triton_device(op, x, mem, syn if synaptic else None)
    require_int32_indexable(op, x)
    if plan is None:
        plan = step_plan(x, mem, syn, beta=beta, threshold=threshold, graded_spikes_factor=graded_spikes_factor,
                         alpha=alpha, reset=reset, reset_delay=reset_delay, synaptic=synaptic)
    dts = plan.dtypes
    ref = new_output(mem if mem is not None else x, dts["spk"])
    if (tuple(ref.shape), tuple(ref.stride())) != (plan.shape, plan.stride) or plan.synaptic != bool(synaptic):
        raise ValueError(f"{op}: the plan was made for shape {plan.shape}, strides {plan.stride}")
    xs = _like(x, ref)
    ms = _like(mem, ref) if mem is not None else None
    ss = _like(syn, ref) if (synaptic and syn is not None) else None
    spk = ref
    mem_out = new_output(ref, dts["mem"])
    syn_out = new_output(ref, dts["syn"]) if synaptic else None
    b, tr, tf, ts, a, gsf = plan.scalars
    pb, pr, pf, ps, pa = plan.arrays
    E = x.numel()
    if E:
        BLOCK = 1024
        dummy = spk
        launch(_snntorch_step_kernel)[(cdiv(E, BLOCK),)](
            xs, ms if ms is not None else dummy, ss if ss is not None else dummy, spk, mem_out,
            syn_out if syn_out is not None else dummy,
            pb if pb is not None else dummy, pr if pr is not None else dummy, pf if pf is not None else dummy,
            ps if ps is not None else dummy, pa if pa is not None else dummy,
            b, tr, tf, ts, a, gsf, E,
            RESET=RESETS[plan.reset], DELAY=plan.reset_delay, SYN=plan.synaptic, HAS_M=ms is not None,
            HAS_S=ss is not None, PER_BETA=pb is not None, PER_THR=pr is not None, PER_ALPHA=pa is not None,
            R_SP=_ROUND[dts["alpha"]] if synaptic else 0, R_SB=_ROUND[dts["syn"]] if synaptic else 0,
            R_P=_ROUND[dts["beta"]], R_B=_ROUND[dts["base"]], BLOCK=BLOCK, num_warps=4,
            enable_fp_fusion=False,  # snnTorch rounds every product before the sum
        )
    if synaptic:
        syn_ref = syn if syn is not None else x
        if syn_ref.stride() != ref.stride():  # (the synaptic current keeps its own layout, as in snnTorch)
            syn_out = torch.empty_like(syn_ref, dtype=syn_out.dtype).copy_(syn_out)
        return spk, syn_out, mem_out
    return spk, mem_out
