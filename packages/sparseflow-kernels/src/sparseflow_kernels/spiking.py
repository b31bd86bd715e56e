"""The fused spiking layer: conv + folded BatchNorm (+ residual) + neuron over all T steps in one kernel.

Three ways to run one layer, all exact to the same semantics (see :func:`spiking_conv2d`):

* ``"fused"``: one :func:`~sparseflow_kernels.conv._conv_kernel` launch; the membrane stays in registers
  across the T steps and only spikes are written (fp32 accumulation and neuron update in any storage dtype).
  With an :class:`Occupancy` of the input it skips all-zero (time step, tile, channel group) blocks, and with
  ``write_occupancy`` it writes the occupancy of its own spikes for the next layer (no prescan there).
* ``"fused"`` with ``ConvConfig(t_in_m=True)``: the GEMM rows hold every time step of a tile, for deep layers
  whose few pixels would otherwise leave most of the GPU idle.
* ``"cudnn"``: ``F.conv2d`` over the T*N batch, then :func:`multistep_neuron` (BatchNorm + neuron in one pass).
* ``"triton_conv"``: the same pair with the convolution on the Triton kernel (a steps-looped ``ConvConfig``, no
  neuron): an image stem of few channels, whose cuDNN kernels pad the channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._utils import (
    dot_precision,
    repeated_over_steps,
    require_int32_indexable,
    require_int32_numel,
    require_triton_device,
)
from .conv import launch_conv, pack_conv_weight, pools_in_epilogue
from .neuron import NeuronSpec, multistep_neuron
from .neuron_pool import multistep_neuron_pool, pool_args, pool_uncovered
from .occupancy import Occupancy, empty_codes, prescan
from .pool import max_pool2d
from .sparse_conv import conv_output_size, fold_affine, normalize_conv_args
from .tiling import ConvConfig, default_config, require_conv_groups_fit

PATHS = ("fused", "cudnn", "triton_conv")


def new_spike_tensor(T, N, C, H, W, dtype, device) -> torch.Tensor:
    """[T, N, C, H, W] with channels innermost in memory (each x[t] is channels_last)."""
    return torch.empty((T, N, H, W, C), dtype=dtype, device=device).permute(0, 1, 4, 2, 3)


def new_frames(B, C, H, W, dtype, device) -> torch.Tensor:
    """[B, C, H, W] channels_last: a convolution's output frames, as cuDNN writes them for channels_last input."""
    return torch.empty((B, C, H, W), dtype=dtype, device=device, memory_format=torch.channels_last)


def new_membrane(N, C, H, W, dtype, device) -> torch.Tensor:
    """[N, C, H, W] channels_last, the spikes' layout: a tensor of its own, not a view (a neuron may detach its
    membrane in place, as SpikingJelly's ``detach`` does)."""
    return new_frames(N, C, H, W, dtype, device)


def pool_steps(spikes: torch.Tensor, pool) -> torch.Tensor:
    """``F.max_pool2d`` of every step of ``spikes`` ``[T, N, C, H, W]`` (``pool``: ``(kernel_size, stride, padding)``)
    with :func:`~sparseflow_kernels.pool.max_pool2d`, in the spikes' layout."""
    T, N = spikes.shape[:2]
    pooled = max_pool2d(_flat_tn(spikes), *pool)
    return pooled.view(T, N, *pooled.shape[1:])


