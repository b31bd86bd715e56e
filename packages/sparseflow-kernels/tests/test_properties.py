"""Property tests (hypothesis) of every kernel against float64 torch references on random cases:
shapes with 1s and primes (never a multiple of a block), strides, paddings, dilations, fp32/fp16,
contiguous / channels_last / strided views, densities from 0 to 1, non-binary values (0/1/2 spike counts,
reals), NaN and +-Inf in the input and huge fp16 values.

Every case is a dict drawn by ``draw_*(pick)``, where ``pick(options)`` chooses one option: hypothesis
(``st.data()``) drives it here, and ``tests/gpu/test_gpu_properties.py`` runs the same checkers on CUDA
(through hypothesis when it is installed there, else through a seeded sampler). Profiles
(``HYPOTHESIS_PROFILE``): ``ci`` (default: few examples, derandomized, the suite stays well under a
minute in the interpreter), ``dev`` (many random examples on the CPU, for bug hunting) and ``gpu``.

Regression cases found on the way are kept as explicit ``@example``-style tests at the end of the file.
"""

from __future__ import annotations

import math
import os
import random

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import assert_spikes_match

from sparseflow_kernels import NeuronSpec, multistep_neuron, prescan, sparse_conv2d, spiking_conv2d
from sparseflow_kernels.naive import as_float64, conv2d_reference, neuron_reference, prescan_reference

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test dependency; the GPU machine may lack it
    given = None

# NaN/Inf cases make numpy (the interpreter's dot) warn: expected here
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
#: examples per property and profile
EXAMPLES = {"ci": 10, "dev": 200, "gpu": 150}

#: relative tolerance of finite outputs (max |y - ref| / max |ref|), per storage dtype
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
FP16_MAX = 65504.0

SIZES = [1, 2, 3, 5, 7, 11, 13]  # 1 and primes: no block size divides them
CHANNELS = [1, 2, 3, 5, 17, 19]  # 17, 19: two channel groups of 16, the second one partial
OUT_CHANNELS = [1, 2, 7, 17]
DENSITIES = [0.0, 0.03, 0.2, 0.6, 1.0]
LAYOUTS = ["contiguous", "channels_last", "strided"]
SPECIALS = ["none", "none", "nan", "inf", "-inf", "inf-and-minus-inf"]


def prop(n: int | None = None):
    """``@given(data=st.data())`` with the active profile's settings (``n`` overrides the example count)."""

    def wrap(fn):
        if given is None:
            return pytest.mark.skip(reason="hypothesis is not installed")(fn)
        count = n if n is not None and PROFILE == "ci" else EXAMPLES.get(PROFILE, EXAMPLES["ci"])
        s = settings(max_examples=count, deadline=None, derandomize=PROFILE == "ci", database=None,
                     suppress_health_check=list(HealthCheck), print_blob=True)
        return s(given(data=st.data())(fn))

    return wrap


def hyp_pick(data):
    return lambda options: data.draw(st.sampled_from(list(options)))


def seeded_pick(seed: int):
    rng = random.Random(seed)
    return lambda options: rng.choice(list(options))


# ------------------------------------------------------------------------------------------- inputs


def make_values(shape, density, values, gen) -> torch.Tensor:
    """float64 tensor: zeros except a ``density`` fraction, which holds spikes (1), spike counts (1 or 2,
    as after a SEW add) or reals."""
    mask = torch.rand(shape, generator=gen, dtype=torch.float64) < density
    if values == "spike":
        v = torch.ones(shape, dtype=torch.float64)
    elif values == "count":
        v = torch.randint(1, 3, shape, generator=gen).double()
    else:
        v = torch.randn(shape, generator=gen, dtype=torch.float64)
    return mask * v


def add_specials(x: torch.Tensor, special: str, gen) -> torch.Tensor:
    """Put NaN / +-Inf at one or two random places (their block becomes non-zero even at density 0)."""
    if special == "none" or x.numel() == 0:
        return x
    x = x.clone()
    flat = x.view(-1)
    idx = torch.randint(0, flat.numel(), (2,), generator=gen)
    vals = {"nan": [math.nan], "inf": [math.inf], "-inf": [-math.inf],
            "inf-and-minus-inf": [math.inf, -math.inf]}[special]
    for i, v in zip(idx.tolist(), vals):
        flat[i] = v
    return x


