"""snnTorch on the GPU: the step kernel compiled for CUDA (no fma contraction, round-to-nearest fp16/bf16
conversions) gives snnTorch's spikes and states bit for bit, in every reset mode and dtype. (Explicit-state and
``output=True`` models through ``optimize(numerics="faithful")`` run on CUDA in the core suite's
``test_snntorch_styles.py``.)"""

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
