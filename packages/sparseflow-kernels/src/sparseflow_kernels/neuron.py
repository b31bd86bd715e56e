"""Multi-step spiking neurons in one Triton pass over all time steps (membrane in registers).

``multistep_neuron`` computes, for an input sequence ``x`` ``[T, N, ...]``: ``z = x * scale[c] + shift[c]``
(optional: a folded BatchNorm, channel axis 2) ``+ residual``, then the neuron over t. It is the epilogue of
the fused spiking layer as a kernel of its own: the neuron modules' replacement, and the second half of the
"cuDNN conv + fused BatchNorm/neuron" path for layers where the fused conv loses. With ``return_sum`` it also
writes ``z`` itself, rounded to the sum's dtype, and fires from that rounded value: the residual stream of a
network whose neurons come before their convolutions (MS-ResNet), summed and turned into the spikes of the
neuron that reads it in one pass, the same spikes that neuron computes from the stored sum.

Neurons (:class:`NeuronSpec`): SpikingJelly ``LIFNode`` (``tau``, ``decay_input``, hard reset to ``v_reset``
or soft reset when ``v_reset is None``), ``IFNode``, ``ParametricLIFNode`` (as LIF with decay
``sigmoid(w)``), and snnTorch ``Leaky`` (``beta``, reset ``"subtract"`` or ``"zero"``, strict ``>``), each in
its framework's own fp32 operation order: LIF divides by ``tau``, PLIF multiplies by ``sigmoid(w)``, so the
membranes and spikes are the framework's bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._epilogue_jit import (
    NEURON_IF,
    NEURON_LEAKY,
    NEURON_LIF,
    NEURON_PLIF,
    _neuron_scalars,
    _neuron_step,
    _step_of,
    pdl_enter,
)
from ._utils import cdiv, launch, require_dtype, require_int32_indexable, require_triton_device
from .tiling import neuron_tile

_KINDS = {"lif": NEURON_LIF, "plif": NEURON_PLIF, "if": NEURON_IF, "leaky": NEURON_LEAKY}


@dataclass(frozen=True)
class NeuronSpec:
    """Parameters of a neuron, normalised for the kernels.

    ``kind``: ``"lif"``, ``"if"``, ``"plif"`` (LIF with ``decay`` given as ``sigmoid(w)``) or ``"leaky"``.
    ``decay``: the multiplier of the leak term (``1/tau`` for LIF, ``sigmoid(w)`` for PLIF, ``beta`` for
    Leaky). ``tau`` (LIF): the time constant the kernels divide by, as SpikingJelly does (``x / tau`` and
    ``x * (1 / tau)`` differ in the last bit for most tau); set from ``decay`` when not given, and ``decay``
    from it when given. ``v_reset``: None = soft reset (Leaky: ``"subtract"``; hard = ``"zero"``).
    """

    kind: str = "lif"
    decay: float = 0.5
    decay_input: bool = True
    v_threshold: float = 1.0
    v_reset: float | None = 0.0
    tau: float | None = None

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"neuron must be one of {sorted(_KINDS)}, got {self.kind!r}")
        if self.kind != "lif":
            object.__setattr__(self, "tau", None)
        elif self.tau is None:
            object.__setattr__(self, "tau", 1.0 / float(self.decay))
        else:
            object.__setattr__(self, "tau", float(self.tau))
            object.__setattr__(self, "decay", 1.0 / self.tau)

    @classmethod
    def make(cls, neuron="lif", tau=2.0, decay_input=True, v_threshold=1.0, v_reset=0.0, beta=None,
             decay=None) -> NeuronSpec:
        if isinstance(neuron, NeuronSpec):
            return neuron
        if neuron == "leaky":
            if beta is None:
                raise ValueError("neuron='leaky' needs beta")
            return cls("leaky", float(beta), True, float(v_threshold), v_reset)
        lif_tau = None
        if decay is None:
            if neuron in ("lif", "plif") and not tau > 1.0:
                raise ValueError(f"LIF needs tau > 1, got {tau}")
            decay = 1.0 / float(tau)
            lif_tau = float(tau) if neuron == "lif" else None
        return cls(neuron, float(decay), bool(decay_input), float(v_threshold),
                   None if v_reset is None else float(v_reset), lif_tau)

    @property
    def code(self) -> int:
        return _KINDS[self.kind]

    @property
    def leak(self) -> float:
        """The kernels' leak constant: ``tau`` for LIF (divided by), else ``decay`` (multiplied)."""
        return self.tau if self.kind == "lif" else self.decay

    @classmethod
    def from_leak(cls, kind: str, leak: float, decay_input: bool, v_threshold: float,
                  v_reset: float | None) -> NeuronSpec:
        """The spec whose :attr:`leak` is ``leak`` (the inverse of the flat kernel arguments)."""
        if kind == "lif":
            return cls(kind, 1.0 / leak, decay_input, v_threshold, v_reset, leak)
        return cls(kind, leak, decay_input, v_threshold, v_reset)

    @property
    def hard_reset(self) -> bool:
        return self.v_reset is not None

    @property
    def v_init(self) -> float:
        """SpikingJelly starts the membrane at ``v_reset`` (hard) or 0 (soft); snnTorch at 0."""
        if self.kind == "leaky" or self.v_reset is None:
            return 0.0
        return self.v_reset

    def kernel_args(self) -> dict:
        return dict(neuron=self.code, hard_reset=self.hard_reset, decay_input=self.decay_input,
                    leak=self.leak, v_threshold=self.v_threshold,
                    v_reset=0.0 if self.v_reset is None else self.v_reset, v_init=self.v_init)


