"""Models for the core tests built from SpikingJelly's model zoo and layers, so that the tests need no benchmark
package: zoo models with the LIF neuron SparseFlow's benchmarks use, AdaBN calibration so that randomly
initialised models fire, and miniature spiking MobileNetV2 / U-Net networks (depthwise, grouped and transposed
convolutions in their usual places). Every model is multi-step (``[T, N, 3, H, W]`` input) and in eval mode."""

from __future__ import annotations

import importlib
import math

import torch
import torch.nn.functional as F
from spikingjelly.activation_based import functional, layer, neuron
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# name -> (module of spikingjelly.activation_based.model, constructor, fixed keyword arguments, is a CNN)
ZOO_MODELS = {
    "spiking_resnet18": ("spiking_resnet", "spiking_resnet18", {}, True),
    "sew_resnet18": ("sew_resnet", "sew_resnet18", {"cnf": "ADD"}, True),
    "spikformer_ti": ("spikformer", "spikformer_ti", {}, False),
}


def lif_kwargs() -> dict:
    """LIF with ``tau=2``, hard reset to 0, ATan surrogate, detached reset (a fresh surrogate each call)."""
    from spikingjelly.activation_based import surrogate

    return {"tau": 2.0, "v_reset": 0.0, "surrogate_function": surrogate.ATan(), "detach_reset": True}


def zoo_model(name: str, T: int, num_classes: int = 10, **kw) -> nn.Module:
    """A model of SpikingJelly's zoo with :func:`lif_kwargs` neurons (the CNNs take ``neuron.LIFNode`` with them;
    the transformers keep their per-position paper defaults with these merged over them), neurons reset."""
    module, ctor, fixed, cnn = ZOO_MODELS[name]
    build = getattr(importlib.import_module(f"spikingjelly.activation_based.model.{module}"), ctor)
    if cnn:
        model = build(pretrained=False, spiking_neuron=neuron.LIFNode, num_classes=num_classes,
                      **{**fixed, **lif_kwargs(), **kw})
    else:
        model = build(T=T, num_classes=num_classes, spiking_neuron=None, **{**lif_kwargs(), **kw})
    functional.set_step_mode(model, "m")
    functional.reset_net(model)
    return model.eval()


def repeat_time(x: torch.Tensor, T: int) -> torch.Tensor:
    """``[N, ...]`` repeated over a leading time axis: ``[T, N, ...]`` (a contiguous copy)."""
    return x.unsqueeze(0).expand(T, *x.shape).contiguous()


def smooth_images(n: int, size: int) -> torch.Tensor:
    """``n`` normalised ``[3, size, size]`` images with image-like spatial correlation: random 4x4-pixel blobs,
    bilinearly upsampled."""
    low = torch.rand(n, 3, max(1, size // 4), max(1, size // 4))
    return (F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False) - 0.45) / 0.25


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: torch.Tensor, T: int, batches: int = 2) -> nn.Module:
    """AdaBN: every BatchNorm's running statistics re-estimated (cumulative average, batch statistics during the
    passes) over ``batches`` forward passes of ``images`` ``[M, 3, H, W]`` repeated over ``T`` steps, so that the
    neurons of a randomly initialised model neither stay silent nor saturate. Neurons reset, eval mode."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    momenta = [bn.momentum for bn in bns]
    param = next(model.parameters())
    model.eval()
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        bs = max(1, math.ceil(len(images) / batches))
        for i in range(batches):
            idx = torch.arange(i * bs, (i + 1) * bs) % len(images)
            functional.reset_net(model)
            model(repeat_time(images[idx].to(param.device, param.dtype), T))
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        functional.reset_net(model)
        model.eval()
    return model


def _lif() -> nn.Module:
    return neuron.LIFNode(**lif_kwargs(), step_mode="m")


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [layer.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False, step_mode="m"),
            layer.BatchNorm2d(cout, step_mode="m")]


def _inverted_residual(cin: int, hidden: int, cout: int, k: int, stride: int) -> nn.Sequential:
    """(expand 1x1 -> BN -> LIF, unless ``hidden == cin``) -> depthwise kxk -> BN -> LIF -> project 1x1 -> BN
    -> LIF."""
    expand = [*_conv_bn(cin, hidden, 1), _lif()] if hidden != cin else []
    return nn.Sequential(*expand, *_conv_bn(hidden, hidden, k, stride, groups=hidden), _lif(),
                         *_conv_bn(hidden, cout, 1), _lif())


def tiny_mobilenet(num_classes: int = 3) -> nn.Module:
    """A spiking MobileNetV2 in miniature: a stride-2 stem conv, two inverted-residual blocks (depthwise 3x3, then
    an expanding block with a stride-2 depthwise 5x5), a 1x1 head conv, average pooling and a linear classifier.
    Output ``[T, N, num_classes]``."""
    net = nn.Sequential(
        *_conv_bn(3, 16, 3, 2), _lif(),
        _inverted_residual(16, 16, 8, 3, 1), _inverted_residual(8, 16, 16, 5, 2),
        *_conv_bn(16, 32, 1), _lif(),
        layer.AdaptiveAvgPool2d((1, 1), step_mode="m"), layer.Flatten(start_dim=1, step_mode="m"),
        layer.Linear(32, num_classes, step_mode="m"),
    )
    return net.eval()


class TinyUNet(nn.Module):
    """A spiking U-Net in miniature: three encoder levels (two conv/BN/LIF each, 2x2 max pools between), a decoder
    that upsamples with stride-2 ``ConvTranspose2d`` (kernel 2, then kernel 3 with ``output_padding=1``, deepest
    level first: ``up.0.0``, ``up.1.0``), concatenates the encoder's spikes and runs two conv pairs, and a 1x1
    head: per-pixel scores ``[T, N, num_classes, H, W]`` (``H``, ``W`` multiples of 4)."""

    UPSAMPLE = ((2, 0, 0), (3, 1, 1))  # (kernel, padding, output_padding), deepest level first

    def __init__(self, num_classes: int = 3, ch: tuple[int, int, int] = (4, 8, 16)):
        super().__init__()

        def pair(cin, cout):
            return nn.Sequential(*_conv_bn(cin, cout, 3), _lif(), *_conv_bn(cout, cout, 3), _lif())

        self.enc = nn.ModuleList(pair(cin, cout) for cin, cout in zip((3, *ch[:-1]), ch))
        self.pool = layer.MaxPool2d(2, 2, step_mode="m")
        self.up = nn.ModuleList(
            nn.Sequential(layer.ConvTranspose2d(ch[i + 1], ch[i], k, 2, p, op, bias=False, step_mode="m"),
                          layer.BatchNorm2d(ch[i], step_mode="m"), _lif())
            for i, (k, p, op) in zip((1, 0), self.UPSAMPLE))
        self.dec = nn.ModuleList(pair(2 * ch[i], ch[i]) for i in (1, 0))
        self.head = layer.Conv2d(ch[0], num_classes, 1, step_mode="m")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, enc in enumerate(self.enc):
            x = enc(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.up, self.dec):
            x = dec(torch.cat([up(x), skips.pop()], dim=2))
        return self.head(x)
