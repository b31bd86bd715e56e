"""GPU run of the property suite (``packages/sparseflow-kernels/tests/test_properties.py``) and of the model
zoo (``packages/sparseflow-core/tests/test_model_zoo.py``), on the real kernels (scripts/gpu_check.sh).

* The same checkers as the CPU suites (``test_properties.py``; ``test_properties_ops.py``: linear, 1x1 conv,
  SSA, channel_dot, grouped/depthwise conv, transposed conv, BatchNorm, max-pool), on CUDA, with bf16 added
  to fp32/fp16 (fp32 through the default ``tf32x3``), larger maps (31, 56 px) and every special value (NaN,
  +-Inf, fp16 overflow). Cases come from a seeded sampler (the GPU machine may lack hypothesis;
  ``SPARSEFLOW_GPU_EXAMPLES`` scales the count).
* Every buildable zoo model optimized with the kernels forced on (``mode="sparse"``): no crash, logits equal
  the dense model's, the report has an entry per conv / linear layer.
* Resource safety: 1,000 forwards with changing sparsity do not grow ``torch.cuda.memory_allocated``.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

N_CASES = int(os.environ.get("SPARSEFLOW_GPU_EXAMPLES", "24"))
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _props():
    import test_properties as tp

    return tp


def _gpu_case(draw, seed: int, bigger: dict) -> dict:
    tp = _props()
    pick = tp.seeded_pick(10_000 + seed)
    c = draw(pick)
    c["dtype"] = pick(DTYPES)
    for k, options in bigger.items():
        if k in c:
            c[k] = pick([c[k], *options])  # keep the drawn value or take a larger one
    if c["dtype"] != torch.float16 and "huge" in c:
        c["huge"] = False
    return c


@pytest.mark.parametrize("seed", range(N_CASES))
def test_gpu_sparse_conv2d_property(seed):
    tp = _props()
    c = _gpu_case(tp.draw_conv, seed, {"H": [31, 56], "W": [29, 56], "C": [37, 64, 130], "CO": [64, 96]})
    tp.check_sparse_conv(c, device="cuda")


@pytest.mark.parametrize("seed", range(N_CASES))
def test_gpu_prescan_property(seed):
    tp = _props()
    tp.check_prescan(_gpu_case(tp.draw_prescan, seed, {"H": [31, 56], "W": [33, 56], "C": [64, 130]}),
                     device="cuda")


@pytest.mark.parametrize("seed", range(N_CASES))
def test_gpu_spiking_conv2d_property(seed):
    tp = _props()
    c = _gpu_case(tp.draw_spiking, seed, {"H": [28, 31], "W": [28, 33], "C": [32, 64], "CO": [64, 128],
                                          "T": [4]})
    tp.check_spiking(c, device="cuda")


@pytest.mark.parametrize("seed", range(N_CASES))
def test_gpu_multistep_neuron_property(seed):
    tp = _props()
    tp.check_neuron(_gpu_case(tp.draw_neuron, seed, {"C": [64, 256], "T": [4, 8]}), device="cuda")


# the other kernels (packages/sparseflow-kernels/tests/test_properties_ops.py), one property each


def _ops():
    import test_properties_ops as tpo

    return tpo


# op -> (drawer, checker) names in test_properties_ops.py, and the larger GPU sizes each draw may take instead
OPS = {
    "sparse_linear": ("draw_linear", "check_linear", {"K": [256, 1000], "N": [64, 384], "lead": [(8, 197)]}),
    "sparse_conv1x1": ("draw_conv1x1", "check_conv1x1", {"C": [64, 256], "CO": [64, 384], "L": [196]}),
    "ssa_attention": ("draw_ssa", "check_ssa", {"H": [8], "D": [32, 64], "L": [64, 196]}),
    "channel_dot": ("draw_channel_dot", "check_channel_dot", {"C": [64, 256], "spatial": [(14, 14), (196,)]}),
    "grouped_conv2d": ("draw_grouped", "check_grouped", {"H": [31, 56], "W": [29, 56], "groups": [32, 64]}),
    "conv_transpose2d": ("draw_conv_transpose", "check_conv_transpose",
                         {"H": [16, 29], "W": [16, 31], "C": [37, 64], "CO": [64, 96]}),
    "sparse_batch_norm2d": ("draw_batchnorm", "check_batchnorm", {"C": [64, 130], "H": [31, 56], "W": [29, 56]}),
    "max_pool2d": ("draw_pool", "check_pool", {"C": [64, 130], "H": [31, 56], "W": [33, 56]}),
}


@pytest.mark.parametrize("seed", range(N_CASES))
@pytest.mark.parametrize("op", list(OPS))
def test_gpu_op_property(op, seed):
    tpo = _ops()
    draw, check, bigger = OPS[op]
    getattr(tpo, check)(_gpu_case(getattr(tpo, draw), seed, bigger), device="cuda")


@pytest.mark.parametrize("name", ["ssa-nan-in-k-v-silent", "ssa-inf-in-k-v-silent", "ssa-inf-in-v-head-padding",
                                  "linear-fp16-huge-overflows", "grouped-17ch-gemm-inf",
                                  "convt-inf-meets-minus-inf", "batchnorm-occupancy-nan-70ch"])
def test_gpu_op_regressions(name):
    """The CPU suite's regression cases of these kernels, on the real kernels."""
    c, check = _ops().regression_case(name)
    check(c, device="cuda")


