"""torch.compile of an optimized model (run on the device machine by scripts/gpu_check.sh): the sparseflow ops
(registered with torch.library.triton_op) stay in Dynamo's graph, and the compiled model gives the eager
optimized model's spikes and logits."""

import copy

import pytest
import torch

from sparseflow_bench.models import build_model, recalibrate_bn
from sparseflow_core import optimize, reset_states

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("name", ["spiking_resnet18", "sew_resnet18", "spikformer_ti"])
def test_compile_optimized_model(name):
    torch.manual_seed(0)
    T, N, S = 2, 2, 64
    model = build_model(name, T=T, num_classes=10).cuda().eval()
    imgs = torch.rand(4, 3, S, S, device="cuda")
    recalibrate_bn(model, imgs, T)
    x = imgs[:N].unsqueeze(0).repeat(T, 1, 1, 1, 1).half()
    opt = optimize(copy.deepcopy(model).half(), x)
    with torch.no_grad():
        reset_states(opt)
        opt(x)  # eager: dispatch measures and caches each layer's path
        reset_states(opt)
        ref = opt(x).float()
        explanation = torch._dynamo.explain(opt)(x)
        reasons = [str(r) for r in explanation.break_reasons]
        ours = [r for r in reasons if "sparseflow" in r]
        assert not ours, "graph breaks in sparseflow code:\n" + "\n".join(ours[:5])
        calls = [str(n.target) for g in explanation.graphs for n in g.graph.nodes if n.op == "call_function"]
        assert any("sparseflow" in c for c in calls), "no sparseflow op in the compiled graph"
        torch._dynamo.reset()
        cm = torch.compile(opt)
        reset_states(opt)
        out = cm(x).float()
        reset_states(opt)
        out2 = cm(x).float()
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
