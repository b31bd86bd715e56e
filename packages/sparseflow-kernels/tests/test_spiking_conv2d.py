"""spiking_conv2d (conv + affine + residual + neuron over T) against float64 references made of F.conv2d and
the SpikingJelly / snnTorch neuron modules themselves, on every path: fused, time-in-M, sparse (prescan),
occupancy chain, cuDNN. Spikes must match except at exact threshold ties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import (
    NEURONS,
    assert_fires,
    assert_spikes_match,
    kernel_neuron_kwargs,
    reference_neuron,
)

from sparseflow_kernels import ConvConfig, Occupancy, prescan, spiking_conv2d
from sparseflow_kernels.naive import as_float64, conv2d_reference

TM_CONFIG = ConvConfig(tile_h=4, tile_w=4, block_n=32, block_k=16, t_in_m=True)


def make_layer(T=3, N=2, C=20, CO=24, H=9, W=9, k=3, stride=1, padding=1, *, bias=True, affine=True,
               kind="spikes", residual=False, v0=False, dtype=torch.float32):
    """Inputs of one layer and its float64 pre-neuron reference ``z`` [T, N, CO, OH, OW]."""
    KH, KW = (k, k) if isinstance(k, int) else k
    if kind == "spikes":
        x = (torch.rand(T, N, C, H, W) < 0.3).float()
    elif kind == "counts012":
        x = torch.randint(0, 3, (T, N, C, H, W)).float() * (torch.rand(T, N, C, H, W) < 0.3)
    elif kind == "real":
        x = torch.randn(T, N, C, H, W) * (torch.rand(T, N, C, H, W) < 0.5)
    else:
        raise ValueError(kind)
    x = x.to(dtype)
    w = (torch.randn(CO, C, KH, KW) * 1.6 / (0.3 * C * KH * KW) ** 0.5).to(dtype)
    b = (torch.randn(CO) * 0.3 + 0.4).to(dtype) if bias else None
    scale = torch.rand(CO) * 0.8 + 0.7 if affine else None
    shift = torch.rand(CO) * 0.6 if affine else None
    y = conv2d_reference(*as_float64(x.flatten(0, 1), w, b), stride, padding)
    z = y.view(T, N, *y.shape[1:])
    if scale is not None:
        z = z * scale.double().view(1, 1, -1, 1, 1) + shift.double().view(1, 1, -1, 1, 1)
    res = None
    if residual:
        res = torch.randn(z.shape) * 0.7
        z = z + res.double()
    v = torch.rand(z.shape[1:]) * 1.2 - 0.4 if v0 else None
    return dict(x=x, w=w, b=b, scale=scale, shift=shift, res=res, v=v, z=z, stride=stride, padding=padding)


def run(layer, p, **kw):
    return spiking_conv2d(layer["x"], layer["w"], layer["b"], layer["stride"], layer["padding"],
                          scale=layer["scale"], shift=layer["shift"], residual=layer["res"], v=layer["v"],
                          **kernel_neuron_kwargs(p), **kw)


def check(layer, p, spikes, v=None, **tol):
    ref_s, ref_h, ref_v = reference_neuron(p, layer["z"], layer["v"])
    assert_fires(ref_s)
    assert spikes.dtype == layer["x"].dtype
    assert spikes.shape == ref_s.shape
    return assert_spikes_match(spikes, ref_s, ref_h, p["v_threshold"], v, ref_v if v is not None else None,
                               **tol)


@pytest.mark.parametrize("neuron", list(NEURONS), ids=list(NEURONS))
def test_neurons_fused(neuron):
    p = NEURONS[neuron]
    layer = make_layer()
    spikes, v = run(layer, p, return_v=True)
    assert v.dtype == torch.float32 and v.shape == (2, 24, 9, 9)
    check(layer, p, spikes, v)
    # each time step of the output is channels_last
    assert spikes[0].is_contiguous(memory_format=torch.channels_last)


GEOMS = {
    "3x3-s1-p1": dict(k=3, stride=1, padding=1),
    "3x3-s2-p1": dict(k=3, stride=2, padding=1, H=11, W=10),
    "1x1-s1-p0": dict(k=1, stride=1, padding=0),
    "1x1-s2-p0-nobias": dict(k=1, stride=2, padding=0, bias=False),
    "3x3-s(2,1)-p(1,0)": dict(k=3, stride=(2, 1), padding=(1, 0)),
    "3x3-p0-odd-C37-CO5": dict(k=3, stride=1, padding=0, C=37, CO=5, H=7, W=11),
}


@pytest.mark.parametrize("T", [1, 3], ids=["T1", "T3"])
@pytest.mark.parametrize("geom", list(GEOMS), ids=list(GEOMS))
def test_geometry(geom, T):
    p = NEURONS["lif-hard"]
    layer = make_layer(T=T, **GEOMS[geom])
    spikes, v = run(layer, p, return_v=True)
    check(layer, p, spikes, v)


@pytest.mark.parametrize("kind", ["counts012", "real"])
@pytest.mark.parametrize("neuron", ["lif-soft", "plif-hard", "leaky-subtract"])
def test_non_binary_inputs(kind, neuron):
    p = NEURONS[neuron]
    layer = make_layer(kind=kind, N=1)
    spikes, v = run(layer, p, return_v=True)
    check(layer, p, spikes, v)


@pytest.mark.parametrize("neuron", ["lif-hard", "lif-soft", "if-soft", "leaky-zero", "leaky-subtract"])
def test_initial_v_given(neuron):
    p = NEURONS[neuron]
    layer = make_layer(v0=True, N=1)
    v_before = layer["v"].clone()
    spikes, v = run(layer, p, return_v=True)
    check(layer, p, spikes, v)
    assert torch.equal(layer["v"], v_before), "the initial membrane must not be modified in place"
    # without return_v: spikes only, and the same spikes
    only = run(layer, p)
    assert isinstance(only, torch.Tensor)
    assert torch.equal(only, spikes)


def test_v_none_starts_at_v_reset():
    """v=None is SpikingJelly's start: v_reset for a hard reset (here -0.25), not 0."""
    p = NEURONS["lif-vreset-neg-th0.6"]
    layer = make_layer(T=1, N=1)
    spikes, v = run(layer, p, return_v=True)
    check(layer, p, spikes, v)
    layer0 = dict(layer, v=torch.zeros(1, 24, 9, 9))  # an explicit 0 start differs
    _, v_zero = run(layer0, p, return_v=True)
    assert not torch.allclose(v, v_zero)


