"""GPU correctness (run on the device machine by scripts/gpu_check.sh): randomized sweeps of every kernel
path against float64 references, all three storage dtypes, both memory formats."""

import pytest
import torch
import torch.nn.functional as F

from sparseflow_kernels import (
    ConvConfig,
    NeuronSpec,
    multistep_neuron,
    prescan,
    sparse_conv2d,
    spiking_conv2d,
)
from sparseflow_kernels.naive import neuron_reference, spiking_conv2d_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def sparse_input(shape, density, g, dtype, channels_last, values="int"):
    x = (torch.rand(shape, generator=g, device="cuda") < density).float()
    if values == "int":
        x = x * torch.randint(1, 3, shape, generator=g, device="cuda").float()
    else:
        x = x * torch.randn(shape, generator=g, device="cuda")
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("seed", range(12))
def test_sparse_conv2d_random_sweep(dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    gc = torch.Generator().manual_seed(seed)
    pick = lambda opts: opts[int(torch.randint(len(opts), (1,), generator=gc))]
    N, C, CO = pick([1, 2, 5]), pick([3, 16, 37, 64, 130]), pick([1, 17, 64, 96])
    H, W = pick([7, 13, 28, 31, 56]), pick([5, 14, 29, 56])
    k, s = pick([1, 3, 3, 5]), pick([1, 2])
    p = pick([0, 1, 2]) if k > 1 else pick([0, 1])
    d = pick([1, 1, 2])
    if H + 2 * p < d * (k - 1) + 1 or W + 2 * p < d * (k - 1) + 1:
        d = 1
    density = pick([0.0, 0.01, 0.05, 0.3, 1.0])
    x = sparse_input((N, C, H, W), density, g, dtype, bool(seed % 2), pick(["int", "real"]))
    w = torch.randn(CO, C, k, k, generator=g, device="cuda").to(dtype)
    b = torch.randn(CO, generator=g, device="cuda").to(dtype) if seed % 3 else None
    ref = F.conv2d(x.double(), w.double(), None if b is None else b.double(), s, p, d)
    for bs in (8, 16):
        y = sparse_conv2d(x, w, b, s, p, d, block_size=bs)
        assert y.shape == ref.shape and not torch.isnan(y).any()
        if ref.norm() == 0:
            assert torch.equal(y.double(), ref)
        else:
            assert rel(y, ref) < TOL[dtype], (N, C, H, W, CO, k, s, p, d, density, bs)


def test_sparse_conv2d_nan_inf_propagate():
    x = torch.zeros(2, 16, 20, 20, device="cuda")
    x[0, 3, 5, 5] = float("nan")
    x[1, 7, 17, 2] = float("inf")
    w = torch.randn(8, 16, 3, 3, device="cuda")
    ref = F.conv2d(x, w, None, 1, 1)
    y = sparse_conv2d(x, w, None, 1, 1)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(torch.isinf(y), torch.isinf(ref))


def _flips(s, rs, rh, v_th, tol=1e-4):
    """Spike mismatches not explained by a reference membrane within tol of the threshold at the first
    differing step of that neuron."""
    diff = (s.double() != rs)
    if not diff.any():
        return 0
    first = diff.float().argmax(0)
    anyd = diff.any(0)
    h_at = torch.gather(rh, 0, first.unsqueeze(0))[0]
    return int((anyd & ((h_at - v_th).abs() > tol)).sum())


_DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_COMBOS = [(d, p, n) for p in ("fused", "tm", "sparse", "occ_chain", "cudnn") for d in ("fp32", "fp16")
           for n in ("lif_hard", "lif_soft", "if", "plif", "leaky")]
_COMBOS += [("bf16", p, "lif_hard") for p in ("fused", "tm", "sparse", "cudnn")]


@pytest.mark.parametrize("dt,path,neuron", _COMBOS, ids=["-".join(c) for c in _COMBOS])
def test_spiking_conv2d_paths(dt, path, neuron):
    dtype = _DT[dt]
    g = torch.Generator(device="cuda").manual_seed(hash((path, neuron)) % 1000)
    T, N, C, H, W, CO = 3, 2, 48, 21, 19, 40
    x = sparse_input((T, N, C, H, W), 0.1, g, dtype, False)
    w = (torch.randn(CO, C, 3, 3, generator=g, device="cuda") * 0.2).to(dtype)
    sc = torch.rand(CO, generator=g, device="cuda") + 0.5
    sh = torch.randn(CO, generator=g, device="cuda") * 0.2
    res = (torch.rand(T, N, CO, H, W, generator=g, device="cuda") < 0.2).to(dtype)
    kw = {"lif_hard": dict(neuron="lif"), "lif_soft": dict(neuron="lif", v_reset=None),
          "if": dict(neuron="if"), "plif": dict(neuron="plif", tau=1 / 0.6),
          "leaky": dict(neuron="leaky", beta=0.8, v_reset=None)}[neuron]
    spec = NeuronSpec.make(**kw)
    extra = {"fused": {}, "tm": {"config": ConvConfig(4, 4, 64, 16, t_in_m=True)}, "sparse": {"sparse": True},
             "occ_chain": {"occupancy": prescan(x.flatten(0, 1), 8, 16)}, "cudnn": {"path": "cudnn"}}[path]
    s, _v = spiking_conv2d(x, w, None, 1, 1, scale=sc, shift=sh, residual=res, return_v=True, **kw, **extra)
    rs, rh, _rv = spiking_conv2d_reference(x.double(), w.double(), None, 1, 1, scale=sc.double(),
                                          shift=sh.double(), residual=res.double(), spec=spec)
    # fp32 accumulation everywhere; the cudnn path rounds the conv to the storage dtype before the neuron
    tol = 1e-4 if (dtype == torch.float32 and path != "cudnn") else 3e-2
    assert _flips(s, rs, rh, spec.v_threshold, tol) == 0
    assert s.sum() > 0


@pytest.mark.parametrize("dt", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("layer", ["dvs-2ch-3x3", "stem-3ch-7x7-s2", "7ch-3x3-residual"])
def test_spiking_conv2d_im2col(dt, layer):
    """The im2col tilings (the (tap, channel) reduction of layers of few channels) on the GPU, every one of them,
    against the float64 reference: spikes equal except at threshold ties, channels_last and contiguous inputs."""
    from sparseflow_kernels.tiling import IM2COL_CONFIGS, spiking_configs

    dtype = _DT[dt]
    C, k, st, pad, res = {"dvs-2ch-3x3": (2, 3, 1, 1, False), "stem-3ch-7x7-s2": (3, 7, 2, 3, False),
                          "7ch-3x3-residual": (7, 3, 1, 1, True)}[layer]
    g = torch.Generator(device="cuda").manual_seed(C)
    T, N, H, W, CO = 4, 3, 37, 30, 128
    x = sparse_input((T, N, C, H, W), 0.15, g, dtype, False)
    w = (torch.randn(CO, C, k, k, generator=g, device="cuda") * 0.5).to(dtype)
    sc = torch.rand(CO, generator=g, device="cuda") + 0.5
    sh = torch.randn(CO, generator=g, device="cuda") * 0.2
    OH, OW = (H + 2 * pad - k) // st + 1, (W + 2 * pad - k) // st + 1
    r = (torch.rand(T, N, CO, OH, OW, generator=g, device="cuda") < 0.2).to(dtype) if res else None
    spec = NeuronSpec.make("lif", tau=2.0)
    rs, rh, _rv = spiking_conv2d_reference(x.double(), w.double(), None, st, pad, scale=sc.double(),
                                          shift=sh.double(), residual=None if r is None else r.double(), spec=spec)
    cfgs = spiking_configs(C, CO, T)
    for name in IM2COL_CONFIGS:
        for xs in (x, x.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(x.shape)):
            s, _v = spiking_conv2d(xs, w, None, st, pad, scale=sc, shift=sh, residual=r, neuron="lif", tau=2.0,
                                   return_v=True, config=cfgs[name])
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            assert _flips(s, rs, rh, spec.v_threshold, tol) == 0, name
            assert 0 < s.float().mean() < 1


@pytest.mark.parametrize("dt", ["fp32", "fp16"])
def test_spiking_conv2d_static_stem(dt):
    """A ResNet stem (3 -> 64, 7 x 7 / 2) on a static image repeated over T by stride 0, every steps-looped tiling
    (the frame convolved once per tile): the spikes and membrane of the same tiling on the input repeated in memory,
    bit for bit, and the float64 reference's except at threshold ties."""
    from sparseflow_kernels.tiling import spiking_configs

    dtype = _DT[dt]
    g = torch.Generator(device="cuda").manual_seed(7)
    T, N, C, H, CO = 4, 3, 3, 61, 64
    frame = (torch.randn(N, C, H, H, generator=g, device="cuda") * 1.5).to(dtype)
    x = frame.unsqueeze(0).expand(T, *frame.shape)
    w = (torch.randn(CO, C, 7, 7, generator=g, device="cuda") * 0.3).to(dtype)
    sc = torch.rand(CO, generator=g, device="cuda") + 0.5
    sh = torch.randn(CO, generator=g, device="cuda") * 0.2
    spec = NeuronSpec.make("lif", tau=2.0)
    rs, rh, _rv = spiking_conv2d_reference(x.double(), w.double(), None, 2, 3, scale=sc.double(), shift=sh.double(),
                                          spec=spec)
    looped = {n: c for n, c in spiking_configs(C, CO, T).items() if not c.t_in_m}
    assert any(c.im2col for c in looped.values())
    for name, cfg in looped.items():
        kw = dict(scale=sc, shift=sh, neuron="lif", tau=2.0, return_v=True, config=cfg)
        s, v = spiking_conv2d(x, w, None, 2, 3, **kw)
        ms, mv = spiking_conv2d(x.contiguous(), w, None, 2, 3, **kw)
        assert torch.equal(s, ms) and torch.equal(v, mv), name
        assert _flips(s, rs, rh, spec.v_threshold, 1e-4 if dtype == torch.float32 else 3e-2) == 0, name
        assert 0 < s.float().mean() < 1
    # the pair on the im2col kernel: the frames convolved once, then the neuron kernel (and the stem's max pool)
    pc = spiking_configs(C, CO, T)["im2col_8x8"]
    for pool in (None, (3, 2, 1)):
        kw = dict(scale=sc, shift=sh, neuron="lif", tau=2.0, return_v=True, config=pc, path="triton_conv", pool=pool)
        s, v = spiking_conv2d(x, w, None, 2, 3, **kw)
        ms, mv = spiking_conv2d(x.contiguous(), w, None, 2, 3, **kw)
        assert torch.equal(s, ms) and torch.equal(v, mv), pool
        if pool is None:
            assert _flips(s, rs, rh, spec.v_threshold, 1e-4 if dtype == torch.float32 else 3e-2) == 0
        else:
            ref = F.max_pool2d(rs.flatten(0, 1).float(), 3, 2, 1).view(s.shape)
            assert (s.float() != ref).float().mean() < (1e-3 if dtype == torch.float32 else 2e-2)  # (ties)
            assert 0 < s.float().mean() < 1


_TOKEN_PATHS = {"fused": {"config": ConvConfig(1, 64, 64, 64)},
                "tm": {"config": ConvConfig(1, 32, 64, 64, t_in_m=True)},
                "tm_n128": {"config": ConvConfig(1, 32, 128, 64, t_in_m=True, num_warps=8)},
                "sparse": {"config": ConvConfig(1, 64, 64, 64), "sparse": True}, "cudnn": {"path": "cudnn"}}


@pytest.mark.parametrize("dt", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("path", list(_TOKEN_PATHS))
def test_spiking_projection_tokens_residual_after(dt, path):
    """Spikformer's fused projections: a 1x1 spiking layer over [T, N, C, 1, L] tokens with the skip connection
    added after the neuron (residual_after), in the configurations SparseConv1d measures."""
    dtype = _DT[dt]
    g = torch.Generator(device="cuda").manual_seed(7)
    T, N, C, L, CO = 4, 3, 256, 197, 384
    x = sparse_input((T, N, C, 1, L), 0.15, g, dtype, False)
    w = (torch.randn(CO, C, 1, 1, generator=g, device="cuda") * 0.15).to(dtype)
    sc = torch.rand(CO, generator=g, device="cuda") + 0.5
    sh = torch.randn(CO, generator=g, device="cuda") * 0.2
    res = torch.randint(0, 3, (T, N, CO, 1, L), generator=g, device="cuda").to(dtype)  # sums of spikes
    out, _v = spiking_conv2d(x, w, None, 1, 0, scale=sc, shift=sh, residual=res, residual_after=True,
                             return_v=True, v_dtype=dtype, **_TOKEN_PATHS[path])
    spec = NeuronSpec.make("lif")
    rs, rh, _rv = spiking_conv2d_reference(x.double(), w.double(), None, 1, 0, scale=sc.double(),
                                          shift=sh.double(), spec=spec)
    s = out - res  # exact: small integers
    assert torch.equal(out, res + s) and bool(((s == 0) | (s == 1)).all())
    tol = 1e-4 if (dtype == torch.float32 and path != "cudnn") else 3e-2
    assert _flips(s, rs, rh, spec.v_threshold, tol) == 0
    assert s.sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_multistep_neuron_matches_reference(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(4, 3, 33, 7, 5, generator=g, device="cuda") * 1.5).to(dtype)
    for kw in (dict(neuron="lif"), dict(neuron="if", v_reset=None), dict(neuron="leaky", beta=0.9, v_reset=0.0)):
        spec = NeuronSpec.make(**kw)
        s, _v = multistep_neuron(x, spec, return_v=True)
        rs, rh, _rv = neuron_reference(x.double(), spec)
        assert _flips(s, rs, rh, spec.v_threshold, 1e-4 if dtype == torch.float32 else 1e-2) == 0


@pytest.mark.parametrize("pool", [(2, 2, 0), (3, 2, 1)], ids=["2-2-0", "3-2-1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_neuron_pool_is_the_neuron_then_the_pool(dtype, pool):
    """multistep_neuron_pool on the GPU (a DVS layer's layout: channels_last steps, 2 blocks of channels, T=16):
    the max pool of the neuron kernel's spikes and its membrane, bit for bit; spiking_conv2d's cuDNN path with
    ``pool`` the same, also on a static input."""
    from sparseflow_kernels.neuron_pool import ORDERS, multistep_neuron_pool

    g = torch.Generator(device="cuda").manual_seed(1)
    T, N, C, H, W = 16, 2, 96, 18, 20
    x = (torch.randn(T * N, H, W, C, generator=g, device="cuda") * 0.8 + 0.3).to(dtype)
    x = x.permute(0, 3, 1, 2).view(T, N, C, H, W)
    scale = torch.rand(C, generator=g, device="cuda") + 0.5
    shift = torch.randn(C, generator=g, device="cuda") * 0.2
    v0 = torch.randn(N, C, H, W, generator=g, device="cuda") * 0.3
    for spec in (NeuronSpec.make("plif", decay=0.4), NeuronSpec.make("lif", tau=2.0, v_reset=None)):
        s, v_ref = multistep_neuron(x, spec, scale=scale, shift=shift, v=v0, return_v=True)
        want = F.max_pool2d(s.flatten(0, 1).float(), *pool).to(dtype)
        for order in ORDERS:
            y, v = multistep_neuron_pool(x, spec, kernel_size=pool[0], stride=pool[1], padding=pool[2],
                                         scale=scale, shift=shift, v=v0, return_v=True, order=order)
            assert torch.equal(y.flatten(0, 1), want) and torch.equal(v, v_ref) and 0 < y.float().mean() < 1, order
        # one frame repeated by stride 0 (a static stem): the same bits as the frame repeated in memory
        xs = x[:1].expand(T, *x.shape[1:])
        s, v_ref = multistep_neuron(xs.contiguous(), spec, scale=scale, shift=shift, v=v0, return_v=True)
        want = F.max_pool2d(s.flatten(0, 1).float(), *pool).to(dtype)
        for order in ORDERS:
            y, v = multistep_neuron_pool(xs, spec, kernel_size=pool[0], stride=pool[1], padding=pool[2],
                                         scale=scale, shift=shift, v=v0, return_v=True, order=order)
            assert torch.equal(y.flatten(0, 1), want) and torch.equal(v, v_ref), order
    w = (torch.randn(C, C, 3, 3, generator=g, device="cuda") * 0.05).to(dtype)
    for xs in (x, x[:1].expand(T, *x.shape[1:])):
        kw = dict(scale=scale, shift=shift, neuron="lif", return_v=True, path="cudnn")
        y, v = spiking_conv2d(xs, w, None, 1, 1, pool=pool, **kw)
        s, v_ref = spiking_conv2d(xs, w, None, 1, 1, **kw)
        assert torch.equal(y.flatten(0, 1), F.max_pool2d(s.flatten(0, 1).float(), *pool).to(dtype))
        assert torch.equal(v, v_ref)
    # the fused kernel's steps-looped tilings, pooling in their epilogue (2 / 2) or after the kernel (3 / 2 / 1)
    from sparseflow_kernels.tiling import spiking_configs

    names = ["fused_dense"] + (["tma_8x8", "tma_8x16"] if dtype != torch.float32 else [])
    for name in names:
        kw = dict(scale=scale, shift=shift, neuron="lif", return_v=True, config=spiking_configs(C, C, T, True)[name])
        y, v = spiking_conv2d(x, w, None, 1, 1, pool=pool, **kw)
        s, v_ref = spiking_conv2d(x, w, None, 1, 1, **kw)
        assert torch.equal(y.flatten(0, 1), F.max_pool2d(s.flatten(0, 1).float(), *pool).to(dtype)), name
        assert torch.equal(v, v_ref), name


@pytest.mark.parametrize("layout", ["channels_innermost", "contiguous"])
def test_qk_token_attention_is_the_dense_composition(layout):
    """QKFormer's token attention on the GPU at its first stage's shape (T=4, N=8, 96 channels in 8 heads, 56 x 56
    tokens), fp16 spikes: the head sums in fp16, the multi-step neuron kernel and ``attn * k``, bit for bit, from a
    carried membrane."""
    from sparseflow_kernels import qk_token_attention

    g = torch.Generator(device="cuda").manual_seed(2)
    T, N, C, heads, L = 4, 8, 96, 8, 56 * 56
    qk = (torch.rand(T, N, L, 2 * C, generator=g, device="cuda") < 0.2).half()
    qk = qk.transpose(2, 3) if layout == "channels_innermost" else qk.transpose(2, 3).contiguous()
    spec = NeuronSpec.make("lif", tau=2.0, v_threshold=1.5)
    v0 = (torch.rand(N, heads, 1, L, generator=g, device="cuda") * 1.2).half()
    y, v = qk_token_attention(qk, heads, spec, v=v0, return_v=True)
    q = qk[:, :, :C].reshape(T, N, heads, C // heads, L)
    k = qk[:, :, C:].reshape(T, N, heads, C // heads, L)
    attn, v_ref = multistep_neuron(q.sum(dim=3, keepdim=True), spec, v=v0.float(), return_v=True,
                                   v_dtype=torch.float16)
    assert torch.equal(y, (attn * k).reshape(T, N, C, L)) and torch.equal(v, v_ref)
    assert 0 < attn.float().mean() < 1


def test_every_pooling_candidate_on_the_dvs_layers():
    """Every candidate a pooling spiking layer measures, on the DVS Gesture network's five layer shapes (T=16, N=8,
    2 -> 128 channels at 128 x 128, then 128 at 64 ... 8; pool 2 / 2), run as the dispatch runs it: eagerly, from a
    carried membrane, then captured in a CUDA graph and replayed, each synchronised: the max pool of the same
    candidate's unpooled spikes, and the same membrane, with no fault."""
    from sparseflow_kernels.spiking import new_spike_tensor
    from sparseflow_kernels.tiling import spiking_configs

    T, N = 16, 8
    g = torch.Generator(device="cuda").manual_seed(0)
    for C, H in ((2, 128), (128, 64), (128, 32), (128, 16), (128, 8)):
        x = new_spike_tensor(T, N, C, H, H, torch.float16, "cuda")
        x.copy_((torch.rand(T, N, C, H, H, generator=g, device="cuda") < 0.15).half())
        w = (torch.randn(128, C, 3, 3, generator=g, device="cuda") * 0.1).half()
        sc, sh = torch.rand(128, device="cuda") + 0.5, torch.rand(128, device="cuda") * 0.2
        cands = {n: dict(config=c) for n, c in spiking_configs(C, 128, T, tma=C >= 8, N=N).items()}
        cands["cudnn"] = dict(path="cudnn")
        kw = dict(scale=sc, shift=sh, neuron=NeuronSpec.make("plif", decay=0.5), return_v=True,
                  v_dtype=torch.float16)
        for name, how in cands.items():
            s, v = spiking_conv2d(x, w, None, 1, 1, **kw, **how)
            y, v1 = spiking_conv2d(x, w, None, 1, 1, pool=(2, 2, 0), **kw, **how)
            torch.cuda.synchronize()
            want = F.max_pool2d(s.flatten(0, 1).float(), 2).half()
            assert torch.equal(y.flatten(0, 1), want) and torch.equal(v1, v), (C, H, name)
            y2, _ = spiking_conv2d(x, w, None, 1, 1, pool=(2, 2, 0), v=v, **kw, **how)
            graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.cuda.graph(graph):
                y3, _ = spiking_conv2d(x, w, None, 1, 1, pool=(2, 2, 0), v=v, **kw, **how)
            torch.cuda.current_stream().wait_stream(stream)
            for _ in range(3):
                y3.fill_(float("nan"))
                graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(y3, y2), (C, H, name)