@triton.jit
def _multistep_kernel(
    x_ptr, sxt, sxn, sxc, sxs,
    y_ptr, syt, syn, syc, sys,
    r_ptr, srt, srn, src, srs,
    v_ptr, svn, svc, svs,
    vo_ptr, son, soc, sos,
    z_ptr, szt, szn, szc, szs,
    scale_ptr, shift_ptr,
    T, N, C, S,
    leak, v_th, v_reset, v_init,
    NEURON: tl.constexpr, HARD_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RES: tl.constexpr,
    HAS_V: tl.constexpr, STORE_V: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, RES_POST: tl.constexpr = False, STORE_Z: tl.constexpr = False,
    ROUND_AFFINE: tl.constexpr = False, T_CHUNK: tl.constexpr = 1,
    PDL: tl.constexpr = False,
):
    """Tensors are viewed as [T, N, C, S] (S = flattened spatial); a program owns a [BLOCK_S, BLOCK_C]
    block of one sample (channel-fastest, coalesced for channels_last) and loops over t, ``T_CHUNK`` steps per
    load."""
    pdl_enter(PDL)
    leak, v_th, v_reset, v_init = _neuron_scalars(leak, v_th, v_reset, v_init)
    n = tl.program_id(2)
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (s < S)[:, None] & (c < C)[None, :]
    xo = n * sxn + s[:, None] * sxs + c[None, :] * sxc
    yo = n * syn + s[:, None] * sys + c[None, :] * syc
    if HAS_SCALE:
        scale = tl.load(scale_ptr + c, mask=c < C, other=1.0).to(tl.float32)[None, :]
    if HAS_SHIFT:
        shift = tl.load(shift_ptr + c, mask=c < C, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        ro = n * srn + s[:, None] * srs + c[None, :] * src
    if STORE_Z:
        zo = n * szn + s[:, None] * szs + c[None, :] * szc
    if HAS_V:
        v = tl.load(v_ptr + n * svn + s[:, None] * svs + c[None, :] * svc, mask=ok, other=0.0).to(tl.float32)
    else:
        v = tl.full([BLOCK_S, BLOCK_C], v_init, dtype=tl.float32)
    # T_CHUNK steps (4 or 8, dividing T; else 1) are loaded at once, so that their memory latencies overlap (one
    # load per step would wait for each in turn: these tensors are a few MB, and latency bounds them)
    tk = tl.arange(0, T_CHUNK)
    okk = ok[:, :, None]
    for t0 in range(0, T, T_CHUNK):
        xs = tl.load(x_ptr + xo[:, :, None] + (t0 + tk)[None, None, :] * sxt, mask=okk, other=0.0)
        if HAS_RES:
            rs = tl.load(r_ptr + ro[:, :, None] + (t0 + tk)[None, None, :] * srt, mask=okk, other=0.0)
        for k in tl.static_range(T_CHUNK):
            t = t0 + k
            z = _step_of(xs, k, T_CHUNK).to(tl.float32)
            if HAS_SCALE:
                z = z * scale
            if HAS_SHIFT:
                z = z + shift
            if ROUND_AFFINE:  # stored in x's dtype before the residual comes, as a separate add would store it
                z = z.to(x_ptr.dtype.element_ty).to(tl.float32)
            if HAS_RES:
                r = _step_of(rs, k, T_CHUNK).to(tl.float32)
                if not RES_POST:
                    z = z + r
            if STORE_Z:  # the sum in its own dtype; the neuron fires from the value stored, as a reader would
                zq = z.to(z_ptr.dtype.element_ty)
                tl.store(z_ptr + t * szt + zo, zq, mask=ok)
                z = zq.to(tl.float32)
            spike, v = _neuron_step(z, v, leak, v_th, v_reset, NEURON, HARD_RESET, DECAY_INPUT)
            if HAS_RES and RES_POST:  # residual + spikes, rounded once (a skip connection after the neuron)
                tl.store(y_ptr + t * syt + yo, (r + spike.to(tl.float32)).to(y_ptr.dtype.element_ty), mask=ok)
            else:
                tl.store(y_ptr + t * syt + yo, spike.to(y_ptr.dtype.element_ty), mask=ok)
    if STORE_V:
        tl.store(vo_ptr + n * son + s[:, None] * sos + c[None, :] * soc, v, mask=ok)


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    """A per-channel scale or shift as the kernel reads it: in its own float type (loaded into fp32, exactly), so
    that an fp16 bias costs no conversion kernel per call."""
    if t.dtype in (torch.float32, torch.float16, torch.bfloat16) and t.is_contiguous():
        return t
    return t.float().contiguous()


def _as_tncs(t: torch.Tensor) -> torch.Tensor:
    """View [T, N, C, *spatial] as [T, N, C, S] without copying when the spatial dims merge."""
    T, N, C = t.shape[:3]
    if t.dim() == 3:
        return t.unsqueeze(-1)
    try:
        return t.view(T, N, C, -1)
    except RuntimeError:
        # spatial dims do not merge under these strides: go through channels_last-like contiguous
        return t.permute(0, 1, *range(3, t.dim()), 2).contiguous().movedim(-1, 2).view(T, N, C, -1)


def _merges(t: torch.Tensor) -> bool:
    """Whether ``t`` ``[T, N, C, *spatial]`` views as ``[T, N, C, S]`` without a copy."""
    try:
        t.view(*t.shape[:3], -1)
        return True
    except RuntimeError:
        return False


def _empty_in_layout(x: torch.Tensor, dtype) -> torch.Tensor:
    """An output shaped like ``x`` ``[T, N, C, *spatial]`` in ``x``'s memory layout where that is dense and its
    spatial dims merge, else contiguous: the kernel writes its ``[T, N, C, S]`` view, which must be the tensor
    itself."""
    y = torch.empty_like(x, dtype=dtype, memory_format=torch.preserve_format)
    if y.dim() > 3 and not _merges(y):
        y = torch.empty(x.shape, dtype=dtype, device=x.device)
    return y


def _empty_like_channels_last(x: torch.Tensor, dtype=None) -> torch.Tensor:
    """Empty tensor shaped like ``x`` ``[T, N, C, *sp]`` with channels innermost in memory."""
    perm = (0, 1, *range(3, x.dim()), 2)
    shape = [x.shape[i] for i in perm]
    inv = [perm.index(i) for i in range(x.dim())]
    return torch.empty(shape, dtype=dtype or x.dtype, device=x.device).permute(*inv)


def _membrane_like(y: torch.Tensor, dtype) -> torch.Tensor:
    """The final membrane ``[N, C, ...]`` for spikes ``y`` ``[T, N, C, ...]``, channels innermost where the spikes
    are (their tiles store it coalesced; stored NCHW, each element of a tile row lands in its own sector), else
    contiguous."""
    shape = tuple(y.shape[1:])
    if y.dim() > 3 and y.stride(2) == 1 and shape[1] > 1:
        strides, step = [0] * len(shape), shape[1]
        for d in range(len(shape) - 1, 1, -1):
            strides[d], step = step, step * shape[d]
        strides[0], strides[1] = step, 1
        # (a tensor of its own, not a view of one: a neuron may detach its membrane in place)
        return torch.empty_strided(shape, strides, dtype=dtype, device=y.device)
    return torch.empty(shape, dtype=dtype, device=y.device)


def multistep_neuron(
    x: torch.Tensor,
    neuron: NeuronSpec | str = "lif",
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    return_v: bool = False,
    v_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
    residual_after: bool = False,
    preserve_layout: bool = False,
    return_sum: bool = False,
    round_affine: bool = False,
    **neuron_kwargs,
):
    """Run a neuron over ``x`` ``[T, N, C, ...]`` (or ``[T, N]``) in one kernel; returns spikes (and the
    final membrane ``[N, C, ...]`` in ``v_dtype`` (fp32 by default) and the spikes' memory layout, when
    ``return_v``; then the sum, when ``return_sum``).

    ``scale``/``shift`` (``[C]``) apply ``z = x * scale + shift`` first (BatchNorm in eval mode, folded),
    ``residual`` (shaped like ``x``) is added after them; with ``residual_after`` it is added to the spikes
    instead and ``residual + spikes`` is returned (in the output dtype, rounded once). ``v``: initial membrane
    ``[N, C, ...]``; None starts from the neuron's initial value. The spikes are written channels innermost
    (channels_last, what cuDNN's fast fp16 kernels take), or, with ``preserve_layout``, in ``x``'s memory layout
    (as the dense neuron modules write them, so that a dense op downstream sees the tensor it would see there).

    ``return_sum``: the neuron's input ``z = x * scale + shift + residual`` is written too, in the dtype torch's
    ``x + residual`` has (``x``'s without a residual) and ``x``'s memory layout, rounded once from fp32; the
    neuron fires from the rounded value, so its spikes and membrane are those of this function run on the
    returned sum. Not with ``residual_after``.

    ``round_affine``: ``x * scale + shift`` is rounded to ``x``'s dtype before the residual is added, as torch
    rounds the output of a separate add: with ``shift`` alone, the sum is then torch's ``(x + shift) + residual``
    bit for bit (a cuDNN convolution's bias, left out of the convolution, added here with the residual).
    """
    op = "multistep_neuron"
    spec = NeuronSpec.make(neuron, **neuron_kwargs)
    if x.dim() < 2:
        raise ValueError(f"{op}: expected [T, N, ...], got shape {tuple(x.shape)}")
    require_dtype(op, "x", x)
    require_triton_device(op, x, scale, shift, residual, v)
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"{op}: residual shape {tuple(residual.shape)} differs from x {tuple(x.shape)}")
    if residual_after and residual is None:
        raise ValueError(f"{op}: residual_after=True needs a residual")
    if return_sum and residual_after:
        raise ValueError(f"{op}: return_sum=True writes the neuron's input, which residual_after does not add to")
    xv = x if x.dim() >= 3 else x.unsqueeze(-1)
    T, N, C = xv.shape[:3]
    for name, p in (("scale", scale), ("shift", shift)):
        if p is not None and (p.dim() != 1 or p.shape[0] != C):
            raise ValueError(f"{op}: {name} must have shape [{C}], got {tuple(p.shape)}")
    if v is not None and tuple(v.shape) != tuple(x.shape[1:]):
        raise ValueError(f"{op}: v must have shape {tuple(x.shape[1:])}, got {tuple(v.shape)}")
    require_int32_indexable(op, x, residual, v)
    if preserve_layout:
        y = _empty_in_layout(xv, out_dtype or x.dtype)
    else:
        y = _empty_like_channels_last(xv, out_dtype or x.dtype)
    if v_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"multistep_neuron: v_dtype must be float32, float16 or bfloat16, got {v_dtype}")
    v_out = _membrane_like(y, v_dtype) if return_v else None
    z = None
    if return_sum:
        if residual is not None:
            require_dtype(op, "residual", residual)
        z_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
        z = _empty_in_layout(xv, z_dtype)
    x4, y4 = _as_tncs(xv), _as_tncs(y)
    z4 = _as_tncs(z) if z is not None else y4
    r4 = _as_tncs(residual if residual.dim() >= 3 else residual.unsqueeze(-1)) if residual is not None else y4
    v3 = (v if v.dim() >= 2 else v.unsqueeze(-1)).reshape(N, C, -1) if v is not None else y4[0]
    vo3 = v_out.view(N, C, -1) if v_out is not None else y4[0]
    S = x4.shape[3]
    if T and N and C and S:
        BLOCK_S, BLOCK_C, T_CHUNK = neuron_tile(C, S, T)
        if residual is not None and (r4.stride(2) == 1) != (x4.stride(2) == 1):
            # (a residual in the other memory order is exchanged through shared memory: eight steps of both
            # spilled registers on sm_90 with Triton 3.8; 208 registers a thread with 3.6)
            T_CHUNK = min(T_CHUNK, 4)
        grid = (cdiv(S, BLOCK_S), cdiv(C, BLOCK_C), N)
        ka = spec.kernel_args()
        launch(_multistep_kernel)[grid](
            x4, x4.stride(0), x4.stride(1), x4.stride(2), x4.stride(3),
            y4, y4.stride(0), y4.stride(1), y4.stride(2), y4.stride(3),
            r4, r4.stride(0), r4.stride(1), r4.stride(2), r4.stride(3),
            v3, v3.stride(0), v3.stride(1), v3.stride(2),
            vo3, vo3.stride(0), vo3.stride(1), vo3.stride(2),
            z4, z4.stride(0), z4.stride(1), z4.stride(2), z4.stride(3),
            _per_channel(scale) if scale is not None else y4,
            _per_channel(shift) if shift is not None else y4,
            T, N, C, S,
            ka["leak"], ka["v_threshold"], ka["v_reset"], ka["v_init"],
            NEURON=ka["neuron"], HARD_RESET=ka["hard_reset"], DECAY_INPUT=ka["decay_input"],
            HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, HAS_RES=residual is not None,
            HAS_V=v is not None, STORE_V=return_v, BLOCK_S=BLOCK_S, BLOCK_C=BLOCK_C, T_CHUNK=T_CHUNK,
            RES_POST=bool(residual_after), STORE_Z=z is not None, ROUND_AFFINE=bool(round_affine), num_warps=4,
        )
    if x.dim() == 2:
        y = y.squeeze(-1)
        if v_out is not None:
            v_out = v_out.squeeze(-1)
        if z is not None:
            z = z.squeeze(-1)
    out = (y, *((v_out,) if return_v else ()), *((z,) if return_sum else ()))
    return out if len(out) > 1 else y
