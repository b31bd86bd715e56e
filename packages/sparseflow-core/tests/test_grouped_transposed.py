"""optimize() on grouped/depthwise and transposed convolutions: their handlers, and a spiking MobileNetV2 and a
spiking U-Net in miniature: which layers are replaced, outputs equal to the dense model, report entries,
restore()."""

from __future__ import annotations

import copy

import pytest
import torch
from sf_core_zoo import TinyUNet, recalibrate_bn, repeat_time, smooth_images, tiny_mobilenet
from spikingjelly.activation_based import functional, layer, neuron
from torch import nn

import sparseflow_core
from sparseflow_core.handlers.grouped_transposed import GROUPED_HANDLER, TRANSPOSE_HANDLER
from sparseflow_core.registry import find_op_handler
from sparseflow_ops import SparseConv2d
from sparseflow_ops.conv_transpose import SparseConvTranspose2d
from sparseflow_ops.depthwise import SparseGroupedConv2d

T = 2


def rel(y, ref):
    return ((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def images(n, size):
    return repeat_time(smooth_images(n, size), T)


def calibrated(model, size):
    return recalibrate_bn(model, smooth_images(4, size), T)


def run(model, x):
    functional.reset_net(model)
    with torch.no_grad():
        y = model(x)
    functional.reset_net(model)
    return y


def entries(rep, cls):
    return {e.name: e for e in rep.layers if e.type == cls}


def test_handlers_registered_for_the_right_modules():
    assert find_op_handler(nn.Conv2d(8, 8, 3, groups=8)) is GROUPED_HANDLER
    assert find_op_handler(nn.Conv2d(8, 16, 3, groups=2)) is GROUPED_HANDLER
    assert find_op_handler(nn.Conv2d(8, 8, 3)) is not GROUPED_HANDLER
    assert find_op_handler(layer.ConvTranspose2d(8, 8, 2, 2)) is TRANSPOSE_HANDLER


def test_mobilenet_depthwise_and_pointwise_replaced(monkeypatch):
    """With write_occupancy the fused layers before the depthwise convs hand over their spikes' occupancy:
    the depthwise kernels run no prescan of their own."""
    from sparseflow_kernels import depthwise as kdw

    model = calibrated(tiny_mobilenet(), 16)
    x = images(1, 16)
    ref = run(model, x)
    opt, rep = sparseflow_core.optimize(copy.deepcopy(model), x, mode="sparse", block_size=4,
                                        write_occupancy=True, return_report=True)
    mods = dict(opt.named_modules())
    dw = [n for n, m in mods.items() if isinstance(m, SparseGroupedConv2d)]
    pw = [n for n, m in mods.items() if isinstance(m, SparseConv2d) and m.kernel_size == (1, 1)]
    assert len(dw) == 2 and all(mods[n].is_depthwise and mods[n].folded_bn is not None for n in dw)
    assert len(pw) >= 3  # expand / project 1x1 convs of the blocks and the head
    convs = entries(rep, "Conv2d")
    assert all(convs[n].action == "sparse" and "depthwise" in convs[n].detail for n in dw)
    assert all(mods[n].accepts_occupancy for n in dw)
    prescans = []
    monkeypatch.setattr(kdw, "prescan", lambda *a, **k: prescans.append(a) or pytest.fail("depthwise prescan"))
    y = run(opt, x)
    assert y.shape == ref.shape and rel(y, ref) < 1e-5
    assert all(mods[n].last_path == "sparse" for n in dw) and not prescans
    sparseflow_core.restore(opt)
    assert not any(isinstance(m, (SparseGroupedConv2d, SparseConv2d)) for m in opt.modules())
    assert rel(run(opt, x), ref) == 0


def test_unet_transposed_convs_replaced():
    model = calibrated(TinyUNet(), 16)
    x = images(1, 16)
    ref = run(model, x)
    only_grouped_transposed = lambda m, name: isinstance(m, nn.ConvTranspose2d) or not isinstance(m, nn.Conv2d)
    opt, rep = sparseflow_core.optimize(copy.deepcopy(model), x, mode="sparse", filter_fn=only_grouped_transposed,
                                        block_size=4, return_report=True)
    ups = {n: m for n, m in opt.named_modules() if isinstance(m, SparseConvTranspose2d)}
    assert sorted(ups) == ["up.0.0", "up.1.0"]
    assert {m.kernel_size for m in ups.values()} == {(2, 2), (3, 3)}
    assert all(m.folded_bn is not None for m in ups.values())
    ct_entries = entries(rep, "ConvTranspose2d").values()
    assert {e.action for e in ct_entries} == {"sparse"}
    assert all(0 < e.elem_density < 1 for e in ct_entries)  # the analyzer measured their spike density
    y = run(opt, x)
    assert y.shape == ref.shape == (T, 1, 3, 16, 16)
    assert rel(y, ref) < 1e-5
    assert all(m.last_path == "sparse" for m in ups.values())
    sparseflow_core.restore(opt)
    assert not any(isinstance(m, SparseConvTranspose2d) for m in opt.modules())
    assert type(opt.up[0][0]) is layer.ConvTranspose2d


class _Tiny(nn.Module):
    """image -> conv -> LIF -> {grouped conv, transposed conv with groups=2, depthwise on the image}."""

    def __init__(self):
        super().__init__()
        self.stem = layer.Conv2d(3, 8, 3, 1, 1, step_mode="m")
        self.sn = neuron.LIFNode(step_mode="m")
        self.grouped = layer.Conv2d(8, 8, 3, 1, 1, groups=2, step_mode="m")
        self.up_g2 = layer.ConvTranspose2d(8, 4, 2, 2, groups=2, step_mode="m")
        self.dw_image = layer.Conv2d(3, 3, 3, 1, 1, groups=3, step_mode="m")

    def forward(self, x):
        s = self.sn(self.stem(x) * 4)
        return self.grouped(s).sum() + self.up_g2(s).sum() + self.dw_image(x).sum()


def test_left_modules_and_reasons():
    net = _Tiny().eval()
    x = torch.rand(T, 1, 3, 6, 6)
    ref = run(net, x)
    opt, rep = sparseflow_core.optimize(copy.deepcopy(net), x, mode="sparse", return_report=True)
    by = {e.name: e for e in rep.layers}
    assert by["grouped"].action == "sparse" and "grouped (2 groups)" in by["grouped"].detail
    assert by["up_g2"].action == "left" and "groups=2" in by["up_g2"].reason
    assert by["dw_image"].action == "left" and "spiking" in by["dw_image"].reason
    assert isinstance(opt.grouped, SparseGroupedConv2d)
    assert type(opt.up_g2) is layer.ConvTranspose2d and type(opt.dw_image) is layer.Conv2d
    assert rel(run(opt, x), ref) < 1e-5
