"""A multi-step neuron and the max pool that reads its spikes, in one Triton pass over all time steps.

``multistep_neuron_pool`` computes ``max_pool2d(neuron(x * scale + shift))`` for ``x`` ``[T, N, C, H, W]``: a
spiking VGG's or a DVS network's ``conv -> BatchNorm -> neuron -> MaxPool2d`` after the convolution. The neuron's
spikes are pooled in registers and only the pooled ones are written: on the DVS Gesture network's first layer
(T=16, N=8, 128 channels at 128 x 128) the separate pool read back 537 MB of fp16 spikes that the neuron had just
written.

Two orders of the same computation (:func:`~sparseflow_kernels.tiling.neuron_pool_order` picks one):

* ``"bits"``: the neuron runs once per input pixel over all steps and stores its spikes as one bit per step (a
  uint8 per pixel and channel up to 8 steps: 6.4 MB where a ResNet stem's four fp16 spike maps at N=8 are 51 MB);
  a second kernel ORs the bits over each window (the max of 0/1 spikes) and writes the pooled spikes. Overlapping
  windows cost no extra neuron work, and a static input (one frame repeated by stride 0) is loaded once.
* ``"steps"``: one kernel; a program loads every window position of its output pixels at once (``[pixels, window,
  channels]``, the window padded to a power of two), runs the neuron over t on all of them with their membranes in
  registers, and stores the window's maximum at each step.

Either way only the pooled spikes are written. The spikes are the neuron kernel's bit for bit (the same
``_neuron_step``), so their maximum is exactly the max pool of the spikes. Every input pixel must lie in some
window (``stride <= kernel_size``, the last window reaching the last row and column): its membrane is computed
there. A pixel in several windows (``kernel_size`` 3, ``stride`` 2) is computed by each, with the same arithmetic,
so every copy of its final membrane holds the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._epilogue_jit import _channel_affine, _neuron_scalars, _neuron_step, pdl_enter
from ._utils import (
    cdiv,
    launch,
    multiprocessors,
    next_power_of_2,
    pair,
    repeated_over_steps,
    require_dtype,
    require_int32_indexable,
    require_triton_device,
)
from .neuron import NeuronSpec, _as_tncs, _per_channel
from .pool import _out_size
from .tiling import BITS_MAX_STEPS, neuron_pool_bits_tile, neuron_pool_order, neuron_pool_tile, neuron_tile


@triton.jit
def _neuron_pool_kernel(
    x_ptr, sxt, sxn, sxc, sxh, sxw,
    y_ptr, syt, syn, syc, syh, syw,
    v_ptr, svn, svc, svh, svw,
    vo_ptr, son, soc, soh, sow,
    scale_ptr, shift_ptr,
    T, C, H, W, OH, OW,
    leak, v_th, v_reset, v_init,
    NEURON: tl.constexpr, HARD_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_V: tl.constexpr, STORE_V: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    KK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, PREFETCH: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Tiles ``[BLOCK_P output pixels, KK window positions, BLOCK_C channels]`` of one sample; window positions
    past ``KH * KW`` (``KK`` is a power of two) or in the padding are masked and never fire. ``PREFETCH``: step
    ``t + 1`` is loaded before step ``t`` is computed (small tiles, whose programs would wait on each load)."""
    pdl_enter(PDL)
    leak, v_th, v_reset, v_init = _neuron_scalars(leak, v_th, v_reset, v_init)
    n = tl.program_id(2).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    k = tl.arange(0, KK)
    oh = p // OW
    ow = p % OW
    ih = oh[:, None] * SH - PH + (k // KW)[None, :]
    iw = ow[:, None] * SW - PW + (k % KW)[None, :]
    p_ok = p < OH * OW
    win = p_ok[:, None] & (k < KH * KW)[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    c_ok = c < C
    ok = win[:, :, None] & c_ok[None, None, :]
    c3 = c[None, None, :]
    xo = n * sxn + (ih * sxh + iw * sxw)[:, :, None] + c3 * sxc
    if HAS_SCALE:
        scale = tl.load(scale_ptr + c, mask=c_ok, other=1.0).to(tl.float32)[None, None, :]
    if HAS_SHIFT:
        shift = tl.load(shift_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, None, :]
    if HAS_V:
        v = tl.load(v_ptr + n * svn + (ih * svh + iw * svw)[:, :, None] + c3 * svc, mask=ok, other=0.0)
        v = v.to(tl.float32)
    else:
        v = tl.full([BLOCK_P, KK, BLOCK_C], v_init, dtype=tl.float32)
    yo = n * syn + (oh * syh + ow * syw)[:, None] + c[None, :] * syc
    y_ok = p_ok[:, None] & c_ok[None, :]
    if PREFETCH:
        nxt = tl.load(x_ptr + xo, mask=ok, other=0.0)
    for t in range(T):
        if PREFETCH:
            cur = nxt
            nxt = tl.load(x_ptr + (t + 1) * sxt + xo, mask=ok & (t + 1 < T), other=0.0)
        else:
            cur = tl.load(x_ptr + t * sxt + xo, mask=ok, other=0.0)
        z = cur.to(tl.float32)
        if HAS_SCALE:
            z = z * scale
        if HAS_SHIFT:
            z = z + shift
        spike, v = _neuron_step(z, v, leak, v_th, v_reset, NEURON, HARD_RESET, DECAY_INPUT)
        pooled = tl.max(tl.where(ok, spike.to(tl.float32), 0.0), axis=1)
        tl.store(y_ptr + t * syt + yo, pooled.to(y_ptr.dtype.element_ty), mask=y_ok)
    if STORE_V:
        tl.store(vo_ptr + n * son + (ih * soh + iw * sow)[:, :, None] + c3 * soc, v, mask=ok)


@triton.jit
def _neuron_bits_kernel(
    x_ptr, sxt, sxn, sxc, sxs,
    b_ptr, sbn, sbc, sbs,
    v_ptr, svn, svc, svs,
    vo_ptr, son, soc, sos,
    scale_ptr, shift_ptr,
    T, C, S,
    leak, v_th, v_reset, v_init,
    NEURON: tl.constexpr, HARD_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_V: tl.constexpr, STORE_V: tl.constexpr,
    STATIC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """The neuron over the steps for a ``[BLOCK_S pixels, BLOCK_C channels]`` tile of one sample (``[T, N, C, S]``
    views), each pixel once: its spikes stored as one bit per step (bit ``t``) in ``b_ptr``'s integer type, and
    its final membrane. ``STATIC``: one frame repeated over the steps by stride 0, loaded once."""
    pdl_enter(PDL)
    leak, v_th, v_reset, v_init = _neuron_scalars(leak, v_th, v_reset, v_init)
    n = tl.program_id(2).to(tl.int64)
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    ok = (s < S)[:, None] & c_ok[None, :]
    xo = n * sxn + s[:, None] * sxs + c[None, :] * sxc
    if HAS_V:
        v = tl.load(v_ptr + n * svn + s[:, None] * svs + c[None, :] * svc, mask=ok, other=0.0).to(tl.float32)
    else:
        v = tl.full([BLOCK_S, BLOCK_C], v_init, dtype=tl.float32)
    if STATIC:
        z0 = _channel_affine(tl.load(x_ptr + xo, mask=ok, other=0.0).to(tl.float32), scale_ptr, shift_ptr, c, c_ok,
                             HAS_SCALE, HAS_SHIFT)
    bits = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.int32)
    for t in range(T):
        if STATIC:
            z = z0
        else:
            z = _channel_affine(tl.load(x_ptr + t * sxt + xo, mask=ok, other=0.0).to(tl.float32), scale_ptr,
                                shift_ptr, c, c_ok, HAS_SCALE, HAS_SHIFT)
        spike, v = _neuron_step(z, v, leak, v_th, v_reset, NEURON, HARD_RESET, DECAY_INPUT)
        bits = bits | (spike.to(tl.int32) << t)
    tl.store(b_ptr + n * sbn + s[:, None] * sbs + c[None, :] * sbc, bits.to(b_ptr.dtype.element_ty), mask=ok)
    if STORE_V:
        tl.store(vo_ptr + n * son + s[:, None] * sos + c[None, :] * soc, v, mask=ok)


@triton.jit
def _pool_bits_kernel(
    b_ptr, sbn, sbc, sbh, sbw,
    y_ptr, syt, syn, syc, syh, syw,
    T, C, H, W, OH, OW,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """The max pool of spikes held as one bit per step (``_neuron_bits_kernel``'s): a program ORs the bits of every
    window position of its ``[BLOCK_P output pixels, BLOCK_C channels]`` of one sample (the max of 0/1 spikes;
    positions in the padding hold none) and writes the pooled spikes of each step."""
    pdl_enter(PDL)
    n = tl.program_id(2).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    oh = p // OW
    ow = p % OW
    p_ok = p < OH * OW
    c_ok = c < C
    bits = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.int32)
    for k in tl.static_range(KH * KW):
        ih = oh * SH - PH + k // KW
        iw = ow * SW - PW + k % KW
        ok = (p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))[:, None] & c_ok[None, :]
        bo = n * sbn + (ih * sbh + iw * sbw)[:, None] + c[None, :] * sbc
        bits = bits | tl.load(b_ptr + bo, mask=ok, other=0).to(tl.int32)
    yo = n * syn + (oh * syh + ow * syw)[:, None] + c[None, :] * syc
    y_ok = p_ok[:, None] & c_ok[None, :]
    for t in range(T):
        tl.store(y_ptr + t * syt + yo, ((bits >> t) & 1).to(y_ptr.dtype.element_ty), mask=y_ok)


def _bits_frames(N, C, H, W, T, device) -> torch.Tensor:
    """``[N, C, H, W]`` channels_last integers of one bit per step: uint8 up to 8 steps, int16 up to 16, int32
    up to 32 (``_pool_bits_kernel`` widens them to int32; a sign extension sets only bits past the last step)."""
    dtype = torch.uint8 if T <= 8 else torch.int16 if T <= 16 else torch.int32
    return torch.empty((N, H, W, C), dtype=dtype, device=device).permute(0, 3, 1, 2)


ORDERS = ("bits", "steps")


def pool_args(kernel_size, stride=None, padding=0, op: str = "multistep_neuron_pool"):
    """``(kernel, stride, padding)`` as pairs of ints (``stride`` None: the kernel size), checked as
    ``F.max_pool2d`` checks them."""
    kh, kw = pair(kernel_size, "kernel_size", op)
    sh, sw = pair(stride if stride is not None and stride != [] else (kh, kw), "stride", op)
    ph, pw = pair(padding, "padding", op)
    if min(kh, kw, sh, sw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"{op}: kernel_size and stride must be >= 1 and padding >= 0")
    if ph > kh // 2 or pw > kw // 2:
        raise ValueError(f"{op}: padding ({ph}, {pw}) must be at most half the kernel size ({kh}, {kw})")
    return (kh, kw), (sh, sw), (ph, pw)


def pool_uncovered(H: int, W: int, kernel_size, stride, padding) -> str:
    """Why some pixel of an ``H x W`` map lies in no window of the max pool (``F.max_pool2d`` without
    ``ceil_mode``), or ''. The fused neuron computes each pixel's membrane in a window that holds it."""
    for name, size, k, s, p in (("rows", H, kernel_size[0], stride[0], padding[0]),
                                ("columns", W, kernel_size[1], stride[1], padding[1])):
        if s > k:
            return f"stride {s} is larger than the kernel {k}: {name} between the windows are in none"
        out = _out_size(size, k, s, p, 1, False)
        if out < 1:
            return f"the {size} {name} are fewer than the kernel {k} spans"
        if (out - 1) * s - p + k < size:
            return f"the last of the {size} {name} is in no window (kernel {k}, stride {s}, padding {p})"
    return ""


def multistep_neuron_pool(
    x: torch.Tensor,
    neuron: NeuronSpec | str = "lif",
    *,
    kernel_size,
    stride=None,
    padding=0,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    return_v: bool = False,
    v_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
    order: str | None = None,
    **neuron_kwargs,
):
    """``max_pool2d(neuron(x * scale + shift), kernel_size, stride, padding)`` per step for ``x``
    ``[T, N, C, H, W]`` in one kernel (see the module docstring): returns the pooled spikes
    ``[T, N, C, OH, OW]`` (channels innermost, in ``out_dtype``, ``x``'s by default), and the final membrane
    ``[N, C, H, W]`` (channels_last, ``v_dtype``) when ``return_v``. ``v``: the initial membrane ``[N, C, H, W]``;
    None starts at the neuron's initial value. ``scale`` / ``shift`` ``[C]`` as in :func:`multistep_neuron`.
    ``order``: ``"bits"`` (two kernels: the neuron once per input pixel, its spikes stored as one bit per step,
    then the pool of the bits; up to ``BITS_MAX_STEPS`` steps) or ``"steps"`` (one kernel, every window position of
    a tile at once, step by step); None takes :func:`~sparseflow_kernels.tiling.neuron_pool_order`'s. Both give the
    same bits."""
    op = "multistep_neuron_pool"
    if order is not None and order not in ORDERS:
        raise ValueError(f"{op}: order must be one of {ORDERS} or None, got {order!r}")
    spec = NeuronSpec.make(neuron, **neuron_kwargs)
    if x.dim() != 5:
        raise ValueError(f"{op}: expected x of shape [T, N, C, H, W], got {tuple(x.shape)}")
    require_dtype(op, "x", x)
    require_triton_device(op, x, scale, shift, v)
    T, N, C, H, W = x.shape
    (kh, kw), (sh, sw), (ph, pw) = pool_args(kernel_size, stride, padding, op)
    why = pool_uncovered(H, W, (kh, kw), (sh, sw), (ph, pw))
    if why:
        raise ValueError(f"{op}: every pixel must lie in a window of the pool (its membrane is computed there); {why}")
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None and (t.dim() != 1 or t.shape[0] != C):
            raise ValueError(f"{op}: {name} must have shape [{C}], got {tuple(t.shape)}")
    if v is not None and tuple(v.shape) != (N, C, H, W):
        raise ValueError(f"{op}: v must have shape {(N, C, H, W)}, got {tuple(v.shape)}")
    if v_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{op}: v_dtype must be float32, float16 or bfloat16, got {v_dtype}")
    require_int32_indexable(op, x, v)
    OH, OW = _out_size(H, kh, sh, ph, 1, False), _out_size(W, kw, sw, pw, 1, False)
    y = torch.empty((T, N, OH, OW, C), dtype=out_dtype or x.dtype, device=x.device).permute(0, 1, 4, 2, 3)
    v_out = torch.empty((N, C, H, W), dtype=v_dtype, device=x.device, memory_format=torch.channels_last) \
        if return_v else None
    static = repeated_over_steps(x)  # one frame repeated over the steps
    order = order or neuron_pool_order(T, (kh, kw), (sh, sw), static)
    if order == "bits" and T > BITS_MAX_STEPS:
        raise ValueError(f"{op}: order='bits' holds up to {BITS_MAX_STEPS} steps (one bit each), got T={T}")
    if y.numel():
        ka = spec.kernel_args()
        params = (_per_channel(scale) if scale is not None else y, _per_channel(shift) if shift is not None else y)
        scalars = (ka["leak"], ka["v_threshold"], ka["v_reset"], ka["v_init"])
        neuron_meta = dict(NEURON=ka["neuron"], HARD_RESET=ka["hard_reset"], DECAY_INPUT=ka["decay_input"],
                           HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None)
        window = dict(KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw)
        out_args = (y, *y.stride())
        if order == "bits":  # the neuron once per pixel, its spikes as bits; then the pool of the bits
            bits = _bits_frames(N, C, H, W, T, x.device)
            x4, b3 = _as_tncs(x), bits.view(N, C, H * W)
            v3 = v.reshape(N, C, -1) if v is not None else b3
            vo3 = v_out.view(N, C, -1) if v_out is not None else b3
            BLOCK_S, BLOCK_C, _ = neuron_tile(C, H * W)
            launch(_neuron_bits_kernel)[(cdiv(H * W, BLOCK_S), cdiv(C, BLOCK_C), N)](
                x4, *x4.stride(), b3, *b3.stride(), v3, *v3.stride(), vo3, *vo3.stride(), *params, T, C, H * W,
                *scalars, **neuron_meta, HAS_V=v is not None, STORE_V=return_v, STATIC=static, BLOCK_S=BLOCK_S,
                BLOCK_C=BLOCK_C, num_warps=4)
            BLOCK_P, BLOCK_C, warps = neuron_pool_bits_tile(C, OH * OW, N, multiprocessors(x.device))
            launch(_pool_bits_kernel)[(cdiv(OH * OW, BLOCK_P), cdiv(C, BLOCK_C), N)](
                bits, *bits.stride(), *out_args, T, C, H, W, OH, OW, **window, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C,
                num_warps=warps)
            return (y, v_out) if return_v else y
        v0 = v if v is not None else y[0, :, :, :1, :1]
        vo = v_out if v_out is not None else y[0, :, :, :1, :1]
        KK = next_power_of_2(kh * kw)
        BLOCK_P, BLOCK_C, warps, prefetch = neuron_pool_tile(C, OH * OW, KK, N, multiprocessors(x.device))
        launch(_neuron_pool_kernel)[(cdiv(OH * OW, BLOCK_P), cdiv(C, BLOCK_C), N)](
            x, *x.stride(), *out_args, v0, *v0.stride(), vo, *vo.stride(), *params, T, C, H, W, OH, OW, *scalars,
            **neuron_meta, HAS_V=v is not None, STORE_V=return_v, **window, KK=KK, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C,
            PREFETCH=prefetch, num_warps=warps)
    elif v_out is not None:  # (no step: the membrane is the initial one)
        v_out.copy_(v if v is not None else torch.full_like(v_out, spec.v_init))
    return (y, v_out) if return_v else y
