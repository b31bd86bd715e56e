"""spiking_conv2d with ``ConvConfig(im2col=True)``: the reduction over the flattened (tap, channel) index, for layers
of few input channels (a DVS network's 2 polarities, an image's 3). Against the float64 reference (spikes equal except
at exact threshold ties), with a residual, an initial membrane, strides, a 7 x 7 stem, non-binary inputs, the max
pool in the epilogue (bit for bit the max pool of the same configuration's spikes); the refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import NEURONS, poison_allocations
from test_spiking_conv2d import check, make_layer, run

from sparseflow_kernels import ConvConfig
from sparseflow_kernels.conv import pack_conv_weight, pack_weight
from sparseflow_kernels.tiling import IM2COL_CONFIGS, spiking_configs

IM2COL = {name: spiking_configs(2, 128, 4)[name] for name in IM2COL_CONFIGS}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    poison_allocations(monkeypatch)


LAYERS = {
    "dvs-2ch-3x3": dict(C=2, CO=24, H=10, W=9),
    "image-3ch-7x7-s2": dict(C=3, CO=20, H=13, W=12, k=7, stride=2, padding=3),
    "5ch-3x3-s2-nobias": dict(C=5, CO=17, H=9, W=11, stride=2, bias=False),
    "1ch-1x1": dict(C=1, CO=16, k=1, padding=0),
    "15ch-3x3-residual-v0": dict(C=15, CO=24, residual=True, v0=True),
}


@pytest.mark.parametrize("name", list(IM2COL))
@pytest.mark.parametrize("layer_kind", list(LAYERS))
def test_against_float64(layer_kind, name):
    p = NEURONS["lif-hard" if "residual" not in layer_kind else "plif-hard"]
    layer = make_layer(T=3, N=2, **LAYERS[layer_kind])
    spikes, v = run(layer, p, return_v=True, config=IM2COL[name])
    check(layer, p, spikes, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_binary_inputs_and_half(dtype):
    p = NEURONS["lif-soft"]
    layer = make_layer(T=2, N=1, C=3, CO=16, H=8, W=8, kind="real", dtype=dtype)
    spikes, v = run(layer, p, return_v=True, config=IM2COL["im2col_8x8"])
    check(layer, p, spikes, v, v_rtol=1e-4 if dtype == torch.float32 else 5e-2)


@pytest.mark.parametrize("k", [2, 4])
def test_pool_in_the_epilogue(k):
    p = NEURONS["lif-hard"]
    layer = make_layer(T=2, N=2, C=2, CO=20, H=16, W=8)
    for name, cfg in IM2COL.items():
        y, v = run(layer, p, return_v=True, config=cfg, pool=(k, k, 0))
        s, v_ref = run(layer, p, return_v=True, config=cfg)
        want = F.max_pool2d(s.flatten(0, 1), k).view(y.shape)
        assert torch.equal(y, want) and torch.equal(v, v_ref), name


def test_candidates_and_refusals():
    assert set(IM2COL_CONFIGS) <= set(spiking_configs(15, 128, 4)) and not set(IM2COL_CONFIGS) & set(
        spiking_configs(16, 128, 4))
    assert "im2col_8x8_n128" not in spiking_configs(2, 64, 4)  # (no tile wider than the layer's channels)
    with pytest.raises(ValueError, match="im2col runs steps-looped tiles with pointer loads"):
        ConvConfig(4, 4, 64, 32, t_in_m=True, im2col=True)
    layer = make_layer(T=2, N=1, C=2, CO=16, H=8, W=8)
    cfg = IM2COL["im2col_8x8"]
    with pytest.raises(ValueError, match="is not packed for this layer and configuration"):
        run(layer, NEURONS["lif-hard"], config=cfg, packed_weight=pack_weight(layer["w"], 32, 64, torch.float32))
    with pytest.raises(ValueError, match=r"im2col=True\) runs dense"):
        run(layer, NEURONS["lif-hard"], config=cfg, sparse=True)
    packed = pack_conv_weight(layer["w"], cfg, torch.float32)
    assert packed.shape == (1, 32, 64)  # 3 x 3 taps of 2 channels: one K block of 32
    y = run(layer, NEURONS["lif-hard"], config=cfg, packed_weight=packed)
    assert torch.equal(y, run(layer, NEURONS["lif-hard"], config=cfg))
