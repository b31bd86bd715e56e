"""multistep_neuron_pool: the neuron over T and the max pool of its spikes in one pass. The pooled spikes are
``F.max_pool2d`` of the neuron kernel's spikes bit for bit, the final membrane the neuron kernel's bit for bit, and
the neuron kernel's spikes and membrane match the float64 neuron except at threshold ties. spiking_conv2d(pool=...)
returns the same on both of its paths. Outputs start as NaN; inputs are fresh random reals (firing and silent)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import NEURONS, assert_fires, assert_spikes_match, kernel_neuron_kwargs, poison_allocations

from sparseflow_kernels import NeuronSpec, multistep_neuron, spiking_conv2d
from sparseflow_kernels.naive import neuron_reference, spiking_conv2d_reference
from sparseflow_kernels.neuron_pool import multistep_neuron_pool, pool_uncovered

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    given = None

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

#: (kernel_size, stride, padding): the pools after the neurons of spiking VGGs and DVS networks, ResNet stems' and
#: others whose windows overlap or are not square
POOLS = [(2, 2, 0), (3, 2, 1), (3, 1, 1), (2, 1, 0), (1, 1, 0), ((2, 3), (2, 2), (0, 1)), ((3, 2), (2, 1), (1, 0))]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every tensor the wrappers allocate starts as NaN: an element a kernel forgets to write fails."""
    poison_allocations(monkeypatch)