def to_layout(x64: torch.Tensor, dtype, layout: str, device) -> torch.Tensor:
    """The kernel's input in ``dtype`` on ``device``: contiguous, channels_last (4-D, or per step of a 5-D
    [T, N, C, H, W] tensor) or a strided view (every other element of a twice-as-wide tensor)."""
    x = x64.to(device=device, dtype=dtype)
    if layout == "channels_last":
        if x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        perm = (*range(0, x.dim() - 3), x.dim() - 2, x.dim() - 1, x.dim() - 3)
        inv = [perm.index(i) for i in range(x.dim())]
        return x.permute(*perm).contiguous().permute(*inv)
    if layout == "strided":
        wide = torch.full((*x.shape[:-1], 2 * x.shape[-1]), float("nan"), dtype=dtype, device=device)
        wide[..., ::2] = x
        view = wide[..., ::2]
        assert not view.is_contiguous() or x.shape[-1] == 1
        return view
    return x.contiguous()


# ---------------------------------------------------------------------------------------- comparison


def assert_like_dense(y: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype, what: str = "",
                      inf_may_be_nan: bool = False) -> None:
    """``y`` (kernel, ``dtype``) equals the float64 reference as the dense op in ``dtype`` would: the same
    NaN and +-Inf positions (including fp16 overflow), finite values within ``TOL[dtype]`` of the largest
    finite reference value. fp16 values within 10% of the overflow boundary may round either way.
    ``inf_may_be_nan``: accept NaN where the dense op has +-Inf (fp32 through tf32x3 on tensor cores, whose
    operand split computes inf - inf; see docs/robustness.md)."""
    assert y.shape == ref64.shape, (tuple(y.shape), tuple(ref64.shape))
    assert y.dtype == dtype
    y64 = y.double().cpu()
    ref_d = ref64.to(dtype).double()  # what a dense op in ``dtype`` rounds to (overflow -> inf)
    near = torch.zeros_like(ref64, dtype=torch.bool)
    if dtype in (torch.float16,):
        a = ref64.abs()
        near = (a > 0.9 * FP16_MAX) & (a < 1.1 * FP16_MAX)
    if inf_may_be_nan:
        near = near | (torch.isinf(ref_d) & torch.isnan(y64))
    for name, f in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        bad = (f(y64) != f(ref_d)) & ~near
        assert not bad.any(), (
            f"{what}{name} positions differ from the dense op at {bad.nonzero()[:5].tolist()} "
            f"(y={y64[bad][:5].tolist()}, ref={ref_d[bad][:5].tolist()})")
    fin = torch.isfinite(ref_d) & ~near
    if fin.any():
        scale = ref64[fin].abs().max().item()
        err = (y64[fin] - ref64[fin]).abs().max().item() / max(scale, 1e-30)
        assert err < TOL[dtype], f"{what}relative error {err:.3e} >= {TOL[dtype]:.0e}"


# ----------------------------------------------------------------------------------- sparse_conv2d


def draw_conv(pick) -> dict:
    c = dict(
        N=pick([1, 2, 3]), C=pick(CHANNELS), CO=pick(OUT_CHANNELS), H=pick(SIZES), W=pick(SIZES),
        KH=pick([1, 2, 3, 5]), KW=pick([1, 3]), stride=(pick([1, 2, 3]), pick([1, 2])),
        padding=(pick([0, 1, 2]), pick([0, 1])), dilation=(pick([1, 1, 2]), pick([1, 2])),
        bias=pick([True, False]), dtype=pick([torch.float32, torch.float16]), layout=pick(LAYOUTS),
        density=pick(DENSITIES), values=pick(["spike", "count", "real"]), special=pick(SPECIALS),
        huge=pick([False, False, True]), block_size=pick([8, 16, (4, 8)]), dense=pick([False, False, True]),
        seed=pick(range(1 << 16)),
    )
    # a kernel that does not fit the padded input: shrink it (F.conv2d would refuse)
    for i, (size, k) in enumerate(((c["H"], "KH"), (c["W"], "KW"))):
        while c["dilation"][i] * (c[k] - 1) + 1 > size + 2 * c["padding"][i]:
            if c["dilation"][i] > 1:
                c["dilation"] = tuple(1 if j == i else d for j, d in enumerate(c["dilation"]))
            else:
                c[k] = c[k] - 1 if c[k] > 1 else 1
                if c[k] == 1:
                    break
    return c


