"""Small spiking networks for the core tests (SpikingJelly and snnTorch), BatchNorm calibration so that
neurons fire in every layer, and helpers that compare an optimized model with its dense original."""

from __future__ import annotations

import snntorch
import torch
from spikingjelly.activation_based import functional, layer, neuron
from torch import nn


@torch.no_grad()
def calibrate_bns(net: nn.Module, example, forward=None) -> None:
    """Give every BatchNorm running statistics close to the real ones of its input (in forward order, one
    pass) and an affine (weight 0.8-1.5, bias 0.5-1.0) after which the neurons fire at a useful rate."""
    gen = torch.Generator().manual_seed(1234)

    def hook(bn, inputs):
        y = inputs[0]
        y = y.flatten(0, 1) if y.dim() == 5 else y
        mean, var = y.mean((0, 2, 3)), y.var((0, 2, 3)) + 1e-3
        r = lambda: torch.rand(mean.shape, generator=gen)
        bn.running_mean.copy_(mean + 0.1 * var.sqrt() * (r() - 0.5))
        bn.running_var.copy_(var * (0.8 + 0.4 * r()))
        bn.weight.copy_(0.8 + 0.7 * r())
        bn.bias.copy_(0.5 + 0.5 * r())

    handles = [m.register_forward_pre_hook(hook) for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    was = net.training
    net.eval()
    try:
        (forward or net)(example)
    finally:
        for h in handles:
            h.remove()
        net.train(was)
    reset(net)


def reset(net: nn.Module) -> None:
    functional.reset_net(net)
    for m in net.modules():
        if isinstance(m, snntorch.Leaky):
            m.reset_mem()


def small_sj_net(step_mode="m"):
    """image conv (left) -> fused conv/bn/LIF -> conv/bn (sparse, bn folded) -> maxpool -> LIF (neuron kernel)
    -> fused conv/bn/IF at 8x8 -> fused 1x1 conv/bn/PLIF -> linear."""
    net = nn.Sequential(
        layer.Conv2d(3, 16, 3, padding=1, bias=False), layer.BatchNorm2d(16), neuron.LIFNode(tau=2.0),
        layer.Conv2d(16, 20, 3, padding=1, bias=False), layer.BatchNorm2d(20), neuron.LIFNode(v_reset=None),
        layer.Conv2d(20, 16, 3, padding=1, bias=True), layer.BatchNorm2d(16), layer.MaxPool2d(2),
        neuron.LIFNode(tau=2.0),
        layer.Conv2d(16, 24, 3, padding=1, bias=False), layer.BatchNorm2d(24), neuron.IFNode(),
        layer.Conv2d(24, 16, 1, bias=True), layer.BatchNorm2d(16), neuron.ParametricLIFNode(init_tau=2.5),
        layer.Flatten(), layer.Linear(16 * 8 * 8, 10),
    )
    functional.set_step_mode(net, step_mode)
    return net.eval()


def image_input(T=2, N=2, H=16, W=16, C=3):
    return torch.randn(T, N, C, H, W)


def snntorch_net():
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), snntorch.Leaky(beta=0.8, init_hidden=True),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
        snntorch.Leaky(beta=0.7, threshold=0.9, init_hidden=True, reset_mechanism="zero"),
        nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8), snntorch.Leaky(beta=0.9, init_hidden=True),
        nn.Flatten(), nn.Linear(8 * 14 * 14, 10),
    )
    return net.eval()


def run_steps(net, xs):
    """snnTorch style: one [N, C, H, W] step per call, outputs stacked."""
    return torch.stack([net(x) for x in xs])


def spiking_modules(net):
    from sparseflow_core import is_spiking_module

    return {n: m for n, m in net.named_modules() if n and is_spiking_module(m)}


def membranes(net):
    out = {}
    for n, m in spiking_modules(net).items():
        v = m.mem if isinstance(m, snntorch.Leaky) else m.v
        out[n] = v.detach().clone() if isinstance(v, torch.Tensor) else v
    return out


def assert_same_state(opt, dense):
    a, b = membranes(opt), membranes(dense)
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(b[k], torch.Tensor):
            assert isinstance(a[k], torch.Tensor), k
            torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-4, msg=k)
        else:
            assert a[k] == b[k], k


@torch.no_grad()
def compare_calls(opt, dense, inputs, forward=lambda net, x: net(x)):
    """First call, second call without reset, then reset and a third call: same outputs and neuron state."""
    for i, x in enumerate(inputs):
        if i == 2:
            reset(opt)
            reset(dense)
        ref = forward(dense, x)
        y = forward(opt, x)
        assert y.shape == ref.shape
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4, msg=f"call {i}")
        assert_same_state(opt, dense)


def build_small_sj():
    """(calibrated small SpikingJelly net, three [T, N, 3, 16, 16] inputs), deterministic."""
    torch.manual_seed(0)
    net = small_sj_net()
    xs = [image_input() for _ in range(3)]
    calibrate_bns(net, xs[0])
    return net, xs


def build_resnet(kind: str):
    """spiking_resnet18 / sew_resnet18 (ADD) in multi-step mode, BatchNorms calibrated so that every layer
    fires; three [T=2, N=1, 3, 32, 32] inputs. Deterministic."""
    from spikingjelly.activation_based.model import sew_resnet, spiking_resnet

    torch.manual_seed(0)
    if kind == "spiking_resnet18":
        net = spiking_resnet.spiking_resnet18(spiking_neuron=neuron.LIFNode, num_classes=10)
    else:
        net = sew_resnet.sew_resnet18(spiking_neuron=neuron.LIFNode, num_classes=10, cnf="ADD")
    functional.set_step_mode(net, "m")
    net.eval()
    xs = [torch.randn(2, 1, 3, 32, 32) for _ in range(3)]
    calibrate_bns(net, torch.randn(2, 6, 3, 32, 32))  # a larger batch: deep 1x1 maps need the samples
    return net, xs


class ResidualBlock(nn.Module):
    """sn2(bn2(conv2(sn1(bn1(conv1(x))))) + x), the spiking ResNet pattern, on plain torch layers."""

    def __init__(self, c, step_mode="s"):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.sn1 = neuron.LIFNode(tau=2.0, step_mode=step_mode)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.sn2 = neuron.IFNode(step_mode=step_mode)

    def forward(self, x):
        out = self.sn1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.sn2(out)


def small_nn_net(residual=False):
    """torch nn.Conv2d / nn.BatchNorm2d with single-step SpikingJelly neurons: one [N, C, H, W] step per
    call."""
    mods = [nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), neuron.LIFNode(tau=2.0)]
    if residual:
        mods.append(ResidualBlock(16))
    else:
        mods += [nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                 neuron.LIFNode(v_reset=None)]
    mods += [nn.Flatten(), nn.Linear(16 * 14 * 14, 10)]
    return nn.Sequential(*mods).eval()
