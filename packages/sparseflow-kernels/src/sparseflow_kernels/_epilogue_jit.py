"""The epilogue helpers shared by the kernels (private: ``triton.jit`` helpers, no API).

* :func:`_channel_affine`: ``z * scale + shift`` per output channel (a bias, or an eval BatchNorm folded in), the
  epilogue of the grouped and transposed convolutions;
* :func:`_neuron_step`: one time step of a neuron, the epilogue of the fused convolution
  (:mod:`~sparseflow_kernels.conv`) and the body of the multi-step neuron kernel (:mod:`~sparseflow_kernels.neuron`);
  ``NEURON_*`` are the codes of its ``NEURON`` constexpr (0: no neuron, a plain convolution);
* :func:`_step_of`: one time step of a tile that holds a few steps per pixel (selected, not reduced): the T-in-M
  epilogue of the fused convolution and the multi-step neuron kernel, which load several steps at once;
* :func:`_neuron_scalars`: a neuron kernel's scalar arguments in fp32;
* :func:`pdl_enter`: the first statement of every kernel, its side of programmatic dependent launch.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

# the CPU interpreter (set before triton is imported) runs numpy, which never contracts and has no libdevice
_INTERPRETER = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")

NEURON_NONE, NEURON_LIF, NEURON_IF, NEURON_LEAKY, NEURON_PLIF = 0, 1, 2, 3, 4


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """The first statement of every kernel (``PDL``: its last parameter, which the launcher sets where the kernel
    launches with programmatic dependent launch, see ``_utils.pdl_enabled``). Launched so, a kernel may start while
    the kernel before it in the stream is still running: each program waits here until that kernel has completed and
    its writes are visible, before any load, store or exit of its own (a program that touched memory or returned
    first would break the ordering, also the one the next kernel relies on transitively), then lets the next
    kernel be scheduled."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _neuron_scalars(leak, v_th, v_reset, v_init):
    """A neuron kernel's scalar arguments in fp32, the type its arithmetic runs in, whatever type they arrive in
    (``torch.compile`` passes Python floats as fp64)."""
    return tl.cast(leak, tl.float32), tl.cast(v_th, tl.float32), tl.cast(v_reset, tl.float32), \
        tl.cast(v_init, tl.float32)


@triton.jit
def _channel_affine(z, scale_ptr, shift_ptr, co, co_ok, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """``z * scale[co] + shift[co]`` (fp32; each factor only when given) for a ``[rows, channels]`` tile."""
    if HAS_SCALE:
        z = z * tl.load(scale_ptr + co, mask=co_ok, other=1.0)[None, :]
    if HAS_SHIFT:
        z = z + tl.load(shift_ptr + co, mask=co_ok, other=0.0)[None, :]
    return z


@triton.jit
def _mul_rn(a, b):
    """``a * b`` rounded on its own, as PyTorch's eager multiply rounds it: the compiler may not contract it with
    the add that follows into one fused multiply-add (which rounds once, and flips a spike now and then)."""
    if _INTERPRETER:
        p = a * b
    else:
        p = libdevice.mul_rn(a, b)
    return p


@triton.jit
def _neuron_step(z, v, leak, v_th, v_reset,
                 NEURON: tl.constexpr, HARD_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr):
    """One time step of the neuron, fp32, in the frameworks' own operation order (bit for bit).
    SpikingJelly LIF (NEURON 1, ``leak`` = tau: divided by, correctly rounded, as SpikingJelly divides),
    PLIF (NEURON 4, ``leak`` = sigmoid(w): multiplied, as SpikingJelly multiplies), IF (NEURON 2): charge,
    fire (h >= v_th), hard/soft reset. snnTorch Leaky (NEURON 3, ``leak`` = beta): ``v`` carries the previous
    membrane; reset from it, fire when mem > v_th."""
    if NEURON == 3:
        # snnTorch: reset = H(mem_prev - thr); mem = beta * mem_prev + z - reset * thr ("subtract")
        # or mem = (beta * mem_prev + z) * (1 - reset) ("zero"); spike = mem > thr.
        was = v > v_th
        if HARD_RESET:
            h = _mul_rn(tl.where(was, 0.0, v), leak) + z
        else:
            h = _mul_rn(v, leak) + z - tl.where(was, v_th, 0.0)
        spike = h > v_th
        return spike, h
    else:
        if NEURON == 1:  # x / tau, not x * (1 / tau): they differ in the last bit for most tau
            if DECAY_INPUT:
                h = v + tl.math.div_rn(z - (v - v_reset), leak)
            else:
                h = v - tl.math.div_rn(v - v_reset, leak) + z
        elif NEURON == 4:
            if DECAY_INPUT:
                h = v + _mul_rn(z - (v - v_reset), leak)
            else:
                h = v - _mul_rn(v - v_reset, leak) + z
        else:
            h = v + z
        spike = h >= v_th
        if HARD_RESET:  # SpikingJelly's arithmetic form: the same for finite h, and 0 * inf = NaN as there
            s = spike.to(tl.float32)
            v = (1.0 - s) * h + s * v_reset
        else:
            v = h - tl.where(spike, v_th, 0.0)
        return spike, v


@triton.jit
def _step_of(zs, t: tl.constexpr, T_P2: tl.constexpr):
    """Step ``t`` of ``zs`` ``[P, BLOCK_N, T_P2]`` (``T_P2`` 1, 2, 4 or 8) as ``[P, BLOCK_N]``, by halving the step
    axis (``tl.split``; the lowest bit of ``t`` first): a selection, so exactly the values of those rows, and the
    layout that holds a pixel's steps in one thread is made once for all steps (a sum over the step axis of the
    other steps masked to zero reduced across warps, through shared memory, at every step)."""
    tl.static_assert(T_P2 == 1 or T_P2 == 2 or T_P2 == 4 or T_P2 == 8)
    P: tl.constexpr = zs.shape[0]
    BN: tl.constexpr = zs.shape[1]
    z = zs
    if T_P2 >= 2:
        lo, hi = tl.split(tl.reshape(z, [P, BN, T_P2 // 2, 2]))
        z = lo if t % 2 == 0 else hi
    if T_P2 >= 4:
        lo, hi = tl.split(tl.reshape(z, [P, BN, T_P2 // 4, 2]))
        z = lo if (t // 2) % 2 == 0 else hi
    if T_P2 >= 8:
        lo, hi = tl.split(tl.reshape(z, [P, BN, 1, 2]))
        z = lo if (t // 4) % 2 == 0 else hi
    return tl.reshape(z, [P, BN])
