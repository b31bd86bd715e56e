"""A multi-step neuron and the max pool over its spikes in one pass: ``max_pool2d(neuron(x * scale + shift))``.

Why it exists: a spiking ResNet's stem is conv -> BatchNorm -> neuron -> 3x3/2 max pool. Unfused, the neuron writes
the [T*N, 64, 112, 112] spike map (51 MB at T=4, N=8, fp16) and the pool reads it back to keep a quarter of it.
Here each program owns a block of pooled pixels and channels, runs the neuron over T at every input pixel of their
windows (``[pixels, taps, channels]`` membranes in registers; a pixel shared by two windows is computed twice) and
stores only the pooled spikes: the map is read once and the output is a quarter of it. An input repeated over T by
stride 0 (the stem of a static image) is read once per window.

Exact: the neuron's arithmetic is :func:`~sparseflow_kernels.neuron.multistep_neuron`'s (the same jit step), and
the max of spikes ({0, 1}) over a window's valid pixels is what ``F.max_pool2d`` gives (padding is ``-inf`` there,
and a window always holds one valid pixel, so a padded tap counted as 0 changes nothing). The final membrane is
stored for every input pixel; that needs every pixel inside some window (stride <= kernel size): see
:func:`pool_covers_input`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._epilogue_jit import _load_affine, _neuron_step
from ._utils import cdiv, launch, next_power_of_2, pair, require_dtype, require_int32_indexable, require_triton_device
from .neuron import NeuronSpec
from .pool import _out_size


@triton.jit
def _neuron_max_pool_kernel(
    x_ptr, sxt, sxn, sxc, sxh, sxw,
    y_ptr, syt, syn, syc, syh, syw,
    v_ptr, svn, svc, svh, svw,
    vo_ptr, son, soc, soh, sow,
    scale_ptr, shift_ptr,
    T, C, H, W, OH, OW,
    leak, v_th, v_reset, v_init,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    KK_P2: tl.constexpr, NEURON: tl.constexpr, HARD_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_V: tl.constexpr, STORE_V: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    leak = tl.cast(leak, tl.float32)
    v_th = tl.cast(v_th, tl.float32)
    v_reset = tl.cast(v_reset, tl.float32)
    v_init = tl.cast(v_init, tl.float32)
    n = tl.program_id(2).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # pooled pixels
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    k = tl.arange(0, KK_P2)  # window taps
    oh = p // OW
    ow = p % OW
    ih = (oh * SH - PH)[:, None] + (k // KW)[None, :]  # [P, K]
    iw = (ow * SW - PW)[:, None] + (k % KW)[None, :]
    pix_ok = (p < OH * OW)[:, None] & (k < KH * KW)[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    c_ok = c < C
    ok = pix_ok[:, :, None] & c_ok[None, None, :]  # [P, K, C]
    xo = n * sxn + (ih * sxh + iw * sxw)[:, :, None] + (c * sxc)[None, None, :]
    scale = tl.load(scale_ptr + c, mask=c_ok, other=1.0)[None, None, :] if HAS_SCALE else None
    shift = tl.load(shift_ptr + c, mask=c_ok, other=0.0)[None, None, :] if HAS_SHIFT else None
    if HAS_V:
        vofs = n * svn + (ih * svh + iw * svw)[:, :, None] + (c * svc)[None, None, :]
        v = tl.load(v_ptr + vofs, mask=ok, other=0.0).to(tl.float32)
    else:
        v = tl.full([BLOCK_P, KK_P2, BLOCK_C], v_init, dtype=tl.float32)
    yo = n * syn + (oh * syh + ow * syw)[:, None] + (c * syc)[None, :]
    y_ok = (p < OH * OW)[:, None] & c_ok[None, :]
    for t in range(T):
        z = _load_affine(x_ptr + t * sxt + xo, ok, scale, shift, HAS_SCALE, HAS_SHIFT)
        spike, v = _neuron_step(z, v, leak, v_th, v_reset, NEURON, HARD_RESET, DECAY_INPUT)
        pooled = tl.max(tl.where(ok & spike, 1.0, 0.0), axis=1)
        tl.store(y_ptr + t * syt + yo, pooled.to(y_ptr.dtype.element_ty), mask=y_ok)
    if STORE_V:  # (a pixel of two windows is stored twice, with the same value)
        vo = n * son + (ih * soh + iw * sow)[:, :, None] + (c * soc)[None, None, :]
        tl.store(vo_ptr + vo, v, mask=ok)


def pool_covers_input(H: int, W: int, kernel_size, stride=None, padding=0, dilation=1,
                      ceil_mode: bool = False) -> bool:
    """Whether a max pool's windows (undilated, stride <= kernel size) reach every input pixel, so that the fused
    neuron can store every pixel's membrane."""
    kh, kw = pair(kernel_size, "kernel_size", "max_pool2d")
    sh, sw = pair(stride if stride not in (None, []) else (kh, kw), "stride", "max_pool2d")
    ph, pw = pair(padding, "padding", "max_pool2d")
    if pair(dilation, "dilation", "max_pool2d") != (1, 1) or sh > kh or sw > kw or ph > kh // 2 or pw > kw // 2:
        return False
    oh, ow = _out_size(H, kh, sh, ph, 1, ceil_mode), _out_size(W, kw, sw, pw, 1, ceil_mode)
    return oh > 0 and ow > 0 and (oh - 1) * sh - ph + kh >= H and (ow - 1) * sw - pw + kw >= W


