"""Data-parallel inference on the GPU under torchrun (one rank per GPU of the machine, NCCL):

* ``sparseflow-bench eval`` with ``numerics="faithful"`` gives the dense model's fp32 logits bit for bit, every
  sample once, in data-set order; with fp16 and CUDA graphs it runs and reports the ranks' throughput, every
  rank on the same kernel paths (broadcast from rank 0);
* scripts/sj_distributed_gpu.py: a SparseFlow model inside SpikingJelly's own distributed inference
  (``predict_classification``/``evaluate_classification``) gives the dense model's logits bit for bit
  (faithful)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).resolve().parents[2]
# several torchrun jobs per test (Triton compiles in each): past gpu_check.sh's default per-test timeout
_long = pytest.mark.timeout(600) if importlib.util.find_spec("pytest_timeout") else (lambda f: f)


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    paths = [str(ROOT / "packages" / p / "src") for p in
             ("sparseflow-kernels", "sparseflow-ops", "sparseflow-core", "sparseflow-bench")] + [str(ROOT / "src")]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    return env


def _torchrun(args, timeout=420):
    nproc = torch.cuda.device_count()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from sparseflow_bench.data import natural_images
    from sparseflow_bench.models import build_model, recalibrate_bn

    d = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    n = 13  # not a multiple of the batch or of the ranks
    torch.save({"inputs": natural_images(n, size=64, seed=2), "labels": torch.arange(n) % 10}, d / "images.pt")
    model = build_model("sew_resnet18", T=4, num_classes=10).cuda()
    recalibrate_bn(model, natural_images(8, size=64, seed=1).cuda(), 4)  # so that it spikes
    torch.save(model.state_dict(), d / "weights.pt")
    return d


def _eval(data, out, *extra):
    args = ["-m", "sparseflow_bench.cli", "eval", "--model", "sew_resnet18", "--weights", str(data / "weights.pt"),
            "--num-classes", "10", "--data", str(data / "images.pt"), "--T", "4", "--batch-size", "4",
            "--out", str(out), "--no-progress", *extra]
    proc = _torchrun(args)
    return torch.load(out / "predictions.pt"), json.loads((out / "summary.json").read_text()), proc


@_long
def test_eval_faithful_equals_dense_and_fp16_cuda_graph_runs(data, tmp_path):
    dense, _sd, _ = _eval(data, tmp_path / "dense", "--no-optimize")
    faithful, sf, _ = _eval(data, tmp_path / "faithful", "--numerics", "faithful")
    assert torch.equal(dense["index"], torch.arange(13)) and torch.equal(faithful["index"], torch.arange(13))
    assert dense["logits"].std(0).max() > 0  # the logits depend on the sample: the network spikes
    assert torch.equal(faithful["logits"], dense["logits"])
    assert sf["throughput"]["samples"] == 13 and sf["path_disagreements"] == {}

    fast, s16, proc = _eval(data, tmp_path / "fast16", "--dtype", "float16", "--cuda-graph")
    base, b16, _ = _eval(data, tmp_path / "dense16", "--dtype", "float16", "--cuda-graph", "--no-optimize")
    assert torch.equal(fast["index"], torch.arange(13))
    assert "samples/s in total" in proc.stdout
    thr = s16["throughput"]
    assert len(thr["per_rank"]) == torch.cuda.device_count() and thr["samples_per_s"] > 0
    assert sum(r["samples"] for r in thr["per_rank"]) == 13
    assert s16["path_disagreements"] == {}
    agree = float((fast["prediction"] == base["prediction"]).float().mean())
    print(f"fp16 + CUDA graphs: {thr['samples_per_s']:.1f} samples/s optimized, "
          f"{b16['throughput']['samples_per_s']:.1f} dense; top-1 agreement with dense fp16 {agree:.3f}")


@_long
def test_sparseflow_inside_spikingjelly_distributed_inference(tmp_path):
    folder = tmp_path / "data"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_eval_data.py"), "--out", str(folder), "--n", "20",
                    "--size", "64"], env=_env(), check=True, cwd=ROOT, timeout=120)
    _torchrun([str(ROOT / "scripts" / "sj_distributed_gpu.py"), "--data", str(folder / "images"), "--out",
               str(tmp_path / "sj"), "--size", "64", "--batch-size", "4"], timeout=560)
    s = json.loads((tmp_path / "sj" / "sj_summary.json").read_text())
    assert s["samples"] == 20 and s["logits_std_over_samples"] > 0
    assert s["vs_dense"]["sparseflow_faithful/eager"]["bit_for_bit"]
    assert "error" not in s["runs"]["sparseflow_fast/eager"], s["runs"]["sparseflow_fast/eager"]
    assert s["vs_dense"]["sparseflow_fast/eager"]["same_indices"]