def currents(shape, dtype, layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "channels_last":
        T, N, C, H, W = shape
        return (torch.randn(T, N, H, W, C, generator=g) * 0.8 + 0.3).movedim(-1, 2).to(dtype).to(DEVICE)
    return (torch.randn(shape, generator=g) * 0.8 + 0.3).to(dtype).to(DEVICE)


def pooled(spikes, pool):
    T, N = spikes.shape[:2]
    y = F.max_pool2d(spikes.flatten(0, 1).float(), *pool)
    return y.view(T, N, *y.shape[1:]).to(spikes.dtype)


def check_call(p, x, pool, scale=None, shift=None, v0=None, order=None):
    """One call against the neuron kernel + F.max_pool2d (bit for bit) and, through it, the float64 neuron."""
    spec = NeuronSpec.make(**kernel_neuron_kwargs(p))
    x_before = x.clone()
    y, v = multistep_neuron_pool(x, spec, kernel_size=pool[0], stride=pool[1], padding=pool[2], scale=scale,
                                 shift=shift, v=v0, return_v=True, order=order)
    assert torch.equal(x, x_before)
    s, v_ref = multistep_neuron(x, spec, scale=scale, shift=shift, v=v0, return_v=True)
    want = pooled(s, pool)
    assert y.shape == want.shape and y.dtype == x.dtype and not torch.isnan(y).any()
    assert torch.equal(y, want), "pooled spikes differ from the max pool of the neuron kernel's spikes"
    assert v.is_contiguous(memory_format=torch.channels_last) and torch.equal(v, v_ref)
    assert y[0].is_contiguous(memory_format=torch.channels_last)
    z = x.double()
    if scale is not None:
        z = z * scale.double().view(1, 1, -1, 1, 1)
    if shift is not None:
        z = z + shift.double().view(1, 1, -1, 1, 1)
    rs, rh, rv = neuron_reference(z.cpu(), spec, None if v0 is None else v0.double().cpu())
    assert_spikes_match(s.cpu(), rs, rh, p["v_threshold"], v.cpu(), rv, v_rtol=1e-2 if x.dtype != torch.float32
                        else 1e-4)
    return y, v, rs


@pytest.mark.parametrize("order", ["bits", "steps"])
@pytest.mark.parametrize("pool", POOLS, ids=str)
@pytest.mark.parametrize("neuron", ["lif-hard", "lif-soft", "if-hard", "plif-hard", "leaky-zero"])
def test_pooled_spikes_and_membrane(neuron, pool, order):
    T, N, C, H, W = 3, 2, 5, 6, 6
    x = currents((T, N, C, H, W), torch.float32, "channels_last", seed=1)
    g = torch.Generator().manual_seed(2)  # (not the global generator: the same inputs in any test order)
    scale, shift = (torch.rand(C, generator=g) + 0.5).to(DEVICE), (torch.randn(C, generator=g) * 0.2 + 0.3).to(DEVICE)
    v0 = (torch.randn(N, C, H, W, generator=g) * 0.4).to(DEVICE)
    _y, v, rs = check_call(NEURONS[neuron], x, pool, scale, shift, v0, order=order)
    assert_fires(rs)
    check_call(NEURONS[neuron], x, pool, v0=v, order=order)  # the membrane handed to the next call


@pytest.mark.parametrize("order", ["bits", "steps"])
@pytest.mark.parametrize("pool", [(3, 2, 1), (2, 2, 0), ((3, 2), (2, 1), (1, 0))], ids=str)
def test_static_frame_repeated_by_stride_zero(pool, order):
    """One frame repeated over the steps by stride 0 (a static image's stem): the same bits as the frame repeated
    in memory (``bits`` loads it once)."""
    T, N, C, H, W = 4, 2, 6, 8, 10
    frame = currents((1, N, C, H, W), torch.float16, "channels_last", seed=7)
    x = frame.expand(T, N, C, H, W)
    assert x.stride(0) == 0
    g = torch.Generator().manual_seed(8)
    scale, shift = (torch.rand(C, generator=g) + 0.5).to(DEVICE), (torch.randn(C, generator=g) * 0.2).to(DEVICE)
    p = NEURONS["lif-hard"]
    y, v, rs = check_call(p, x, pool, scale, shift, order=order)
    assert_fires(rs)
    y2, v2, _ = check_call(p, x.contiguous(), pool, scale, shift, order=order)
    assert torch.equal(y, y2) and torch.equal(v, v2)


@pytest.mark.parametrize("T", [5, 16, 20])
def test_the_orders_agree_and_the_rule_picks_bits_for_overlapping_or_static_windows(T):
    """The two orders give the same bits, with the steps held in each of the bit tensor's integer types (uint8
    up to 8 steps, int16 up to 16, int32 beyond: a spike at step 15 sets the int16's sign bit)."""
    from sparseflow_kernels.tiling import neuron_pool_order

    assert neuron_pool_order(4, (3, 3), (2, 2), False) == "bits"
    assert neuron_pool_order(16, (2, 2), (2, 2), False) == "steps"
    assert neuron_pool_order(4, (2, 2), (2, 2), True) == "bits"
    assert neuron_pool_order(40, (3, 3), (2, 2), True) == "steps"
    x = currents((T, 1, 9, 5, 6), torch.float16, "channels_last", seed=2)
    spec = NeuronSpec.make("if", v_threshold=0.9, v_reset=None)  # (soft reset: it fires at every late step too)
    outs = [multistep_neuron_pool(x, spec, kernel_size=3, stride=2, padding=1, return_v=True, order=o)
            for o in ("bits", "steps")]
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert 0 < outs[0][0].float().mean() < 1 and outs[0][0][-1].any()


def _prop(fn):
    if given is None:
        return pytest.mark.skip(reason="hypothesis is not installed")(fn)
    s = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                 suppress_health_check=list(HealthCheck), print_blob=True)
    return s(given(data=st.data())(fn))


@_prop
def test_property_pooled_spikes(data):
    """Random shapes (1s, primes, channel counts past one block), pool, neuron, dtype, layout, affine and initial
    membrane, among the pools whose windows cover the map."""
    pick = (lambda options: data.draw(st.sampled_from(list(options))))
    pool = pick(POOLS)
    shape = (pick([1, 2, 3]), pick([1, 2]), pick([1, 3, 17, 70]), pick([2, 3, 5, 6]), pick([2, 4, 7]))
    if pool_uncovered(shape[3], shape[4], *(((v, v) if isinstance(v, int) else v) for v in pool)):
        pool = (1, 1, 0)
    dtype = pick([torch.float32, torch.float16])
    p = NEURONS[pick(sorted(NEURONS))]
    x = currents(shape, dtype, pick(["contiguous", "channels_last"]), seed=pick(range(1000)))
    if pick([False, True]):  # one frame repeated over the steps by stride 0
        x = x[:1].expand(shape)
    C = shape[2]
    scale, shift = ((torch.rand(C).to(DEVICE) + 0.5, (torch.randn(C) * 0.3).to(DEVICE)) if pick([True, False])
                    else (None, None))
    v0 = (torch.randn(shape[1:]) * 0.5).to(DEVICE) if pick([True, False]) else None
    check_call(p, x, pool, scale, shift, v0, order=pick(["bits", "steps", None]))


