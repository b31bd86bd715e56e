"""snnTorch on the GPU: the step kernel compiled for CUDA (no fma contraction, round-to-nearest fp16/bf16
conversions) gives snnTorch's spikes and states bit for bit, in every reset mode and dtype; explicit-state and
``output=True`` models through ``optimize(numerics="faithful")`` give the dense model's spikes and membranes bit for
bit; ``init_hidden=True`` conv -> Leaky chains fused into the convolution (the multi-step kernel's Leaky step) are
checked the same way."""

import copy

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("delay", [True, False])
@pytest.mark.parametrize("reset", ["subtract", "zero", "none"])
@pytest.mark.parametrize("kind", ["leaky", "synaptic"])
def test_step_kernel_bit_for_bit(kind, reset, delay, dtype):
    import snntorch

    from sparseflow_ops import accelerate_neuron

    torch.manual_seed(0)
    if kind == "leaky":
        dense = snntorch.Leaky(beta=0.93, threshold=0.61, reset_mechanism=reset, reset_delay=delay)
    else:
        dense = snntorch.Synaptic(alpha=0.71, beta=0.93, threshold=0.61, reset_mechanism=reset, reset_delay=delay)
    dense = dense.to("cuda", dtype).eval()
    opt = accelerate_neuron(copy.deepcopy(dense))
    xs = [(torch.randn(8, 64, 17, 19, device="cuda") * 1.3).to(dtype) for _ in range(6)]
    with torch.no_grad():
        sd = so = None
        for x in xs:
            a = dense(x, *sd) if sd else dense(x)
            b = opt(x, *so) if so else opt(x)
            for u, v in zip(a, b):
                assert u.dtype == v.dtype and torch.equal(u, v), (u.float() - v.float()).abs().max()
            sd, so = a[1:], b[1:]


@pytest.mark.parametrize("kind", ["leaky", "synaptic"])
def test_explicit_state_model_faithful(kind, strict_fp32):
    from test_snntorch_styles import ExplicitNet, data

    from sparseflow_core import optimize

    net = ExplicitNet(kind).cuda().eval()
    dense = copy.deepcopy(net)
    opt = optimize(net, data(0).cuda(), numerics="faithful")
    with torch.no_grad():
        for call in range(3):
            ref, got = dense(data(call + 1).cuda()), opt(data(call + 1).cuda())
            for u, v in zip(ref, got):
                assert torch.equal(u, v), (call, (u - v).abs().max())


def test_init_hidden_output_model_faithful(strict_fp32):
    """Includes conv -> Leaky(init_hidden=True) chains fused into one kernel (the multi-step kernel's Leaky step,
    where fma contraction of beta * mem + x would differ from snnTorch's rounded product)."""
    from test_snntorch_styles import data, forward_pass, hidden_net

    from sparseflow_core import optimize

    dense, net = hidden_net().cuda(), hidden_net().cuda()
    opt = optimize(net, data(0)[0].cuda(), numerics="faithful")
    with torch.no_grad():
        for call in range(3):
            x = data(call + 10).cuda()
            ref = forward_pass(dense, x)
            got = forward_pass(opt, x)
            for u, v in zip(ref, got):
                assert torch.equal(u, v), (call, (u - v).abs().max())
