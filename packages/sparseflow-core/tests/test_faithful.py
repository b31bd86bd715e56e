"""``optimize(model, numerics="faithful")``: the dense model's outputs bit for bit.

Randomly initialised spiking networks amplify any change of fp32 summation order (a spike that flips at one layer
changes the next layers' inputs), so "fast" mode, exact per layer up to the order of its sums, can end far from the
dense logits. "faithful" runs convolutions and BatchNorm as the dense modules do and only the exact parts (neuron
arithmetic, residual adds, max pools, spike-product attention) on SparseFlow's kernels: the logits must be equal,
not close, on the first call, on a second call without reset (the membrane carried over) and after ``reset_net``.
The models are SpikingJelly zoo models with the benchmarks' LIF neuron, BatchNorm recalibrated on random images:
on the CPU (interpreter) at T=2, 32 px; on CUDA (marked ``gpu``) at T=4, 64 px in true fp32 (no TF32), with
cuDNN's own convolutions and BatchNorm and SparseFlow's neuron kernels compiled for the GPU, where fma contraction
and division could differ from SpikingJelly's kernels.
"""

from __future__ import annotations

import copy

import pytest
import torch
from sf_core_nets import build_small_sj, calibrate_bns, small_sj_net
from sf_core_zoo import lif_kwargs, recalibrate_bn, zoo_model
from torch import nn

from sparseflow_core import get_report, optimize, reset_states
from sparseflow_kernels import multistep_neuron
from sparseflow_ops import SparseConv1d, SparseConv2d
from sparseflow_ops.neuron import KernelNeuronForward

GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
# per device: time steps, image size, BatchNorm calibration images, Spikformer width and heads
SHAPES = {
    "cpu": dict(T=2, size=32, calibration=3, spikformer=(64, 4)),
    "cuda": dict(T=4, size=64, calibration=4, spikformer=(128, 8)),
}
MODEL_CASES = [
    *[pytest.param("cpu", name, id=f"cpu-{name}") for name in ("spiking_resnet18", "sew_resnet18", "spikformer")],
    *[pytest.param("cuda", name, id=f"cuda-{name}", marks=GPU)
      for name in ("small_sj", "spiking_resnet18", "sew_resnet18", "spikformer")],
]


def _model(name, device="cpu", seed=0):
    """(dense model, input [T, 2, 3, size, size]) on ``device``, BatchNorm recalibrated so that every layer fires."""
    shapes = SHAPES[device]
    T, size = shapes["T"], shapes["size"]
    torch.manual_seed(seed)
    if name == "small_sj":  # LIF hard and soft reset, IF, PLIF (decay sigmoid(w)), max pool, 1x1 conv, Linear
        net = small_sj_net()
        x = torch.randn(T, 2, 3, 16, 16)
        calibrate_bns(net, x)  # (on the CPU: its random affine comes from a CPU generator)
        return net.to(device).eval(), x.to(device)
    if name == "spikformer":  # Spikformer-Ti's structure, narrower and shallower
        from spikingjelly.activation_based.model.spikformer import Spikformer

        dims, heads = shapes["spikformer"]
        model = Spikformer(T=T, img_size_h=size, img_size_w=size, num_classes=10, embed_dims=dims, num_heads=heads,
                           depths=2, **lif_kwargs())
    else:
        model = zoo_model(name, T=T, num_classes=10)
    model = model.to(device).eval()
    imgs = torch.rand(shapes["calibration"], 3, size, size, device=device)
    recalibrate_bn(model, imgs, T)
    x = torch.rand(T, 2, 3, size, size, device=device) * 2
    return model, x