def test_uncovered_pixels_and_bad_arguments_are_refused():
    x = currents((2, 1, 3, 7, 6), torch.float32)
    with pytest.raises(ValueError, match="the last of the 7 rows is in no window"):
        multistep_neuron_pool(x, "lif", kernel_size=2)
    with pytest.raises(ValueError, match="stride 3 is larger than the kernel 2"):
        multistep_neuron_pool(x, "lif", kernel_size=2, stride=3)
    with pytest.raises(ValueError, match="must be at most half the kernel size"):
        multistep_neuron_pool(x, "lif", kernel_size=2, padding=2)
    with pytest.raises(ValueError, match=r"expected x of shape \[T, N, C, H, W\]"):
        multistep_neuron_pool(x[0], "lif", kernel_size=1)
    with pytest.raises(ValueError, match=r"v must have shape \(1, 3, 7, 6\)"):
        multistep_neuron_pool(x, "lif", kernel_size=1, v=x[0, :, :2])
    with pytest.raises(ValueError, match=r"scale must have shape \[3\]"):
        multistep_neuron_pool(x, "lif", kernel_size=1, scale=torch.ones(4, device=DEVICE))
    with pytest.raises(ValueError, match=r"order must be one of \('bits', 'steps'\) or None, got 'rows'"):
        multistep_neuron_pool(x, "lif", kernel_size=1, order="rows")
    with pytest.raises(ValueError, match=r"order='bits' holds up to 32 steps \(one bit each\), got T=33"):
        multistep_neuron_pool(currents((33, 1, 1, 2, 2), torch.float32), "lif", kernel_size=2, order="bits")


def test_no_steps_returns_the_initial_membrane():
    x = currents((0, 2, 3, 4, 4), torch.float32)
    v0 = torch.randn(2, 3, 4, 4).to(DEVICE)
    y, v = multistep_neuron_pool(x, "lif", kernel_size=2, v=v0, return_v=True)
    assert y.shape == (0, 2, 3, 2, 2) and torch.equal(v, v0)


@pytest.mark.parametrize("path", ["fused", "cudnn"])
@pytest.mark.parametrize("pool", [(2, 2, 0), (3, 2, 1)], ids=str)
def test_spiking_conv2d_returns_the_pooled_spikes(pool, path):
    """Both paths of the spiking layer with ``pool``: the max pool of the layer's own spikes, and its membrane."""
    g = torch.Generator().manual_seed(5)
    T, N, C, CO, H, W = 2, 2, 4, 6, 6, 6
    x = (torch.rand(T, N, C, H, W, generator=g) < 0.4).float().to(DEVICE)
    w = (torch.randn(CO, C, 3, 3, generator=g) * 0.6).to(DEVICE)
    scale, shift = (torch.rand(CO, generator=g) + 0.5).to(DEVICE), (torch.rand(CO, generator=g) * 0.4).to(DEVICE)
    kw = dict(scale=scale, shift=shift, neuron="lif", tau=2.0, v_threshold=0.7, return_v=True, path=path)
    y, v = spiking_conv2d(x, w, None, 1, 1, pool=pool, **kw)
    s, v_ref = spiking_conv2d(x, w, None, 1, 1, **kw)
    assert torch.equal(y, pooled(s, pool)) and torch.equal(v, v_ref)
    rs = spiking_conv2d_reference(x.double(), w.double(), None, 1, 1, scale=scale.double(), shift=shift.double(),
                                  spec=NeuronSpec.make("lif", tau=2.0, v_threshold=0.7))[0]
    assert_fires(rs)
    if path == "cudnn":  # a static input: the convolution once, the neuron and the pool over T
        xs = x[:1].expand(T, *x.shape[1:])
        ys, vs = spiking_conv2d(xs, w, None, 1, 1, pool=pool, **kw)
        ss, vss = spiking_conv2d(xs, w, None, 1, 1, **kw)
        assert torch.equal(ys, pooled(ss, pool)) and torch.equal(vs, vss)


