"""The occupancy helpers shared by the kernels (private: ``triton.jit`` helpers, no API).

* writing: :func:`_edge_codes`, the 9-bit edge codes of one tile (the prescan of :mod:`~.occupancy` and the fused
  convolution's epilogue, which writes the occupancy of its own spikes);
* tiles: :func:`_tile_of` / :func:`_block_of` (a program's sample, output tile and channel block) and
  :func:`_tile_pixels` (the tile's pixels);
* reading: :func:`_receptive_groups` ORs the codes under an output tile's receptive field (edge-exact halo),
  :func:`_active_groups` for every channel group; :func:`_visit_list` lists the groups a K loop visits
  (:func:`_compact`; every group when dense) and :func:`_visit_group` reads the i-th of them. The sparse
  convolution kernels (conv, conv_transpose, depthwise) and the sparse GEMM (linear, from its block flags) use them.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_of(tile, TILES_H, TILES_W):
    """(sample, tile row, tile column) of program tile index ``tile`` (tiles of a sample row-major)."""
    return tile // (TILES_W * TILES_H), (tile // TILES_W) % TILES_H, tile % TILES_W


@triton.jit
def _block_of(pid, NUM_CB, TILES_H, TILES_W):
    """(channel block, sample, tile row, tile column) of program ``pid``: channel blocks fastest, then tiles."""
    b, th, tw = _tile_of(pid // NUM_CB, TILES_H, TILES_W)
    return pid % NUM_CB, b, th, tw


@triton.jit
def _tile_pixels(th, tw, H, W, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """(rows, columns, in-bounds mask) of the ``TILE_H * TILE_W`` pixels of tile (th, tw) of an H x W map."""
    p = tl.arange(0, TILE_H * TILE_W)
    oh = th * TILE_H + p // TILE_W
    ow = tw * TILE_W + p % TILE_W
    return oh, ow, (oh < H) & (ow < W)


@triton.jit
def _edge_codes(nz, TILE_H: tl.constexpr, TILE_W: tl.constexpr, GROUP: tl.constexpr, NUM_G: tl.constexpr):
    """Edge codes of one tile. ``nz``: int32 [TILE_H * TILE_W, NUM_G * GROUP], 1 where non-zero
    (rows outside the map must already be 0). Returns int32 [NUM_G]."""
    P: tl.constexpr = TILE_H * TILE_W
    g = tl.max(tl.reshape(nz, [P, NUM_G, GROUP]), axis=2)  # [P, NUM_G]
    p = tl.arange(0, P)
    pr = (p // TILE_W)[:, None]
    pc = (p % TILE_W)[:, None]
    top = pr == 0
    bot = pr == TILE_H - 1
    lef = pc == 0
    rig = pc == TILE_W - 1
    code = tl.max(g, axis=0)
    code |= tl.max(tl.where(top, g, 0), axis=0) << 1
    code |= tl.max(tl.where(bot, g, 0), axis=0) << 2
    code |= tl.max(tl.where(lef, g, 0), axis=0) << 3
    code |= tl.max(tl.where(rig, g, 0), axis=0) << 4
    code |= tl.max(tl.where(top & lef, g, 0), axis=0) << 5
    code |= tl.max(tl.where(top & rig, g, 0), axis=0) << 6
    code |= tl.max(tl.where(bot & lef, g, 0), axis=0) << 7
    code |= tl.max(tl.where(bot & rig, g, 0), axis=0) << 8
    return code


@triton.jit
def _code_bits(rsel, csel):
    """Which bit of a neighbour's edge code to test: rsel/csel 0 = all rows/cols, 1 = first, 2 = last."""
    edge_r = tl.where(rsel == 1, 2, 4)
    edge_c = tl.where(csel == 1, 8, 16)
    corner = 32 << tl.maximum((rsel - 1) * 2 + (csel - 1), 0)
    bits = tl.where(rsel == 0, tl.where(csel == 0, 1, edge_c), tl.where(csel == 0, edge_r, corner))
    return bits