def assert_keeps_layout(y: torch.Tensor, x: torch.Tensor, c: dict) -> None:
    """A channels_last input (that is not also contiguous, as 1x1 maps are) gives a channels_last output."""
    if c["layout"] == "channels_last" and not x.is_contiguous():
        assert y.is_contiguous(memory_format=torch.channels_last), "the output keeps the input's layout"


def check_sparse_conv(c: dict, device="cpu") -> None:
    gen = torch.Generator().manual_seed(c["seed"])
    dtype = c["dtype"]
    x64 = make_values((c["N"], c["C"], c["H"], c["W"]), c["density"], c["values"], gen)
    w64 = torch.randn(c["CO"], c["C"], c["KH"], c["KW"], generator=gen, dtype=torch.float64)
    b64 = torch.randn(c["CO"], generator=gen, dtype=torch.float64) if c["bias"] else None
    if c["huge"] and dtype == torch.float16:
        x64 = x64 * 3e4  # products near the fp16 range: outputs overflow to +-inf like the dense op's
    x64 = add_specials(x64, c["special"], gen)
    x = to_layout(x64, dtype, c["layout"], device)
    w = w64.to(device=device, dtype=dtype)
    b = b64.to(device=device, dtype=dtype) if b64 is not None else None
    # the reference sees exactly the rounded values the kernel sees
    ref = conv2d_reference(*as_float64(x.cpu(), w.cpu(), None if b is None else b.cpu()),
                           c["stride"], c["padding"], c["dilation"])
    precision = c.get("fp32_precision", "tf32x3")
    y = sparse_conv2d(x, w, b, c["stride"], c["padding"], c["dilation"], block_size=c["block_size"],
                      dense=c["dense"], fp32_precision=precision)
    tc_split = x.is_cuda and dtype == torch.float32 and precision == "tf32x3"
    assert_like_dense(y, ref, dtype, f"sparse_conv2d {c}: ", inf_may_be_nan=tc_split)
    assert_keeps_layout(y, x, c)


@prop(14)
def test_sparse_conv2d_property(data):
    check_sparse_conv(draw_conv(hyp_pick(data)))


# ------------------------------------------------------------------------------------------- prescan


def draw_prescan(pick) -> dict:
    return dict(B=pick([1, 2, 3]), C=pick([*CHANNELS, 33]), H=pick([*SIZES, 9, 17]), W=pick([*SIZES, 9, 17]),
                tile=(pick([1, 2, 4, 8, 16]), pick([2, 8])), group=pick([1, 4, 16, 32]),
                dtype=pick([torch.float32, torch.float16]), layout=pick(LAYOUTS), density=pick(DENSITIES),
                values=pick(["spike", "count", "real"]), special=pick([*SPECIALS, "-0"]),
                seed=pick(range(1 << 16)))


def check_prescan(c: dict, device="cpu") -> None:
    gen = torch.Generator().manual_seed(c["seed"])
    x64 = make_values((c["B"], c["C"], c["H"], c["W"]), c["density"], c["values"], gen)
    if c["special"] == "-0":
        x64 = torch.where(x64 == 0, torch.tensor(-0.0, dtype=torch.float64), x64)  # -0.0 is zero
    else:
        x64 = add_specials(x64, c["special"], gen)
    x = to_layout(x64, c["dtype"], c["layout"], device)
    occ = prescan(x, c["tile"], c["group"])
    ref = prescan_reference(x.cpu(), c["tile"], c["group"])
    assert occ.shape == tuple(x.shape) and occ.tile == tuple(c["tile"]) and occ.group == c["group"]
    assert torch.equal(occ.codes.cpu(), ref), f"prescan codes differ for {c}"
    expected_density = float((ref & 1).ne(0).float().mean())
    assert occ.block_density() == pytest.approx(expected_density)


@prop(14)
def test_prescan_property(data):
    check_prescan(draw_prescan(hyp_pick(data)))


# ----------------------------------------------------------------------------------- spiking_conv2d


