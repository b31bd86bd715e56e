"""GPU checks of ``sparseflow.profile`` and the benchmark CLI's profile step (run on the device machine by
scripts/gpu_check.sh): CUDA-event latencies, the dense-op comparison of every SparseFlow layer in fp16 / bf16 /
fp32, densities identical to the CPU's on the same input (channels_last too), NVML energy where readable, and
the profile JSON read back by the results post-processor."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = ["fp32", "fp16", "bf16"]


def spiking_net(C=16, H=32):
    from spikingjelly.activation_based import functional, layer, neuron

    net = nn.Sequential(
        layer.Conv2d(3, C, 3, padding=1, bias=False), layer.BatchNorm2d(C), neuron.LIFNode(),
        layer.Conv2d(C, 2 * C, 3, padding=1, bias=False), layer.BatchNorm2d(2 * C), neuron.LIFNode(),
        layer.Conv2d(2 * C, 2 * C, 3, padding=1, bias=False), layer.BatchNorm2d(2 * C), neuron.IFNode(),
        layer.Conv2d(2 * C, C, 1, bias=True),
    )
    functional.set_step_mode(net, "m")
    with torch.no_grad():  # BatchNorms that let the neurons fire at a useful rate
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.fill_(4.0)
                m.bias.uniform_(0.3, 0.9)
    return net.eval()


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_profile_optimized_net_on_gpu(dtype):
    import sparseflow

    torch.manual_seed(0)
    net = spiking_net().cuda()
    x = torch.randn(4, 2, 3, 32, 32, device="cuda")
    opt = sparseflow.optimize(copy.deepcopy(net), x.to(dtype), dtype=None if dtype == torch.float32 else dtype)
    rep = sparseflow.profile(opt, x.to(dtype), reps=3, save=None)
    assert rep.device == torch.cuda.get_device_name()
    assert rep.forward_ms > 0 and rep.throughput_per_s > 0
    assert rep.samples_per_s == pytest.approx(2 * rep.throughput_per_s)
    sparse = [e for e in rep.layers if e.sparse_module]
    assert len(sparse) >= 3
    for e in sparse:
        assert e.ms > 0 and e.dense_ms is not None and e.dense_ms > 0, e
        assert math.isfinite(e.speedup) and e.path, e
        assert 0 <= e.block_density <= 1 and e.block_density >= e.elem_density
    if rep.energy_j_per_forward is not None:
        assert rep.energy_j_per_forward >= 0
    assert 0 <= rep.skippable_work <= 1 and 0 <= rep.skipped_work <= rep.skippable_work + 1e-12
    d = json.loads(rep.to_json())
    assert len(d["layers"]) == len(rep.layers) and rep.to_csv().count("\n") == len(rep.layers) + 1


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_profile_densities_match_cpu(channels_last):
    """Densities depend on the input only: on the same sparse input a dense conv stack gives the CPU's counts."""
    import sparseflow

    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(24, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1)).eval()
    g = torch.Generator().manual_seed(2)
    x = (torch.rand(3, 24, 37, 29, generator=g) < 0.002).float() * 2.0  # sparse enough for empty 8x8x16 blocks
    rc = sparseflow.profile(net, x, reps=1, block_size=8)
    xg = x.cuda()
    if channels_last:
        xg = xg.contiguous(memory_format=torch.channels_last)
    rg = sparseflow.profile(net.cuda(), xg, reps=1, block_size=8)
    first_c, first_g = rc.layers[0], rg.layers[0]
    assert first_g.elem_density == first_c.elem_density
    assert first_g.block_density == first_c.block_density and 0 < first_g.block_density < 1
    assert first_g.macs == first_c.macs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cli_profile_step_writes_readable_json(tmp_path, dtype):
    from sparseflow_bench import records
    from sparseflow_bench.sections.profile import profile_model

    report, prof = profile_model("spiking_resnet18", 2, 2, 64, dtype, None, torch.device("cuda"), str(tmp_path),
                                 reps=2)
    assert (tmp_path / "profile_spiking_resnet18.json").exists()
    assert (tmp_path / "profile_spiking_resnet18.csv").exists()
    recs = records.collect(str(tmp_path))
    roles = {r.role for r in recs}
    assert {"baseline", "sparseflow"} <= roles
    assert all(r.device == torch.cuda.get_device_name() for r in recs)
    assert any(e.dense_ms for e in prof.layers)
    assert report.layers  # the optimize() report of the profiled model


def test_profile_cuda_graph_model():
    """optimize(..., cuda_graph=True): layers profiled on the wrapped model, the whole forward replayed."""
    import sparseflow

    torch.manual_seed(3)
    net = spiking_net().cuda()
    x = torch.randn(4, 2, 3, 32, 32, device="cuda", dtype=torch.float16)
    g = sparseflow.optimize(copy.deepcopy(net), x, dtype=torch.float16, cuda_graph=True)
    rep = sparseflow.profile(g, x, reps=3)
    assert rep.layers and all(e.calls >= 1 for e in rep.layers)
    assert any(e.sparse_module and e.dense_ms for e in rep.layers)
    assert rep.forward_ms > 0