@triton.jit
def _edge_sel(lo, hi, start, size):
    """Rows [lo, hi] of a producer tile starting at ``start``: 1 = only its first, 2 = only its last, else 0."""
    single = (lo == hi) & (size > 1)
    return tl.where(single & (lo == start), 1, tl.where(single & (hi == start + size - 1), 2, 0))


@triton.jit
def _receptive_groups(
    act, g, g_ok, occ_ptr, b, th, tw, sob, soh, sow, H, W,
    PAD_H, PAD_W, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    OCC_H: tl.constexpr, OCC_W: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
):
    """OR into ``act`` (int32, shaped like ``g``) whether occupancy group ``g`` (where ``g_ok``) is non-zero
    anywhere in the receptive field of output tile (th, tw) of sample ``b``, from the producer's edge codes."""
    r0 = th * (TILE_H * SH) - PAD_H
    r1 = tl.minimum(r0 + (TILE_H - 1) * SH + (KH - 1) * DH, H - 1)
    r0 = tl.maximum(r0, 0)
    c0 = tw * (TILE_W * SW) - PAD_W
    c1 = tl.minimum(c0 + (TILE_W - 1) * SW + (KW - 1) * DW, W - 1)
    c0 = tl.maximum(c0, 0)
    for a in range(r0 // OCC_H, r1 // OCC_H + 1):
        rsel = _edge_sel(tl.maximum(r0, a * OCC_H), tl.minimum(r1, a * OCC_H + OCC_H - 1), a * OCC_H, OCC_H)
        for bb in range(c0 // OCC_W, c1 // OCC_W + 1):
            csel = _edge_sel(tl.maximum(c0, bb * OCC_W), tl.minimum(c1, bb * OCC_W + OCC_W - 1),
                             bb * OCC_W, OCC_W)
            bits = _code_bits(rsel, csel)
            code = tl.load(occ_ptr + b * sob + a * soh + bb * sow + g, mask=g_ok, other=0)
            act |= ((code.to(tl.int32) & bits) != 0).to(tl.int32)
    return act


@triton.jit
def _active_groups(
    act, occ_ptr, b, th, tw, sob, soh, sow, NG, H, W,
    PAD_H, PAD_W, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    OCC_H: tl.constexpr, OCC_W: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, NG_P2: tl.constexpr,
):
    """OR into ``act`` (int32 [NG_P2]) the groups that are non-zero anywhere in the receptive field of
    output tile (th, tw) of sample ``b``, from the producer's edge codes."""
    g = tl.arange(0, NG_P2)
    return _receptive_groups(act, g, g < NG, occ_ptr, b, th, tw, sob, soh, sow, H, W, PAD_H, PAD_W,
                             TILE_H, TILE_W, OCC_H, OCC_W, KH, KW, SH, SW, DH, DW)


@triton.jit
def _compact(act, NG_P2: tl.constexpr):
    """int32 [NG_P2] of 0/1 -> (int32 [NG_P2] listing the active group indices first, their count)."""
    g = tl.arange(0, NG_P2)
    pos = tl.cumsum(act, axis=0) - 1  # slot of each active group
    hit = (pos[:, None] == g[None, :]) & (act[:, None] != 0)  # [group, slot]
    idx = tl.sum(tl.where(hit, g[:, None], 0), axis=0)
    return idx, tl.sum(act, axis=0)


@triton.jit
def _visit_list(act, NG, SPARSE: tl.constexpr, NG_P2: tl.constexpr):
    """(int32 [NG_P2] of group indices, count) a K loop visits: the active groups of ``act`` (``SPARSE``), else
    all ``NG`` groups in order (the list is then unused)."""
    if SPARSE:
        idx, n_groups = _compact(act, NG_P2)
    else:
        idx = tl.zeros([NG_P2], dtype=tl.int32)
        n_groups = NG
    return idx, n_groups


@triton.jit
def _visit_group(i, idx, SPARSE: tl.constexpr, NG_P2: tl.constexpr):
    """The group a K loop visits at step ``i``: read out of the list ``idx`` by the loop index alone (sparse; so
    every address is known ahead and the loop software-pipelines), else ``i`` itself."""
    if SPARSE:
        g = tl.sum(tl.where(tl.arange(0, NG_P2) == i, idx, 0), axis=0)
    else:
        g = i
    return g