NEURON_CHOICES = [
    dict(neuron="lif", tau=2.0, v_reset=0.0), dict(neuron="lif", tau=3.0, v_reset=None, decay_input=False),
    dict(neuron="if", v_reset=0.0, v_threshold=0.7), dict(neuron="if", v_reset=None),
    dict(neuron="plif", tau=1.7, v_reset=-0.2), dict(neuron="leaky", beta=0.8, v_reset=None),
    dict(neuron="leaky", beta=0.6, v_reset=0.0, v_threshold=0.9),
]


def draw_spiking(pick) -> dict:
    c = dict(
        T=pick([1, 2, 3]), N=pick([1, 2]), C=pick(CHANNELS), CO=pick(OUT_CHANNELS), H=pick(SIZES),
        W=pick(SIZES), K=pick([1, 3]), stride=pick([1, 2]), padding=pick([0, 1]), bias=pick([True, False]),
        affine=pick([True, False]), residual=pick([False, True]), v0=pick([False, True]),
        neuron=pick(range(len(NEURON_CHOICES))), dtype=pick([torch.float32, torch.float16]),
        layout=pick(["contiguous", "channels_last"]), density=pick(DENSITIES),
        values=pick(["spike", "count", "real"]),
        special=pick(["none", "none", "nan"]),  # +-Inf: test_inf_membrane_matches_spikingjelly
        skip=pick(["prescan", "dense", "t_in_m", "cudnn"]), seed=pick(range(1 << 16)),
    )
    if c["K"] > min(c["H"], c["W"]) + 2 * c["padding"]:
        c["K"] = 1
    return c


def check_spiking(c: dict, device="cpu") -> None:
    from sparseflow_kernels import ConvConfig

    gen = torch.Generator().manual_seed(c["seed"])
    dtype = c["dtype"]
    T, N, C, CO = c["T"], c["N"], c["C"], c["CO"]
    x64 = make_values((T, N, C, c["H"], c["W"]), c["density"], c["values"], gen)
    x64 = add_specials(x64, c["special"], gen)
    x = to_layout(x64, dtype, c["layout"], device)
    w = (torch.randn(CO, C, c["K"], c["K"], generator=gen, dtype=torch.float64) * 1.5 / math.sqrt(C))
    w = w.to(device=device, dtype=dtype)
    b = torch.randn(CO, generator=gen).to(device=device, dtype=dtype) * 0.3 if c["bias"] else None
    scale = (0.5 + torch.rand(CO, generator=gen)).to(device) if c["affine"] else None
    shift = (0.5 * torch.randn(CO, generator=gen)).to(device) if c["affine"] else None
    OH = (c["H"] + 2 * c["padding"] - c["K"]) // c["stride"] + 1
    OW = (c["W"] + 2 * c["padding"] - c["K"]) // c["stride"] + 1
    res = (torch.randn(T, N, CO, OH, OW, generator=gen) * 0.5).to(device=device, dtype=dtype) \
        if c["residual"] else None
    v0 = (torch.rand(N, CO, OH, OW, generator=gen) * 0.8).to(device) if c["v0"] else None
    kw = dict(NEURON_CHOICES[c["neuron"]])
    spec = NeuronSpec.make(kw.pop("neuron"), **kw)
    run = dict(neuron=spec, scale=scale, shift=shift, residual=res, v=v0, return_v=True)
    if c["skip"] == "prescan":
        run.update(sparse=True)
    elif c["skip"] == "t_in_m":
        run.update(config=ConvConfig(4, 4, 16, 16, True, 4, 1), sparse=True)
    elif c["skip"] == "cudnn":
        if device == "cpu" and dtype == torch.float16:
            run.update(sparse=True)  # the CPU has no fp16 F.conv2d in every torch build: fused instead
        else:
            run.update(path="cudnn")
    spikes, v = spiking_conv2d(x, w, b, c["stride"], c["padding"], **run)
    # float64 reference: conv per step of the values the kernel saw, affine, residual, neuron
    d = lambda t: None if t is None else t.double().cpu()
    y = F.conv2d(d(x).flatten(0, 1), d(w), d(b), c["stride"], c["padding"]).view(T, N, CO, OH, OW)
    cudnn_rounded = run.get("path") == "cudnn" and dtype != torch.float32
    if cudnn_rounded:  # the cuDNN path stores the conv output in the storage dtype before the neuron
        y = y.to(dtype).double()
    if scale is not None:
        y = y * d(scale).view(1, 1, -1, 1, 1) + d(shift).view(1, 1, -1, 1, 1)
    if res is not None:
        y = y + d(res)
    ref_s, ref_h, ref_v = neuron_reference(y, spec, d(v0))
    assert spikes.dtype == dtype and tuple(spikes.shape) == (T, N, CO, OH, OW)
    assert v.dtype == torch.float32
    tie = 2e-3 if dtype == torch.float16 else 1e-4
    if cudnn_rounded:  # cuDNN (fp32 accumulation) and the float64 reference may round one ulp apart
        tie = 3e-2 if dtype == torch.bfloat16 else 5e-3
    s, vv = spikes.cpu(), v.cpu()
    if c["special"] == "nan":
        # a NaN membrane never fires and stays NaN (SpikingJelly and snnTorch alike): compare the rest
        nan_v = torch.isnan(ref_v)
        assert torch.equal(torch.isnan(vv), nan_v), f"NaN membranes differ for {c}"
        keep = ~nan_v.reshape(-1)
        s = s.reshape(T, -1)[:, keep]
        ref_s, ref_h = ref_s.reshape(T, -1)[:, keep], ref_h.reshape(T, -1)[:, keep]
        vv, ref_v = vv.reshape(-1)[keep], ref_v.reshape(-1)[keep]
    assert_spikes_match(s, ref_s, ref_h, spec.v_threshold, vv, ref_v, tie_tol=tie, v_rtol=tie,
                        max_flip_frac=0.05)


