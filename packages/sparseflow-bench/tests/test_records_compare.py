"""sparseflow_bench.records / compare / report / cli: the long-format CSV, the pytest-benchmark JSON, the
regression guard (a 6 % slow-down fails, a 4 % one passes), the README block, the sections' tables and the CLI's
options, on crafted results files of every layout the sections write (and on the committed ones)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparseflow_bench import cli, compare, pytest_format, records, report, sections
from sparseflow_bench.records import CSV_COLUMNS, Record

ENV = {"date": "2026-11-25T21:00:00+00:00", "torch": "2.11.0+cu130", "triton": "3.6.0", "device": "NVIDIA H100",
       "cuda": "13.0", "driver": "580.1"}
COMMITTED = Path(__file__).resolve().parents[3] / "benchmarks" / "results"


def fused_layers_json(scale=1.0):
    rows = []
    for i, (layer, elem, blk) in enumerate([("layer1.0.conv1", 0.2, 0.9), ("layer2.0.conv1", 0.1, 0.6)]):
        rows.append({"layer": layer, "shape": [4, 8, 64, 56 >> i, 56 >> i], "C_out": 64, "stride": 1,
                     "residual": False, "elem_density": elem, "block_density_8x8_16ch_halo": blk,
                     "block_density_16x16_16ch_halo": blk, "compile_graph_fp16_ms": 0.06, "eager_fp32_ms": 1.0,
                     "sparseflow_ms": 0.03 * scale, "path": "fused_dense",
                     "candidates_ms": {"fused_dense": 0.03 * scale, "fused_sparse": 0.05 * scale, "cudnn": None}})
    summary = {"model": "spiking_resnet34", "T": 4, "N": 8, "size": 224, "layers": 2,
               "sum_compile_graph_fp16_ms": 0.12, "sum_sparseflow_ms": 0.06 * scale, "sum_eager_fp32_ms": 2.0,
               "sum_speedup_vs_compile_graph": 0.12 / (0.06 * scale), "min_layer_speedup_vs_compile_graph": 2.0 / scale,
               "paths": {"fused_dense": 2}}
    return {"env": ENV, "summary": summary, "rows": rows}


def sweep_json():
    return {"env": ENV, "rows": [{"size": 224, "layer": "layer1.1.conv1", "N": 1, "T": 4, "C": 64, "H": 56,
                                  "work_fraction": 0.5, "elem_density": 0.1, "fused_dense_best_cfg_ms": 0.03,
                                  "fused_dense_same_cfg_ms": 0.04, "fused_sparse_with_prescan_ms": 0.02,
                                  "fused_sparse_kernel_only_ms": 0.018, "prescan_ms": 0.002}]}


def conv_json():
    row = {"layer": "layer1.0.conv1", "shape": [32, 64, 56, 56], "elem_density": 0.2,
           "block_density_8x8_16ch_halo": 0.9, "block_density_16x16_16ch_halo": 0.95, "cudnn_fp16_cl_ms": 0.03,
           "cudnn_fp32_ms": 0.08, "sparse_fp16_ms": 0.06, "dense_kernel_fp16_ms": 0.04,
           "sparse_fp32_tf32x3_ms": 0.2, "block_size": 16, "dispatch_fp16_ms": 0.03}
    summary = {"layers": 1, "sum_cudnn_fp16_cl_ms": 0.03, "sum_cudnn_fp32_ms": 0.08, "sum_sparse_fp16_ms": 0.06,
               "sum_dispatch_fp16_ms": 0.03, "sum_sparse_fp32_ms": 0.2, "speedup_sparse_vs_cudnn_fp16": 0.5,
               "speedup_sparse_vs_cudnn_fp32": 4 / 3, "speedup_dispatch_vs_cudnn_fp16": 1.0}
    return {"env": ENV, "summary": summary, "rows": [row]}


def e2e_json():
    return {"spiking_resnet34": {"eager_fp32_ms": 8.0, "compile_fp16_ms": 1.5, "sparseflow_ms": 2.0, "device": "H",
                                 "details": {"T": 4, "N": 8, "size": 224, "eager_fp32_ms": 8.0,
                                             "graph_eager_fp32_ms": 3.5, "sparseflow_fp16_ms": 2.0,
                                             "sparseflow_fp32_ms": None, "energy_eager_fp32_J": 2.5}},
            "spikformer_ti": {"eager_fp32_ms": None, "sparseflow_ms": None, "note": "not measured"},
            "_env": ENV}


def section_json():
    """A new sections/<topic>.py file: ctx.bench dicts, plain *_ms numbers, a nested candidates dict."""
    return {"rows": [{"op": "sparse_linear", "shape": [256, 512, 1024], "elem_density": 0.1,
                      "block_density_16x16": 0.4, "cublas_fp16_ms": {"median": 0.02, "p20": 0.019, "p80": 0.021},
                      "sparse_fp16_ms": {"median": 0.01, "p20": 0.009, "p80": 0.012}, "cublas_fp32_ms": 0.05,
                      "speedup": 2.0, "exact": True},
                     {"op": "sparse_linear", "shape": [8, 64], "note": "no timing in this row"}],
            "summary": {"rows": 1}, "_env": ENV}


def write_results(d: Path, scale=1.0, extra=True) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    files = {"fused_spiking_resnet34.json": fused_layers_json(scale), "fused_batch_sweep.json": sweep_json(),
             "sparse_conv_spiking_resnet34.json": conv_json(), "e2e.json": e2e_json()}
    if extra:
        files["linear.json"] = section_json()
    for name, obj in files.items():
        (d / name).write_text(json.dumps(obj))
    return d


def by(recs, **kw):
    return [r for r in recs if all(getattr(r, k) == v for k, v in kw.items())]


# ------------------------------------------------------------------------------------------- records
def test_collect_reads_every_layout(tmp_path):
    recs = records.collect(str(write_results(tmp_path)))
    assert {r.source for r in recs} == {"fused_spiking_resnet34.json", "fused_batch_sweep.json",
                                        "sparse_conv_spiking_resnet34.json", "e2e.json", "linear.json"}
    fused = by(recs, section="fused_layers", layer="layer2.0.conv1")
    assert {r.provider for r in fused} == {"compile_graph_fp16", "eager_fp32", "sparseflow", "path:fused_dense",
                                           "path:fused_sparse"}  # the None candidate is not a timing
    sf = by(fused, provider="sparseflow")[0]
    assert (sf.median_ms, sf.elem_density, sf.block_density, sf.block_size) == (0.03, 0.1, 0.6, 8)
    assert sf.role == "sparseflow" and sf.baseline == "compile_graph_fp16" and sf.shape == "4x8x64x28x28"
    assert sf.device == "NVIDIA H100" and sf.versions.startswith("torch 2.11.0+cu130; triton 3.6.0")
    assert by(fused, provider="path:fused_sparse")[0].role == "sparse"
    sweep = by(recs, section="batch_sweep")
    assert len(sweep) == 5 and by(sweep, provider="fused_sparse_with_prescan")[0].block_density == 0.5
    assert by(sweep, role="baseline")[0].provider == "fused_dense_same_cfg"
    conv = by(recs, section="sparse_conv")
    assert len(conv) == 6 and all(r.block_density == 0.95 and r.block_size == 16 for r in conv)  # at its block size
    e2e = by(recs, section="e2e")
    assert {r.provider for r in e2e} == {"eager_fp32", "graph_eager_fp32", "compile_fp16", "sparseflow_fp16"}
    assert all(r.model == "spiking_resnet34" and r.shape == "4x8x3x224x224" for r in e2e)
    lin = by(recs, source="linear.json")
    assert {r.provider: r.role for r in lin} == {"cublas_fp16": "baseline", "sparse_fp16": "sparse",
                                                "cublas_fp32": "baseline"}  # the baseline of fp32 timings
    sp = by(lin, provider="sparse_fp16")[0]
    assert (sp.median_ms, sp.p20_ms, sp.p80_ms) == (0.01, 0.009, 0.012)
    assert (sp.op, sp.shape, sp.elem_density, sp.block_density, sp.block_size) == (
        "sparse_linear", "256x512x1024", 0.1, 0.4, 16)
    assert sp.baseline == "cublas_fp16" and sp.dtype == "float16"


def test_unknown_files_are_skipped_with_a_message(tmp_path):
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "no_timings.json").write_text(json.dumps({"rows": [{"a": 1}], "device": "x"}))
    (tmp_path / "pytest_benchmark.json").write_text(json.dumps({"benchmarks": []}))  # our own output: ignored
    (tmp_path / "e2e.json").write_text(json.dumps(e2e_json()))
    msgs = []
    recs = records.collect(str(tmp_path), log=msgs.append)
    assert {r.source for r in recs} == {"e2e.json"}
    assert sorted(m.split(":")[0] for m in msgs) == ["skipped broken.json", "skipped list.json",
                                                     "skipped no_timings.json"]


def test_csv_long_format_columns_and_round_trip(tmp_path):
    recs = records.collect(str(write_results(tmp_path / "r")))
    path = records.write_csv(recs, str(tmp_path / "results.csv"))
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    required = {"op", "shape", "elem_density", "block_density", "provider", "median_ms", "p20_ms", "p80_ms", "device",
                "versions", "date", "source"}
    assert required <= set(rows[0]) and list(rows[0]) == CSV_COLUMNS
    assert len(rows) == len(recs)
    lin = next(r for r in rows if r["provider"] == "sparse_fp16" and r["source"] == "linear.json")
    assert (float(lin["median_ms"]), float(lin["p20_ms"]), lin["block_density"]) == (0.01, 0.009, "0.4")
    assert records.read_csv(path) == recs


def test_pytest_benchmark_schema(tmp_path):
    recs = records.collect(str(write_results(tmp_path / "r")))
    path = str(tmp_path / "pb.json")
    pytest_format.write_pytest_benchmark(recs, path)
    obj = json.loads(Path(path).read_text())
    assert {"machine_info", "commit_info", "benchmarks", "datetime", "version"} <= set(obj)
    assert obj["machine_info"]["gpu"] == "NVIDIA H100"
    assert len(obj["benchmarks"]) == len(recs)
    stats_fields = {"min", "max", "mean", "stddev", "rounds", "median", "iqr", "q1", "q3", "iqr_outliers",
                    "stddev_outliers", "outliers", "ld15iqr", "hd15iqr", "ops", "total", "iterations"}
    for b in obj["benchmarks"]:
        assert {"group", "name", "fullname", "params", "param", "extra_info", "options", "stats"} <= set(b)
        assert set(b["stats"]) == stats_fields
    names = [b["name"] for b in obj["benchmarks"]]
    assert len(set(names)) == len(names)  # unique within a file
    b = next(b for b in obj["benchmarks"] if b["extra_info"]["source"] == "linear.json"
             and b["params"]["provider"] == "sparse_fp16")
    assert b["stats"]["median"] == pytest.approx(1e-5) and b["stats"]["q1"] == pytest.approx(9e-6)
    assert b["stats"]["q3"] == pytest.approx(1.2e-5) and b["stats"]["ops"] == pytest.approx(1e5)
    back = pytest_format.read_pytest_benchmark(path)
    assert [r.key for r in back] == [r.key for r in recs]
    assert [r.median_ms for r in back] == pytest.approx([r.median_ms for r in recs])
    pytest.importorskip("pytest_benchmark")
    run = subprocess.run([sys.executable, "-m", "pytest_benchmark", "compare", path, "--columns=median"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "sparse_linear" in run.stdout or "linear" in run.stdout


def test_profile_json_reader(tmp_path):
    from sparseflow_core import LayerProfile, ProfileReport

    rep = ProfileReport([LayerProfile("l1", "SparseConv2d", 1, 0.5, 0.2, 0.6, "fused_dense", 8, 1.0, 100,
                                      [2, 1, 4, 8, 8], True),
                         LayerProfile("sn", "LIFNode", 1, 0.1, 1.0)], forward_ms=3.0, throughput_per_s=333.3)
    d = rep.to_dict() | {"model": "m", "T": 2, "N": 1, "size": 8, "dtype": "float16", "_env": ENV}
    (tmp_path / "profile_m.json").write_text(json.dumps(d))
    recs = records.collect(str(tmp_path))
    assert {(r.layer, r.provider, r.role, r.median_ms) for r in recs} == {
        ("l1", "dense_op", "baseline", 1.0), ("l1", "sparseflow", "sparseflow", 0.5),
        ("", "sparseflow_profiled", "reference", 3.0)}
    assert by(recs, layer="l1")[0].block_density == 0.6 and by(recs, layer="l1")[0].block_size == 8


def test_committed_results_are_read():
    """Every device folder of the committed results reads without a layout error; each holds the end-to-end run,
    and the H100 set every section it was measured with."""
    from sparseflow_bench.layout import device_dirs

    dirs = device_dirs(str(COMMITTED))
    assert dirs, f"no device folder with results under {COMMITTED}"
    for d in dirs:
        msgs = []
        recs = records.collect(d, log=msgs.append)
        sections = {r.section for r in recs}
        assert "e2e" in sections, d
        if d.endswith("h100"):
            assert {"fused_layers", "batch_sweep", "sparse_conv", "e2e", "density", "profile"} <= sections
        assert all(r.median_ms > 0 and r.device for r in recs)
        assert not [m for m in msgs if "unexpected layout" in m], msgs


# ------------------------------------------------------------------------------------------- compare
def slowed(recs, factor, provider="sparseflow"):
    return [Record(**{**r.__dict__, "median_ms": r.median_ms * factor}) if r.provider == provider else r
            for r in recs]


@pytest.mark.parametrize("factor,status", [(1.06, 1), (1.04, 0), (0.90, 0)], ids=["slower6pct", "slower4pct",
                                                                                   "faster10pct"])
def test_compare_flags_slowdowns_over_threshold(tmp_path, factor, status, capsys):
    old = records.collect(str(write_results(tmp_path / "old")))
    new = slowed(old, factor)
    records.write_csv(old, str(tmp_path / "old.csv"))
    records.write_csv(new, str(tmp_path / "new.csv"))
    assert compare.main([str(tmp_path / "new.csv"), str(tmp_path / "old.csv")]) == status
    out = capsys.readouterr().out
    n = len(by(old, provider="sparseflow"))
    if status:
        assert out.count("SLOWER") == n and "+6.0%" in out and "FAIL" in out
    else:
        assert "SLOWER" not in out and "OK: no slow-down" in out
    cmp = compare.compare_records(new, old)
    assert len(cmp.changes) == len(old) and not cmp.only_new and not cmp.only_old
    assert len(cmp.slowdowns) == (n if status else 0)


def test_compare_folders_threshold_and_roles(tmp_path, capsys):
    write_results(tmp_path / "old")
    write_results(tmp_path / "new", scale=1.06)  # SparseFlow 6 % slower in the fused-layer file only
    assert compare.main([str(tmp_path / "new"), str(tmp_path / "old")]) == 1
    out = capsys.readouterr().out
    assert "fused_spiking_resnet34.json::fused_layers::spiking_resnet34.layer1.0.conv1" in out
    assert compare.main([str(tmp_path / "new"), str(tmp_path / "old"), "--threshold", "0.07"]) == 0
    assert compare.main([str(tmp_path / "new"), str(tmp_path / "old"), "--roles", "baseline"]) == 0
    capsys.readouterr()
    assert compare.main([str(tmp_path / "new"), str(tmp_path / "old"), "--all"]) == 1
    assert "compile_graph_fp16" in capsys.readouterr().out  # --all lists unchanged timings too
    # a pytest-benchmark file against a folder
    recs = records.collect(str(tmp_path / "new"))
    pytest_format.write_pytest_benchmark(recs, str(tmp_path / "pb.json"))
    assert compare.main([str(tmp_path / "pb.json"), str(tmp_path / "old")]) == 1


def test_compare_nothing_matched_and_bad_arguments(tmp_path, capsys):
    write_results(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "e2e.json").write_text(json.dumps({"other_model": {"eager_fp32_ms": 1.0}, "_env": ENV}))
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    with pytest.raises(ValueError, match="threshold"):
        compare.compare_records([], [], threshold=-0.1)
    with pytest.raises(ValueError, match="unknown roles"):
        compare.compare_records([], [], roles=("fast",))


def test_compare_warns_on_different_devices(tmp_path):
    old = records.collect(str(write_results(tmp_path / "old")))
    new = [Record(**{**r.__dict__, "device": "NVIDIA A100"}) for r in old]
    assert "WARNING: different devices" in compare.compare_records(new, old).table()


# ------------------------------------------------------------------------------------------- report
def test_report_writes_csv_json_plots_and_readme(tmp_path, capsys):
    d = write_results(tmp_path / "res")
    readme = tmp_path / "README.md"
    readme.write_text(f"# T\n\n## Results\n\nintro\n\n{report.BEGIN}\nstale\n{report.END}\n\n## Status\nkept\n")
    assert report.main(["--results", str(d), "--readme", str(readme)]) == 0
    for f in ("results.csv", "pytest_benchmark.json", "e2e.md", "sparse_conv_spiking_resnet34.md"):
        assert (d / f).exists(), f
    # the crafted fused rows lack columns of the markdown table: that table is skipped with a message, the rest
    # of the report is written
    assert "fused_spiking_resnet34.md: skipped (KeyError" in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    assert (d / "speedup_vs_block_density.png").stat().st_size > 1000
    assert (d / "layers_spiking_resnet34.png").stat().st_size > 1000
    text = readme.read_text()
    assert "stale" not in text and text.endswith("## Status\nkept\n") and "intro" in text
    assert "| 0.120 ms" not in text  # sums are formatted from the JSON, checked below
    assert "`torch.compile` + CUDA graph fp16: 0.120 ms | 0.060 ms | 2.00x (slowest layer 2.00x)" in text
    assert "eager fp32 8.00 ms / compile fp16 1.50 ms | 2.00 ms | 4.0x / 0.75x" in text
    assert "cuDNN fp16 channels_last 0.030 ms | 0.060 ms | 0.50x (dispatch: 1.00x)" in text
    assert "`linear`: 1 rows, sum (sparse_fp16), `linear.json` | cublas_fp16: 0.020 ms | 0.010 ms | 2.00x" in text
    assert "spikformer_ti: not measured" in text
    assert "![speed-up vs block density](res/speedup_vs_block_density.png)" in text
    # every file a row reads is listed with its device and versions
    for f in ("e2e.json", "fused_spiking_resnet34.json", "sparse_conv_spiking_resnet34.json", "linear.json"):
        assert f"`{f}`: NVIDIA H100, torch 2.11.0+cu130, triton 3.6.0" in text, f
    # regenerating is stable
    report.update_readme(str(readme), str(d))
    assert readme.read_text() == text
    no_markers = tmp_path / "R2.md"
    no_markers.write_text("nothing\n")
    assert report.update_readme(str(no_markers), str(d)) is False and no_markers.read_text() == "nothing\n"


def test_readme_rows_of_density_sweep_and_profiles(tmp_path):
    """The density sweep gets one row (per op: speed-up at the sparsest and densest block density) and every
    profiled model one row (sum over its SparseFlow layers against their dense ops), both read from the JSON."""
    rows = [{"op": "conv3x3", "pattern": p, "target_density": e, "elem_density": e, "block_density": b,
             "shape": [32, 64, 56, 56], "rel_err": 0.0, "sparse_ms": s,
             "dense_kernel_ms": 0.2, "baseline_ms": 0.1, "speedup_sparse_vs_baseline": 0.1 / s,
             "speedup_sparse_vs_dense_kernel": 0.2 / s}
            for p, e, b, s in (("iid", 0.5, 1.0, 0.2), ("iid", 0.005, 0.25, 0.05), ("clustered", 0.02, 0.5, 0.1))]
    (tmp_path / "density.json").write_text(json.dumps({"baseline": "cuDNN fp16", "rows": rows, "_env": ENV}))
    layers = [{"name": "sn1", "type": "LIFNode", "ms": 0.01, "dense_ms": None},
              {"name": "layer1.0.conv1", "type": "SparseConv2d", "ms": 0.02, "dense_ms": 0.05,
               "elem_density": 0.1, "block_density": 0.5, "block_size": 8, "in_shape": [4, 8, 64, 56, 56]},
              {"name": "layer1.0.conv2", "type": "SparseConv2d", "ms": 0.03, "dense_ms": 0.04,
               "elem_density": 0.1, "block_density": 0.6, "block_size": 8, "in_shape": [4, 8, 64, 56, 56]}]
    (tmp_path / "profile_sew_resnet34.json").write_text(json.dumps(
        {"model": "sew_resnet34", "T": 4, "N": 8, "size": 224, "dtype": "float16", "forward_ms": 1.0,
         "layers": layers, "_env": ENV}))
    recs = records.collect(str(tmp_path))
    dens = by(recs, section="density")
    assert {r.layer for r in dens} == {"iid@0.5", "iid@0.005", "clustered@0.02"}  # one row per pattern and density
    assert {(r.provider, r.role) for r in dens} == {("cudnn_fp16_cl", "baseline"), ("sparse_fp16", "sparse"),
                                                   ("dense_kernel_fp16", "reference")}
    sp = {p["record"].layer: p["speedup"] for p in report.speedups(dens)}
    assert sp == pytest.approx({"iid@0.5": 0.5, "iid@0.005": 2.0, "clustered@0.02": 1.0})  # over cuDNN, same row
    text = report.readme_results(str(tmp_path), plot=False)
    assert ("| per-op density sweep, synthetic spikes (clustered, iid; 3 rows), fp16, `density.json` | cuDNN fp16 | "
            "sparse kernel, prescan included | conv3x3 2.00x at 25% of blocks (0.5% of elements) .. 0.50x at 100% |"
            ) in text
    assert ("| `sparseflow.profile` of sew_resnet34 (input 4x8x3x224x224, float16): 2 SparseFlow layers, each timed "
            "alone in eager mode (CUDA events, launch-bound), sum, `profile_sew_resnet34.json` | "
            "each layer's dense op: 0.090 ms | 0.050 ms | 1.80x |") in text
    assert "`density.json`: NVIDIA H100" in text and "`profile_sew_resnet34.json`: NVIDIA H100" in text
    assert "`density`:" not in text and "`profile`:" not in text  # not also summed as generic sections


def test_speedups_pair_each_timing_with_its_baseline(tmp_path):
    recs = records.collect(str(write_results(tmp_path)))
    sp = {(p["record"].source, p["record"].provider): p["speedup"] for p in report.speedups(recs)}
    assert sp[("fused_batch_sweep.json", "fused_sparse_with_prescan")] == pytest.approx(2.0)
    assert sp[("sparse_conv_spiking_resnet34.json", "sparse_fp16")] == pytest.approx(0.5)
    assert sp[("linear.json", "sparse_fp16")] == pytest.approx(2.0)
    kept = [Record(f, "e2e", "o", "", "p", 1.0) for f in ("e2e.json", "depthwise_transposed_dry.json",
                                                          "density.json")]
    assert [r.source for r in report.current(kept)] == ["e2e.json", "density.json"]  # --dry smoke runs are not read


# ------------------------------------------------------------------------------------------- cli
def test_cli_help_exposes_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--model", "--T", "--batch", "--dtype", "--block-size", "--out", "--sections", "compare", "report"):
        assert opt in out, opt


def test_cli_dispatches_report_and_compare(tmp_path):
    write_results(tmp_path / "a")
    assert cli.main(["report", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "results.csv").exists()
    assert cli.main(["compare", str(tmp_path / "a" / "results.csv"), str(tmp_path / "a" / "results.csv")]) == 0


@pytest.mark.parametrize("args,msg", [(["--block-size", "x"], "block size"), (["--block-size", "0"], "positive"),
                                      (["--dtype", "int8"], "invalid choice")], ids=["bs_text", "bs_zero", "dtype"])
def test_cli_rejects_bad_options(args, msg, capsys):
    with pytest.raises(SystemExit):
        cli.main(args)
    assert msg in capsys.readouterr().err


def test_console_script_entry_point():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'sparseflow-bench = "sparseflow_bench.cli:main"' in text
    assert os.path.exists(cli.__file__)


def _fake_sections(monkeypatch, calls):
    """Every section but ``profile`` recorded instead of run (with the context it gets); ``profile`` runs with its
    ``profile_model`` recorded."""
    from sparseflow_bench import timing
    from sparseflow_bench.sections import profile

    real = sections.find_section
    monkeypatch.setattr(cli.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(timing, "environment", lambda: dict(ENV))
    monkeypatch.setattr(sections, "find_section",
                        lambda name: real(name) if name == "profile" else (lambda ctx: calls.append((name, ctx))))

    def fake_profile(model, T, batch, size, dtype, block_size, device, out, reps=5, mode="auto"):
        calls.append(("profile", model, T, batch, size, dtype, block_size, mode))

        class P:
            def table(self):
                return "profile table"

        return None, P()

    monkeypatch.setattr(profile, "profile_model", fake_profile)


def test_cli_gpu_run_steps(tmp_path, monkeypatch, capsys):
    """The GPU path without a GPU: every section is run in the order given on one context (the per-layer sections
    share its prepared model), then the profile and the report; options reach them."""
    calls = []
    _fake_sections(monkeypatch, calls)
    out = tmp_path / "out"
    write_results(out)
    status = cli.main(["--sections", "e2e,layers,linear,conv", "--out", str(out), "--model", "sew_resnet34",
                       "--T", "2", "--batch", "4", "--dtype", "bfloat16", "--block-size", "16", "--no-progress"])
    assert status == 0
    assert [c[0] for c in calls] == ["e2e", "layers", "linear", "conv", "profile"]
    ctx = calls[0][1]
    assert all(c[1] is ctx for c in calls[:4])  # one context: what the sections share lives in ctx.cache
    assert (ctx.T, ctx.N, ctx.size, ctx.model, ctx.out_dir, ctx.dry) == (2, 4, 224, "sew_resnet34", str(out), False)
    assert ctx.models == ["spiking_resnet34", "sew_resnet34", "spikformer_ti"] and 0 < ctx.left() <= 540
    assert calls[-1] == ("profile", "sew_resnet34", 2, 4, 224, cli.torch.bfloat16, 16, "auto")
    assert (out / "results.csv").exists() and (out / "pytest_benchmark.json").exists()
    text = capsys.readouterr().out
    assert "profile table" in text and "[6/6" in text  # the step lines when the bar is off


def test_cli_default_run_is_density_e2e_and_every_model_profiled(tmp_path, monkeypatch):
    """``nox -s bench`` with no arguments: the density sweep, then the end-to-end models, then sparseflow.profile
    of each end-to-end model and each other benchmark model (the U-Net at its own size), then the report."""
    calls = []
    _fake_sections(monkeypatch, calls)
    assert cli.main(["--out", str(tmp_path), "--no-progress", "--no-report"]) == 0
    assert [c[0] if c[0] != "profile" else (c[1], c[4]) for c in calls] == [
        "density", "e2e", ("spiking_resnet34", 224), ("sew_resnet34", 224), ("spikformer_ti", 224),
        ("spiking_resnet50", 224), ("sdt_8_384", 224), ("spiking_unet", 128)]


def test_run_sections_reports_failures_and_keeps_going(tmp_path, monkeypatch, capsys):
    """An unknown or failing section sets the status and the next one still runs; one that would start past the
    budget is skipped."""
    import time

    import torch

    ran = []

    def failing(ctx):
        raise RuntimeError("boom")

    runs = {"bad": failing, "good": lambda ctx: ran.append("good")}
    real = sections.find_section
    monkeypatch.setattr(sections, "find_section", lambda name: runs.get(name) or real(name))
    ctx = sections.SectionContext(str(tmp_path), {}, torch.device("cpu"), dry=True)
    assert sections.run_sections(["bad", "no_such_section", "good"], ctx) == 1
    assert ran == ["good"]
    err = capsys.readouterr().err
    assert "RuntimeError: boom" in err and "unknown section 'no_such_section'" in err
    ctx.deadline = time.time() + 5
    assert sections.run_sections(["good"], ctx, min_left=20) == 0 and ran == ["good"]
    assert "good: skipped (budget)" in capsys.readouterr().out


def test_committed_tables_and_long_format_are_reproduced(tmp_path):
    """The report of the committed H100 results, regenerated from their JSON, gives the committed section tables
    and long-format CSV byte for byte, and the README block names every file it reads."""
    import shutil

    src = COMMITTED / "h100"
    d = tmp_path / "h100"
    shutil.copytree(src, d, ignore=shutil.ignore_patterns("*.md", "*.png", "results.csv", "kernels"))
    written = report.section_tables(str(d), log=lambda *_: None)
    assert sorted(written) == ["e2e.md", "fused_batch_sweep.md", "fused_spiking_resnet34.md", "neuron_pool.md",
                               "sparse_conv_spiking_resnet34.md"]
    for name in written:
        assert (d / name).read_text() == (src / name).read_text(), name
    recs = report.write_records(str(d), log=lambda *_: None)
    assert (d / "results.csv").read_text() == (src / "results.csv").read_text()
    assert {r.section for r in recs} >= {"fused_layers", "batch_sweep", "sparse_conv", "e2e", "density", "profile"}
    text = report.readme_results(str(d), plot=False)
    for f in ("e2e.json", "fused_spiking_resnet34.json", "sparse_conv_spiking_resnet34.json", "density.json"):
        assert f"`{f}`" in text, f


def test_generic_reader_nested_layouts(tmp_path):
    """Section files nest their rows: models -> name -> layers with a ``ms`` dict and a ``block_density`` dict
    (resnet_family), models: [{model, size, rows}] (depthwise_transposed); each timing gets the baseline of its own
    dtype."""
    fam = {"models": {"sew_resnet18": {"T": 4, "layers": [
        {"layer": "layer1.0.conv1", "kernel": "3x3", "C": 64, "H": 56, "batch": 32, "elem_density": 0.2,
         "block_density": {"tile16_g16": 0.9, "tile8_g16": 0.7, "prescan8_any": 0.6},
         "ms": {"cudnn_fp16_cl": 0.04, "cudnn_fp32": 0.1, "sparse_fp16_b8": 0.05, "sparse_fp16_b16": 0.02,
                "sparse_fp32": 0.08, "dense_kernel_fp16": 0.06}, "exact": {"fp32": 1e-7}}],
        "summary": {"sum_x_ms": 1.0}}}, "_env": ENV}
    dt = {"env": ENV, "models": [{"model": "spiking_unet", "size": 128, "rows": [
        {"name": "up1", "kind": "transposed", "block_density_input": 0.3, "block_density_halo": 0.5,
         "cudnn_fp16_cl_ms": 0.02, "sparse_fp16_ms": 0.01, "configs_fp16_ms": {"a": 0.01, "b": 0.03}}]},
        {"model": "spiking_unet", "size": 256, "rows": [{"name": "up1", "kind": "transposed",
                                                        "cudnn_fp16_cl_ms": 0.08, "sparse_fp16_ms": 0.04}]}]}
    (tmp_path / "resnet_family.json").write_text(json.dumps(fam))
    (tmp_path / "depthwise_transposed.json").write_text(json.dumps(dt))
    recs = records.collect(str(tmp_path))
    f = by(recs, source="resnet_family.json")
    assert {r.section for r in f} == {"resnet_family.layers"} and {r.model for r in f} == {"sew_resnet18"}
    roles = {r.provider: (r.role, r.baseline) for r in f}
    assert roles == {"cudnn_fp16_cl": ("baseline", "cudnn_fp16_cl"), "cudnn_fp32": ("baseline", "cudnn_fp32"),
                     "sparse_fp16_b8": ("sparse", "cudnn_fp16_cl"), "sparse_fp16_b16": ("sparse", "cudnn_fp16_cl"),
                     "sparse_fp32": ("sparse", "cudnn_fp32"), "dense_kernel_fp16": ("reference", "cudnn_fp16_cl")}
    assert all((r.block_density, r.block_size, r.elem_density) == (0.7, 8, 0.2) for r in f)
    assert f[0].shape == "batch32xC64xH56xk3x3" and f[0].op == "layers"
    q = by(recs, source="depthwise_transposed.json")
    assert {r.model for r in q} == {"spiking_unet@128", "spiking_unet@256"}
    assert {r.provider for r in q if r.model.endswith("128")} == {"cudnn_fp16_cl", "sparse_fp16", "configs_fp16:a",
                                                                  "configs_fp16:b"}
    assert by(q, model="spiking_unet@128", provider="sparse_fp16")[0].block_density == 0.5  # the halo one
    best = report.best_per_group(recs)
    assert {(p["record"].source, p["record"].provider) for p in best} == {
        ("resnet_family.json", "sparse_fp16_b16"), ("depthwise_transposed.json", "sparse_fp16")}
    assert sorted(p["speedup"] for p in best) == pytest.approx([2.0, 2.0, 2.0])


def test_section_context_time_forwards_and_write_text(tmp_path, monkeypatch):
    """The sections' shared helpers: each model's forward is timed with its neurons reset just before it, without
    autograd and without a CUDA graph; the markdown lands in the output folder."""
    import torch

    from sparseflow_bench import sections

    ctx = sections.SectionContext(str(tmp_path), {}, torch.device("cpu"), dry=False)
    events = []
    monkeypatch.setattr(sections, "reset", lambda m: events.append(("reset", m)))

    def fake_bench(fn, **kw):
        y = fn()
        events.append(("timed", kw, y.requires_grad))
        return {"median": float(len(events))}

    monkeypatch.setattr(ctx, "bench", fake_bench)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    out = ctx.time_forwards(torch.ones(2, 3), dense=a, optimized=b)
    assert out == {"ms_dense": 2.0, "ms_optimized": 4.0}
    assert events == [("reset", a), ("timed", {"graph": False, "rep": 20}, False),
                      ("reset", b), ("timed", {"graph": False, "rep": 20}, False)]
    path = ctx.write_text("t.md", "# t\n")
    assert path == str(tmp_path / "t.md") and (tmp_path / "t.md").read_text() == "# t\n"


def test_exactness_section_dry_run(tmp_path):
    """``--sections exactness`` on the CPU (interpreter, T=2, 32 px): the faithful model's logits are the dense
    model's bit for bit on all three calls, and the JSON and markdown are written."""
    import json

    import torch

    from sparseflow_bench import sections
    from sparseflow_bench.sections import exactness

    ctx = sections.SectionContext(str(tmp_path), {"device": "cpu"}, torch.device("cpu"), dry=True,
                                  models=["sew_resnet18"])
    res = exactness.run(ctx)["sew_resnet18"]
    assert "error" not in res, res
    assert res["faithful_bit_identical"] == [True, True, True]
    assert res["faithful_logits_rel_err"] == [0.0, 0.0, 0.0]
    assert res["replaced"]["fused"] > 0
    saved = json.loads((tmp_path / "exactness.json").read_text())
    assert saved["models"]["sew_resnet18"]["faithful_bit_identical"] == [True, True, True]
    assert "| sew_resnet18 | 0 / 0 / 0 | yes / yes / yes |" in (tmp_path / "exactness.md").read_text()


