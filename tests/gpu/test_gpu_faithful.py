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