def test_spiking_conv2d_pool_refusals():
    x = currents((2, 1, 3, 7, 7), torch.float32)
    w = torch.randn(4, 3, 3, 3).to(DEVICE)
    with pytest.raises(ValueError, match="needs every pixel in a window of the pool"):
        spiking_conv2d(x, w, None, 1, 1, pool=(2, 2, 0), path="cudnn")
    with pytest.raises(ValueError, match="not with a residual"):
        spiking_conv2d(x, w, None, 1, 1, pool=(1, 1, 0), residual=torch.zeros(2, 1, 4, 7, 7, device=DEVICE))
    with pytest.raises(ValueError, match=r"pool must be \(kernel_size, stride, padding\)"):
        spiking_conv2d(x, w, None, 1, 1, pool=2)
    # the fused path pools whatever F.max_pool2d pools (its neuron ran on the whole map)
    y = spiking_conv2d(x, w, None, 1, 1, pool=(2, 2, 0))
    assert torch.equal(y, pooled(spiking_conv2d(x, w, None, 1, 1), (2, 2, 0)))


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("name", ["fused_dense", "tma_8x8", "tma_8x16", "tma_row64_n128"])
def test_fused_kernel_pools_in_its_epilogue(name, k):
    """The fused kernel's own pooling (windows inside its steps-looped tiles, maps of partial tiles): the max pool
    of the same kernel's unpooled spikes and the same membrane, bit for bit, against an output poisoned as NaN; the
    row tiles (``tma_row64_n128``) and maps the windows do not divide pool after the kernel instead."""
    from sparseflow_kernels.conv import pools_in_epilogue
    from sparseflow_kernels.neuron_pool import pool_args
    from sparseflow_kernels.spiking import new_spike_tensor
    from sparseflow_kernels.tiling import spiking_configs

    g = torch.Generator().manual_seed(k)
    T, N, C, CO = 3, 2, 16, 128 if name.endswith("n128") else 64
    for H, W in ((12, 20), (6, 10)):
        xs = (torch.rand(T, N, C, H, W, generator=g) < 0.4).half()
        x = new_spike_tensor(T, N, C, H, W, torch.float16, DEVICE)
        x.copy_(xs.to(DEVICE))
        w = (torch.randn(CO, C, 3, 3, generator=g) * 0.25).half().to(DEVICE)
        scale, shift = (torch.rand(CO, generator=g) + 0.5).to(DEVICE), (torch.rand(CO, generator=g) * 0.3).to(DEVICE)
        cfg = spiking_configs(C, CO, T, tma=True)[name]
        pool = (k, k, 0)
        kw = dict(scale=scale, shift=shift, neuron="lif", tau=2.0, v_threshold=0.6, return_v=True, config=cfg)
        y, v = spiking_conv2d(x, w, None, 1, 1, pool=pool, **kw)
        s, v_ref = spiking_conv2d(x, w, None, 1, 1, **kw)
        assert torch.equal(y, pooled(s, pool)) and torch.equal(v, v_ref)
        assert 0 < y.float().mean() < 1
        in_kernel = pools_in_epilogue(cfg, pool_args(*pool), H, W)
        assert in_kernel == (name != "tma_row64_n128" and H % k == 0 and W % k == 0 and (H, W, k) != (6, 10, 4))