@pytest.mark.parametrize("neuron", ["lif-soft", "if-hard", "plif-soft-nodecayinput", "leaky-zero"])
def test_residual(neuron):
    p = NEURONS[neuron]
    layer = make_layer(residual=True, N=1)
    spikes, v = run(layer, p, return_v=True)
    check(layer, p, spikes, v)


def test_residual_spikes_channels_last():
    """A residual that is itself spikes in a channels_last-per-step layout (as a fused layer returns)."""
    p = NEURONS["lif-hard"]
    layer = make_layer(N=1)
    res = (torch.rand(3, 1, 9, 9, 24) < 0.4).float().permute(0, 1, 4, 2, 3)
    layer = dict(layer, res=res, z=layer["z"] + res.double())
    spikes, v = run(layer, p, return_v=True)
    check(layer, p, spikes, v)


POST_PATHS = {
    "fused": dict(),
    "fused-t_in_m": dict(config=TM_CONFIG),
    "sparse-prescan": dict(sparse=True),
    "cudnn": dict(path="cudnn"),
    "triton_conv": dict(path="triton_conv", config=ConvConfig(tile_h=4, tile_w=8, block_n=16, block_k=16)),
    "tokens-1x1-tile1x16": dict(config=ConvConfig(tile_h=1, tile_w=16, block_n=16, block_k=16)),
    "tokens-1x1-tile1x8-t_in_m": dict(config=ConvConfig(tile_h=1, tile_w=8, block_n=32, block_k=16, t_in_m=True)),
}


@pytest.mark.parametrize("neuron", ["lif-hard", "lif-soft", "if-hard"])
@pytest.mark.parametrize("path", list(POST_PATHS), ids=list(POST_PATHS))
def test_residual_after_neuron(path, neuron):
    """``residual_after``: the layer returns ``residual + spikes`` (a Transformer skip connection), the
    residual in the contiguous layout of a token stream; tokens as [T, N, C, 1, L] for the 1x1 configs."""
    p = NEURONS[neuron]
    tokens = path.startswith("tokens")
    geom = dict(H=1, W=23, k=1, padding=0) if tokens else {}
    layer = make_layer(v0=True, N=2, T=3, **geom)
    res = torch.randn(layer["z"].shape) * 0.7
    out, v = run(dict(layer, res=res), p, return_v=True, residual_after=True, **POST_PATHS[path])
    spikes = (out != res).float()  # |res| < 2**24: adding a spike always changes it
    torch.testing.assert_close(out, res + spikes, rtol=0, atol=0)
    check(layer, p, spikes, v)