def _inf_cases():
    tp = _props()
    for special in ("inf", "-inf", "nan", "inf-and-minus-inf"):
        yield {**tp.DEFAULT_CONV, "N": 2, "C": 37, "CO": 64, "H": 31, "W": 29, "KH": 3, "KW": 3,
               "special": special, "density": 0.1, "values": "real"}


def test_gpu_inf_nan_fp32_ieee_exact():
    """+-Inf and NaN through fp32 with ``fp32_precision="ieee"``: the same non-finite positions as F.conv2d."""
    tp = _props()
    for c in _inf_cases():
        tp.check_sparse_conv({**c, "fp32_precision": "ieee"}, device="cuda")


def test_gpu_inf_fp32_tf32x3_stays_inf():
    """+-Inf stay +-Inf (not NaN) through the default fp32 ``tf32x3`` path: Triton 3.6 masks the ``inf - inf``
    remainder of the split (checked on the H200)."""
    tp = _props()
    for c in _inf_cases():
        gen = torch.Generator().manual_seed(c["seed"])
        x64 = tp.add_specials(tp.make_values((2, 37, 31, 29), 0.1, "real", gen), c["special"], gen)
        w = torch.randn(64, 37, 3, 3, generator=gen).cuda()
        x = x64.float().cuda()
        from sparseflow_kernels import sparse_conv2d

        y = sparse_conv2d(x, w, None, 1, 1).cpu()
        ref = torch.nn.functional.conv2d(x.double().cpu(), w.double().cpu(), padding=1)
        assert torch.equal(torch.isnan(y), torch.isnan(ref)), c["special"]


# ------------------------------------------------------------------------------------------------ zoo


def _zoo_names():
    """``SPARSEFLOW_GPU_ZOO``: "all" (default), "fast" (the CPU suite's models) or comma-separated names."""
    import test_model_zoo as zoo

    sel = os.environ.get("SPARSEFLOW_GPU_ZOO", "all")
    if sel == "all":
        return [z[0] for z in zoo.ZOO]
    if sel == "fast":
        return list(zoo.FAST)
    return [n for n in sel.split(",") if n]


@pytest.mark.parametrize("name", _zoo_names())
def test_gpu_model_zoo(name, strict_fp32, record_property):
    """Logits within 2e-2 (norm) of the dense model: the kernels' fp32 (tf32x3) sums are ordered unlike
    cuDNN's, so a spike at an exact threshold tie may flip somewhere in a deep net; anything wrong beyond
    that (a skipped block that was not zero, a lost residual) is far larger."""
    import test_model_zoo as zoo

    errors: list[float] = []
    try:
        rep = zoo.run_zoo_case(name, device="cuda", mode="sparse", rtol=2e-2, metric="norm", errors=errors)
    finally:
        record_property("rel_err", ",".join(f"{e:.3g}" for e in errors))  # the junit XML keeps the measured errors
    assert rep.layers


# ------------------------------------------------------------------------------------------ resources


@torch.no_grad()
def test_gpu_memory_flat_over_1000_forwards():
    """A fused spiking layer and a sparse conv, 1,000 calls with the sparsity changing every call: the
    allocated memory after the warm-up stays where it was (caches and scratch buffers are reused)."""
    from spikingjelly.activation_based import functional, layer, neuron
    from torch import nn

    from sparseflow_core import optimize

    torch.manual_seed(0)
    net = nn.Sequential(
        layer.Conv2d(3, 32, 3, padding=1, bias=False), layer.BatchNorm2d(32), neuron.LIFNode(),
        layer.Conv2d(32, 32, 3, padding=1, bias=False), layer.BatchNorm2d(32), neuron.LIFNode(),
        layer.Conv2d(32, 16, 3, padding=1), neuron.IFNode(),
    )
    functional.set_step_mode(net, "m")
    net = net.cuda().eval()
    xs = [torch.rand(4, 2, 3, 32, 32, device="cuda") * s for s in (0.5, 1.0, 2.0, 4.0)]
    opt = optimize(net, xs[0], mode="sparse")
    for x in xs:
        functional.reset_net(opt)
        opt(x)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    for i in range(1000):
        functional.reset_net(opt)
        opt(xs[i % len(xs)])
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated() - base
    assert grown <= 1 << 20, f"allocated memory grew by {grown} bytes over 1,000 forwards"
