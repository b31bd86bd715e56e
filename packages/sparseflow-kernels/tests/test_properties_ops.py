"""Property tests (hypothesis) of the other kernels against float64 torch references: ``sparse_linear``,
``sparse_conv1x1``, ``ssa_attention``, ``channel_dot``, ``grouped_conv2d`` (depthwise and grouped),
``sparse_conv_transpose2d``, ``sparse_batch_norm2d`` and ``max_pool2d``.

The same machinery as ``test_properties.py`` (its drawing helpers, value generators, special-value injection,
layouts, ``assert_like_dense`` and profiles): shapes with 1s and primes (never a multiple of a block), strides,
paddings, output paddings, dilations, fp32/fp16, contiguous / channels_last / strided views, densities from 0
to 1, non-binary values (0/1/2 spike counts, reals), NaN and +-Inf in the input (same NaN / +-Inf positions as
the dense op) and huge fp16 values (overflow exactly where the dense op, rounded once, overflows).
Every ``check_*(c, device)`` takes a case dict drawn by ``draw_*(pick)``; ``tests/gpu/test_gpu_properties.py``
runs them on CUDA; each returns its float64 reference. Output buffers are poisoned (NaN) so an element a kernel
forgets to write shows up.

Regression cases found on the way are kept as explicit tests at the end of the file.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_properties import (
    CHANNELS,
    DENSITIES,
    LAYOUTS,
    OUT_CHANNELS,
    SIZES,
    SPECIALS,
    add_specials,
    assert_keeps_layout,
    assert_like_dense,
    draw_conv,
    hyp_pick,
    make_values,
    prop,
    to_layout,
)

from sparseflow_kernels import (
    DepthwiseConfig,
    LinearConfig,
    channel_dot,
    default_config,
    grouped_conv2d,
    prescan,
    sparse_batch_norm2d,
    sparse_conv1x1,
    sparse_conv_transpose2d,
    sparse_linear,
    ssa_attention,
)
from sparseflow_kernels.naive import (
    batch_norm2d_reference,
    channel_dot_reference,
    conv1x1_reference,
    conv2d_reference,
    conv_transpose2d_reference,
    linear_reference,
    max_pool2d_reference,
    ssa_reference,
)
from sparseflow_kernels.pool import max_pool2d

# NaN/Inf cases make numpy (the interpreter's dot) warn: expected here
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]

VALUES = ["spike", "count", "real"]
DTYPES = [torch.float32, torch.float16]


class _PoisonedTorch:
    """``torch`` for a kernel module that allocates with ``torch.empty`` directly: the same module, except
    that ``empty`` returns NaN-filled tensors."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        return _poison(torch.empty(*args, **kwargs))


def _poison(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)


@pytest.fixture(autouse=True)
def _poison_op_outputs(monkeypatch):
    """Output buffers of these kernels start as NaN (flags as -1), like the conftest's for the conv kernels
    (depthwise, transpose and BatchNorm import ``empty_like_layout`` by name, so they are patched here)."""
    from sparseflow_kernels import attention as kattn
    from sparseflow_kernels import batchnorm as kbn
    from sparseflow_kernels import conv_transpose as kct
    from sparseflow_kernels import depthwise as kdw
    from sparseflow_kernels import linear as klin
    from sparseflow_kernels import pool as kpool

    def wrap(fn):
        return lambda *a, **k: _poison(fn(*a, **k))

    for mod, name in ((klin, "new_output"), (kattn, "new_output"), (kdw, "empty_like_layout"),
                      (kct, "empty_like_layout"), (kbn, "empty_like_layout")):
        monkeypatch.setattr(mod, name, wrap(getattr(mod, name)))
    monkeypatch.setattr(kpool, "torch", _PoisonedTorch())
    yield


def _d(t):
    """float64 CPU copy of exactly the values the kernel saw (``None`` stays ``None``)."""
    return None if t is None else t.detach().double().cpu()


def _tc_split(x: torch.Tensor, precision: str = "tf32x3") -> bool:
    """fp32 through tf32x3 on tensor cores: NaN accepted where the dense op has +-Inf (see test_properties)."""
    return x.is_cuda and x.dtype == torch.float32 and precision == "tf32x3"


def _huge(c: dict) -> bool:
    return bool(c.get("huge")) and c["dtype"] == torch.float16