def _flat_tn(t: torch.Tensor) -> torch.Tensor:
    """[T, N, C, H, W] -> [T*N, C, H, W]: a view when T and N merge (always for our own outputs, which the
    kernels write through it), else a copy (inputs only: a static input repeated by stride 0, say), channels_last
    where each step is."""
    try:
        return t.view(t.shape[0] * t.shape[1], *t.shape[2:])
    except RuntimeError:
        if t.dim() == 5 and t[0].is_contiguous(memory_format=torch.channels_last) and not t[0].is_contiguous():
            flat = torch.empty((t.shape[0] * t.shape[1], *t.shape[2:]), dtype=t.dtype, device=t.device,
                               memory_format=torch.channels_last)
            flat.view(t.shape).copy_(t)
            return flat
        return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def spiking_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    neuron: str | NeuronSpec = "lif",
    tau: float = 2.0,
    decay_input: bool = True,
    v_threshold: float = 1.0,
    v_reset: float | None = 0.0,
    beta: float | None = None,
    v: torch.Tensor | None = None,
    return_v: bool = False,
    v_dtype: torch.dtype = torch.float32,
    residual: torch.Tensor | None = None,
    residual_after: bool = False,
    return_sum: bool = False,
    pool: tuple | None = None,
    occupancy: Occupancy | None = None,
    sparse: bool = False,
    write_occupancy: bool = False,
    occupancy_group: int = 16,
    path: str = "fused",
    config: ConvConfig | None = None,
    packed_weight: torch.Tensor | None = None,
    fp32_precision: str = "tf32x3",
):
    """A spiking layer over all time steps: for each t, ``y = conv2d(x[t], weight, bias, stride, padding)``,
    ``z = y * scale + shift`` (per output channel, when given: BatchNorm folded) ``+ residual[t]``, then the
    neuron, with its membrane carried from t to t+1.

    ``x``: ``[T, N, C, H, W]``, spikes or any real values, fp32/fp16/bf16. Returns spikes
    ``[T, N, C_out, H_out, W_out]`` in ``x``'s dtype (each step channels_last), then the final membrane
    (``[N, C_out, H_out, W_out]`` in ``v_dtype``, fp32 by default; the update itself is always fp32) when
    ``return_v``, then the sum when ``return_sum`` (below), then an :class:`Occupancy` of the spikes when
    ``write_occupancy``.

    Neurons (SpikingJelly semantics): ``"lif"`` (``tau``, ``decay_input``; divided by tau as SpikingJelly
    does), ``"if"``, ``"plif"`` (pass ``NeuronSpec.make("plif", decay=sigmoid(w))`` for SpikingJelly's exact
    arithmetic, or ``tau = 1 / sigmoid(w)``), hard reset to ``v_reset`` or soft reset when ``v_reset is None``;
    ``"leaky"`` is snnTorch's ``Leaky`` (``beta``; ``v_reset=None`` for "subtract", 0.0 for "zero").
    ``v``: initial membrane ``[N, C_out, H_out, W_out]``; None starts at SpikingJelly's initial value.

    ``residual`` (shaped like the output) is added before the neuron (``neuron(bn(conv(x)) + residual)``, a
    ResNet block); with ``residual_after=True`` it is added to the spikes instead and the layer returns
    ``residual + spikes`` (a Transformer block's skip connection around a spiking projection); it must then
    have ``x``'s dtype, the sum's dtype.

    ``return_sum`` (with a residual added before the neuron): the neuron's input ``bn(conv(x)) + residual`` is
    returned too, after the membrane, as separate ops store it: ``bn(conv(x))`` rounded to ``x``'s dtype, then the
    sum rounded to the dtype of ``x + residual``, in the spikes' layout. The neuron fires from the stored sum, so
    the spikes and membrane are those of :func:`multistep_neuron` run on it. This is the residual stream of a
    network whose neurons come before their convolutions (MS-ResNet): one kernel writes the sum, which the skip
    connection reads, and the spikes of the neuron that reads it.

    ``pool`` ``(kernel_size, stride, padding)``: the spikes go through ``F.max_pool2d`` with these arguments (the
    max pool after the neuron of a spiking VGG or DVS network) and only the pooled ones are returned; the membrane
    stays the full map's. The ``"cudnn"`` path runs the neuron and the pool in one kernel
    (:func:`~sparseflow_kernels.neuron_pool.multistep_neuron_pool`, which needs every output pixel in a window),
    the fused one pools its spikes in its epilogue where the windows do not overlap and divide its steps-looped
    tiles and the map (:func:`~sparseflow_kernels.conv.pools_in_epilogue`: only the pooled spikes are written), and
    with :func:`~sparseflow_kernels.pool.max_pool2d` after it otherwise. Not with a residual, the sum or the
    occupancy.

    An ``x`` repeated over the steps by stride 0 (``frame.expand(T, ...)``, see :func:`repeated_over_steps`) is
    convolved once, on ``x[0]``, and only the epilogue and the neuron run over T: by the ``"cudnn"`` path, the same
    values up to the rounding of a convolution over another batch size (cuDNN may pick another algorithm for it);
    by the fused kernel with its steps looped (not ``t_in_m``, no occupancy), each tile's sums once, bit for bit those
    of the input repeated in memory.

    Skipping: ``occupancy`` (of ``x`` viewed as ``[T*N, C, H, W]``, e.g. written by the previous layer) or
    ``sparse=True`` (run the prescan here) skip all-zero blocks; otherwise every block is computed.
    ``path="cudnn"`` runs ``F.conv2d`` plus one fused BatchNorm/neuron kernel instead; ``path="triton_conv"`` the
    same with the convolution on the Triton kernel of ``config`` (steps looped), which writes it channels_last.
    """
    op = "spiking_conv2d"
    if x.dim() != 5:
        raise ValueError(f"{op}: expected x of shape [T, N, C, H, W], got {tuple(x.shape)}")
    if path not in PATHS:
        raise ValueError(f"{op}: path must be one of {PATHS}, got {path!r}")
    spec = NeuronSpec.make(neuron, tau=tau, decay_input=decay_input, v_threshold=v_threshold,
                           v_reset=v_reset, beta=beta)
    T, N = x.shape[:2]
    step = x[0] if T else x.new_empty(x.shape[1:])  # one time step: the checks of F.conv2d's arguments
    stride, padding, _ = normalize_conv_args(op, step, weight, bias, stride, padding, 1, 1)
    _, C, H, W = step.shape
    CO, _, KH, KW = weight.shape
    OH = conv_output_size(H, KH, stride[0], padding[0], 1)
    OW = conv_output_size(W, KW, stride[1], padding[1], 1)
    for name, p in (("scale", scale), ("shift", shift)):
        if p is not None and (p.dim() != 1 or p.shape[0] != CO):
            raise ValueError(f"{op}: {name} must have shape [{CO}], got {tuple(p.shape)}")
    if residual is not None and tuple(residual.shape) != (T, N, CO, OH, OW):
        raise ValueError(f"{op}: residual must have shape {(T, N, CO, OH, OW)}, got {tuple(residual.shape)}")
    if residual_after:
        if residual is None:
            raise ValueError(f"{op}: residual_after=True needs a residual")
        if residual.dtype != x.dtype:
            raise ValueError(f"{op}: a residual added after the neuron must have x's dtype {x.dtype}, "
                             f"got {residual.dtype}")
        if write_occupancy:
            raise ValueError(f"{op}: write_occupancy describes spikes; not available with residual_after")
    if return_sum and (residual is None or residual_after or write_occupancy):
        raise ValueError(f"{op}: return_sum=True returns the neuron's input bn(conv(x)) + residual: it needs a "
                         "residual added before the neuron, and writes no occupancy")
    if v is not None and tuple(v.shape) != (N, CO, OH, OW):
        raise ValueError(f"{op}: v must have shape {(N, CO, OH, OW)}, got {tuple(v.shape)}")
    if pool is not None:
        if residual is not None or return_sum or write_occupancy:
            raise ValueError(f"{op}: pool pools the spikes; not with a residual, return_sum or write_occupancy")
        if not isinstance(pool, (tuple, list)) or len(pool) != 3:
            raise ValueError(f"{op}: pool must be (kernel_size, stride, padding), got {pool!r}")
        pool = pool_args(*pool, op=op)
        why = pool_uncovered(OH, OW, *pool)
        if why and path != "fused":
            raise ValueError(f"{op}: the {path!r} path pools in its neuron kernel, which needs every pixel in a "
                             f"window of the pool; {why}")
    require_triton_device(op, x, weight, bias, scale, shift, residual, v)
    require_int32_indexable(op, x, residual)
    require_int32_numel(op, "output", (T, N, CO, OH, OW))

    sc, sh = fold_affine(bias, scale, shift)
    cfg = (config or default_config(C, CO)) if path != "cudnn" else None
    if path == "triton_conv" and cfg.t_in_m:
        raise ValueError(f"{op}: path='triton_conv' convolves the frames on their own: a steps-looped config, not "
                         "t_in_m")
    # the fused kernel pools its spikes itself where the windows divide its tiles and the map; else the pool follows
    k = pool[0][0] if pool is not None and cfg is not None and pools_in_epilogue(cfg, pool, OH, OW) else 1
    out = new_spike_tensor(T, N, CO, OH // k, OW // k, x.dtype, x.device) if path == "fused" else None
    if v_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{op}: v_dtype must be float32, float16 or bfloat16, got {v_dtype}")
    # the fused kernel's final membrane channels innermost, as its spikes: its stores coalesce (NCHW scattered them)
    v_out = new_membrane(N, CO, OH, OW, v_dtype, x.device) if return_v and path == "fused" else None
    occ_out = None
    z = new_spike_tensor(T, N, CO, OH, OW, torch.promote_types(x.dtype, residual.dtype), x.device) \
        if return_sum and path == "fused" else None

    if path != "fused":
        if write_occupancy:
            raise ValueError(f"{op}: write_occupancy needs path='fused'")
        if path == "cudnn":
            # channels_last in and out: cuDNN's NHWC kernels without its own layout conversions (an NCHW image into
            # the stem cost two transposes of the [T*N, 64, 112, 112] output on the H100), and the neuron kernel
            # reads channels fastest
            wl = weight.contiguous(memory_format=torch.channels_last)

            def conv(frames):
                return F.conv2d(frames.contiguous(memory_format=torch.channels_last), wl, None, stride, padding)
        else:
            require_conv_groups_fit(op, C, cfg)
            w = packed_weight if packed_weight is not None else pack_conv_weight(weight, cfg, x.dtype)

            def conv(frames):
                y = new_frames(frames.shape[0], CO, OH, OW, x.dtype, x.device)
                if frames.shape[0]:
                    launch_conv(frames, w, CO, KH, KW, stride, padding, (1, 1), T=1, N=frames.shape[0], out=y,
                                cfg=cfg, prec=dot_precision(x.dtype, fp32_precision))
                return y
        if repeated_over_steps(x):  # the same input at every step: conv(x[t]) = conv(x[0]), computed once
            y = conv(x[0])
            y = y.unsqueeze(0).expand(T, *y.shape)
        else:
            y = conv(_flat_tn(x)).view(T, N, CO, OH, OW)
        if pool is not None:
            res = multistep_neuron_pool(y, spec, kernel_size=pool[0], stride=pool[1], padding=pool[2], scale=sc,
                                        shift=sh, v=v, return_v=return_v, v_dtype=v_dtype, out_dtype=x.dtype)
        else:
            res = multistep_neuron(y, spec, scale=sc, shift=sh, residual=residual,
                                   residual_after=residual_after, v=v, return_v=return_v, v_dtype=v_dtype,
                                   out_dtype=x.dtype, return_sum=return_sum, round_affine=return_sum)
        res = res if isinstance(res, tuple) else (res,)
        out = res[0]
        v_out = res[1] if return_v else None
        z = res[-1] if return_sum else None
    else:
        require_conv_groups_fit(op, C, cfg)
        # the same frame at every step: a steps-looped tile convolves it once (same sums, bit for bit)
        static = repeated_over_steps(x) and not cfg.t_in_m and occupancy is None and not sparse
        xf = x[0] if static else _flat_tn(x)
        occ = None
        if occupancy is not None:
            occupancy.check_matches(op, xf.shape, cfg.block_k)
            occ = occupancy
        elif sparse:
            occ = prescan(xf, (cfg.tile_h, cfg.tile_w), cfg.block_k)
        if write_occupancy:
            occ_out = empty_codes(T * N, CO, OH, OW, (cfg.tile_h, cfg.tile_w), occupancy_group, x.device)
        w = packed_weight if packed_weight is not None else pack_conv_weight(weight, cfg, x.dtype)
        if T * N:
            launch_conv(
                xf, w, CO, KH, KW, stride, padding, (1, 1), T=T, N=N,
                out=out.view(T * N, CO, OH // k, OW // k), cfg=cfg, prec=dot_precision(x.dtype, fp32_precision),
                scale=sc, shift=sh, residual=_flat_tn(residual) if residual is not None else None,
                v=v, v_out=v_out, occ=occ, occ_out=occ_out, occ_group=occupancy_group,
                residual_post=residual_after, sum_out=_flat_tn(z) if z is not None else None, pool=k,
                static=static, **spec.kernel_args(),
            )
        if pool is not None and k == 1:
            out = pool_steps(out, pool)
    result = [out]
    if return_v:
        result.append(v_out)
    if return_sum:
        result.append(z)
    if write_occupancy:
        result.append(Occupancy(codes=occ_out, shape=(T * N, CO, OH, OW), tile=(cfg.tile_h, cfg.tile_w),
                                group=occupancy_group))
    return result[0] if len(result) == 1 else tuple(result)