def test_readme_row_names_a_dense_run_that_was_not_timed(tmp_path):
    """An end-to-end record whose section skipped a dense run says so beside its baseline in the README's row, and
    claims no speed-up over the dense runs that were timed; the status line leaves it out of its range."""
    e2e = {"net": {"T": 4, "N": 8, "size": 224, "sparseflow_ms": 1.0, "eager_fp32_ms": 10.0, "baseline_ms": 1.5,
                   "baseline_kind": "compile_fp16_default_graph",
                   "baseline_skipped": ["compile_fp16_reduce-overhead: the section's time budget ran out"]},
           "full": {"T": 4, "N": 8, "size": 224, "sparseflow_ms": 1.0, "eager_fp32_ms": 10.0, "baseline_ms": 1.2,
                    "baseline_kind": "compile_fp16_default_graph", "speedup_vs_best_dense": 1.2},
           "_env": ENV}
    (tmp_path / "e2e.json").write_text(json.dumps(e2e))
    text = report.readme_results(str(tmp_path), plot=False)
    row = next(ln for ln in text.splitlines() if ln.startswith("| net end to end"))
    assert "1.50 ms (not timed: compile_fp16_reduce-overhead: the section's time budget ran out)" in row
    assert row.endswith("| 1.00 ms | 10.0x / none claimed |") and "1.50x" not in row
    status_line = next(ln for ln in text.splitlines() if ln.startswith("* End to end"))
    assert "1.20x over the best dense fp16 run" in status_line and "1.50x" not in status_line
    assert "(full; the others' dense runs were not all timed)" in status_line
    full = next(ln for ln in text.splitlines() if ln.startswith("| full end to end"))
    assert "not timed" not in full and "1.20x" in full
