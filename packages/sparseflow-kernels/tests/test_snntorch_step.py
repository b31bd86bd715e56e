"""snntorch_step (one step of snnTorch's Leaky / Synaptic) against snnTorch's modules, output buffers poisoned:
the spikes and states bit for bit with snnTorch's dtypes, and clear errors for inputs it does not take."""

from __future__ import annotations

import pytest
import snntorch
import torch

from sparseflow_kernels.snntorch_step import snntorch_step, step_dtypes


def _params(m):
    return dict(beta=m.beta, threshold=m.threshold, graded_spikes_factor=m.graded_spikes_factor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reset", ["subtract", "zero", "none"])
def test_leaky_and_synaptic_steps(reset, dtype):
    torch.manual_seed(0)
    leaky = snntorch.Leaky(beta=0.9, threshold=0.55, reset_mechanism=reset).to(dtype)
    syn_m = snntorch.Synaptic(alpha=0.6, beta=0.9, threshold=0.55, reset_mechanism=reset).to(dtype)
    xs = [(torch.randn(3, 4, 5) * 1.5).to(dtype) for _ in range(4)]
    mem = syn = kmem = ksyn = None
    smem = kmem2 = None
    with torch.no_grad():
        for x in xs:
            spk, mem = leaky(x, mem) if mem is not None else leaky(x)
            kspk, kmem = snntorch_step(x, kmem, reset=reset, **_params(leaky))
            for a, b in ((spk, kspk), (mem, kmem)):
                assert a.dtype == b.dtype and torch.equal(a, b)
            sspk, syn, smem = syn_m(x, syn, smem) if smem is not None else syn_m(x)
            kspk, ksyn, kmem2 = snntorch_step(x, kmem2, syn=ksyn, alpha=syn_m.alpha, synaptic=True, reset=reset,
                                              **_params(syn_m))
            for a, b in ((sspk, kspk), (syn, ksyn), (smem, kmem2)):
                assert a.dtype == b.dtype and torch.equal(a, b)


def test_dtype_plan_follows_pytorch_promotion():
    """Half model: products and sums in fp16, the reset by subtraction (fp32 spikes) makes the membrane fp32."""
    m = snntorch.Leaky(beta=0.9).half()
    d = step_dtypes(torch.float16, torch.float16, None, m.beta, m.threshold, None, m.graded_spikes_factor,
                    "subtract", True, False)
    assert d["beta"] == d["base"] == torch.float16 and d["mem"] == d["spk"] == torch.float32
    d = step_dtypes(torch.float16, torch.float16, None, m.beta, m.threshold, None, m.graded_spikes_factor,
                    "none", True, False)
    assert d["mem"] == torch.float16


def test_bad_inputs_name_the_problem():
    m = snntorch.Leaky(beta=0.9)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="reset must be one of"):
        snntorch_step(x, None, reset="hard", **_params(m))
    with pytest.raises(ValueError, match="mem has shape"):
        snntorch_step(x, torch.zeros(3, 2), **_params(m))
    with pytest.raises(TypeError, match="float64"):
        snntorch_step(x.double(), None, **_params(m))
    with pytest.raises(ValueError, match="needs alpha"):
        snntorch_step(x, None, synaptic=True, **_params(m))
    with pytest.raises(ValueError, match="does not broadcast"):
        snntorch_step(x, None, beta=torch.rand(4), threshold=m.threshold,
                      graded_spikes_factor=m.graded_spikes_factor)
