"""The CPU demo of ``sparseflow-bench`` (SparseFlow's kernels through the interpreter, what optimize() did, exactness
on real kernel outputs, no glitches in the output), the per-device results layout, and the README's generated
results block."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from sparseflow_bench import cli, demo, layout, report, status

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(cli.torch.cuda, "is_available", lambda: False)


def test_cpu_demo_runs_the_kernels_and_is_exact(no_cuda, tmp_path, capsys):
    """``sparseflow-bench`` without a GPU: the demo on the smallest demo model; fused and sparse kernel paths, the
    three exactness lines at 0, firing rates; no --dtype notice nobody asked for, nothing printed on stderr (no
    progress bar to interleave with), no claim that the kernels need a GPU."""
    assert demo.interpreter_active()  # the test suite's conftest sets TRITON_INTERPRET=1
    rc = cli.main(["--size", "8", "--T", "1", "--block-size", "4", "--results-root", str(tmp_path / "none")])
    out, err = capsys.readouterr()
    assert rc == 0, out
    assert err == ""
    assert "Triton's CPU interpreter" in out and "need a CUDA GPU" not in out
    assert "--dtype" not in out
    for line in ("first call", "second call, no reset", "after reset_net"):
        row = next(x for x in out.splitlines() if x.strip().startswith(line))
        assert row.split()[-1] == "0", row
    assert "fused_dense" in out  # the image stem
    assert "fused_sparse" in out  # the spike-fed conv -> BN -> LIF
    assert " sparse" in out  # the sparse conv / linear paths
    assert "Firing rates" in out and "lif1" in out
    header = out.index("No CUDA GPU"), out.index("building the model")
    assert header[0] < header[1]


def test_exactness_reads_the_optimized_outputs():
    """exactness() compares what the optimized model returns: a model that returns something else is caught."""
    dense = torch.nn.Linear(3, 2)
    other = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    err = demo.exactness(dense, other, x)
    assert set(err) == {"first call", "second call, no reset", "after reset_net"}
    assert all(v > 0 for v in err.values())
    assert all(v == 0 for v in demo.exactness(dense, dense, x).values())


def test_interpreter_is_set_before_triton_loads(monkeypatch):
    monkeypatch.setattr(cli.torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    cli._use_interpreter(False, [])
    assert os.environ["TRITON_INTERPRET"] == "1"


@pytest.mark.parametrize("name,slug", [("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"),
                                       ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA GeForce RTX 4090", "rtx4090"),
                                       ("NVIDIA L40S", "l40s"), ("Some GPU", "some-gpu")])
def test_device_slug(name, slug):
    assert layout.device_slug(name) == slug


def _write(d: Path, name: str, device: str, date: str, **extra) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(json.dumps({"_env": {"device": device, "date": date}, **extra}))


def test_current_results_dir_is_the_newest_device(tmp_path):
    _write(tmp_path / "h100", "e2e.json", "NVIDIA H100 80GB HBM3", "2026-11-26T06:00:00+00:00")
    assert layout.current_results_dir(str(tmp_path)) == str(tmp_path / "h100")
    _write(tmp_path / "h200", "e2e.json", "NVIDIA H200", "2026-12-03T06:00:00+00:00")
    assert layout.current_results_dir(str(tmp_path)) == str(tmp_path / "h200")
    assert layout.device_results_dir(str(tmp_path), "NVIDIA H200") == str(tmp_path / "h200")
    assert layout.current_results_dir(str(tmp_path / "missing")) is None


def test_status_lines_read_the_files(tmp_path):
    m = {"sparseflow_ms": 1.0, "eager_fp32_ms": 8.0, "compile_fp16_ms": 1.5}
    _write(tmp_path, "e2e.json", "NVIDIA H200", "2026-12-03T06:00:00+00:00", a=m, b={**m, "eager_fp32_ms": 9.0})
    lines = status.status_lines(str(tmp_path), "benchmarks/results/h200")
    assert "NVIDIA H200, 2026-12-03" in lines[0]
    assert "8.0-9.0x over SpikingJelly eager fp32" in lines[1] and "1.50x over `torch.compile`" in lines[1]


def test_status_lines_name_the_best_dense_baseline(tmp_path):
    """An e2e entry with the best of the dense runs (``baseline_ms``, ``baseline_kind``) is compared with that run,
    named, not with ``torch.compile`` alone."""
    m = {"sparseflow_ms": 2.0, "eager_fp32_ms": 8.0, "compile_fp16_ms": 3.0, "baseline_ms": 1.0,
         "baseline_kind": "compile_fp16_default_graph"}
    _write(tmp_path, "e2e.json", "NVIDIA H200", "2026-12-03T06:00:00+00:00", a=m)
    lines = status.status_lines(str(tmp_path), "benchmarks/results/h200")
    assert "0.50x over the best dense fp16 run (compile_fp16_default_graph)" in lines[1], lines
    assert status.baseline_of(m) == (1.0, "compile_fp16_default_graph")
    assert status.baseline_of({"compile_fp16_ms": 3.0}) == (3.0, None)


def test_readme_results_block_is_current():
    """The README's results block (status lines included) is what the report generates from the committed files
    of the newest device folder, so the README cannot contradict them."""
    readme = (ROOT / "README.md").read_text()
    i, j = readme.index(report.BEGIN), readme.index(report.END)
    d = layout.current_results_dir(str(ROOT / layout.RESULTS_ROOT))
    assert d is not None
    link = os.path.relpath(d, ROOT)
    assert readme[i + len(report.BEGIN) + 1:j] == report.readme_results(d, link, plot=False)


def test_diagnose_compares_each_mode_with_the_dense_model(capsys):
    """``sparseflow-bench diagnose`` on the CPU (the torch paths, tiny shapes): per mode the optimized model's
    error against the dense fp32 model, per time step, the dense model's own reordering error and its distance to
    float64, where outputs first differ and the paths taken; TF32 settings restored afterwards."""
    import math

    import torch

    from sparseflow_bench import cli

    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    assert cli.main(["diagnose", "sew_resnet18", "--modes", "torch", "--seeds", "3", "--T", "2", "--batch", "1",
                     "--size", "16"]) == 0
    out = capsys.readouterr().out
    assert "seed 3 mode torch: rel err" in out and "dense fp32 reordered" in out and "paths {" in out
    from sparseflow_bench.diagnose import diagnose

    (r,) = diagnose("sew_resnet18", ["torch"], [3], T=2, N=1, size=16, log=lambda *_: None)
    assert r["rel_err"] < 1e-3 and len(r["rel_err_per_t"]) == 2 and all(math.isfinite(e) for e in r["rel_err_per_t"])
    assert r["dense_fp32_vs_fp64"] < 1e-4 and math.isfinite(r["dense_reordered_rel_err"])
    assert isinstance(r["first_difference"], list) and r["paths"]
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == tf32