def test_residual_after_fp16_rounds_once():
    """fp16 storage: residual + spike rounded once, as the dense fp16 add."""
    p = NEURONS["lif-hard"]
    layer = make_layer(N=1, T=2, H=1, W=19, k=1, padding=0, dtype=torch.float16)
    res = (torch.randn(layer["z"].shape) * 300).half()  # large values: x + 1 rounds in fp16
    out = run(dict(layer, res=res), p, residual_after=True,
              config=ConvConfig(tile_h=1, tile_w=16, block_n=16, block_k=16))
    spikes = spiking_conv2d(layer["x"], layer["w"], layer["b"], 1, 0, scale=layer["scale"], shift=layer["shift"],
                            config=ConvConfig(tile_h=1, tile_w=16, block_n=16, block_k=16),
                            **kernel_neuron_kwargs(p))
    assert spikes.sum() > 0
    torch.testing.assert_close(out, res + spikes, rtol=0, atol=0)


def test_residual_after_errors():
    layer = make_layer(N=1, T=2)
    p = NEURONS["lif-hard"]
    with pytest.raises(ValueError, match="needs a residual"):
        run(layer, p, residual_after=True)
    res = torch.randn(layer["z"].shape).double()
    with pytest.raises(ValueError, match="x's dtype"):
        run(dict(layer, res=res), p, residual_after=True)
    with pytest.raises(ValueError, match="write_occupancy"):
        run(dict(layer, res=res.float()), p, residual_after=True, write_occupancy=True)


PATHS = {
    "fused": dict(),
    "fused-t_in_m": dict(config=TM_CONFIG),
    "fused-blockn16": dict(config=ConvConfig(tile_h=8, tile_w=8, block_n=16, block_k=16)),
    "sparse-prescan": dict(sparse=True),
    "sparse-t_in_m": dict(sparse=True, config=TM_CONFIG),
    "occupancy-given": "occ",
    "cudnn": dict(path="cudnn"),
    "triton_conv": dict(path="triton_conv", config=ConvConfig(tile_h=4, tile_w=8, block_n=16, block_k=16)),
}


@pytest.mark.parametrize("neuron", ["lif-hard", "plif-soft-nodecayinput", "leaky-zero"])
@pytest.mark.parametrize("path", list(PATHS), ids=list(PATHS))
def test_paths_all_options(path, neuron):
    """Every path with bias, scale/shift, residual and an initial membrane at once."""
    p = NEURONS[neuron]
    layer = make_layer(residual=True, v0=True, N=2, T=3)
    kw = PATHS[path]
    if kw == "occ":
        kw = dict(occupancy=prescan(layer["x"].flatten(0, 1), 8, 16))
    spikes, v = run(layer, p, return_v=True, **kw)
    check(layer, p, spikes, v)


def test_sparse_equals_fused_bitwise():
    """Skipping all-zero blocks changes nothing: the sparse and dense sweeps of the same kernel agree."""
    p = NEURONS["lif-soft"]
    layer = make_layer(N=2)
    x = layer["x"]
    x[:, :, 4:12] = 0  # whole channel groups and tiles are empty
    x[0, 1, :, :8, :8] = 0
    dense, vd = run(layer, p, return_v=True)
    sparse, vs = run(layer, p, return_v=True, sparse=True)
    assert torch.equal(dense, sparse)
    assert torch.equal(vd, vs)


CHAINS = {
    "A-default>B-3x3s1": (dict(), dict(k=3, stride=1, padding=1)),
    "A-t_in_m>B-3x3s2": (dict(config=TM_CONFIG), dict(k=3, stride=2, padding=1)),
    "A-blockn16>B-1x1": (dict(config=ConvConfig(8, 8, block_n=16, block_k=16)),
                         dict(k=1, stride=1, padding=0)),
}


