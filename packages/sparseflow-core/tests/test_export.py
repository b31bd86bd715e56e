"""sparseflow_core.export: the reset-state forward of an optimized SpikingJelly network traced by torch.export
(the Triton kernels as ``torch.ops.sparseflow`` operators, run by the interpreter on the CPU), the weight
preparation folded into constants, and the program's outputs against the optimized model's."""

from __future__ import annotations

import copy

import pytest
import torch
from sf_core_nets import build_resnet, calibrate_bns, image_input, reset, small_sj_net
from torch import nn

from sparseflow_core import export, optimize
from sparseflow_core.export import fold_constants, graph_ops


def test_export_program_gives_the_optimized_models_outputs():
    """Every layer kind of the small net (fused conv/BN/LIF, IF and PLIF, sparse conv + max pool, neuron kernel,
    sparse linear) is in the graph as a sparseflow operator; the program run on fresh inputs (not only the
    example) gives the optimized model's logits bit for bit, from reset neurons on every call."""
    net = small_sj_net()
    x = image_input(T=2, N=1)
    calibrate_bns(net, x)
    opt = optimize(copy.deepcopy(net), x)
    res = export(opt, x, None)
    assert res.max_abs_diff == 0.0
    ops = res.ops
    for op in ("spiking_conv2d", "conv2d", "max_pool2d", "multistep_neuron", "linear"):
        assert ops.get(f"sparseflow::{op}", 0) >= 1, ops
    assert ops["sparseflow::spiking_conv2d"] == 4
    assert not [k for k in ops if k.startswith(("sparseflow::bn_affine", "sparseflow::fold_bn"))], ops
    assert res.inputs == [{"shape": [2, 1, 3, 16, 16], "dtype": "float32", "device": "cpu"}]
    assert res.outputs[0]["shape"] == [2, 1, 10]
    prog = res.program.module()
    for _ in range(2):
        xi = torch.randn_like(x) * 2
        reset(opt)
        want = opt(xi)
        got = prog(xi)  # no reset in between: the program starts from reset neurons itself
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        reset(net)
        torch.testing.assert_close(got, net(xi), rtol=1e-4, atol=1e-4)  # and the dense model's


def test_export_with_a_dynamic_batch():
    """``dynamic_batch=True``: one program for batches 1 to ``max_batch`` (the kernels' launch grids follow the
    batch), giving the optimized model's logits at batches other than the example's."""
    net = small_sj_net()
    x = image_input(T=2, N=2)
    calibrate_bns(net, x)
    opt = optimize(copy.deepcopy(net), x)
    res = export(opt, x, None, dynamic_batch=True, max_batch=64)
    assert res.max_abs_diff == 0.0 and res.meta["dynamic_batch"]
    prog = res.program.module()
    for n in (1, 3):
        xi = image_input(T=2, N=n) * 2
        reset(opt)
        torch.testing.assert_close(prog(xi), opt(xi), rtol=0, atol=0)
    with pytest.raises(ValueError, match="at least 2"):
        export(opt, image_input(T=2, N=1), None, dynamic_batch=True)


def test_export_sew_resnet_with_the_skip_add_in_the_fused_layers():
    """sew_resnet18 (ADD): the blocks are rewritten FX graphs whose fused conv2 adds the identity to its spikes
    (``residual_after``); the export traces them into 19 fused spiking layers, and the program gives the optimized
    model's logits on inputs it was not traced with (the cuDNN paths: fast under the interpreter)."""
    net, xs = build_resnet("sew_resnet18")
    res = export(copy.deepcopy(net), xs[0], None, optimize_kw={"mode": "torch"})
    assert res.max_abs_diff == 0.0
    assert res.ops["sparseflow::spiking_conv2d"] == 19
    opt = res.model
    prog = res.program.module()
    for x in xs[1:]:
        reset(opt)
        reset(net)
        with torch.no_grad():
            got = prog(x)
            torch.testing.assert_close(got, opt(x), rtol=0, atol=0)
            torch.testing.assert_close(got, net(x), rtol=1e-4, atol=1e-4)


def test_export_package_needs_a_cuda_example():
    net = small_sj_net()
    with pytest.raises(RuntimeError, match="needs a CUDA example"):
        export(net, image_input(T=1, N=1), "model.pt2")


def test_fold_constants_computes_the_weight_preparation_once():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3))
            self.register_buffer("s", torch.rand(4) + 0.5)

        def forward(self, x):
            w = torch.zeros(8, 3)
            w[:4] = self.w * self.s[:, None]  # in place, as the weight packing
            return x @ w.t() + torch.ones(8)

    m = M()
    x = torch.randn(5, 3)
    ep = torch.export.export(m, (x,)).run_decompositions({})
    folded = fold_constants(ep.module())
    ops = graph_ops(folded)
    assert "aten::mul.Tensor" not in ops and "aten::slice_scatter" not in ops, ops
    torch.testing.assert_close(folded(x), m(x), rtol=0, atol=0)
    x2 = torch.randn(5, 3)
    torch.testing.assert_close(folded(x2), m(x2), rtol=0, atol=0)


class _StaticStemNet(nn.Module):
    """An image stem computed once per frame on a static input (conv -> BN -> max pool -> LIF, as multi-step layers
    or as Spikformer's SeqToANNContainer), then a spiking layer and a linear head."""

    def __init__(self, container: bool):
        super().__init__()
        from spikingjelly.activation_based import layer, neuron

        if container:
            self.stem = layer.SeqToANNContainer(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(layer.Conv2d(3, 8, 3, 1, 1, step_mode="m"), layer.BatchNorm2d(8, step_mode="m"),
                                      layer.MaxPool2d(3, 2, 1, step_mode="m"))
        self.lif = neuron.LIFNode(tau=2.0, step_mode="m")
        self.conv = layer.Conv2d(8, 8, 3, 1, 1, bias=False, step_mode="m")
        self.bn = layer.BatchNorm2d(8, step_mode="m")
        self.lif2 = neuron.LIFNode(tau=2.0, step_mode="m")
        self.fc = layer.Linear(8 * 8 * 8, 4, step_mode="m")

    def forward(self, x):
        return self.fc(self.lif2(self.bn(self.conv(self.lif(self.stem(x))))).flatten(2))


@pytest.mark.parametrize("container", [False, True], ids=["layers", "container"])
def test_export_of_a_static_example_holds_for_any_input(container):
    """Exported with a static example (one frame repeated over T by stride 0), the program does not keep the
    once-per-frame stem: on inputs whose steps differ it gives the dense model's logits."""
    torch.manual_seed(0)
    net = _StaticStemNet(container)
    frame = torch.randn(1, 3, 16, 16)
    x = frame.unsqueeze(0).expand(2, *frame.shape)
    calibrate_bns(net, x.contiguous())
    net.eval()
    opt = optimize(copy.deepcopy(net), x)
    prog = export(opt, x, None).program.module()
    xi = torch.randn(2, 1, 3, 16, 16) * 2
    reset(net)
    want = net(xi)
    assert want.abs().sum() > 0
    torch.testing.assert_close(prog(xi), want, rtol=1e-4, atol=1e-4)