def multistep_neuron_max_pool(
    x: torch.Tensor,
    neuron: NeuronSpec | str = "lif",
    *,
    kernel_size,
    stride=None,
    padding=0,
    ceil_mode: bool = False,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    return_v: bool = False,
    v_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
    **neuron_kwargs,
):
    """``F.max_pool2d`` over each step of ``multistep_neuron(x, neuron, scale=scale, shift=shift, v=v)``, in one
    kernel: ``x`` ``[T, N, C, H, W]`` (any strides; stride 0 over T reads one map for every step) -> pooled spikes
    ``[T, N, C, OH, OW]`` (each step channels_last), and the final membrane ``[N, C, H, W]`` (``v_dtype``) when
    ``return_v``. The pool must cover its input (:func:`pool_covers_input`); ValueError otherwise."""
    op = "multistep_neuron_max_pool"
    spec = NeuronSpec.make(neuron, **neuron_kwargs)
    if x.dim() != 5:
        raise ValueError(f"{op}: expected x of shape [T, N, C, H, W], got {tuple(x.shape)}")
    require_dtype(op, "x", x)
    require_triton_device(op, x, scale, shift, v)
    T, N, C, H, W = x.shape
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None and (t.dim() != 1 or t.shape[0] != C):
            raise ValueError(f"{op}: {name} must have shape [{C}], got {tuple(t.shape)}")
    if v is not None and tuple(v.shape) != (N, C, H, W):
        raise ValueError(f"{op}: v must have shape {(N, C, H, W)}, got {tuple(v.shape)}")
    if v_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{op}: v_dtype must be float32, float16 or bfloat16, got {v_dtype}")
    if not pool_covers_input(H, W, kernel_size, stride, padding, 1, ceil_mode):
        raise ValueError(f"{op}: the pool (kernel_size={kernel_size}, stride={stride}, padding={padding}) must "
                         f"cover every pixel of its {H}x{W} input (no dilation, stride <= kernel size)")
    require_int32_indexable(op, x, v)
    kh, kw = pair(kernel_size, "kernel_size", op)
    sh, sw = pair(stride if stride not in (None, []) else (kh, kw), "stride", op)
    ph, pw = pair(padding, "padding", op)
    OH, OW = _out_size(H, kh, sh, ph, 1, ceil_mode), _out_size(W, kw, sw, pw, 1, ceil_mode)
    y = torch.empty((T, N, OH, OW, C), dtype=out_dtype or x.dtype, device=x.device).permute(0, 1, 4, 2, 3)
    v_out = torch.empty((N, C, H, W), dtype=v_dtype, device=x.device) if return_v else None
    vin = v if v is not None else y[0]
    vo = v_out if v_out is not None else y[0]
    if T and N and C:
        block_c = min(64, next_power_of_2(C))
        kk = next_power_of_2(kh * kw)
        block_p = max(1, min(4096 // (kk * block_c), next_power_of_2(OH * OW)))
        ka = spec.kernel_args()
        launch(_neuron_max_pool_kernel)[(cdiv(OH * OW, block_p), cdiv(C, block_c), N)](
            x, *x.stride(), y, *y.stride(), vin, *vin.stride(), vo, *vo.stride(),
            scale.float().contiguous() if scale is not None else y,
            shift.float().contiguous() if shift is not None else y,
            T, C, H, W, OH, OW, ka["leak"], ka["v_threshold"], ka["v_reset"], ka["v_init"],
            KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, KK_P2=kk, NEURON=ka["neuron"], HARD_RESET=ka["hard_reset"],
            DECAY_INPUT=ka["decay_input"], HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
            HAS_V=v is not None, STORE_V=return_v, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4,
        )
    return (y, v_out) if return_v else y

