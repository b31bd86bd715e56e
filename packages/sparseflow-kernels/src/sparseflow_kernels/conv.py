"""The convolution kernel: one implicit-GEMM mainloop with a pluggable prologue and epilogue.

* prologue (``SPARSE``): which channel groups of the receptive field hold non-zeros, read from an
  :class:`~sparseflow_kernels.occupancy.Occupancy` (written by the prescan or by the layer that produced the
  input). The K loop then visits only those groups: a register bitmask, next group = its lowest set bit.
* mainloop: for every (group, tap) pair, a ``[pixels, BLOCK_K]`` input tile and a ``[BLOCK_K, BLOCK_N]``
  weight tile go through ``tl.dot`` on tensor cores, accumulating in fp32. The tiles are gathered by pointers
  (any stride, dilation, layout), or, with ``TMA`` (:attr:`ConvConfig.tma`, Hopper and later, stride 1, channels
  innermost), loaded by the tensor-memory accelerator through tensor descriptors: the input as a 5-D
  ``[T, N, H, W, C]`` descriptor whose box at ``(t, n, oh0 - pad + kh, ow0 - pad + kw, c0)`` is the tap's shifted
  tile, its out-of-bounds zero fill the padding, and the loads pipelined by the compiler.
* epilogue (``NEURON``): 0 stores ``acc * scale + shift`` (a plain convolution, bias or folded BatchNorm);
  1 (LIF), 2 (IF), 3 (snnTorch Leaky) and 4 (PLIF) add an optional residual, run the neuron over the time steps with the
  membrane in registers and store only the spikes; ``WRITE_OCC`` also writes the spikes' occupancy.
  ``RES_POST`` adds the residual to the spikes instead (``residual + neuron(...)``: a Transformer block's
  skip connection around a spiking projection), so that sum is what is stored. ``SUM_OUT`` stores the neuron's
  input as well (the residual stream of MS-ResNet's blocks, which the next block's first neuron and its skip
  connection read), rounded as separate ops round it.

Rows of the GEMM are the pixels of one output tile (``TILE_H x TILE_W``). With ``T_IN_M`` they are the pixels
of every time step (``T x TILE_H x TILE_W``), which gives deep, small layers T times more programs;
otherwise the program loops over T itself.

The prologue's helpers live in :mod:`._occupancy_jit`, the neuron step in :mod:`._epilogue_jit` (both shared with
the other kernels); the tile shapes in :mod:`.tiling`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._epilogue_jit import (
    NEURON_IF,
    NEURON_LEAKY,
    NEURON_LIF,
    NEURON_NONE,
    NEURON_PLIF,
    _neuron_scalars,
    _neuron_step,
    _step_of,
    pdl_enter,
)
from ._occupancy_jit import _active_groups, _block_of, _edge_codes, _visit_group, _visit_list
from ._utils import _traced, cdiv, interpreter_active, launch, multiprocessors, next_power_of_2
from .tiling import ConvConfig

__all__ = ["NEURON_IF", "NEURON_LEAKY", "NEURON_LIF", "NEURON_NONE", "NEURON_PLIF", "ConvConfig", "launch_conv",
           "multiprocessors", "pack_conv_weight", "pack_weight", "tile_counters", "tma_supported"]


# -------------------------------------------------------------------------------------------- mainloop
@triton.jit
def _mainloop(
    acc, xrow_ptr, ih0, iw0, row_ok, C, H, W, sxc, sxh, sxw,
    w_ptr, C_PAD, CO_PAD, co, idx, i0, i1,
    KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, BLOCK_K: tl.constexpr,
    SPARSE: tl.constexpr, NG_P2: tl.constexpr, PREC: tl.constexpr,
):
    """acc += sum over visited (group, tap) of x[rows, group channels at the tap] @ w[tap, group, co].

    One (group, tap) pair per iteration, iterations ``i0`` to ``i1`` (all: 0 to ``n_groups * KH * KW``; a share
    of them under split-K). Dense (``SPARSE`` false): every group in order. Sparse: the ``n_groups`` groups listed
    first in ``idx`` (registers); the group of iteration i is read out of ``idx`` by its loop index alone, so every
    address is known ahead and the loop software-pipelines.
    """
    KK: tl.constexpr = KH * KW
    ck = tl.arange(0, BLOCK_K)
    for i in range(i0, i1):
        c0 = _visit_group(i // KK, idx, SPARSE, NG_P2) * BLOCK_K
        tap = i % KK
        ih = ih0 + (tap // KW) * DH
        iw = iw0 + (tap % KW) * DW
        ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        cc = c0 + ck
        a = tl.load(
            xrow_ptr[:, None] + (ih * sxh + iw * sxw)[:, None] + cc[None, :] * sxc,
            mask=ok[:, None] & (cc < C)[None, :], other=0.0,
        )
        wt = tl.load(w_ptr + ((tap * C_PAD + cc) * CO_PAD)[:, None] + co[None, :])
        acc = tl.dot(a.to(wt.dtype), wt, acc, input_precision=PREC)
    return acc


@triton.jit
def _mainloop_im2col(
    acc, xrow_ptr, ih0, iw0, row_ok, C, H, W, sxc, sxh, sxw, w_ptr, CO_PAD, co,
    KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, BLOCK_K: tl.constexpr,
    PREC: tl.constexpr, K_BLOCKS: tl.constexpr,
):
    """acc += x[rows, (tap, channel) block] @ w[(tap, channel) block, co] over the flattened reduction index
    ``k = tap * C + c`` (``ConvConfig.im2col``), ``K_BLOCKS`` blocks (1 for 3 x 3 taps of up to 3 channels, 5 for a
    7 x 7 stem's 3), unrolled up to 2; the weight is packed ``[1, K_BLOCKS * BLOCK_K, CO_PAD]`` in that order,
    zero past ``KH * KW * C``."""
    kk0 = tl.arange(0, BLOCK_K)
    row = xrow_ptr + ih0 * sxh + iw0 * sxw
    if K_BLOCKS <= 2:  # unrolled
        for i in tl.static_range(K_BLOCKS):
            acc = _im2col_block(acc, row, i * BLOCK_K + kk0, ih0, iw0, row_ok, C, H, W, sxc, sxh, sxw, w_ptr, CO_PAD,
                                co, KH, KW, DH, DW, PREC)
    else:  # a loop (unrolled, each block's operands took shared memory of their own: 278 KB for 5 in fp32)
        for i in range(K_BLOCKS):
            acc = _im2col_block(acc, row, i * BLOCK_K + kk0, ih0, iw0, row_ok, C, H, W, sxc, sxh, sxw, w_ptr, CO_PAD,
                                co, KH, KW, DH, DW, PREC)
    return acc


@triton.jit
def _im2col_block(acc, row, kk, ih0, iw0, row_ok, C, H, W, sxc, sxh, sxw, w_ptr, CO_PAD, co,
                  KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, PREC: tl.constexpr):
    """One K block ``kk`` of :func:`_mainloop_im2col`: the gathered ``x`` tile times the weight rows."""
    tap = kk // C
    dh = (tap // KW) * DH
    dw = (tap % KW) * DW
    ih = ih0[:, None] + dh[None, :]
    iw = iw0[:, None] + dw[None, :]
    ok = row_ok[:, None] & (kk < KH * KW * C)[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    a = tl.load(row[:, None] + (dh * sxh + dw * sxw + (kk - tap * C) * sxc)[None, :], mask=ok, other=0.0)
    wt = tl.load(w_ptr + (kk * CO_PAD)[:, None] + co[None, :])
    return tl.dot(a.to(wt.dtype), wt, acc, input_precision=PREC)


@triton.jit
def _mainloop_tma(acc, x_desc, w_desc, t0, n, ih0, iw0, co0, i0, i1, C_PAD,
                  KH: tl.constexpr, KW: tl.constexpr, BM: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """:func:`_mainloop`'s sums in its order (group-major, then taps), every tile a tensor-descriptor load: the input
    box ``[T rows, 1, TILE_H, TILE_W, BLOCK_K]`` at the tap's shift from ``(t0, n, ih0, iw0)``, zero outside the map
    (the padding) and beyond the channels; the weight box ``[BLOCK_K, BLOCK_N]`` of the packed
    ``[KK*C_PAD, CO_PAD]``. Iterations ``i0`` to ``i1`` of the ``NG * KH * KW``."""
    KK: tl.constexpr = KH * KW
    for i in range(i0, i1):
        g = i // KK
        tap = i % KK
        a = x_desc.load([t0, n, ih0 + tap // KW, iw0 + tap % KW, g * BLOCK_K])
        wt = w_desc.load([tap * C_PAD + g * BLOCK_K, co0])
        acc = tl.dot(a.reshape(BM, BLOCK_K), wt, acc, input_precision=PREC)
    return acc


@triton.jit
def _mainloop_tma_flat(x_desc, w_desc, t0, n, p0, ow, W, co0, i0, i1, C_PAD, PAD_H, PAD_W,
                       KH: tl.constexpr, KW: tl.constexpr, BM: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """The convolution of ``BM`` rows that run through the map in row-major order (``FLAT``; ``KW`` 1 or 3, an
    output as wide as the input). The input is a 4-D ``[T, N, H*W, C]`` descriptor, so the tap ``(kh, kw)`` of the
    rows from pixel ``p0`` on is the box at pixel ``p0 + (kh - PAD_H) * W + kw - PAD_W``: zero above the first row
    and below the last (the descriptor's fill). A row whose column ``ow + kw - PAD_W`` leaves the map reads the
    next or previous row instead, so each column of taps sums into its own accumulator (three independent chains of
    tensor-core products, both operands straight from shared memory) and those rows are dropped from it at the end.
    Order: per column of taps, channel groups then kernel rows; iterations ``i0`` to ``i1`` of the ``NG * KH``."""
    acc0 = tl.zeros([BM, BLOCK_N], dtype=tl.float32)
    acc1 = tl.zeros([BM, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BM, BLOCK_N], dtype=tl.float32)
    for i in range(i0, i1):
        kh = i % KH
        c0 = (i // KH) * BLOCK_K
        q = p0 + (kh - PAD_H) * W - PAD_W
        wrow = kh * KW * C_PAD + c0
        acc0 = tl.dot(x_desc.load([t0, n, q, c0]).reshape(BM, BLOCK_K), w_desc.load([wrow, co0]), acc0,
                      input_precision=PREC)
        if KW == 3:
            acc1 = tl.dot(x_desc.load([t0, n, q + 1, c0]).reshape(BM, BLOCK_K), w_desc.load([wrow + C_PAD, co0]),
                          acc1, input_precision=PREC)
            acc2 = tl.dot(x_desc.load([t0, n, q + 2, c0]).reshape(BM, BLOCK_K),
                          w_desc.load([wrow + 2 * C_PAD, co0]), acc2, input_precision=PREC)
    col = ow - PAD_W
    acc = tl.where(((col >= 0) & (col < W))[:, None], acc0, 0.0)
    if KW == 3:
        acc += tl.where((col + 1 < W)[:, None], acc1, 0.0)  # (col + 1 >= 0 always: PAD_W is 1)
        acc += tl.where((col + 2 < W)[:, None], acc2, 0.0)
    return acc


@triton.jit
def _split_k_sum(acc, ws_ptr, cnt_ptr, tile, sk, BM: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
    """Split-K: store this program's partial sum of ``tile`` in the fp32 workspace, count it in the tile's counter,
    and return (the sum of the ``SPLIT_K`` partials in split order, True) to the last program to arrive, (zeros,
    False) to the others. The last one sets the counter back to 0 for the next launch. The sum's order is the same
    whichever program arrives last."""
    offs = tl.arange(0, BM)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    base = ws_ptr + tile.to(tl.int64) * (SPLIT_K * BM * BLOCK_N)
    tl.store(base + sk * (BM * BLOCK_N) + offs, acc)
    tl.debug_barrier()  # every thread's stores before the release below
    arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
    last = arrived == SPLIT_K - 1
    tl.debug_barrier()
    total = tl.zeros([BM, BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(SPLIT_K):
        total += tl.load(base + j * (BM * BLOCK_N) + offs, mask=(offs >= 0) & last, other=0.0, cache_modifier=".cg")
    tl.atomic_xchg(cnt_ptr + tile, 0, mask=last)
    return total, last


@triton.jit
def _stream_k_sum(acc, ws_ptr, cnt_ptr, tile, slot, n_slots, SLOTS, BM: tl.constexpr, BLOCK_N: tl.constexpr):
    """Stream-K: ``acc`` is this program's part of ``tile``'s reduction, the ``slot``-th of the tile's ``n_slots``
    parts (``SLOTS`` the workspace's parts per tile). A tile in one part returns (acc, True) at once. Otherwise the
    part goes into the fp32 workspace and the tile's counter as in :func:`_split_k_sum`, and the last program to
    arrive gets (the sum of the parts in slot order, True), the others (zeros, False)."""
    last = n_slots == 1
    if n_slots > 1:
        offs = tl.arange(0, BM)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        base = ws_ptr + tl.cast(tile, tl.int64) * SLOTS * (BM * BLOCK_N)
        tl.store(base + slot * (BM * BLOCK_N) + offs, acc)
        tl.debug_barrier()  # every thread's stores before the release below
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        last = arrived == n_slots - 1
        tl.debug_barrier()
        acc = tl.zeros([BM, BLOCK_N], dtype=tl.float32)
        for j in range(n_slots):
            acc += tl.load(base + j * (BM * BLOCK_N) + offs, mask=(offs >= 0) & last, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(cnt_ptr + tile, 0, mask=last)
    return acc, last


@triton.jit
def _pixels(p, th, tw, OH, OW, TILE_H: tl.constexpr, TILE_W: tl.constexpr, FLAT: tl.constexpr):
    """(rows, columns, in-bounds mask) of the local pixels ``p`` of tile (th, tw): a ``TILE_H x TILE_W`` tile, or
    with ``FLAT`` the ``TILE_W`` pixels from ``tw * TILE_W`` on in row-major order (``th`` is 0)."""
    if FLAT:
        q = tw * TILE_W + p
        oh = q // OW
        ow = q % OW
        ok = q < OH * OW
    else:
        oh = th * TILE_H + p // TILE_W
        ow = tw * TILE_W + p % TILE_W
        ok = (oh < OH) & (ow < OW)
    return oh, ow, ok


# ---------------------------------------------------------------------------------------------- kernel
@triton.jit
def _conv_kernel(
    # input [B, C, H, W] (B = T * N), weights packed [KH*KW, C_PAD, CO_PAD]
    x_ptr, sxb, sxc, sxh, sxw,
    w_ptr, C_PAD, CO_PAD,
    # output [B, CO, OH, OW]: conv result (NEURON 0) or spikes
    y_ptr, syb, syc, syh, syw,
    scale_ptr, shift_ptr,
    res_ptr, srb, src, srh, srw,
    v_ptr, svn, svc, svh, svw,
    vout_ptr, son, soc, soh, sow,
    occ_ptr, sob, soth, sotw,
    occo_ptr, sqb, sqh, sqw,
    T, N, C, H, W, CO, OH, OW, TILES_H, TILES_W, NUM_CB, NG, NG_OUT,
    PAD_H, PAD_W,
    leak, v_th, v_reset, v_init,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPARSE: tl.constexpr, OCC_H: tl.constexpr, OCC_W: tl.constexpr, NG_P2: tl.constexpr,
    NEURON: tl.constexpr, HARD_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RES: tl.constexpr,
    HAS_V: tl.constexpr, STORE_V: tl.constexpr, WRITE_OCC: tl.constexpr, OCC_GROUP: tl.constexpr,
    T_IN_M: tl.constexpr, T_P2: tl.constexpr, PREC: tl.constexpr, RES_POST: tl.constexpr = False,
    x_desc=None, w_desc=None, TMA: tl.constexpr = False, FLAT: tl.constexpr = False,
    FLATTEN_T: tl.constexpr = False, WARP_SPEC: tl.constexpr = False,
    ws_ptr=None, cnt_ptr=None, SPLIT_K: tl.constexpr = 1, TILE_N: tl.constexpr = 1,
    sum_ptr=None, SUM_OUT: tl.constexpr = False,
    SK_CHUNK=1, SK_SLOTS=1, STREAM_K: tl.constexpr = False, POOL: tl.constexpr = 1, IM2COL: tl.constexpr = False,
    K_BLOCKS: tl.constexpr = 1, STATIC: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    pdl_enter(PDL)
    leak, v_th, v_reset, v_init = _neuron_scalars(leak, v_th, v_reset, v_init)
    pid = tl.program_id(0)
    if T_IN_M:
        if STREAM_K:
            # the reduction iterations of all tiles in a row (channel blocks fastest), SK_CHUNK of them per program:
            # this program's share runs from the tail of one tile into the head of the next
            n_iter = NG * (KH if FLAT else KH * KW)
            g0 = pid * SK_CHUNK
            g1 = tl.minimum(g0 + SK_CHUNK, tl.cdiv(N, TILE_N) * TILES_H * TILES_W * NUM_CB * n_iter)
            for tile in range(g0 // n_iter, (g1 - 1) // n_iter + 1):
                _t_in_m_tile(
                    tile, pid, g0, g1, x_ptr, sxb, sxc, sxh, sxw, w_ptr, C_PAD, CO_PAD, y_ptr, syb, syc, syh, syw,
                    scale_ptr, shift_ptr, res_ptr, srb, src, srh, srw, v_ptr, svn, svc, svh, svw,
                    vout_ptr, son, soc, soh, sow, occ_ptr, sob, soth, sotw, occo_ptr, sqb, sqh, sqw,
                    T, N, C, H, W, CO, OH, OW, TILES_H, TILES_W, NUM_CB, NG, NG_OUT, PAD_H, PAD_W,
                    leak, v_th, v_reset, v_init, KH, KW, SH, SW, DH, DW, TILE_H, TILE_W, BLOCK_N, BLOCK_K,
                    SPARSE, OCC_H, OCC_W, NG_P2, NEURON, HARD_RESET, DECAY_INPUT, HAS_SCALE, HAS_SHIFT, HAS_RES,
                    HAS_V, STORE_V, WRITE_OCC, OCC_GROUP, T_P2, PREC, RES_POST, x_desc, w_desc, TMA, FLAT,
                    ws_ptr, cnt_ptr, SPLIT_K, TILE_N, sum_ptr, SUM_OUT, SK_CHUNK, SK_SLOTS, STREAM_K)
        else:  # one tile (a split of it with split-K); not a one-trip loop, which compiles to other code (Triton
            # 3.6, sm_90a: tma_tm_4x4_nb2 with a residual 170 registers instead of 151)
            _t_in_m_tile(
                pid // SPLIT_K, pid, 0, 0, x_ptr, sxb, sxc, sxh, sxw, w_ptr, C_PAD, CO_PAD, y_ptr, syb, syc, syh, syw,
                scale_ptr, shift_ptr, res_ptr, srb, src, srh, srw, v_ptr, svn, svc, svh, svw,
                vout_ptr, son, soc, soh, sow, occ_ptr, sob, soth, sotw, occo_ptr, sqb, sqh, sqw,
                T, N, C, H, W, CO, OH, OW, TILES_H, TILES_W, NUM_CB, NG, NG_OUT, PAD_H, PAD_W,
                leak, v_th, v_reset, v_init, KH, KW, SH, SW, DH, DW, TILE_H, TILE_W, BLOCK_N, BLOCK_K,
                SPARSE, OCC_H, OCC_W, NG_P2, NEURON, HARD_RESET, DECAY_INPUT, HAS_SCALE, HAS_SHIFT, HAS_RES,
                HAS_V, STORE_V, WRITE_OCC, OCC_GROUP, T_P2, PREC, RES_POST, x_desc, w_desc, TMA, FLAT,
                ws_ptr, cnt_ptr, SPLIT_K, TILE_N, sum_ptr, SUM_OUT, SK_CHUNK, SK_SLOTS, STREAM_K)
    else:
        cb, n, th, tw = _block_of(pid, NUM_CB, TILES_H, TILES_W)
        co, co_ok, scale, shift = _channels(cb, CO, scale_ptr, shift_ptr, BLOCK_N, HAS_SCALE, HAS_SHIFT)
        P: tl.constexpr = TILE_H * TILE_W
        oh, ow, row_ok = _pixels(tl.arange(0, P), th, tw, OH, OW, TILE_H, TILE_W, FLAT)
        out_ok = row_ok[:, None] & co_ok[None, :]
        ih0 = oh * SH - PAD_H
        iw0 = ow * SW - PAD_W
        if NEURON != 0:
            v = _initial_v(v_ptr, n, oh, ow, co, out_ok, svn, svc, svh, svw, v_init, HAS_V, P, BLOCK_N)
        if STATIC:  # one frame per sample (x is [N, C, H, W]): its convolution once, the neuron over every step
            acc_static = _step_conv(0, n, n, th, tw, cb, ow, ih0, iw0, row_ok, co, x_ptr, sxb, sxc, sxh, sxw, w_ptr,
                                    C_PAD, CO_PAD, occ_ptr, sob, soth, sotw, C, H, W, NG, PAD_H, PAD_W, x_desc, w_desc,
                                    KH, KW, SH, SW, DH, DW, TILE_H, TILE_W, BLOCK_N, BLOCK_K, SPARSE, OCC_H, OCC_W,
                                    NG_P2, PREC, TMA, FLAT, IM2COL, K_BLOCKS)
        # FLATTEN_T: the steps' K loops run as one software pipeline (the loads of step t + 1 are in flight during
        # step t's epilogue); WARP_SPEC: producer and consumer warps
        for t in tl.range(0, T, flatten=FLATTEN_T, warp_specialize=WARP_SPEC):
            b = t * N + n
            if STATIC:
                acc = acc_static
            else:
                acc = _step_conv(t, n, b, th, tw, cb, ow, ih0, iw0, row_ok, co, x_ptr, sxb, sxc, sxh, sxw,
                                 w_ptr, C_PAD, CO_PAD, occ_ptr, sob, soth, sotw, C, H, W, NG,
                                 PAD_H, PAD_W, x_desc, w_desc, KH, KW, SH, SW, DH, DW, TILE_H, TILE_W, BLOCK_N,
                                 BLOCK_K, SPARSE, OCC_H, OCC_W, NG_P2, PREC, TMA, FLAT, IM2COL, K_BLOCKS)
            rp = res_ptr + b * srb + (oh * srh + ow * srw)[:, None] + co[None, :] * src
            z = _affine_residual(acc, scale, shift, rp, out_ok, HAS_SCALE, HAS_SHIFT, HAS_RES, SUM_OUT, y_ptr,
                                 sum_ptr + b * syb + (oh * syh + ow * syw)[:, None] + co[None, :] * syc
                                 if SUM_OUT else None)
            if NEURON == 0:
                yp = y_ptr + b * syb + (oh * syh + ow * syw)[:, None] + co[None, :] * syc
                tl.store(yp, z.to(y_ptr.dtype.element_ty), mask=out_ok)
            else:
                spike, v = _neuron_step(z, v, leak, v_th, v_reset, NEURON, HARD_RESET, DECAY_INPUT)
                if POOL > 1:  # only the max over each POOL x POOL window of the spikes is stored
                    _store_pooled(spike, y_ptr, b, th, tw, co, co_ok, syb, syc, syh, syw, OH // POOL, OW // POOL,
                                  TILE_H, TILE_W, BLOCK_N, POOL)
                else:
                    _store_step(spike, y_ptr, b, oh, ow, co, out_ok, syb, syc, syh, syw,
                                occo_ptr, sqb, sqh, sqw, th, tw, cb, NG_OUT,
                                WRITE_OCC, TILE_H, TILE_W, BLOCK_N, OCC_GROUP,
                                res_ptr, srb, src, srh, srw, RES_POST)
        if STORE_V:  # the final membrane, [N, CO, OH, OW]
            vp = vout_ptr + (n * son + oh * soh + ow * sow)[:, None] + co[None, :] * soc
            tl.store(vp, v, mask=out_ok)


@triton.jit
def _step_conv(t, n, b, th, tw, cb, ow, ih0, iw0, row_ok, co, x_ptr, sxb, sxc, sxh, sxw, w_ptr, C_PAD, CO_PAD,
               occ_ptr, sob, soth, sotw, C, H, W, NG, PAD_H, PAD_W, x_desc, w_desc,
               KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
               DH: tl.constexpr, DW: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPARSE: tl.constexpr, OCC_H: tl.constexpr,
               OCC_W: tl.constexpr, NG_P2: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr, FLAT: tl.constexpr,
               IM2COL: tl.constexpr, K_BLOCKS: tl.constexpr):
    """The fp32 convolution of one steps-looped tile (th, tw) of output channel block ``cb``: input frame ``b``
    of ``x`` (step ``t`` of sample ``n`` in the tensor descriptor), by tensor-descriptor loads (``TMA``, ``FLAT``),
    (tap, channel) blocks (``IM2COL``) or channel groups by pointers (``SPARSE``: only the groups the occupancy
    lists)."""
    P: tl.constexpr = TILE_H * TILE_W
    acc = tl.zeros([P, BLOCK_N], dtype=tl.float32)
    if FLAT:
        acc = _mainloop_tma_flat(x_desc, w_desc, t, n, tw * TILE_W, ow, W, cb * BLOCK_N, 0, NG * KH, C_PAD,
                                 PAD_H, PAD_W, KH, KW, P, BLOCK_N, BLOCK_K, PREC)
    elif TMA:
        acc = _mainloop_tma(acc, x_desc, w_desc, t, n, th * TILE_H - PAD_H, tw * TILE_W - PAD_W, cb * BLOCK_N,
                            0, NG * KH * KW, C_PAD, KH, KW, P, BLOCK_K, PREC)
    elif IM2COL:
        acc = _mainloop_im2col(acc, x_ptr + b * sxb + tl.zeros([P], dtype=tl.int32), ih0, iw0, row_ok,
                               C, H, W, sxc, sxh, sxw, w_ptr, CO_PAD, co, KH, KW, DH, DW, BLOCK_K, PREC, K_BLOCKS)
    else:
        act = tl.zeros([NG_P2], dtype=tl.int32)
        if SPARSE:
            act = _active_groups(act, occ_ptr, b, th, tw, sob, soth, sotw, NG, H, W,
                                 PAD_H, PAD_W, TILE_H, TILE_W, OCC_H, OCC_W, KH, KW, SH, SW, DH, DW, NG_P2)
        idx, n_groups = _visit_list(act, NG, SPARSE, NG_P2)
        acc = _mainloop(acc, x_ptr + b * sxb + tl.zeros([P], dtype=tl.int32), ih0, iw0, row_ok,
                        C, H, W, sxc, sxh, sxw, w_ptr, C_PAD, CO_PAD, co, idx, 0, n_groups * KH * KW,
                        KH, KW, DH, DW, BLOCK_K, SPARSE, NG_P2, PREC)
    return acc


@triton.jit
def _channels(cb, CO, scale_ptr, shift_ptr, BLOCK_N: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """(output channels, their mask, scale, shift) of channel block ``cb``."""
    co = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < CO
    scale = tl.load(scale_ptr + co, mask=co_ok, other=1.0) if HAS_SCALE else tl.full([BLOCK_N], 1.0, tl.float32)
    shift = tl.load(shift_ptr + co, mask=co_ok, other=0.0) if HAS_SHIFT else tl.zeros([BLOCK_N], tl.float32)
    return co, co_ok, scale, shift


@triton.jit
def _t_in_m_tile(
    tile, pid, g0, g1, x_ptr, sxb, sxc, sxh, sxw, w_ptr, C_PAD, CO_PAD, y_ptr, syb, syc, syh, syw,
    scale_ptr, shift_ptr, res_ptr, srb, src, srh, srw, v_ptr, svn, svc, svh, svw,
    vout_ptr, son, soc, soh, sow, occ_ptr, sob, soth, sotw, occo_ptr, sqb, sqh, sqw,
    T, N, C, H, W, CO, OH, OW, TILES_H, TILES_W, NUM_CB, NG, NG_OUT, PAD_H, PAD_W,
    leak, v_th, v_reset, v_init,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPARSE: tl.constexpr, OCC_H: tl.constexpr, OCC_W: tl.constexpr, NG_P2: tl.constexpr,
    NEURON: tl.constexpr, HARD_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RES: tl.constexpr,
    HAS_V: tl.constexpr, STORE_V: tl.constexpr, WRITE_OCC: tl.constexpr, OCC_GROUP: tl.constexpr,
    T_P2: tl.constexpr, PREC: tl.constexpr, RES_POST: tl.constexpr, x_desc, w_desc, TMA: tl.constexpr,
    FLAT: tl.constexpr, ws_ptr, cnt_ptr, SPLIT_K: tl.constexpr, TILE_N: tl.constexpr, sum_ptr, SUM_OUT: tl.constexpr,
    SK_CHUNK, SK_SLOTS, STREAM_K: tl.constexpr,
):
    """One tile with every time step in the GEMM's rows (``T_IN_M``): rows = (t, sample, pixel) of its ``TILE_N``
    samples. Its reduction whole, or this program's share of it: split ``SPLIT_K`` ways (program ``pid``'s split),
    or with ``STREAM_K`` the global iterations ``g0`` to ``g1`` of all tiles in a row, the partial sums combined by
    the last program to finish (:func:`_split_k_sum`, :func:`_stream_k_sum`), which alone runs the epilogue."""
    cb, n, th, tw = _block_of(tile, NUM_CB, TILES_H, TILES_W)  # (n: the tile's block of TILE_N samples)
    n = n * TILE_N  # its first sample
    co, co_ok, scale, shift = _channels(cb, CO, scale_ptr, shift_ptr, BLOCK_N, HAS_SCALE, HAS_SHIFT)
    P: tl.constexpr = TILE_H * TILE_W
    BM: tl.constexpr = T_P2 * TILE_N * P
    r = tl.arange(0, BM)
    tt = r // (TILE_N * P)
    n_row = n + (r // P) % TILE_N
    oh, ow, row_ok = _pixels(r % P, th, tw, OH, OW, TILE_H, TILE_W, FLAT)
    row_ok = row_ok & (tt < T) & (n_row < N)
    b_row = tt * N + n_row
    ih0 = oh * SH - PAD_H
    iw0 = ow * SW - PAD_W
    act = tl.zeros([NG_P2], dtype=tl.int32)
    if SPARSE:
        for t in range(T):
            act = _active_groups(act, occ_ptr, t * N + n, th, tw, sob, soth, sotw, NG, H, W,
                                 PAD_H, PAD_W, TILE_H, TILE_W, OCC_H, OCC_W, KH, KW, SH, SW, DH, DW, NG_P2)
    idx, n_groups = _visit_list(act, NG, SPARSE, NG_P2)
    # this program's share of the reduction (all of it without split-K or stream-K)
    n_iter = n_groups * (KH if FLAT else KH * KW)
    sk = pid % SPLIT_K
    if STREAM_K:
        i0 = tl.maximum(g0 - tile * n_iter, 0)
        i1 = tl.minimum(g1 - tile * n_iter, n_iter)
    else:
        chunk = tl.cdiv(n_iter, SPLIT_K)
        i0 = sk * chunk
        i1 = tl.minimum(i0 + chunk, n_iter)
    acc = tl.zeros([BM, BLOCK_N], dtype=tl.float32)
    if FLAT:
        acc = _mainloop_tma_flat(x_desc, w_desc, 0, n, tw * TILE_W, ow, W, cb * BLOCK_N, i0, i1, C_PAD,
                                 PAD_H, PAD_W, KH, KW, BM, BLOCK_N, BLOCK_K, PREC)
    elif TMA:
        acc = _mainloop_tma(acc, x_desc, w_desc, 0, n, th * TILE_H - PAD_H, tw * TILE_W - PAD_W, cb * BLOCK_N,
                            i0, i1, C_PAD, KH, KW, BM, BLOCK_K, PREC)
    else:
        acc = _mainloop(acc, x_ptr + b_row * sxb, ih0, iw0, row_ok, C, H, W, sxc, sxh, sxw,
                        w_ptr, C_PAD, CO_PAD, co, idx, i0, i1,
                        KH, KW, DH, DW, BLOCK_K, SPARSE, NG_P2, PREC)
    live = sk == sk  # (a scalar true) every program runs the epilogue, or with split-K the last of a tile
    if SPLIT_K > 1:
        acc, live = _split_k_sum(acc, ws_ptr, cnt_ptr, tile, sk, BM, BLOCK_N, SPLIT_K)
    if STREAM_K:  # the programs sharing this tile: from the one holding its first iteration to its last one's
        first = (tile * n_iter) // SK_CHUNK
        acc, live = _stream_k_sum(acc, ws_ptr, cnt_ptr, tile, pid - first, ((tile + 1) * n_iter - 1) // SK_CHUNK
                                  - first + 1, SK_SLOTS, BM, BLOCK_N)
    row_ok = row_ok & live
    rp = res_ptr + b_row[:, None] * srb + (oh * srh + ow * srw)[:, None] + co[None, :] * src
    z = _affine_residual(acc, scale, shift, rp, row_ok[:, None] & co_ok[None, :], HAS_SCALE, HAS_SHIFT, HAS_RES,
                         SUM_OUT, y_ptr, sum_ptr + b_row[:, None] * syb + (oh * syh + ow * syw)[:, None]
                         + co[None, :] * syc if SUM_OUT else None)
    # per time step: its rows of z (T_P2 x TILE_N * P x BLOCK_N), then the neuron in registers
    Q: tl.constexpr = TILE_N * P
    zs = tl.permute(tl.reshape(z, [T_P2, Q, BLOCK_N]), (1, 2, 0))  # [Q, BLOCK_N, T_P2]: the steps innermost
    q = tl.arange(0, Q)
    oh, ow, q_ok = _pixels(q % P, th, tw, OH, OW, TILE_H, TILE_W, FLAT)  # now those of one step
    if TILE_N > 1:
        n = n + q // P  # the sample of each row
        q_ok = q_ok & (n < N)
    out_ok = (q_ok & live)[:, None] & co_ok[None, :]
    v = _initial_v(v_ptr, n, oh, ow, co, out_ok, svn, svc, svh, svw, v_init, HAS_V, Q, BLOCK_N)
    for t in tl.static_range(T_P2):
        if t < T:
            zt = _step_of(zs, t, T_P2)
            spike, v = _neuron_step(zt, v, leak, v_th, v_reset, NEURON, HARD_RESET, DECAY_INPUT)
            _store_step(spike, y_ptr, t * N + n, oh, ow, co, out_ok, syb, syc, syh, syw,
                        occo_ptr, sqb, sqh, sqw, th, tw, cb, NG_OUT,
                        WRITE_OCC, TILE_H, TILE_W, BLOCK_N, OCC_GROUP,
                        res_ptr, srb, src, srh, srw, RES_POST)
    if STORE_V:  # the final membrane, [N, CO, OH, OW]
        vp = vout_ptr + (n * son + oh * soh + ow * sow)[:, None] + co[None, :] * soc
        tl.store(vp, v, mask=out_ok)


# -------------------------------------------------------------------------------------------- epilogue
@triton.jit
def _affine_residual(acc, scale, shift, rp, ok, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                     HAS_RES: tl.constexpr, SUM_OUT: tl.constexpr = False, y_ptr=None, sp=None):
    """``acc * scale + shift`` (per output channel) ``+`` the residual at ``rp`` (fp32). ``SUM_OUT``: the sum as a
    separate add writes it, stored at ``sp``: ``acc * scale + shift`` rounded to the output's (``x``'s) type, plus
    the residual, rounded to the type at ``sp``; the neuron then reads the stored value."""
    z = acc
    if HAS_SCALE:
        z = z * scale[None, :]
    if HAS_SHIFT:
        z = z + shift[None, :]
    if SUM_OUT:
        z = z.to(y_ptr.dtype.element_ty).to(tl.float32)
    if HAS_RES:
        z = z + tl.load(rp, mask=ok, other=0.0).to(tl.float32)
    if SUM_OUT:
        zq = z.to(sp.dtype.element_ty)
        tl.store(sp, zq, mask=ok)
        z = zq.to(tl.float32)
    return z


@triton.jit
def _initial_v(v_ptr, n, oh, ow, co, ok, svn, svc, svh, svw, v_init,
               HAS_V: tl.constexpr, P: tl.constexpr, BLOCK_N: tl.constexpr):
    if HAS_V:
        vp = v_ptr + (n * svn + oh * svh + ow * svw)[:, None] + co[None, :] * svc
        v = tl.load(vp, mask=ok, other=0.0).to(tl.float32)
    else:
        v = tl.full([P, BLOCK_N], v_init, dtype=tl.float32)
    return v


@triton.jit
def _store_step(spike, y_ptr, b, oh, ow, co, ok, syb, syc, syh, syw,
                occo_ptr, sqb, sqh, sqw, th, tw, cb, NG_OUT,
                WRITE_OCC: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                BLOCK_N: tl.constexpr, OCC_GROUP: tl.constexpr,
                res_ptr, srb, src, srh, srw, RES_POST: tl.constexpr):
    yp = y_ptr + (b * syb + oh * syh + ow * syw)[:, None] + co[None, :] * syc
    if RES_POST:  # residual + spikes: one rounding of the exact sum, as the dense add
        rp = res_ptr + (b * srb + oh * srh + ow * srw)[:, None] + co[None, :] * src
        val = tl.load(rp, mask=ok, other=0.0).to(tl.float32) + spike.to(tl.float32)
        tl.store(yp, val.to(y_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(yp, spike.to(y_ptr.dtype.element_ty), mask=ok)
    if WRITE_OCC:
        GPB: tl.constexpr = BLOCK_N // OCC_GROUP
        nz = (spike & ok).to(tl.int32)
        code = _edge_codes(nz, TILE_H, TILE_W, OCC_GROUP, GPB)
        g = cb * GPB + tl.arange(0, GPB)
        tl.store(occo_ptr + b * sqb + th * sqh + tw * sqw + g, code.to(tl.int16), mask=g < NG_OUT)


@triton.jit
def _store_pooled(spike, y_ptr, b, th, tw, co, co_ok, syb, syc, syh, syw, PH, PW,
                  TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr, POOL: tl.constexpr):
    """The max pool (``POOL`` wide, stride ``POOL``) of one step's spikes of tile (th, tw), stored at its
    ``TILE_H / POOL x TILE_W / POOL`` pooled pixels of the ``PH x PW`` pooled map. The windows lie inside the tile (its
    sides are multiples of ``POOL``), and inside the map or outside it whole (the map's sides are too): a window past
    the map's edge, whose rows computed spikes from zero padding, is not stored."""
    QH: tl.constexpr = TILE_H // POOL
    QW: tl.constexpr = TILE_W // POOL
    s = tl.reshape(spike.to(tl.int32), [QH, POOL, QW, POOL, BLOCK_N])
    s = tl.reshape(tl.max(tl.max(s, axis=3), axis=1), [QH * QW, BLOCK_N])
    q = tl.arange(0, QH * QW)
    ph = th * QH + q // QW
    pw = tw * QW + q % QW
    ok = ((ph < PH) & (pw < PW))[:, None] & co_ok[None, :]
    tl.store(y_ptr + (b * syb + ph * syh + pw * syw)[:, None] + co[None, :] * syc, s.to(y_ptr.dtype.element_ty),
             mask=ok)


def pools_in_epilogue(cfg: ConvConfig, pool, OH: int, OW: int) -> bool:
    """Whether the fused kernel with ``cfg`` pools its spikes itself (:func:`launch_conv`'s ``pool``): a max pool
    ``pool`` ``((k, k), (k, k), (0, 0))`` of non-overlapping windows, ``k`` 2 or 4, that divides the steps-looped
    tile (``cfg.t_in_m`` False, rows of ``tile_h > 1``) and the ``OH x OW`` map."""
    (kh, kw), (sh, sw), (ph, pw) = pool
    k = kh
    return (kh == kw == sh == sw == k and ph == pw == 0 and k in (2, 4) and not cfg.t_in_m and cfg.tile_h > 1
            and cfg.tile_h % k == 0 and cfg.tile_w % k == 0 and OH % k == 0 and OW % k == 0
            and cfg.split_k == 1 and not cfg.stream_k and cfg.tile_n == 1)


def pack_conv_weight(weight: torch.Tensor, cfg: ConvConfig, dtype: torch.dtype) -> torch.Tensor:
    """The weight packed as configuration ``cfg`` reads it: :func:`pack_weight`, or with ``cfg.im2col`` the
    ``[1, K_PAD, CO_PAD]`` matrix of the flattened (tap, channel) reduction (``k = (kh * KW + kw) * C + c``)."""
    if cfg.im2col:
        CO, C, KH, KW = weight.shape
        weight = weight.detach().permute(0, 2, 3, 1).reshape(CO, KH * KW * C, 1, 1)
    return pack_weight(weight, cfg.block_k, cfg.block_n, dtype)


def pack_weight(weight: torch.Tensor, block_k: int, block_n: int, dtype: torch.dtype) -> torch.Tensor:
    """``[CO, C, KH, KW]`` -> ``[KH*KW, C_PAD, CO_PAD]`` in ``dtype``, zero-padded so the kernel loads
    ``[BLOCK_K, BLOCK_N]`` weight tiles without masks, contiguous along the output channels."""
    CO, C, KH, KW = weight.shape
    c_pad = cdiv(C, block_k) * block_k
    co_pad = cdiv(CO, block_n) * block_n
    packed = torch.zeros((KH * KW, c_pad, co_pad), dtype=dtype, device=weight.device)
    packed[:, :C, :CO] = weight.detach().permute(2, 3, 1, 0).reshape(KH * KW, C, CO).to(dtype)
    return packed


#: how the per-step loop of a tensor-descriptor convolution without ``t_in_m`` compiles (``tl.range`` options)
TMA_LOOP = {"flatten": True, "warp_specialize": False}


def tma_supported(x: torch.Tensor, kernel_size, stride, padding, dilation=(1, 1)) -> bool:
    """Whether a convolution of ``x`` ``[B, C, H, W]`` can load its tiles through tensor descriptors
    (:attr:`ConvConfig.tma`): a GPU with a tensor-memory accelerator (compute capability 9.0 or later; any device
    under the CPU interpreter), fp16 or bf16, a "same" convolution (stride and dilation 1, ``2 * padding ==
    kernel_size - 1``), channels innermost and rows contiguous in memory (channels_last) and the other strides and
    the base 16-byte aligned."""
    if tuple(stride) != (1, 1) or tuple(dilation) != (1, 1) or x.dim() != 4:
        return False
    if any(2 * p != k - 1 for p, k in zip(padding, kernel_size)):
        return False
    _B, _C, H, W = x.shape
    if x.dtype not in (torch.float16, torch.bfloat16) or x.stride(1) != 1 or (H > 1 and x.stride(2) != W * x.stride(3)):
        return False
    size = x.element_size()
    if x.data_ptr() % 16 or any((s * size) % 16 for i, s in enumerate(x.stride()) if i != 1 and x.shape[i] > 1):
        return False
    if x.device.type == "cuda":
        return not interpreter_active() and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return interpreter_active()


_COUNTERS: dict = {}


def tile_counters(device: torch.device, n: int) -> torch.Tensor:
    """At least ``n`` zero int32 arrival counters for split-K's and stream-K's tiles, kept per device and stream: the
    program that combines a tile sets its counter back to 0, so they stay zero between launches and no launch pays for a
    fill of its own (a kernel more in a graph of 20-microsecond layers). Launches on one stream run in turn; a
    stream of its own gets counters of its own. Counters outgrown are kept: a captured CUDA graph may point at them."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    held = _COUNTERS.setdefault((device, stream), [])
    if not held or held[-1].numel() < n:
        held.append(torch.zeros(max(n, 1024), dtype=torch.int32, device=device))
    return held[-1]


def _descriptors(x, w_packed, T, N, cfg: ConvConfig):
    """The input as a descriptor over ``[T, N, H, W, C]`` (``x`` is ``[T*N, C, H, W]`` with sample ``t * N + n``)
    with ``[T rows, TILE_N, TILE_H, TILE_W, BLOCK_K]`` boxes (every step of the tile with ``t_in_m``, else one), or
    with ``tile_h == 1`` over ``[T, N, H*W, C]`` with ``[T rows, TILE_N, TILE_W, BLOCK_K]`` boxes (rows in row-major
    order across the map's rows), and the packed weight as ``[KK*C_PAD, CO_PAD]`` with ``[BLOCK_K, BLOCK_N]`` boxes."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    _B, C, H, W = x.shape
    sb, sc, sh, sw = x.stride()
    t_rows = next_power_of_2(T) if cfg.t_in_m else 1
    if cfg.tile_h == 1:
        x_desc = TensorDescriptor(x, [T, N, H * W, C], [N * sb, sb, sw, sc],
                                  [t_rows, cfg.tile_n, cfg.tile_w, cfg.block_k])
    else:
        x_desc = TensorDescriptor(x, [T, N, H, W, C], [N * sb, sb, sh, sw, sc],
                                  [t_rows, cfg.tile_n, cfg.tile_h, cfg.tile_w, cfg.block_k])
    w2 = w_packed.view(-1, w_packed.shape[2])
    return x_desc, TensorDescriptor(w2, list(w2.shape), list(w2.stride()), [cfg.block_k, cfg.block_n])


def launch_conv(
    x, w_packed, CO, KH, KW, stride, padding, dilation, *, T, N, out, cfg: ConvConfig, prec: str,
    scale=None, shift=None, residual=None, v=None, v_out=None, occ=None, occ_out=None,
    occ_group=16, neuron=NEURON_NONE, hard_reset=True, decay_input=True, leak=1.0, v_threshold=1.0,
    v_reset=0.0, v_init=0.0, residual_post=False, sum_out=None, pool: int = 1, static: bool = False,
):
    """Launch :func:`_conv_kernel`. ``x`` ``[T*N, C, H, W]``, ``out`` ``[T*N, CO, OH, OW]``,
    ``residual`` like ``out``, ``v``/``v_out`` ``[N, CO, OH, OW]`` fp32, ``occ`` an Occupancy of ``x``
    (sparse mode) or None (dense), ``occ_out`` codes ``[T*N, tiles_h, tiles_w, groups]`` to fill.
    ``residual_post``: the residual is added to the neuron's spikes (stored sum) instead of before the neuron.
    ``sum_out`` (strided as ``out``): the neuron's input ``x * scale + shift + residual`` is stored there too, the
    affine rounded to ``out``'s type before the add and the sum to ``sum_out``'s after it, as separate ops store them;
    the neuron reads the stored sum.
    ``pool`` (2 or 4, where :func:`pools_in_epilogue` holds): ``out`` is ``[T*N, CO, OH / pool, OW / pool]``, the max
    over each ``pool x pool`` window of the spikes (no residual, sum or occupancy then).
    ``static``: ``x`` is ``[N, C, H, W]``, the one input of every step (a static image): each tile convolves it once
    and runs the epilogue and the neuron over the T steps (steps-looped configurations, dense); the sums are those
    of the same configuration on the input repeated T times, bit for bit.
    ``cfg.tile_n`` samples share each tile (dense, no occupancy written).
    ``cfg.split_k`` shares each tile's reduction among that many programs, ``cfg.stream_k`` all tiles' reductions
    among that many programs per multiprocessor (both: an fp32 workspace of the partial sums, allocated here, and the
    arrival counters of :func:`tile_counters`). ``cfg.tma`` loads the tiles
    through tensor descriptors (:func:`tma_supported` must hold, dense only); with ``cfg.tile_h == 1`` a tile is then
    ``tile_w`` pixels in row-major order across the map's rows. Traced by ``torch.compile`` / ``torch.export`` the same
    configuration gathers them by pointers: the same products summed in the same order."""
    B, C, H, W = x.shape
    _, _, OH, OW = out.shape
    OH, OW = OH * pool, OW * pool  # (the convolution's output; out holds its pooled map)
    if (N if static else T * N) != B or out.shape[0] != T * N:
        raise ValueError(f"launch_conv: x holds {B} frames and out {out.shape[0]} for T={T}, N={N}"
                         f"{' with static=True (x: one frame per sample)' if static else ''}")
    if static and (cfg.t_in_m or occ is not None):
        raise ValueError("launch_conv: static=True convolves each steps-looped tile's frame once: not with "
                         "ConvConfig(t_in_m=True) or an input occupancy")
    if pool > 1 and (neuron == NEURON_NONE or residual is not None or sum_out is not None or occ_out is not None
                     or not pools_in_epilogue(cfg, ((pool, pool), (pool, pool), (0, 0)), OH, OW)):
        raise ValueError(f"launch_conv: pool={pool} needs a neuron, no residual, sum or occupancy output, and a "
                         "configuration whose steps-looped tiles the pool's windows divide")
    tma = cfg.tma and not _traced((x,))
    want = (1, cdiv(KH * KW * C, cfg.block_k) * cfg.block_k) if cfg.im2col else (KH * KW, cdiv(C, cfg.block_k) *
                                                                                   cfg.block_k)
    if tuple(w_packed.shape[:2]) != want or w_packed.shape[2] != cdiv(CO, cfg.block_n) * cfg.block_n:
        raise ValueError(f"launch_conv: the packed weight {tuple(w_packed.shape)} is not packed for this layer and "
                         f"configuration (expected {(*want, cdiv(CO, cfg.block_n) * cfg.block_n)}; pack it with "
                         "pack_conv_weight)")
    if cfg.im2col and occ is not None:  # (ConvConfig itself refuses im2col with t_in_m or tma)
        raise ValueError("ConvConfig(im2col=True) runs dense steps-looped tiles (no occupancy, t_in_m or tma)")
    if cfg.tma and cfg.stream_k:
        # (on the H200 the stream-K tiles with tensor-descriptor loads gave other bits on repeated calls of the same
        # input, where the same tiles with pointer loads gave the same bits on every call, on two streams and in a
        # CUDA graph: a race not understood yet, so the combination is not run)
        raise ValueError(f"ConvConfig(stream_k={cfg.stream_k}) with tensor descriptors (tma=True) is not supported: "
                         "its results differed between repeated calls on the GPU; use tma=False")
    flat = tma and cfg.tile_h == 1
    if flat and KW not in (1, 3):
        raise ValueError(f"ConvConfig(tma=True, tile_h=1) takes kernels 1 or 3 wide, got {KW}")
    tiles_h, tiles_w = (1, cdiv(OH * OW, cfg.tile_w)) if flat else (cdiv(OH, cfg.tile_h), cdiv(OW, cfg.tile_w))
    num_cb = cdiv(CO, cfg.block_n)
    ng = cdiv(C, cfg.block_k)
    dummy = out
    if occ is not None:
        occ_codes, occ_tile = occ.codes, occ.tile
    else:
        occ_codes, occ_tile = dummy, (1, 1)
    ng_out = occ_out.shape[-1] if occ_out is not None else 1
    if residual_post and (residual is None or neuron == NEURON_NONE or occ_out is not None):
        raise ValueError("residual_post needs a residual and a neuron, and no occupancy output")
    if sum_out is not None and (residual is None or residual_post or neuron == NEURON_NONE or occ_out is not None
                                or sum_out.stride() != out.stride()):
        raise ValueError("sum_out needs a residual added before a neuron, no occupancy output, and out's strides")
    if occ_out is not None and cfg.block_n % occ_group:
        raise ValueError(f"occupancy group {occ_group} must divide block_n {cfg.block_n}")
    if tma and (occ is not None or not tma_supported(x, (KH, KW), stride, padding, dilation)):
        raise ValueError("ConvConfig(tma=True) needs a dense 'same' convolution (stride and dilation 1, padding "
                         "(kernel - 1) / 2) of an fp16/bf16 channels_last input on a GPU with a tensor-memory "
                         "accelerator")
    descs = _descriptors(x, w_packed, 1 if static else T, N, cfg) if tma else (None, None)
    split = cfg.split_k
    if (split > 1 or cfg.tile_n > 1 or cfg.stream_k) and (occ is not None or occ_out is not None):
        raise ValueError(f"ConvConfig(split_k={split}, tile_n={cfg.tile_n}, stream_k={cfg.stream_k}) runs dense and "
                         "writes no occupancy")
    rows = cfg.tile_h * cfg.tile_w * cfg.tile_n * (next_power_of_2(T) if cfg.t_in_m else 1)
    n_tiles = cdiv(N, cfg.tile_n) * tiles_h * tiles_w * num_cb
    grid = (n_tiles * split,)
    sk_chunk = sk_slots = 1
    if split > 1:  # the partial sums, and one arrival counter per tile (reset by the tile's last program)
        ws = torch.empty(n_tiles * split * rows * cfg.block_n, device=x.device, dtype=torch.float32)
        cnt = tile_counters(x.device, n_tiles)
    elif cfg.stream_k:  # the tiles' iterations in equal shares, one per program; a tile in at most sk_slots parts
        n_iter = ng * (KH if flat else KH * KW)
        sk_chunk = cdiv(n_tiles * n_iter, cfg.stream_k * multiprocessors(x.device))
        sk_slots = cdiv(n_iter, sk_chunk) + 1
        grid = (cdiv(n_tiles * n_iter, sk_chunk),)
        ws = torch.empty(n_tiles * sk_slots * rows * cfg.block_n, device=x.device, dtype=torch.float32)
        cnt = tile_counters(x.device, n_tiles)
    else:
        ws = cnt = None
    res = residual if residual is not None else dummy
    vin = v if v is not None else dummy
    vo = v_out if v_out is not None else dummy
    oo = occ_out if occ_out is not None else occ_codes
    stage_bytes = (rows * cfg.block_k + cfg.block_k * cfg.block_n) * x.element_size() * (KW if flat else 1)
    num_stages = max(1, min(cfg.num_stages, (160 * 1024) // max(1, stage_bytes)))
    launch(_conv_kernel)[grid](
        x, *x.stride(),
        w_packed, w_packed.shape[1], w_packed.shape[2],
        out, *out.stride(),
        scale if scale is not None else dummy, shift if shift is not None else dummy,
        res, *res.stride(),
        vin, *vin.stride(),
        vo, *vo.stride(),
        occ_codes, *(occ_codes.stride()[:3]),
        oo, *(oo.stride()[:3]),
        T, N, C, H, W, CO, OH, OW, tiles_h, tiles_w, num_cb, ng, ng_out,
        padding[0], padding[1],
        float(leak), float(v_threshold), float(v_reset), float(v_init),
        KH=KH, KW=KW, SH=stride[0], SW=stride[1], DH=dilation[0], DW=dilation[1],
        TILE_H=cfg.tile_h, TILE_W=cfg.tile_w, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        SPARSE=occ is not None, OCC_H=occ_tile[0], OCC_W=occ_tile[1], NG_P2=next_power_of_2(ng),
        NEURON=neuron, HARD_RESET=hard_reset, DECAY_INPUT=decay_input,
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
        HAS_RES=residual is not None and not residual_post, RES_POST=bool(residual_post),
        HAS_V=v is not None, STORE_V=v_out is not None, WRITE_OCC=occ_out is not None,
        OCC_GROUP=occ_group,
        T_IN_M=cfg.t_in_m, T_P2=next_power_of_2(T) if cfg.t_in_m else 1, PREC=prec,
        x_desc=descs[0], w_desc=descs[1], TMA=tma, FLAT=flat,
        FLATTEN_T=tma and TMA_LOOP["flatten"], WARP_SPEC=tma and TMA_LOOP["warp_specialize"],
        ws_ptr=ws, cnt_ptr=cnt, SPLIT_K=split, TILE_N=cfg.tile_n, sum_ptr=sum_out, SUM_OUT=sum_out is not None,
        SK_CHUNK=sk_chunk, SK_SLOTS=sk_slots, STREAM_K=bool(cfg.stream_k), POOL=pool, IM2COL=cfg.im2col,
        K_BLOCKS=w_packed.shape[1] // cfg.block_k if cfg.im2col else 1, STATIC=bool(static),
        num_warps=cfg.num_warps, num_stages=num_stages,
    )
    return out