@pytest.mark.parametrize("chain", list(CHAINS), ids=list(CHAINS))
def test_occupancy_chain(chain):
    """Layer A writes the occupancy of its spikes; layer B consumes it instead of a prescan."""
    a_kw, b_geom = CHAINS[chain]
    pa, pb = NEURONS["lif-hard"], NEURONS["if-soft"]
    la = make_layer(T=2, N=2, C=20, CO=40, H=13, W=11)
    sa, va, occ = run(la, pa, return_v=True, write_occupancy=True, **a_kw)
    check(la, pa, sa, va)
    # the written codes are exactly the prescan of the spikes A returned
    cfg = a_kw.get("config")
    tile = (cfg.tile_h, cfg.tile_w) if cfg is not None else (8, 8)
    assert isinstance(occ, Occupancy)
    assert occ.shape == (4, 40, 13, 11) and occ.tile == tile and occ.group == 16
    assert torch.equal(occ.codes, prescan(sa.flatten(0, 1), tile, 16).codes)
    # layer B on A's spikes
    k = b_geom["k"]
    wb = torch.randn(16, 40, k, k) * 1.6 / (0.3 * 40 * k * k) ** 0.5
    bb = torch.randn(16) * 0.3 + 0.3
    args = (sa, wb, bb, b_geom["stride"], b_geom["padding"])
    kb = kernel_neuron_kwargs(pb)
    with_occ, v1 = spiking_conv2d(*args, occupancy=occ, return_v=True, **kb)
    plain, v2 = spiking_conv2d(*args, return_v=True, **kb)
    prescanned, v3 = spiking_conv2d(*args, sparse=True, return_v=True, **kb)
    assert torch.equal(with_occ, plain) and torch.equal(with_occ, prescanned)
    assert torch.equal(v1, v2) and torch.equal(v1, v3)
    y = conv2d_reference(*as_float64(sa.flatten(0, 1), wb, bb), b_geom["stride"], b_geom["padding"])
    layer_b = dict(x=sa, z=y.view(2, 2, *y.shape[1:]), v=None)
    check(layer_b, pb, with_occ, v1)


def test_write_occupancy_without_return_v():
    p = NEURONS["lif-hard"]
    layer = make_layer(T=2, N=1)
    out = run(layer, p, write_occupancy=True)
    assert isinstance(out, tuple) and len(out) == 2
    spikes, occ = out
    check(layer, p, spikes)
    assert torch.equal(occ.codes, prescan(spikes.flatten(0, 1), 8, 16).codes)


def test_fp16_fused():
    p = NEURONS["lif-hard"]
    layer = make_layer(dtype=torch.float16, N=1)
    spikes, v = run(layer, p, return_v=True)
    assert spikes.dtype == torch.float16 and v.dtype == torch.float32
    check(layer, p, spikes, v, tie_tol=2e-3, v_rtol=2e-3)


def test_noncontiguous_input():
    p = NEURONS["lif-soft"]
    layer = make_layer(N=2)
    big = torch.zeros(3, 2, 20, 9, 18)
    big[..., ::2] = layer["x"]
    layer = dict(layer, x=big[..., ::2])
    assert not layer["x"].is_contiguous()
    spikes, v = run(layer, p, return_v=True)
    check(layer, p, spikes, v)


def test_sequential_calls_carry_membrane():
    """Two calls of T steps, the second from the first's v, equal one reference run over 2T steps."""
    p = NEURONS["plif-hard"]
    layer = make_layer(T=4, N=1)
    x, z = layer["x"], layer["z"]
    first = dict(layer, x=x[:2], res=None, v=None)
    s1, v1 = run(first, p, return_v=True)
    s2, v2 = run(dict(first, x=x[2:], v=v1), p, return_v=True)
    ref_s, ref_h, ref_v = reference_neuron(p, z)
    assert_fires(ref_s)
    assert_spikes_match(torch.cat([s1, s2]), ref_s, ref_h, p["v_threshold"], v2, ref_v)


# ------------------------------------------------------------------------------------------- errors


def test_errors():
    x = (torch.rand(2, 1, 4, 6, 6) < 0.3).float()
    w = torch.randn(8, 4, 3, 3)
    with pytest.raises(ValueError, match="T, N"):
        spiking_conv2d(x[0], w)
    with pytest.raises(TypeError, match="dtype"):
        spiking_conv2d(x, w.half())
    with pytest.raises(ValueError, match="path"):
        spiking_conv2d(x, w, path="cublas")
    with pytest.raises(ValueError, match="channels"):
        spiking_conv2d(x, torch.randn(8, 5, 3, 3))
    with pytest.raises(ValueError, match="residual"):
        spiking_conv2d(x, w, padding=1, residual=torch.zeros(2, 1, 8, 5, 5))
    with pytest.raises(ValueError, match="v must"):
        spiking_conv2d(x, w, padding=1, v=torch.zeros(1, 8, 5, 5))
    with pytest.raises(ValueError, match="scale"):
        spiking_conv2d(x, w, scale=torch.ones(7))
    with pytest.raises(ValueError, match="write_occupancy"):
        spiking_conv2d(x, w, path="cudnn", write_occupancy=True)
    with pytest.raises(ValueError, match="tau"):
        spiking_conv2d(x, w, neuron="lif", tau=1.0)
    with pytest.raises(ValueError, match="beta"):
        spiking_conv2d(x, w, neuron="leaky")
    with pytest.raises(ValueError, match="neuron"):
        spiking_conv2d(x, w, neuron="izhikevich")
    with pytest.raises(ValueError, match="larger"):
        spiking_conv2d(x[..., :2, :2], w)