def _hugify(t: torch.Tensor, factor: float = 3e4) -> torch.Tensor:
    """``t * factor`` kept inside the fp16 range (6e4 at most): the inputs stay finite, their sums overflow."""
    return (t * factor).clamp(-6e4, 6e4)


def _affine(c: dict, n: int, gen, device):
    """fp32 (scale, shift) of a folded BatchNorm, or (None, None)."""
    if not c.get("affine"):
        return None, None
    scale = (0.5 + torch.rand(n, generator=gen, dtype=torch.float64)).float().to(device)
    shift = (0.3 * torch.randn(n, generator=gen, dtype=torch.float64)).float().to(device)
    return scale, shift


# -------------------------------------------------------------------------------------- sparse_linear


LINEAR_CONFIGS = [None, (16, 16, 16), (32, 16, 32), (16, 32, 16)]


def draw_linear(pick) -> dict:
    return dict(
        lead=pick([(), (1,), (3,), (2, 5), (2, 1, 3), (67,)]), K=pick([1, 2, 3, 5, 17, 33, 70]),
        N=pick([1, 2, 7, 17, 33]), bias=pick([True, False]), affine=pick([False, True]), dtype=pick(DTYPES),
        layout=pick(["contiguous", "strided", "transposed", "channels_last"]), density=pick(DENSITIES),
        values=pick(VALUES), special=pick(SPECIALS), huge=pick([False, False, True]),
        config=pick(LINEAR_CONFIGS), dense=pick([False, False, True]), seed=pick(range(1 << 16)),
    )


def _transposed_layout(x64: torch.Tensor, dtype, layout: str, device, dims=(-1, 0)) -> torch.Tensor:
    """``to_layout`` plus ``"transposed"``: dims ``dims`` swapped in memory (a transpose view of a contiguous
    tensor; 1-D tensors stay contiguous)."""
    if layout == "transposed" and x64.dim() >= 2:
        return x64.to(device=device, dtype=dtype).transpose(*dims).contiguous().transpose(*dims)
    if layout == "transposed" or (layout == "channels_last" and x64.dim() != 4):
        layout = "contiguous"
    return to_layout(x64, dtype, layout, device)


