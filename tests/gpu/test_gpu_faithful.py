"""``optimize(model, numerics="faithful")`` on the GPU: the dense fp32 model's logits bit for bit (cuDNN's own
convolutions and BatchNorm, SparseFlow's neuron kernel compiled for the GPU, where fma contraction and division
could differ from SpikingJelly's kernels), on a first call, a second call without reset and after ``reset_net``."""

import copy

import pytest
import torch

from sparseflow_bench.models import build_model, lif_kwargs, recalibrate_bn
from sparseflow_core import optimize, reset_states

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _model(name, T, size):
    torch.manual_seed(0)
    if name == "small_sj":  # LIF hard and soft reset, IF, PLIF (decay sigmoid(w)), max pool, 1x1 conv, Linear
        import os
        import sys

        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "packages", "sparseflow-core", "tests"))
        from sf_core_nets import calibrate_bns, small_sj_net

        net = small_sj_net()
        x = torch.randn(T, 2, 3, 16, 16)
        calibrate_bns(net, x)  # (on the CPU: its random affine comes from a CPU generator)
        return net.cuda().eval(), x.cuda()
    if name == "spikformer_small":
        from spikingjelly.activation_based.model.spikformer import Spikformer

        model = Spikformer(T=T, img_size_h=size, img_size_w=size, num_classes=10, embed_dims=128, num_heads=8,
                           depths=2, **lif_kwargs())
    else:
        model = build_model(name, T=T, num_classes=10)
    model = model.cuda().eval()
    imgs = torch.rand(4, 3, size, size, device="cuda")
    recalibrate_bn(model, imgs, T)
    return model, torch.rand(T, 2, 3, size, size, device="cuda") * 2


@pytest.mark.parametrize("name", ["small_sj", "spiking_resnet18", "sew_resnet18", "spikformer_small"])
def test_faithful_fp32_bit_for_bit(name):
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        dense, x = _model(name, T=4, size=64)
        opt = optimize(copy.deepcopy(dense), x, numerics="faithful")
        with torch.no_grad():
            for call in ("first", "no reset", "after reset"):
                if call != "no reset":
                    reset_states(dense)
                    reset_states(opt)
                ref = dense(x)
                y = opt(x)
                assert ref.abs().max() > 0
                assert torch.equal(y, ref), f"{name}, {call}: max |diff| {(y - ref).abs().max():.3g}"
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("decay_input", [True, False])
@pytest.mark.parametrize("v_reset", [0.0, None, -0.2])
@pytest.mark.parametrize("tau", [3.0, 1.7, 100.0, 2.0])
def test_lif_kernels_divide_like_spikingjelly_on_gpu(tau, v_reset, decay_input):
    """The compiled kernels (``tl.math.div_rn``; the fused conv epilogue too, on an fp32 IEEE 1x1 identity conv,
    whose sums are exact) against SpikingJelly's own LIF on
    CUDA, fp32, two calls: spikes and membranes bit for bit, currents placed at the threshold included."""
    from spikingjelly.activation_based import neuron

    from sparseflow_kernels import multistep_neuron, spiking_conv2d

    torch.manual_seed(0)
    T, N, C, H = 4, 2, 8, 16
    rest = 0.0 if v_reset is None else v_reset
    crit = (1.0 - rest) * tau + rest if decay_input else 1.0 - rest
    x = torch.randn(T, N, C, H, H, device="cuda") * 1.5 + 0.5
    near = torch.full_like(x, crit)
    for k in range(1, 4):  # a few ulps either side of the current that charges a neuron at rest to v_th
        near = torch.where(torch.rand_like(x) < 0.3, torch.nextafter(near, near + (1 if k % 2 else -1)), near)
    x = torch.where(torch.rand_like(x) < 0.5, near, x)
    m = neuron.LIFNode(tau=tau, decay_input=decay_input, v_reset=v_reset, step_mode="m").cuda().eval()
    eye = torch.eye(C, device="cuda").view(C, C, 1, 1)
    v1 = v2 = None
    with torch.no_grad():
        for call in range(2):
            ref = m(x)
            s1, v1 = multistep_neuron(x, "lif", tau=tau, decay_input=decay_input, v_reset=v_reset, v=v1,
                                      return_v=True)
            s2, v2 = spiking_conv2d(x, eye, None, 1, 0, neuron="lif", tau=tau, decay_input=decay_input,
                                    v_reset=v_reset, v=v2, return_v=True, path="fused", fp32_precision="ieee")
            for s, v in ((s1, v1), (s2, v2)):
                assert torch.equal(s, ref), f"call {call}: spikes differ"
                assert torch.equal(v, m.v), f"call {call}: membranes differ by {(v - m.v).abs().max():.3g}"
