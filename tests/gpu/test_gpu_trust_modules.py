"""GPU checks that hooks, autograd and train()/eval() see the dense model through an optimized model (run on the
device machine by scripts/gpu_check.sh): SpikingJelly monitors attached after optimize() record the dense model's
values eagerly, under torch.compile (hook guards recompile) and through a CudaGraphModel (eager while hooked);
backward in eval mode gives the dense gradients; after train() and eval() the fused path comes back."""

import copy

import pytest
import torch
from spikingjelly.activation_based import layer, monitor, neuron

from sparseflow_bench.models import build_model, recalibrate_bn
from sparseflow_core import CudaGraphModel, optimize, reset_states
from sparseflow_ops import SparseConv2d

# fp32 references without TF32: exactness is judged against real fp32
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.usefixtures("strict_fp32")]

MODELS = ["spiking_resnet18", "sew_resnet18"]


def twins(name, numerics="faithful"):
    """(dense fp32 model, optimized copy, input): faithful numerics, so that records compare bit for bit."""
    torch.manual_seed(0)
    T, N, S = 2, 2, 64
    model = build_model(name, T=T, num_classes=10).cuda().eval()
    imgs = torch.rand(4, 3, S, S, device="cuda")
    recalibrate_bn(model, imgs, T)
    x = torch.randn(T, N, 3, S, S, device="cuda")
    opt = optimize(copy.deepcopy(model), x, numerics=numerics)
    return model, opt, x


def records(net, x, fn=None):
    mons = [monitor.InputMonitor(net, instance=neuron.LIFNode), monitor.OutputMonitor(net, instance=layer.BatchNorm2d)]
    with torch.no_grad():
        reset_states(net)
        out = (net if fn is None else fn)(x).clone()
    recs = [[r.clone() for r in m.records] for m in mons]
    for m in mons:
        m.remove_hooks()
    return out, recs


def assert_same_records(a, b):
    assert [len(r) for r in a] == [len(r) for r in b] and all(len(r) for r in b)
    for ra, rb in zip(a, b):
        for x, y in zip(ra, rb):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_monitors_eager_compiled_and_cuda_graph(name):
    model, opt, x = twins(name)
    ref, rec_d = records(model, x)
    out, rec_o = records(opt, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert_same_records(rec_o, rec_d)
    # torch.compile: the hooks are seen at trace time (Dynamo guards on them)
    cm = torch.compile(opt)
    out_c, rec_c = records(opt, x, fn=cm)
    torch.testing.assert_close(out_c, ref, rtol=1e-5, atol=1e-5)
    assert_same_records(rec_c, rec_d)
    # a CUDA-graph wrapper: captured without hooks, eager while a monitor is attached
    g = CudaGraphModel(opt)
    with torch.no_grad():
        for _ in range(4):
            g(x)
    out_g, rec_g = records(g, x)
    torch.testing.assert_close(out_g, ref, rtol=1e-5, atol=1e-5)
    assert_same_records(rec_g, rec_d)


@pytest.mark.autograd
@pytest.mark.parametrize("name", MODELS)
def test_backward_and_train_eval(name):
    model, opt, x = twins(name, numerics="fast")
    xd, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    reset_states(model)
    reset_states(opt)
    model(xd).square().sum().backward()
    opt(xo).square().sum().backward()
    torch.testing.assert_close(xo.grad, xd.grad, rtol=1e-4, atol=1e-5)
    for (n, p), (_, q) in zip(opt.named_parameters(), model.named_parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)
    opt.train()
    model.train()
    reset_states(model)
    reset_states(opt)
    torch.testing.assert_close(opt(x), model(x), rtol=1e-4, atol=1e-5)
    opt.eval()
    model.eval()
    with torch.no_grad():
        reset_states(model)
        reset_states(opt)
        ref = model(x)
        out = opt(x)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)  # fast numerics: fp32 order of sums, amplified
    assert any(m.last_path not in (None, "torch") for m in opt.modules() if isinstance(m, SparseConv2d))


@pytest.mark.autograd
def test_cuda_graph_model_replays_under_grad_mode_and_refuses_backward():
    """A graph model is for inference: under grad mode (no torch.no_grad()) it still replays its graph, with the
    dense model's outputs, and a backward() through it raises an error that says what to do."""
    model, opt, x = twins("spiking_resnet18")
    g = CudaGraphModel(opt)
    for _ in range(4):
        out = g(x)
    assert g._graphs, "the graph model did not capture under grad mode"
    assert g.calls["warmup"] == 2 and g.calls["captures"] == 1 and g.calls["replays"] == 1, g.calls
    assert g.calls["hooks"] == g.calls["training"] == g.calls["cpu"] == 0, g.calls
    with torch.no_grad():
        reset_states(model)
        ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="inference only"):
        out.square().sum().backward()


def test_cuda_graph_of_a_model_optimized_with_dtype_replays():
    """``optimize(..., dtype=torch.float16, cuda_graph=True)``, the one-line fp16 inference: the input cast is
    SparseFlow's own pre-hook, so the wrapper captures and replays (a user's hook would send every call eager);
    the replays give the optimized model's eager outputs."""
    model, _, x = twins("spiking_resnet18")
    g = optimize(copy.deepcopy(model), x, dtype=torch.float16, cuda_graph=True)
    with torch.no_grad():
        outs = [g(x).clone() for _ in range(5)]
        reset_states(g.model)
        ref = g.model(x)
    assert g.calls["captures"] == 1 and g.calls["replays"] == 2 and g.calls["hooks"] == 0, g.calls
    for out in outs[3:]:  # replays repeat the captured kernels (outs[2]: the capture's own replay) bit for bit
        torch.testing.assert_close(out, outs[2], rtol=0, atol=0)
    torch.testing.assert_close(outs[-1], ref)


def test_cuda_graphs_of_two_batch_sizes_keep_their_packed_weights():
    """A graph captured at one batch size keeps the packed weights it ran with while another batch size runs
    tilings that pack the weights otherwise (the layers' caches keep both packings): after the second batch
    size's capture, and with the freed memory of the caching allocator overwritten, the first graph still replays
    its own outputs bit for bit (and the eager model's)."""
    from sparseflow_kernels import force_path

    model, _, x = twins("spiking_resnet18")
    x2, x1 = x.half(), x[:, :1].half()
    g = optimize(copy.deepcopy(model), x, dtype=torch.float16, cuda_graph=True)
    with torch.no_grad():
        with force_path("fused_dense"):  # (block_n 64 packings)
            for _ in range(3):
                first = g(x2).clone()
            reset_states(g.model)
            eager2 = g.model(x2).clone()
        with force_path("fused_tm_n128"):  # (block_n 128, on the layers of 128 channels and more)
            for _ in range(3):
                g(x1)
        junk = [torch.full((n,), float("nan"), device="cuda", dtype=torch.float16)
                for n in (1 << 17, 1 << 19, 1 << 21) for _ in range(64)]
        again = g(x2).clone()
    del junk
    assert g.calls["captures"] == 2, g.calls
    assert any(getattr(m, "last_path", None) == "fused_tm_n128" for m in g.model.modules())
    torch.testing.assert_close(first, eager2)
    torch.testing.assert_close(again, first, rtol=0, atol=0)  # (the same graph replayed: the same bits)
