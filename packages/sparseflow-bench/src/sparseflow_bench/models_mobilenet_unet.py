"""Reference models of depthwise and transposed convolutions: a spiking MobileNetV2-style classifier and a spiking
U-Net-style encoder-decoder.

Both are built from SpikingJelly layers (``layer.Conv2d``, ``layer.BatchNorm2d``, ``layer.ConvTranspose2d``,
...) and the benchmark LIF neuron (:func:`sparseflow_bench.models.lif_kwargs`), in multi-step mode
(``step_mode='m'``, inputs ``[T, N, 3, H, W]``), with random weights (calibrate with
:func:`~sparseflow_bench.models.recalibrate_bn`).

* ``spiking_mobilenetv2``: a stem conv, the inverted-residual stages of MobileNetV2 (``expand 1x1 -> BN -> LIF
  -> depthwise 3x3 (5x5 in the 160-channel stage, as in MnasNet) -> BN -> LIF -> project 1x1 -> BN -> LIF``)
  with SEW-style residuals (``out = LIF(...) + x``: spike counts 0/1/2 reach the next block), a 1x1 head conv,
  average pooling and a linear classifier. Output ``[T, N, num_classes]``. ``width_mult`` and ``stages`` shrink
  it (tests).
* ``spiking_unet``: an encoder of ``conv3x3 -> BN -> LIF`` pairs and 2x2 max-pooling, and a decoder that
  upsamples with ``ConvTranspose2d`` stride 2 (kernels 2, 3 (``output_padding=1``) and 4, padding 1, from the
  deepest level up), concatenates the encoder's spikes and runs two conv pairs; a 1x1 conv gives per-pixel
  class scores ``[T, N, num_classes, H, W]``. ``H`` and ``W`` must be multiples of ``2 ** depth``.

Every convolution but the stem / first encoder conv and the segmentation head consumes spikes, so
``sparseflow_core.optimize`` can replace the depthwise, pointwise and transposed convolutions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["MOBILENET_STAGES", "MOBILENET_UNET_MODELS", "SpikingMobileNetV2", "SpikingUNet"]

#: (expansion t, output channels c, repeats n, first stride s, depthwise kernel k) of MobileNetV2
MOBILENET_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 16, 1, 1, 3),
    (6, 24, 2, 2, 3),
    (6, 32, 3, 2, 3),
    (6, 64, 4, 2, 3),
    (6, 96, 3, 1, 3),
    (6, 160, 3, 2, 5),
    (6, 320, 1, 1, 3),
)


def _lif(**kw: Any) -> nn.Module:
    from spikingjelly.activation_based import neuron

    from .models import lif_kwargs

    return neuron.LIFNode(**{**lif_kwargs(), **kw}, step_mode="m")


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    from spikingjelly.activation_based import layer

    return [layer.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False, step_mode="m"),
            layer.BatchNorm2d(cout, step_mode="m")]


def _make_div(v: float, d: int = 8) -> int:
    return max(d, int(v + d / 2) // d * d)


class InvertedResidual(nn.Module):
    """expand 1x1 -> BN -> LIF -> depthwise kxk -> BN -> LIF -> project 1x1 -> BN -> LIF (+ x, SEW ADD)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, k: int = 3, **lif: Any):
        super().__init__()
        hid = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [*_conv_bn(cin, hid, 1), _lif(**lif)]
        layers += [*_conv_bn(hid, hid, k, stride, groups=hid), _lif(**lif)]
        layers += [*_conv_bn(hid, cout, 1), _lif(**lif)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return y + x if self.residual else y


class SpikingMobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, stages=MOBILENET_STAGES,
                 last_channels: int = 1280, **lif: Any):
        from spikingjelly.activation_based import layer

        super().__init__()
        cin = _make_div(32 * width_mult)
        feats: list[nn.Module] = [*_conv_bn(3, cin, 3, 2), _lif(**lif)]
        for t, c, n, s, k in stages:
            cout = _make_div(c * width_mult)
            for i in range(n):
                feats.append(InvertedResidual(cin, cout, s if i == 0 else 1, t, k, **lif))
                cin = cout
        last = _make_div(last_channels * max(1.0, width_mult))
        feats += [*_conv_bn(cin, last, 1), _lif(**lif)]
        self.features = nn.Sequential(*feats)
        self.pool = layer.AdaptiveAvgPool2d((1, 1), step_mode="m")
        self.flatten = layer.Flatten(start_dim=1, step_mode="m")
        self.classifier = layer.Linear(last, num_classes, step_mode="m")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


class SpikingUNet(nn.Module):
    """Encoder ``depth`` levels deep (``base * 2**i`` channels), transposed-conv decoder with skip concats."""

    #: (kernel, padding, output_padding) of the decoder's stride-2 ConvTranspose2d, deepest level first
    UPSAMPLE = ((2, 0, 0), (3, 1, 1), (4, 1, 0))

    def __init__(self, num_classes: int = 2, base: int = 32, depth: int = 3, in_channels: int = 3, **lif: Any):
        from spikingjelly.activation_based import layer

        super().__init__()
        self.depth = depth
        ch = [base * 2 ** i for i in range(depth + 1)]
        self.enc = nn.ModuleList()
        cin = in_channels
        for i in range(depth + 1):
            self.enc.append(nn.Sequential(*_conv_bn(cin, ch[i], 3), _lif(**lif), *_conv_bn(ch[i], ch[i], 3),
                                          _lif(**lif)))
            cin = ch[i]
        self.pool = layer.MaxPool2d(2, 2, step_mode="m")
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for j, i in enumerate(range(depth - 1, -1, -1)):
            k, p, op = self.UPSAMPLE[j % len(self.UPSAMPLE)]
            self.up.append(nn.Sequential(
                layer.ConvTranspose2d(ch[i + 1], ch[i], k, 2, p, op, bias=False, step_mode="m"),
                layer.BatchNorm2d(ch[i], step_mode="m"), _lif(**lif)))
            self.dec.append(nn.Sequential(*_conv_bn(2 * ch[i], ch[i], 3), _lif(**lif), *_conv_bn(ch[i], ch[i], 3),
                                          _lif(**lif)))
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


def _mobilenet(T: int, num_classes: int, **kw: Any) -> nn.Module:
    return SpikingMobileNetV2(num_classes=num_classes, **kw)


def _unet(T: int, num_classes: int, **kw: Any) -> nn.Module:
    return SpikingUNet(num_classes=num_classes, **kw)


#: registered into :data:`sparseflow_bench.models.MODELS`
MOBILENET_UNET_MODELS: dict[str, Callable[..., nn.Module]] = {
    "spiking_mobilenetv2": _mobilenet,
    "spiking_unet": _unet,
}