@_prop
def test_property_tile_fills_the_device_or_reaches_its_floor(data):
    """The tile's lanes are powers of two within [256, 4096] (channels up to 64, at least 16 unless the layer has
    fewer); it is halved only where the default tile leaves multiprocessors idle, and then until there are four
    programs a multiprocessor or it is at its floor; otherwise it is the large maps' tile, loading step by step."""
    from sparseflow_kernels.tiling import neuron_pool_tile

    C = data.draw(st.integers(1, 600))
    P = data.draw(st.integers(1, 20000))
    KK = data.draw(st.sampled_from([1, 2, 4, 8, 16]))
    N = data.draw(st.integers(1, 64))
    sms = data.draw(st.sampled_from([1, 132, 10**4]))
    bp, bc, warps, prefetch = neuron_pool_tile(C, P, KK, N, sms)
    lanes = bp * KK * bc
    assert bp & (bp - 1) == 0 and bc & (bc - 1) == 0 and lanes <= max(4096, KK * bc)
    assert bc <= 64 and (bc >= 16 or bc >= C) and warps in (2, 4)
    full_bc = min(64, 1 << (C - 1).bit_length())
    full_bp = max(1, min(4096 // (KK * full_bc), 1 << (P - 1).bit_length()))

    def programs(p_, c_):
        return -(-P // p_) * -(-C // c_) * N

    assert prefetch == (programs(full_bp, full_bc) < sms)
    if prefetch:
        assert programs(bp, bc) >= 4 * sms or lanes <= 256 or (bp == 1 and bc <= 16)
    else:
        assert (bp, bc) == (full_bp, full_bc)


@pytest.mark.parametrize("pool", [(2, 2, 0), (3, 2, 1)], ids=str)
@pytest.mark.parametrize("neuron", ["lif-hard", "plif-hard", "if-hard"])
def test_small_tiles_prefetching_the_next_step(neuron, pool, monkeypatch):
    """With a device of many multiprocessors, small maps take the shrunk tile that loads step ``t + 1`` while
    step ``t`` is computed: the same pooled spikes and membrane (bit for bit against the neuron kernel + max pool),
    across tiles that split the channels and a last step that loads nothing."""
    from sparseflow_kernels import neuron_pool
    from sparseflow_kernels.tiling import neuron_pool_tile

    monkeypatch.setattr(neuron_pool, "multiprocessors", lambda device: 10**4)
    T, N, C, H, W = 4, 2, 40, 4, 6
    assert neuron_pool_tile(C, 6, 4, N, 10**4)[3]
    x = currents((T, N, C, H, W), torch.float16, "channels_last", seed=3)
    scale, shift = (torch.rand(C) + 0.5).to(DEVICE), (torch.randn(C) * 0.2 + 0.3).to(DEVICE)
    v0 = (torch.randn(N, C, H, W) * 0.4).to(DEVICE)
    _y, v, rs = check_call(NEURONS[neuron], x, pool, scale, shift, v0)
    assert_fires(rs)
    check_call(NEURONS[neuron], x, pool, v0=v)


@_prop
def test_property_bits_pool_tile(data):
    """The tile of the max pool of the bits: powers of two, up to 64 channels (16 unless the layer has fewer) and
    1024 lanes; below 1024 only where the full tile leaves fewer than four programs a multiprocessor, and not
    below 256 lanes unless the map has fewer pixels."""
    from sparseflow_kernels.tiling import neuron_pool_bits_tile

    C, P, N = data.draw(st.integers(1, 600)), data.draw(st.integers(1, 20000)), data.draw(st.integers(1, 64))
    sms = data.draw(st.sampled_from([1, 132, 10**4]))
    bp, bc, warps = neuron_pool_bits_tile(C, P, N, sms)
    lanes = bp * bc
    assert bp & (bp - 1) == 0 and bc & (bc - 1) == 0 and bc == min(64, 1 << (C - 1).bit_length())
    assert lanes <= 1024 and warps == max(1, min(4, lanes // 256))
    full = max(1, min(1024 // bc, 1 << (P - 1).bit_length()))
    if bp < full:
        assert -(-P // (2 * bp)) * -(-C // bc) * N < 4 * sms and 2 * lanes > 256
    assert lanes >= 256 or bp == full or bp == 1