def check_linear(c: dict, device="cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(c["seed"])
    dtype, K, N = c["dtype"], c["K"], c["N"]
    x64 = make_values((*c["lead"], K), c["density"], c["values"], gen)
    if _huge(c):
        x64 = _hugify(x64)  # sums past the fp16 range: outputs overflow to +-inf like the dense op's
    x64 = add_specials(x64, c["special"], gen)
    x = _transposed_layout(x64, dtype, c["layout"], device)  # "transposed": features outermost
    w = torch.randn(N, K, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    b = torch.randn(N, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype) if c["bias"] else None
    scale, shift = _affine(c, N, gen, device)
    cfg = LinearConfig(*c["config"]) if c["config"] else None
    precision = c.get("fp32_precision", "tf32x3")
    y = sparse_linear(x, w, b, config=cfg, scale=scale, shift=shift, dense=c["dense"], fp32_precision=precision)
    ref = linear_reference(_d(x), _d(w), _d(b), _d(scale), _d(shift))
    assert_like_dense(y, ref, dtype, f"sparse_linear {c}: ", inf_may_be_nan=_tc_split(x, precision))
    return ref


@prop(30)
def test_sparse_linear_property(data):
    check_linear(draw_linear(hyp_pick(data)))


# ------------------------------------------------------------------------------------- sparse_conv1x1


def draw_conv1x1(pick) -> dict:
    return dict(
        B=pick([None, 1, 2, 3]), C=pick([*CHANNELS, 33]), CO=pick([*OUT_CHANNELS, 33]),
        L=pick([1, 2, 5, 13, 17, 70]), w3d=pick([False, True]), bias=pick([True, False]),
        affine=pick([False, True]), dtype=pick(DTYPES), layout=pick(["contiguous", "strided", "transposed"]),
        density=pick(DENSITIES), values=pick(VALUES), special=pick(SPECIALS), huge=pick([False, False, True]),
        config=pick(LINEAR_CONFIGS), dense=pick([False, False, True]), seed=pick(range(1 << 16)),
    )


def check_conv1x1(c: dict, device="cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(c["seed"])
    dtype, C, CO = c["dtype"], c["C"], c["CO"]
    shape = (C, c["L"]) if c["B"] is None else (c["B"], C, c["L"])
    x64 = make_values(shape, c["density"], c["values"], gen)
    if _huge(c):
        x64 = _hugify(x64)
    x64 = add_specials(x64, c["special"], gen)
    # "transposed": channels innermost ([B, L, C] memory), as after a token-major projection
    x = _transposed_layout(x64, dtype, c["layout"], device, dims=(-1, -2))
    w = torch.randn(CO, C, 1, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    b = torch.randn(CO, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype) if c["bias"] else None
    scale, shift = _affine(c, CO, gen, device)
    cfg = LinearConfig(*c["config"]) if c["config"] else None
    y = sparse_conv1x1(x, w if c["w3d"] else w[:, :, 0], b, config=cfg, scale=scale, shift=shift,
                       dense=c["dense"])
    ref = conv1x1_reference(_d(x), _d(w), _d(b), _d(scale), _d(shift))
    assert_like_dense(y, ref, dtype, f"sparse_conv1x1 {c}: ", inf_may_be_nan=_tc_split(x))
    return ref


@prop(25)
def test_sparse_conv1x1_property(data):
    check_conv1x1(draw_conv1x1(hyp_pick(data)))


# -------------------------------------------------------------------------------------- ssa_attention


def draw_ssa(pick) -> dict:
    return dict(
        lead=pick([(), (1,), (2,), (2, 3)]), H=pick([1, 2, 3]), D=pick([1, 2, 3, 5, 17, 33]),
        L=pick([1, 2, 5, 17, 37, 70]), scale=pick([0.125, 0.25, 1.0, 0.3]), dtype=pick(DTYPES),
        layout=pick(["contiguous", "strided", "qkv-slices"]), density=pick(DENSITIES),
        values=pick(VALUES), special=pick(SPECIALS), where=pick(["q", "k", "v"]),
        huge=pick([False, False, True]), block_l=pick([16, 32]), dense=pick([False, False, True]),
        seed=pick(range(1 << 16)),
    )


def check_ssa(c: dict, device="cpu") -> torch.Tensor:
    """``(v @ k^T) @ q * scale`` against float64 torch. The kernel keeps ``v @ k^T`` in fp32 and rounds once at
    the end, so the reference is the float64 product rounded once to the storage dtype (a literal fp16 torch
    ``v @ k^T`` would round, and may overflow, in between)."""
    gen = torch.Generator().manual_seed(c["seed"])
    dtype = c["dtype"]
    shape = (*c["lead"], c["H"], c["D"], c["L"])
    t64 = {}
    for name in ("q", "k", "v"):
        t = make_values(shape, c["density"], c["values"], gen)
        if _huge(c):
            t = _hugify(t, 3e4 if name == "q" else 60.0)  # v @ k^T up to ~1e5 L, times 3e4: past fp16
        t64[name] = add_specials(t, c["special"], gen) if name == c["where"] else t
    if c["layout"] == "qkv-slices":  # SpikingJelly's q, k, v: views into one [..., 3, H, D, L] tensor
        qkv = torch.stack([t64["q"], t64["k"], t64["v"]], dim=-4).to(device=device, dtype=dtype)
        q, k, v = qkv.unbind(-4)
    else:
        q, k, v = (to_layout(t64[n], dtype, c["layout"], device) for n in ("q", "k", "v"))
    y = ssa_attention(q, k, v, c["scale"], block_l=c["block_l"], dense=c["dense"])
    ref = ssa_reference(_d(q), _d(k), _d(v), c["scale"])
    assert y.is_contiguous()
    # pass 2 always runs fp32 tf32x3 on tensor cores
    assert_like_dense(y, ref, dtype, f"ssa_attention {c}: ", inf_may_be_nan=q.is_cuda)
    return ref


@prop(30)
def test_ssa_attention_property(data):
    check_ssa(draw_ssa(hyp_pick(data)))


# ---------------------------------------------------------------------------------------- channel_dot


def draw_channel_dot(pick) -> dict:
    return dict(
        B=pick([1, 2, 3]), C=pick([1, 3, 17, 70]), spatial=pick([(), (1,), (5,), (3, 7), (2, 3, 5), (200,)]),
        dtype=pick(DTYPES), layout=pick(LAYOUTS), density=pick(DENSITIES), values=pick(VALUES),
        special=pick(SPECIALS), where=pick(["a", "b"]), huge=pick([False, False, True]),
        seed=pick(range(1 << 16)),
    )


def check_channel_dot(c: dict, device="cpu") -> torch.Tensor:
    """``(a * b)`` summed over the dims after the second, against float64 rounded once (the kernel sums the
    products in fp32; a literal fp16 ``(a * b).sum()`` would overflow each product on its own)."""
    gen = torch.Generator().manual_seed(c["seed"])
    dtype, B, C = c["dtype"], c["B"], c["C"]
    shape = (B, C, *c["spatial"])
    ab = []
    for name in ("a", "b"):
        t = make_values(shape, c["density"] if name == "a" else max(c["density"], 0.2), c["values"], gen)
        if _huge(c):
            t = _hugify(t, 3e4 if name == "a" else 2.0)  # sums past the fp16 range
        t = add_specials(t, c["special"], gen) if name == c["where"] else t
        layout = c["layout"] if (c["layout"] != "channels_last" or t.dim() == 4) else "contiguous"
        ab.append(to_layout(t, dtype, layout, device))
    a, b = ab
    y = channel_dot(a, b)
    ref = channel_dot_reference(_d(a), _d(b))
    assert_like_dense(y, ref, dtype, f"channel_dot {c}: ")
    return ref


@prop(30)
def test_channel_dot_property(data):
    check_channel_dot(draw_channel_dot(hyp_pick(data)))


# ------------------------------------------------------------------------------------- grouped_conv2d


def draw_grouped(pick) -> dict:
    c = draw_conv(pick)  # geometry, values, layouts, specials of the sparse_conv2d property
    del c["C"], c["CO"]  # C = groups * cg input channels, CO = groups * cog outputs
    c.update(groups=pick([1, 2, 3, 5]), cg=pick([1, 1, 2, 3, 17]), cog=pick([1, 2, 3]), affine=pick([False, True]),
             path=pick(["auto", "direct", "direct", "gemm"]),
             config=pick([None, None, (4, 8, 4), (2, 4, 16), (1, 1, 8)]),
             # the direct kernel given the producer's occupancy: (tile, channels per code)
             occupancy=pick([None, None, ((8, 8), 4), ((1, 4), 1), ((2, 8), 16)]))
    return c


def check_grouped(c: dict, device="cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(c["seed"])
    dtype, g = c["dtype"], c["groups"]
    C, CO = g * c["cg"], g * c["cog"]
    x64 = make_values((c["N"], C, c["H"], c["W"]), c["density"], c["values"], gen)
    if _huge(c):
        x64 = _hugify(x64)
    x64 = add_specials(x64, c["special"], gen)
    x = to_layout(x64, dtype, c["layout"], device)
    w = torch.randn(CO, C // g, c["KH"], c["KW"], generator=gen, dtype=torch.float64).to(device=device,
                                                                                            dtype=dtype)
    b = torch.randn(CO, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype) if c["bias"] else None
    scale, shift = _affine(c, CO, gen, device)
    cfg = DepthwiseConfig(*c["config"]) if c.get("config") and c["path"] == "direct" else None
    block = None if c["block_size"] == 8 else c["block_size"]
    occ = prescan(x, *c["occupancy"]) if c.get("occupancy") and not c["dense"] else None
    y = grouped_conv2d(x, w, b, c["stride"], c["padding"], c["dilation"], g, scale=scale, shift=shift,
                       occupancy=occ, config=cfg, block_size=block, path=c["path"], dense=c["dense"])
    ref = conv2d_reference(_d(x), _d(w), _d(b), c["stride"], c["padding"], c["dilation"], g, scale=_d(scale),
                           shift=_d(shift))
    gemm = c["path"] == "gemm" or (c["path"] == "auto" and C // g >= 16 and g > 1)
    assert_like_dense(y, ref, dtype, f"grouped_conv2d {c}: ", inf_may_be_nan=gemm and _tc_split(x))
    assert_keeps_layout(y, x, c)
    return ref


@prop(24)
def test_grouped_conv2d_property(data):
    check_grouped(draw_grouped(hyp_pick(data)))


# ---------------------------------------------------------------------------- sparse_conv_transpose2d


def draw_conv_transpose(pick) -> dict:
    c = dict(
        N=pick([1, 2]), C=pick(CHANNELS), CO=pick(OUT_CHANNELS), H=pick(SIZES), W=pick(SIZES),
        KH=pick([1, 2, 3, 4, 5]), KW=pick([1, 3]), stride=(pick([1, 2, 3]), pick([1, 2])),
        padding=(pick([0, 1, 2]), pick([0, 1])), output_padding=(pick([0, 1, 2]), pick([0, 1])),
        bias=pick([True, False]), affine=pick([False, True]), dtype=pick(DTYPES), layout=pick(LAYOUTS),
        density=pick(DENSITIES), values=pick(VALUES), special=pick(SPECIALS), huge=pick([False, False, True]),
        block_size=pick([8, 16, (4, 8)]), dense=pick([False, False, True]),
        occupancy=pick([None, None, (8, 8), (1, 4), (2, 16)]),  # the producer's occupancy tile
        seed=pick(range(1 << 16)),
    )
    # output_padding below the stride; an output of at least one pixel (F.conv_transpose2d would refuse)
    c["output_padding"] = tuple(min(op, s - 1) for op, s in zip(c["output_padding"], c["stride"]))
    pad = list(c["padding"])
    for i, (size, k) in enumerate(((c["H"], c["KH"]), (c["W"], c["KW"]))):
        while pad[i] and (size - 1) * c["stride"][i] - 2 * pad[i] + k + c["output_padding"][i] < 1:
            pad[i] -= 1
    c["padding"] = tuple(pad)
    return c


def check_conv_transpose(c: dict, device="cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(c["seed"])
    dtype, C, CO = c["dtype"], c["C"], c["CO"]
    x64 = make_values((c["N"], C, c["H"], c["W"]), c["density"], c["values"], gen)
    if _huge(c):
        x64 = _hugify(x64)
    x64 = add_specials(x64, c["special"], gen)
    x = to_layout(x64, dtype, c["layout"], device)
    w = torch.randn(C, CO, c["KH"], c["KW"], generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    b = torch.randn(CO, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype) if c["bias"] else None
    scale, shift = _affine(c, CO, gen, device)
    occ = None
    if c.get("occupancy") and not c["dense"]:
        occ = prescan(x, c["occupancy"], default_config(C, CO, c["block_size"]).block_k)
    y = sparse_conv_transpose2d(x, w, b, c["stride"], c["padding"], c["output_padding"], scale=scale,
                                shift=shift, occupancy=occ, block_size=c["block_size"], dense=c["dense"])
    ref = conv_transpose2d_reference(_d(x), _d(w), _d(b), c["stride"], c["padding"], c["output_padding"],
                                     scale=_d(scale), shift=_d(shift))
    assert_like_dense(y, ref, dtype, f"sparse_conv_transpose2d {c}: ", inf_may_be_nan=_tc_split(x))
    assert_keeps_layout(y, x, c)
    return ref


@prop(24)
def test_conv_transpose2d_property(data):
    check_conv_transpose(draw_conv_transpose(hyp_pick(data)))


# -------------------------------------------------------------------------------- sparse_batch_norm2d


def draw_batchnorm(pick) -> dict:
    return dict(
        N=pick([1, 2, 3]), C=pick([*CHANNELS, 33, 70]), H=pick(SIZES), W=pick(SIZES),
        weight=pick([True, False]), bias=pick([True, False]), eps=pick([1e-5, 1e-3, 0.0]), dtype=pick(DTYPES),
        layout=pick(LAYOUTS), density=pick(DENSITIES), values=pick(VALUES), special=pick(SPECIALS),
        huge=pick([False, False, True]),
        occupancy=pick([None, None, ((8, 8), 16), ((1, 4), 1), ((2, 8), 4), ((4, 4), 32)]),
        seed=pick(range(1 << 16)),
    )


def check_batchnorm(c: dict, device="cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(c["seed"])
    dtype, C = c["dtype"], c["C"]
    x64 = make_values((c["N"], C, c["H"], c["W"]), c["density"], c["values"], gen)
    if _huge(c):
        x64 = _hugify(x64)  # scales up to ~15: past the fp16 range
    x64 = add_specials(x64, c["special"], gen)
    x = to_layout(x64, dtype, c["layout"], device)
    f32 = dict(dtype=torch.float32, device=device)
    mean = (torch.randn(C, generator=gen) * 0.5).to(**f32)
    var = (0.01 + torch.rand(C, generator=gen) * 2).to(**f32)
    weight = torch.randn(C, generator=gen).to(**f32) * 1.5 if c["weight"] else None
    bias = torch.randn(C, generator=gen).to(**f32) if c["bias"] else None
    occ = prescan(x, *c["occupancy"]) if c["occupancy"] else None
    y = sparse_batch_norm2d(x, mean, var, weight, bias, c["eps"], occupancy=occ)
    # the eval-mode formula of F.batch_norm, written out: torch releases differ on eps == 0 (2.14 takes it in eval
    # mode, 2.11 refuses it), the kernel takes eps >= 0 as 2.14 does
    ref = batch_norm2d_reference(_d(x), _d(mean), _d(var), _d(weight), _d(bias), c["eps"])
    if c["eps"] > 0:  # the written-out formula is F.batch_norm's
        torch.testing.assert_close(ref, F.batch_norm(_d(x), _d(mean), _d(var), _d(weight), _d(bias), training=False,
                                                     eps=c["eps"]), equal_nan=True)
    assert_like_dense(y, ref, dtype, f"sparse_batch_norm2d {c}: ")
    assert_keeps_layout(y, x, c)
    return ref


@prop(24)
def test_sparse_batch_norm2d_property(data):
    check_batchnorm(draw_batchnorm(hyp_pick(data)))


# ----------------------------------------------------------------------------------------- max_pool2d


def draw_pool(pick) -> dict:
    c = dict(
        N=pick([None, 1, 2]), C=pick([*CHANNELS, 70]), H=pick(SIZES), W=pick(SIZES),
        kernel=(pick([1, 2, 3, 4]), pick([1, 2, 3])), stride=pick([None, (1, 1), (2, 2), (3, 1), (2, 3)]),
        padding=(pick([0, 1, 2]), pick([0, 1])), dilation=(pick([1, 1, 2]), pick([1, 2])),
        ceil_mode=pick([False, True]), dtype=pick(DTYPES), layout=pick(LAYOUTS), density=pick(DENSITIES),
        values=pick(["spike", "count", "real", "real"]), special=pick([*SPECIALS, "-inf"]),
        huge=pick([False, True]), seed=pick(range(1 << 16)),
    )
    # padding at most half the kernel; a window that fits the padded input (F.max_pool2d would refuse)
    pad = [min(p, k // 2) for p, k in zip(c["padding"], c["kernel"])]
    dil = list(c["dilation"])
    for i, size in enumerate((c["H"], c["W"])):
        while dil[i] * (c["kernel"][i] - 1) + 1 > size + 2 * pad[i] and dil[i] > 1:
            dil[i] -= 1
        if c["kernel"][i] > size + 2 * pad[i]:
            c["kernel"] = tuple(min(k, size + 2 * pad[i]) if j == i else k for j, k in enumerate(c["kernel"]))
            pad[i] = min(pad[i], c["kernel"][i] // 2)
    c["padding"], c["dilation"] = tuple(pad), tuple(dil)
    return c


def check_pool(c: dict, device="cpu") -> torch.Tensor:
    """Exactly ``F.max_pool2d`` (a selection: no rounding): the same values, NaN and +-Inf everywhere."""
    gen = torch.Generator().manual_seed(c["seed"])
    dtype = c["dtype"]
    shape = (c["C"], c["H"], c["W"]) if c["N"] is None else (c["N"], c["C"], c["H"], c["W"])
    x64 = make_values(shape, c["density"], c["values"], gen)
    if c["values"] == "real" and c["density"] < 1:
        x64 = x64 - (x64 == 0).double() * 0.5  # negative background: padding (-inf) must not win
    if _huge(c):
        x64 = x64 * 6e4  # near the fp16 limit: stored as is (or as inf) and selected exactly
    x64 = add_specials(x64, c["special"], gen)
    layout = c["layout"] if (c["layout"] != "channels_last" or len(shape) == 4) else "contiguous"
    x = to_layout(x64, dtype, layout, device)
    args = (c["kernel"], c["stride"], c["padding"], c["dilation"], c["ceil_mode"])
    y = max_pool2d(x, *args)
    ref = max_pool2d_reference(_d(x), *args)
    assert y.dtype == dtype and y.shape == ref.shape, (tuple(y.shape), tuple(ref.shape))
    torch.testing.assert_close(_d(y), ref, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"max_pool2d {c}: {m}")
    if layout == "channels_last" and not x.is_contiguous():
        assert y.is_contiguous(memory_format=torch.channels_last), "the output keeps the input's layout"
    return ref


@prop(30)
def test_max_pool2d_property(data):
    check_pool(draw_pool(hyp_pick(data)))


# ---------------------------------------------------------------------------- explicit regression cases


def _first(options):
    return next(iter(options))


#: per kernel: (draw, check); a regression case is the first option of every draw, overridden
OPS = {
    "linear": (draw_linear, check_linear), "conv1x1": (draw_conv1x1, check_conv1x1), "ssa": (draw_ssa, check_ssa),
    "channel_dot": (draw_channel_dot, check_channel_dot), "grouped": (draw_grouped, check_grouped),
    "conv_transpose": (draw_conv_transpose, check_conv_transpose), "batchnorm": (draw_batchnorm, check_batchnorm),
    "pool": (draw_pool, check_pool),
}
FP16, REAL = dict(dtype=torch.float16), dict(values="real")
#: cases worth keeping whatever hypothesis draws: edge shapes, every special value, fp16 overflow, and the
#: failures hypothesis found (``ssa-*-silent`` and ``ssa-inf-in-v-head-padding``, fixed in attention.py)
REGRESSIONS = {
    "linear-1x1-nan-only": ("linear", dict(lead=(), K=1, N=1, bias=False, density=0.0, special="nan")),
    "linear-67rows-70feat-blocks16": ("linear", dict(lead=(67,), K=70, N=33, affine=True, layout="transposed",
                                                     density=0.03, special="inf-and-minus-inf", config=(16, 16, 16),
                                                     **REAL)),
    "linear-fp16-huge-overflows": ("linear", dict(lead=(2, 5), K=33, N=17, layout="strided", density=1.0, huge=True,
                                                  **FP16, **REAL)),
    "conv1x1-unbatched-channels-inner-nan": ("conv1x1", dict(B=None, C=19, CO=7, L=13, layout="transposed",
                                                             density=0.2, special="nan", config=(16, 16, 16))),
    "conv1x1-fp16-huge-overflows": ("conv1x1", dict(B=2, C=33, CO=17, L=17, density=1.0, huge=True, **FP16, **REAL)),
    # hypothesis: a NaN in k over an all-zero v block was skipped (the dense product is 0 * NaN = NaN)
    "ssa-nan-in-k-v-silent": ("ssa", dict(lead=(), H=1, D=1, L=1, density=0.0, special="nan", where="k")),
    "ssa-inf-in-k-v-silent": ("ssa", dict(lead=(2,), H=2, D=5, L=37, density=0.0, special="inf", where="k")),
    # an Inf in v met the zero padding of the head dim (D < 16) in v @ k^T: NaN where the dense op has Inf
    "ssa-inf-in-v-head-padding": ("ssa", dict(lead=(), H=1, D=1, L=5, density=1.0, special="inf", where="v")),
    "ssa-fp16-huge-overflows": ("ssa", dict(lead=(2,), H=2, D=17, L=37, density=0.2, huge=True, layout="qkv-slices",
                                            **FP16)),
    "channel-dot-1px-inf-and-minus-inf": ("channel_dot", dict(B=2, C=3, spatial=(1,), density=1.0,
                                                              special="inf-and-minus-inf", **REAL)),
    "channel-dot-fp16-huge-overflows": ("channel_dot", dict(B=2, C=17, spatial=(5,), density=1.0, huge=True,
                                                            **FP16, **REAL)),
    "depthwise-13x11-stride3-dil2-nan": ("grouped", dict(N=2, groups=5, cg=1, cog=2, H=13, W=11, KH=3, KW=3,
                                                         stride=(3, 2), padding=(2, 1), dilation=(2, 2),
                                                         layout="channels_last", density=0.03, special="nan",
                                                         path="direct", occupancy=((2, 8), 16), seed=8)),
    "grouped-17ch-gemm-inf": ("grouped", dict(N=1, groups=2, cg=17, cog=3, H=7, W=5, KH=3, KW=3, padding=(1, 1),
                                              path="auto", special="inf-and-minus-inf", density=0.2, **REAL)),
    "grouped-fp16-huge-overflows": ("grouped", dict(N=1, groups=3, cg=3, cog=2, H=7, W=7, KH=3, KW=3,
                                                    padding=(1, 1), density=1.0, huge=True, **FP16, **REAL)),
    "convt-1x1-input-k5-stride3-outpad2": ("conv_transpose", dict(C=5, CO=7, KH=5, KW=3, stride=(3, 2),
                                                                  output_padding=(2, 1), density=1.0)),
    "convt-inf-meets-minus-inf": ("conv_transpose", dict(N=2, C=19, CO=17, H=5, W=7, KH=4, KW=3, stride=(2, 2),
                                                         padding=(1, 1), output_padding=(1, 0), density=0.03,
                                                         special="inf-and-minus-inf", occupancy=(1, 4), **REAL)),
    "convt-fp16-huge-overflows": ("conv_transpose", dict(C=17, CO=7, H=5, W=5, KH=3, KW=3, stride=(2, 2),
                                                         padding=(1, 1), density=1.0, huge=True, **FP16, **REAL)),
    "batchnorm-occupancy-nan-70ch": ("batchnorm", dict(N=2, C=70, H=13, W=11, layout="channels_last", density=0.03,
                                                       special="nan", occupancy=((2, 8), 4))),
    "batchnorm-fp16-huge-overflows": ("batchnorm", dict(C=19, H=7, W=5, density=1.0, huge=True, **FP16, **REAL)),
    "pool-ceil-mode-channels-last-nan": ("pool", dict(N=2, C=70, H=13, W=11, kernel=(3, 3), stride=(2, 2),
                                                      padding=(1, 1), ceil_mode=True, layout="channels_last",
                                                      density=0.2, special="nan", **REAL)),
    "pool-unbatched-dilated-nan": ("pool", dict(N=None, C=3, H=11, W=7, kernel=(3, 2), stride=(1, 1),
                                                padding=(1, 1), dilation=(2, 2), density=0.0, special="nan", **REAL)),
    "pool-1x1-window-keeps-minus-inf": ("pool", dict(N=2, C=17, H=5, W=3, kernel=(1, 1), stride=(1, 1),
                                                     padding=(0, 0), layout="channels_last", density=0.6,
                                                     special="-inf", **REAL)),
    "pool-fp16-huge-strided": ("pool", dict(N=1, C=5, H=7, W=7, kernel=(2, 2), layout="strided", density=0.6,
                                            huge=True, special="inf", **FP16, **REAL)),
}


def regression_case(name: str) -> tuple:
    op, over = REGRESSIONS[name]
    draw, check = OPS[op]
    return {**draw(_first), "seed": 7, **over}, check


@pytest.mark.parametrize("name", list(REGRESSIONS), ids=list(REGRESSIONS))
def test_op_regressions(name):
    c, check = regression_case(name)
    ref = check(c)
    if c.get("huge") and c["dtype"] == torch.float16 and name.endswith("overflows"):
        # the case must overflow in the dense op (else it tests nothing new), and not everywhere
        r16 = ref.to(torch.float16)
        assert torch.isinf(r16).any() and torch.isfinite(r16).any(), f"{name}: no overflow in the reference"
    if c.get("special", "none") != "none":
        assert not torch.isfinite(ref).all(), f"{name}: the special value reaches no output"


def _ssa_hand(case: str):
    """q, k, v [1, 1, D, L] float32 for a zero block next to an Inf / NaN."""
    D, L = (2, 40) if case == "inf-kv-meets-silent-q-block" else (3, 20)
    q, k, v = torch.ones(1, 1, D, L), torch.ones(1, 1, D, L), torch.ones(1, 1, D, L)
    if case == "nan-in-v-k-silent":
        k.zero_()
        v[0, 0, 1, 4] = math.nan
    elif case == "inf-in-k-v-silent-block":
        v[..., :16] = 0  # the first token block of v is silent; k's holds an Inf
        k[0, 0, 2, 3] = math.inf
    elif case == "inf-kv-meets-silent-q-block":
        v[0, 0, 0, 3] = math.inf  # row 0 of v @ k^T is +Inf; q's second token block is silent
        q[..., 16:32] = 0
    return q, k, v


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
@pytest.mark.parametrize("case", ["nan-in-v-k-silent", "inf-in-k-v-silent-block", "inf-kv-meets-silent-q-block"])
def test_ssa_zero_block_next_to_inf_or_nan(case, dense):
    """0 * Inf and 0 * NaN are NaN: a zero block is skipped only where the dense product is zero as well (the
    kernel skipped any block pair where k or v was all zero, and any q block that was all zero)."""
    q, k, v = _ssa_hand(case)
    ref = ssa_reference(_d(q), _d(k), _d(v), 0.125)
    assert torch.isnan(ref).any()
    y = ssa_attention(q, k, v, 0.125, block_l=16, dense=dense)
    assert_like_dense(y, ref, torch.float32, f"{case}: ")
