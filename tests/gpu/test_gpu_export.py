"""GPU checks of ``sparseflow.export`` (run on the device machine by scripts/gpu_check.sh): the AOTInductor package
of small optimized SpikingJelly nets (fp16 and fp32, every kernel kind: fused conv/BN/LIF/IF/PLIF, sparse conv +
max pool, neuron kernel, sparse linear) gives the optimized model's outputs, loaded in this process and in a fresh
process where sparseflow, SpikingJelly and triton cannot be imported; the dense model's SOPs equal SpikingJelly's
SynOpCounter's on the GPU (the optimized model's within 1%: its kernels may flip a spike at threshold)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def require_loader(tmp_path_factory):
    """Fails the test unless this torch build loads an AOTInductor package of a plain torch model (Conv2d + ReLU, no
    SparseFlow) in a fresh process: a failure of ours is told apart from a loader that cannot load any package. The
    control package is compiled and loaded once per module."""
    from sparseflow_bench.sections.deploy import run_in_fresh_process

    work = tmp_path_factory.mktemp("loader_control")
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU()).cuda().half().eval()
    x = torch.randn(2, 3, 16, 16, device="cuda", dtype=torch.half)
    path = torch._inductor.aoti_compile_and_package(torch.export.export(m, (x,)), package_path=str(work / "plain.pt2"))
    info, out = run_in_fresh_process(path, x, str(work), timeout=120)
    err = None if out is not None else str(info.get("error"))[:300]

    def check():
        if err is not None:
            pytest.fail("torch's AOTInductor loader cannot load a package of a plain torch model either (Conv2d + "
                        f"ReLU, no SparseFlow) in this environment: {err}")

    return check


def _net():
    from sf_core_nets import calibrate_bns, image_input, small_sj_net

    torch.manual_seed(0)
    net = small_sj_net()
    x = image_input(T=4, N=8)
    calibrate_bns(net, x)
    return net.cuda(), x.cuda()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_package_matches_the_optimized_model(tmp_path, dtype, require_loader):
    from sparseflow_bench.sections.deploy import compare_outputs, run_in_fresh_process
    from sparseflow_core import export, optimize, reset_states

    net, x = _net()
    res = export(copy.deepcopy(net), x, str(tmp_path / "net.pt2"), dtype=dtype)
    assert res.max_abs_diff == 0.0
    assert os.path.exists(tmp_path / "net.json")
    xd = x.to(dtype)
    with torch.no_grad():
        reset_states(res.model)
        ref = res.model(xd)
    require_loader()
    # the deployment first: a fresh process that cannot import sparseflow, SpikingJelly or triton
    info, out = run_in_fresh_process(res.path, xd, str(tmp_path), timeout=120)
    assert out is not None, info
    assert info["forbidden_modules"] == [], info
    torch.testing.assert_close(out["y"], ref.cpu(), rtol=0, atol=0)
    torch.testing.assert_close(out["y2"], out["y"], rtol=0, atol=0)
    # then loaded in the process that compiled it
    with torch.no_grad():
        pkg = res.load()
        for _ in range(2):  # every call from reset neurons
            torch.testing.assert_close(pkg(xd), ref, rtol=0, atol=0)
        x2 = torch.randn_like(xd)
        reset_states(res.model)
        d = compare_outputs(pkg(x2), res.model(x2))
    assert d["within_fp16_rounding"], d
    graph = optimize(res.model, xd, cuda_graph=True)
    with torch.no_grad():
        for _ in range(4):
            g = graph(xd)
    torch.testing.assert_close(g, ref, rtol=0, atol=0)


def test_sops_agree_with_spikingjelly_on_the_gpu():
    from sparseflow_core import optimize, profile
    from sparseflow_core.sops import spikingjelly_sops

    net, x = _net()
    sj = spikingjelly_sops(net, x)
    rep = profile(net, x, reps=2, dense=False)  # the same dense computation (the optimized one may flip spikes)
    assert rep.total_sops == sj["total"] > 0
    opt = profile(optimize(copy.deepcopy(net), x), x, reps=2, dense=False)
    assert abs(opt.total_sops - sj["total"]) <= 0.01 * sj["total"]
    assert rep.energy_source.startswith(("NVML", "not available"))
    if rep.energy_source.startswith("NVML"):
        assert rep.energy_j_per_forward is not None and rep.energy_j_per_forward >= 0


def test_dynamic_batch_package(tmp_path, require_loader):
    """One package (``dynamic_batch=True``, exported at batch 8) for batches 1, 3 and 8: the exported program's
    outputs (the paths measured at batch 8, run eagerly) at each batch, bit for bit."""
    from sparseflow_core import export

    net, x = _net()
    res = export(copy.deepcopy(net), x.half(), str(tmp_path / "dyn.pt2"), dtype=torch.float16, dynamic_batch=True,
                 max_batch=64)
    require_loader()
    pkg, prog = res.load(), res.program.module()
    with torch.no_grad():
        for n in (1, 3, 8):
            xi = torch.rand(x.shape[0], n, *x.shape[2:], device="cuda", dtype=torch.float16)
            torch.testing.assert_close(pkg(xi), prog(xi), rtol=0, atol=0)