@prop(12)
def test_spiking_conv2d_property(data):
    check_spiking(draw_spiking(hyp_pick(data)))


# --------------------------------------------------------------------------------- multistep_neuron


def draw_neuron(pick) -> dict:
    return dict(
        T=pick([1, 2, 3, 5]), N=pick([1, 2, 3]), C=pick([1, 3, 17, 70]), spatial=pick([(), (1,), (5,), (3, 7),
                                                                                         (2, 3, 5)]),
        neuron=pick(range(len(NEURON_CHOICES))), dtype=pick([torch.float32, torch.float16]),
        layout=pick(LAYOUTS), affine=pick([True, False]), residual=pick([False, True]), v0=pick([False, True]),
        density=pick(DENSITIES), values=pick(["spike", "count", "real"]), special=pick(["none", "none", "nan"]),
        seed=pick(range(1 << 16)),
    )


def check_neuron(c: dict, device="cpu") -> None:
    gen = torch.Generator().manual_seed(c["seed"])
    dtype = c["dtype"]
    shape = (c["T"], c["N"], c["C"], *c["spatial"])
    x64 = make_values(shape, c["density"], c["values"], gen) * 1.5
    x64 = add_specials(x64, c["special"], gen)
    layout = c["layout"] if (c["layout"] != "channels_last" or len(shape) >= 4) else "contiguous"
    x = to_layout(x64, dtype, layout, device)
    C = c["C"]
    scale = (0.5 + torch.rand(C, generator=gen)).to(device) if c["affine"] else None
    shift = (0.3 * torch.randn(C, generator=gen)).to(device) if c["affine"] else None
    res = (torch.randn(shape, generator=gen) * 0.5).to(device=device, dtype=dtype) if c["residual"] else None
    v0 = (torch.rand(shape[1:], generator=gen) * 0.8).to(device) if c["v0"] else None
    kw = dict(NEURON_CHOICES[c["neuron"]])
    spec = NeuronSpec.make(kw.pop("neuron"), **kw)
    spikes, v = multistep_neuron(x, spec, scale=scale, shift=shift, residual=res, v=v0, return_v=True)
    z = x.double().cpu()
    bshape = (1, 1, C) + (1,) * len(c["spatial"])
    if scale is not None:
        z = z * scale.double().cpu().view(bshape) + shift.double().cpu().view(bshape)
    if res is not None:
        z = z + res.double().cpu()
    ref_s, ref_h, ref_v = neuron_reference(z, spec, None if v0 is None else v0.double().cpu())
    assert spikes.shape == x.shape and spikes.dtype == dtype and v.shape == x.shape[1:]
    s, vv = spikes.cpu(), v.cpu()
    T = c["T"]
    if c["special"] == "nan":
        nan_v = torch.isnan(ref_v)
        assert torch.equal(torch.isnan(vv), nan_v), f"NaN membranes differ for {c}"
        keep = ~nan_v.reshape(-1)
        s, ref_s, ref_h = (t.reshape(T, -1)[:, keep] for t in (s, ref_s, ref_h))
        vv, ref_v = vv.reshape(-1)[keep], ref_v.reshape(-1)[keep]
    tie = 2e-3 if dtype == torch.float16 else 1e-4
    assert_spikes_match(s, ref_s, ref_h, spec.v_threshold, vv, ref_v, tie_tol=tie, v_rtol=tie,
                        max_flip_frac=0.05)