def test_error_cpu_without_interpreter(monkeypatch):
    x = (torch.rand(2, 1, 4, 6, 6) < 0.3).float()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA"):
        spiking_conv2d(x, torch.randn(8, 4, 3, 3))


@pytest.mark.parametrize("T", [1, 2, 5], ids=["T1", "T2", "T5-pads-to-8"])
def test_t_in_m_time_steps(T):
    """Time in the GEMM rows pads T to a power of two; the padded rows must not leak into real steps."""
    p = NEURONS["if-soft"]
    layer = make_layer(T=T, N=1, C=16, CO=16, H=6, W=5, residual=True, v0=True)
    spikes, v = run(layer, p, return_v=True, config=TM_CONFIG, sparse=True)
    check(layer, p, spikes, v)


@pytest.mark.parametrize("CO", [1, 17], ids=["CO1", "CO17"])
def test_write_occupancy_partial_channel_groups(CO):
    p = NEURONS["if-hard"]
    layer = make_layer(T=2, N=2, C=20, CO=CO, H=9, W=10)
    spikes, v, occ = run(layer, p, return_v=True, write_occupancy=True)
    check(layer, p, spikes, v)
    assert occ.codes.shape == (4, 2, 2, -(-CO // 16))
    assert torch.equal(occ.codes, prescan(spikes.flatten(0, 1), 8, 16).codes)


def test_empty_batch():
    w = torch.randn(8, 4, 3, 3)
    out, v = spiking_conv2d(torch.zeros(3, 0, 4, 6, 6), w, padding=1, return_v=True)
    assert out.shape == (3, 0, 8, 6, 6) and v.shape == (0, 8, 6, 6)


STATIC_SHAPES = st.tuples(st.integers(2, 5), st.integers(1, 2), st.integers(1, 4), st.integers(3, 7),
                          st.sampled_from([(3, 1, 1), (1, 1, 0), (3, 2, 1), (5, 2, 2)]))


@settings(max_examples=6, deadline=None)
@given(shape=STATIC_SHAPES, neuron=st.sampled_from(["lif-hard", "if-soft", "plif-hard"]), seed=st.integers(0, 999))
def test_input_repeated_by_stride_zero(shape, neuron, seed):
    """An input repeated over the steps by stride 0 (the cuDNN path then convolves x[0] once) matches the float64
    reference of the repeated input, spikes and final membrane."""
    T, N, C, H, (k, stride, padding) = shape
    torch.manual_seed(seed)
    p = NEURONS[neuron]
    frame = torch.randn(N, C, H, H) * 2  # real-valued: an image
    layer = make_layer(T=T, N=N, C=C, CO=6, H=H, W=H, k=k, stride=stride, padding=padding)
    layer["x"] = frame.unsqueeze(0).expand(T, N, C, H, H)
    assert layer["x"].stride(0) == 0
    y = conv2d_reference(*as_float64(frame, layer["w"], layer["b"]), stride, padding)
    z = y * layer["scale"].double().view(1, -1, 1, 1) + layer["shift"].double().view(1, -1, 1, 1)
    layer["z"] = z.unsqueeze(0).expand(T, *z.shape).contiguous()
    spikes, v = run(layer, p, path="cudnn", return_v=True)
    ref_s, ref_h, ref_v = reference_neuron(p, layer["z"], None)
    assert_spikes_match(spikes, ref_s, ref_h, p["v_threshold"], v, ref_v)


@pytest.mark.parametrize("path", ["fused", "fused-t_in_m", "cudnn"])
def test_final_membrane_is_a_tensor_of_its_own(path):
    """The final membrane equals the reference and is a tensor of its own, not a view, so that a neuron can detach it
    in place (SpikingJelly's ``detach``); every path stores it channels innermost, as its spikes."""
    p = NEURONS["lif-hard"]
    layer = make_layer(v0=True)
    kw = {"fused": {}, "fused-t_in_m": {"config": TM_CONFIG}, "cudnn": {"path": "cudnn"}}[path]
    spikes, v = run(layer, p, return_v=True, **kw)
    check(layer, p, spikes, v)
    assert v._base is None
    v.detach_()
    assert v.is_contiguous(memory_format=torch.channels_last)