@pytest.mark.parametrize("device,name", MODEL_CASES)
def test_faithful_model_gives_dense_logits_bit_for_bit(device, name, strict_fp32):
    dense, x = _model(name, device)
    opt, rep = optimize(copy.deepcopy(dense), x, numerics="faithful", return_report=True)
    with torch.no_grad():
        for call in ("first", "no reset", "after reset"):
            if call != "no reset":
                reset_states(dense)
                reset_states(opt)
            ref = dense(x)
            y = opt(x)
            assert ref.abs().max() > 0
            assert torch.equal(y, ref), f"{name}, {call} call: max |diff| {(y - ref).abs().max():.3g}"
    # the fused chains ran their faithful path, the neurons the kernel in the input's layout
    convs = [m for m in opt.modules() if isinstance(m, (SparseConv2d, SparseConv1d)) and m.fused_neuron is not None]
    assert convs and all(m.last_path == "faithful" for m in convs)
    kernel_neurons = [m for m in opt.modules() if isinstance(m.__dict__.get("forward"), KernelNeuronForward)]
    assert all(m.forward.preserve_layout for m in kernel_neurons)
    assert any("numerics='faithful'" in n for n in rep.notes)


def test_faithful_leaves_the_reordering_ops_dense_and_says_why():
    """Handlers whose kernels sum in another order (the spike-fed Linear classifier here) are skipped under
    numerics="faithful", with the reason in the report; the same layer is replaced in fast mode. The net mixes
    LIF (hard and soft reset), IF and PLIF neurons, a max pool between a BatchNorm and its neuron, and a 1x1 conv."""
    dense, xs = build_small_sj()
    fast = get_report(optimize(copy.deepcopy(dense), xs[0]))
    opt = optimize(copy.deepcopy(dense), xs[0], numerics="faithful")
    rep = get_report(opt)
    lin_fast = [e for e in fast.layers if e.type == "Linear" and e.action != "left"]
    assert lin_fast, "the spike-fed Linear is replaced in fast mode"
    for e in lin_fast:
        f = next(g for g in rep.layers if g.name == e.name)
        assert f.action == "left" and "numerics='faithful'" in f.reason
    assert not any(type(m).__name__ == "SparseLinear" for m in opt.modules())
    with torch.no_grad():
        reset_states(dense)
        reset_states(opt)
        for x in xs:  # three calls, the membranes carried over
            ref = dense(x)
            assert ref.abs().max() > 0
            assert torch.equal(opt(x), ref)


def test_faithful_rejects_unknown_numerics():
    with pytest.raises(ValueError, match="numerics must be one of"):
        optimize(nn.Sequential(nn.Identity()), torch.rand(1, 2), numerics="exact")


def test_faithful_compiled_branch_matches_eager(monkeypatch):
    """What ``torch.compile`` traces in faithful mode (the registered neuron op with the residual and layout
    arguments) gives the eager faithful model's logits exactly."""
    import sparseflow_ops.attention as oa
    import sparseflow_ops.conv as oc
    import sparseflow_ops.linear as ol
    import sparseflow_ops.neuron as on
    import sparseflow_ops.pool as op

    dense, x = _model("sew_resnet18")
    opt = optimize(copy.deepcopy(dense), x, numerics="faithful")
    with torch.no_grad():
        reset_states(opt)
        ref = opt(x)
        for mod in (oa, oc, ol, on, op):
            monkeypatch.setattr(mod, "compiling", lambda: True)
        reset_states(opt)
        y = opt(x)
    assert torch.equal(y, ref)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("residual_after", [False, True])
def test_multistep_neuron_preserve_layout(layout, residual_after):
    """``preserve_layout=True`` writes the spikes in the input's strides, with the values of the default
    (channels innermost) output; non-binary input, a residual before or after the neuron, a given membrane."""
    torch.manual_seed(1)
    T, N, C, H, W = 3, 2, 5, 4, 3
    x = torch.randn(T * N, C, H, W) * 2
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x5 = x.view(T, N, C, H, W)
    res = torch.randint(0, 3, (T, N, C, H, W)).float()
    v0 = torch.rand(N, C, H, W)
    kw = dict(residual=res, residual_after=residual_after, v=v0, return_v=True, tau=3.0)
    ref, vref = multistep_neuron(x5, "lif", **kw)
    y, v = multistep_neuron(x5, "lif", preserve_layout=True, **kw)
    assert y.stride() == x5.stride()
    assert torch.equal(y, ref) and torch.equal(v, vref)
    assert 0 < (y != (res if residual_after else 0)).float().mean() < 1