@prop(14)
def test_multistep_neuron_property(data):
    check_neuron(draw_neuron(hyp_pick(data)))


# ---------------------------------------------------------------------------- explicit regression cases

#: cases worth keeping whatever hypothesis draws (edge shapes, every special value, overflow)
REGRESSION_CONV = {
    "1x1-input-3x3-kernel-pad1": dict(N=1, C=1, CO=1, H=1, W=1, KH=3, KW=3, stride=(1, 1), padding=(1, 1)),
    "prime-13x11-stride3-dil2": dict(N=2, C=19, CO=7, H=13, W=11, KH=3, KW=3, stride=(3, 2), padding=(2, 1),
                                     dilation=(2, 2)),
    "all-ones-19ch": dict(N=1, C=19, CO=17, H=7, W=5, KH=3, KW=3, density=1.0, values="spike"),
    "all-zero-but-one-nan": dict(N=1, C=17, CO=2, H=11, W=11, KH=3, KW=3, density=0.0, special="nan"),
    "inf-meets-minus-inf": dict(N=1, C=3, CO=5, H=5, W=5, KH=3, KW=3, density=0.0,
                                special="inf-and-minus-inf"),
    "fp16-huge-overflows": dict(N=1, C=17, CO=7, H=7, W=7, KH=3, KW=3, density=1.0, values="real",
                                dtype=torch.float16, huge=True),
    "strided-view-fp16": dict(N=2, C=5, CO=2, H=3, W=13, KH=1, KW=3, dtype=torch.float16, layout="strided"),
}
DEFAULT_CONV = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), bias=True, dtype=torch.float32,
                    layout="contiguous", density=0.2, values="count", special="none", huge=False, block_size=8,
                    dense=False, seed=7)


@pytest.mark.parametrize("case", list(REGRESSION_CONV), ids=list(REGRESSION_CONV))
def test_sparse_conv2d_regressions(case):
    check_sparse_conv({**DEFAULT_CONV, **REGRESSION_CONV[case]})


def test_fp16_huge_case_really_overflows():
    """The huge fp16 case must produce infinities in the dense op (else it tests nothing new)."""
    c = {**DEFAULT_CONV, **REGRESSION_CONV["fp16-huge-overflows"]}
    gen = torch.Generator().manual_seed(c["seed"])
    x = make_values((1, 17, 7, 7), 1.0, "real", gen) * 3e4
    w = torch.randn(7, 17, 3, 3, generator=gen, dtype=torch.float64)
    ref = F.conv2d(x.half().double(), w.half().double(), padding=1).half()
    assert torch.isinf(ref).any() and torch.isfinite(ref).any()
    check_sparse_conv(c)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("kind", ["if", "lif"])
def test_inf_membrane_matches_spikingjelly(kind):
    """An infinite membrane fires, and the hard reset ``v = (1 - s) * h + s * v_reset`` gives ``0 * inf = NaN``
    exactly as in SpikingJelly (the kernels once selected ``v_reset`` instead): the spikes of every step and the
    final membrane equal SpikingJelly's own module."""
    from spikingjelly.activation_based import neuron as sj_neuron

    x = torch.zeros(3, 1, 2, 1, 1)
    x[0, 0, 0, 0, 0] = math.inf
    x[1:, 0, 1] = 2.0
    spikes, v = multistep_neuron(x, kind, v_reset=0.0, return_v=True)
    m = (sj_neuron.IFNode if kind == "if" else sj_neuron.LIFNode)(step_mode="m", v_reset=0.0)
    ref_s = m(x.double())
    assert torch.equal(spikes.double(), ref_s)
    assert math.isnan(v[0, 0, 0, 0].item()) and math.isnan(float(m.v[0, 0, 0, 0]))
    torch.testing.assert_close(v[0, 1].double(), m.v[0, 1], rtol=0, atol=0)
