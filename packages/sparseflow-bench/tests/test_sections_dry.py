"""The per-layer sections (``layers``, ``conv``, ``sweep``) in their CPU dry mode (interpreter) on a small
SpikingJelly net standing in for spiking_resnet34: one prepared model shared through the context, every candidate
path run, the spikes of the fp32 path equal to the float64 reference, and the files read back by the one reader
and rendered by the sections' own tables."""

from __future__ import annotations

import json

import pytest
import torch
from spikingjelly.activation_based import functional, layer, neuron
from torch import nn

from sparseflow_bench import models, records, report
from sparseflow_bench.sections import SectionContext, run_sections


def _small(name, T, N, size, device, **kw):
    torch.manual_seed(0)
    net = nn.Sequential(
        layer.Conv2d(3, 16, 3, padding=1, bias=False), layer.BatchNorm2d(16), neuron.LIFNode(),
        layer.Conv2d(16, 16, 3, padding=1, bias=False), layer.BatchNorm2d(16), neuron.IFNode(),
        layer.Conv2d(16, 16, 3, padding=1, bias=False), layer.BatchNorm2d(16), neuron.LIFNode(),
        layer.Flatten(), layer.Linear(16 * size * size, 10),
    )
    functional.set_step_mode(net, "m")
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.fill_(0.8)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval(), torch.rand(T, N, 3, size, size)


def test_layer_sections_share_one_model_and_read_back(tmp_path, monkeypatch):
    prepared = []
    monkeypatch.setattr(models, "prepared_model", lambda *a, **kw: prepared.append(a) or _small(*a, **kw))
    ctx = SectionContext(str(tmp_path), {"device": "cpu", "date": "2026-12-03"}, torch.device("cpu"), dry=True,
                         T=2, N=1, size=8, model="small")
    assert run_sections(["layers", "conv"], ctx) == 0
    assert prepared == [("small", 2, 1, 8, torch.device("cpu"))]  # both sections measured the same layers
    fused = json.loads((tmp_path / "fused_small.json").read_text())
    # the spike-fed ones (the first conv reads the images)
    assert [r["layer"] for r in fused["rows"]] == ["3", "6"] and fused["summary"]["layers"] == 2
    for r in fused["rows"]:
        assert r["flip_rate_fp32_vs_fp64"] == 0.0
        assert r["path"] in r["candidates_ms"] and r["candidates_ms"]["fused_sparse"] is not None
    conv = json.loads((tmp_path / "sparse_conv_dry.json").read_text())
    assert len(conv["rows"]) == 2 and conv["summary"]["layers"] == 2
    recs = records.collect(str(tmp_path), log=lambda *_: None)
    assert {r.section for r in recs} == {"fused_layers", "sparse_conv"}
    assert {r.layer for r in recs if r.section == "fused_layers" and r.role == "sparseflow"} == {"3", "6"}
    written = report.section_tables(str(tmp_path), log=lambda *_: None)
    assert written == ["fused_small.md"]  # --dry smoke files get no table
    assert "# Fused spiking layers of small (T=2, N=1, 8 px)" in (tmp_path / "fused_small.md").read_text()


def test_sweep_section_measures_its_layers_at_two_sizes(tmp_path, monkeypatch):
    from sparseflow_bench.sections import sweep

    prepared = []
    monkeypatch.setattr(models, "prepared_model", lambda *a, **kw: prepared.append(a[3]) or _small(*a, **kw))
    monkeypatch.setattr(sweep, "PICK", ("6",))
    ctx = SectionContext(str(tmp_path), {"device": "cpu"}, torch.device("cpu"), dry=True, T=2, N=1, size=8,
                         model="small")
    out = sweep.run(ctx)
    assert prepared == [8, 16]
    assert [(r["size"], r["N"]) for r in out["rows"]] == [(8, 1), (8, 2), (16, 1), (16, 2)]
    assert all(r["fused_sparse_kernel_only_ms"] > 0 and 0 < r["work_fraction"] <= 1 for r in out["rows"])
    recs = records.collect(str(tmp_path), log=lambda *_: None)
    assert {(r.model, r.role) for r in recs if r.provider == "fused_dense_same_cfg"} == {("8px", "baseline"),
                                                                                          ("16px", "baseline")}
    pytest.importorskip("matplotlib")
    assert report.section_tables(str(tmp_path), log=lambda *_: None) == ["fused_batch_sweep.md"]


def test_e2e_section_dry_run(tmp_path, monkeypatch):
    """``--sections e2e`` on the CPU: the eager time, the dense model's own fp32 reordering error, SparseFlow fp16,
    fp32 and fp32 faithful against the dense fp32 model (faithful: bit for bit), what optimize() replaced, and the
    file read back by the one reader."""
    monkeypatch.setattr(models, "prepared_model", _small)
    ctx = SectionContext(str(tmp_path), {"device": "cpu"}, torch.device("cpu"), dry=True, T=2, N=1, size=8,
                         models=["small"])
    assert run_sections(["e2e"], ctx) == 0
    r = json.loads((tmp_path / "e2e.json").read_text())["small"]
    assert not [k for k in r if k.endswith("error")], r
    assert r["logits_rel_err_fp32_faithful"] == 0.0 and r["logits_rel_err_fp32"] < 1e-3
    assert r["replaced_fp16"]["fused"] == 3 and r["sparseflow_ms"] == r["sparseflow_fp16_ms"] > 0
    # every layer's path in the timed run, by name: the counts per path are those of paths_fp16
    per_layer = [p.split(" ")[0] for p in r["layer_paths_fp16"].values()]
    assert {p: per_layer.count(p) for p in set(per_layer)} == r["paths_fp16"] and "layer_paths_fp32" not in r
    assert "dense_fp32_reordered_logits_rel_err" in r and "dense_fp16_logits_rel_err" in r
    # the GPU kernels one forward launches, the dense fp16 model's and SparseFlow's (none counted without a GPU)
    kpf = r["kernels_per_forward"]
    assert kpf == {"dense": r["kernels_per_forward_dense_fp16"], "sparseflow": r["kernels_per_forward_sparseflow_fp16"]}
    assert all((n > 0) if torch.cuda.is_available() else (n is None) for n in kpf.values()), kpf
    recs = records.collect(str(tmp_path), log=lambda *_: None)
    providers = {r.provider for r in recs}
    assert providers >= {"eager_fp32", "sparseflow_fp16", "sparseflow_fp32", "sparseflow_fp32_faithful"}
    assert {r.role for r in recs if r.provider == "sparseflow_fp16"} == {"sparseflow"}


def test_e2e_section_runs_each_model_on_its_input_at_each_batch(tmp_path, monkeypatch):
    """``E2E_BATCHES`` adds batches (written as ``<model>@N<batch>``, the context's batch under the model's own
    name); the DVS network runs on event frames at its own T and size; each entry records what it ran."""
    from sparseflow_bench.sections import e2e

    ran = []

    def fake_model(ctx, r, name, energy, compile_only):
        ran.append((name, r["T"], r["N"], r["size"], r["input"]))
        r["sparseflow_ms"] = 1.0

    monkeypatch.setattr(e2e, "_model", fake_model)
    monkeypatch.setenv("E2E_BATCHES", "1,8")
    ctx = SectionContext(str(tmp_path), {"device": "cpu", "date": "2026-12-03"}, torch.device("cpu"), dry=True,
                         T=4, N=8, size=224, models=["spiking_resnet34", "dvs_gesture_plif"])
    out = e2e.run(ctx)
    assert ran == [("spiking_resnet34", 4, 1, 224, "images"), ("spiking_resnet34", 4, 8, 224, "images"),
                   ("dvs_gesture_plif", 16, 1, 128, "events"), ("dvs_gesture_plif", 16, 8, 128, "events")]
    assert list(out) == ["spiking_resnet34@N1", "spiking_resnet34", "dvs_gesture_plif@N1", "dvs_gesture_plif"]
    written = json.loads((tmp_path / "e2e.json").read_text())
    assert written["dvs_gesture_plif@N1"]["N"] == 1 and written["dvs_gesture_plif"]["T"] == 16


def test_e2e_speedup_only_against_all_three_dense_runs(monkeypatch):
    """A dense run skipped for the section's time budget is named, and no speed-up is claimed against the best of
    the others; the summary table says why its speed-up is missing and shows the one of a complete row."""
    from types import SimpleNamespace

    from sparseflow_bench import timing
    from sparseflow_bench.sections import e2e

    monkeypatch.setattr(timing, "graph_of", lambda fn, x: (lambda: fn(x), None))
    monkeypatch.setattr(timing, "bench_ms", lambda fn, graph=True: {"median": 2.0})
    model, x = _small("small", 2, 1, 8, "cpu")
    ctx = SimpleNamespace(dry=False, left=lambda: 10.0)
    energy = SimpleNamespace(joules_per_call=lambda fn: None)
    r = {"T": 2, "N": 1, "sparseflow_ms": 1.0}
    e2e._baselines(ctx, r, energy, model, x, model(x).float(), None, False)
    assert r["baseline_kind"] == "graph_eager_fp16" and r["baseline_ms"] == 2.0
    assert "speedup_vs_best_dense" not in r
    assert [k.split(":")[0] for k in r["baseline_skipped"]] == ["compile_fp16_default", "compile_fp16_reduce-overhead"]
    whole = {"T": 4, "N": 8, "baseline_ms": 1.3, "baseline_kind": "compile_fp16_default_graph", "sparseflow_ms": 0.9,
             "speedup_vs_best_dense": 1.3 / 0.9, "paths_fp16": {"cudnn": 2}}
    lines = e2e._table({"cut": r, "whole": whole, "_env": {}})
    assert len(lines) == 4 and "time budget ran out" in lines[2] and "**1.44x**" in lines[3]
    assert "cudnn 2" in lines[3]


def test_e2e_layer_table_from_the_dispatch_medians():
    """Per spiking layer kind: the path the dispatch took (its fastest), the fastest pair, the fastest fused tiling (a
    candidate that failed, ``inf``, is none) and fused / pair; a static stem's pairs are ``cudnn_static``, its
    ``_then_pool`` form and its im2col pair, none of them a fused kernel."""
    from sparseflow_bench.sections import e2e

    m = {"N": 8, "spiking_candidates_us_fp16": {
        "4x8x64x56x56 -> 64 stride 1": {"tma_tm_2x2_nb8": 30.0, "cudnn": 36.0, "fused_dense": 50.0},
        "4x8x512x7x7 -> 512 stride 1": {"cudnn": 20.0, "tma_tm_4x8": 30.0, "tma_8x8": float("inf")},
        "4x8x3x224x224 -> 64 stride 2": {"cudnn_static": 80.0, "fused_tm": float("inf"), "im2col_pair_static": 40.0,
                                         "im2col_8x8_static": 50.0},
        "4x8x3x224x224 -> 64 stride 2, pooled": {"cudnn_static": 300.0, "cudnn_static_then_pool": 90.0,
                                                 "im2col_8x8_static": 120.0},
        "4x8x64x56x56 -> 64 stride 1, writing a sum": {"sum_tma_tm_2x2_nb8": 28.0, "pair": 35.0}}}
    lines = e2e._layer_table("net", m)
    rows = [ln for ln in lines if ln.startswith("| 4x8")]
    assert rows == ["| 4x8x64x56x56 -> 64 stride 1 | tma_tm_2x2_nb8 | 36.0 | 30.0 (tma_tm_2x2_nb8) | 0.83 |",
                    "| 4x8x512x7x7 -> 512 stride 1 | cudnn | 20.0 | 30.0 (tma_tm_4x8) | 1.50 |",
                    "| 4x8x3x224x224 -> 64 stride 2 | im2col_pair_static | 40.0 | 50.0 (im2col_8x8_static) | 1.25 |",
                    "| 4x8x3x224x224 -> 64 stride 2, pooled | cudnn_static_then_pool | 90.0 | "
                    "120.0 (im2col_8x8_static) | 1.33 |",
                    "| 4x8x64x56x56 -> 64 stride 1, writing a sum | sum_tma_tm_2x2_nb8 | 35.0 | "
                    "28.0 (sum_tma_tm_2x2_nb8) | 0.80 |"]
    assert e2e._layer_table("net", {"N": 8}) == []
    md_lines = e2e._table({"net": {**m, "T": 4}})  # the summary table does not list the candidates
    assert not any("tma_tm_2x2_nb8" in ln for ln in md_lines)


def test_e2e_candidates_named_from_the_dispatch_keys():
    """The dispatch's medians by layer kind, named from SparseConv2d's keys (a fused spiking layer's and a layer
    writing a sum's), in one dtype, fastest first, us."""
    import torch

    from sparseflow_bench.sections import e2e
    from sparseflow_kernels import dispatch

    dispatch.clear_cache()
    try:
        shape, cl = (4, 8, 64, 56, 56), (200704, 1605632, 1, 3584, 64)
        dispatch.record(("spiking", shape, torch.float16, 64, (3, 3), (1, 1), (1, 1), False, False, "lif", True,
                         False, False), "cudnn", {"cudnn": 3.6e-2, "tma_tm_2x2_nb8": 4.0e-2})
        dispatch.record(("sum", shape, cl, torch.float16, 128, (3, 3), (2, 2), (1, 1), cl, torch.float16), "pair",
                        {"sum_fused_tm": 3.0e-2, "pair": 2.5e-2})
        dispatch.record(("spiking", shape, torch.float32, 64, (3, 3), (1, 1), (1, 1), False, False, "lif", False,
                         False, False), "cudnn", {"cudnn": 1.0})
        assert e2e._spiking_candidates(torch.float16) == {
            "4x8x64x56x56 -> 64 stride 1 + residual": {"cudnn": 36.0, "tma_tm_2x2_nb8": 40.0},
            "4x8x64x56x56 -> 128 stride 2, writing a sum": {"pair": 25.0, "sum_fused_tm": 30.0}}
    finally:
        dispatch.clear_cache()


def test_shapes_section_dry_run(tmp_path):
    """``--sections shapes`` on the CPU: every configuration the dispatch measures, run once per shape and batch
    (the tensor-descriptor ones through the interpreter, flattened and not), its spikes against float64, and the
    file read back by the one reader."""
    from sparseflow_bench.sections import shapes

    ctx = SectionContext(str(tmp_path), {"device": "cpu"}, torch.device("cpu"), dry=True, T=2, N=1, size=8)
    out = shapes.run(ctx)
    # batch 1 with one shape again with a residual before the neuron (``sn(bn(conv(x)) + identity)``)
    assert [(r["N"], r["C"], r["residual"]) for r in out["rows"]] == [(1, 16, False), (1, 32, False), (1, 16, True),
                                                                      (2, 16, False), (2, 32, False)]
    for r in out["rows"]:
        names = set(r["flip_rate_vs_fp64"])
        assert {"fused_dense", "tma_8x8", "tma_8x8_unflattened", "tma_tm_2x4", "tma_tm_2x4_split4"} <= names
        assert 0 < r["elem_density"] < 1 and 0 < r["block_density_8x8_16ch_halo"] <= 1
        assert 0.02 < r["output_firing_rate"] < 0.98  # the layer fires, and not everywhere
        assert max(r["flip_rate_vs_fp64"].values()) <= 2e-3
    assert json.loads((tmp_path / "conv_shapes_dry.json").read_text())["rows"][0]["C"] == 16
    from sparseflow_kernels import conv

    assert conv.TMA_LOOP["flatten"] is True  # the A/B switch is put back
    # the table of a timed run: each row's fastest configuration against cuDNN's conv alone
    timed = {**out, "rows": [{**r, "cudnn_conv_ms": 0.02, "cudnn_neuron_ms": 0.03, "best": "tma_8x8", "best_ms": 0.025,
                              "best_over_cudnn_conv": 1.25} for r in out["rows"]]}
    table = shapes.markdown(timed, str(tmp_path))
    assert table.count("| `tma_8x8` | 1.25 |") == 5 and "| 2 | 1 | 16 | 4 | no |" in table
    assert "| 2 | 1 | 16 | 4 | yes |" in table
    recs = records.rows_of(timed, "conv_shapes.json")
    assert len(recs) == 5 and all(r.baseline == "cudnn_conv_alone" and r.section == "conv_shapes" for r in recs)
    assert [r.op for r in recs].count("spiking_conv2d_residual") == 1


def test_neuron_pool_section_dry_run(tmp_path):
    """``--sections neuron_pool`` on the CPU: a static stem map and a DVS map, each order of the neuron + max pool
    run once against the neuron kernel then the pool kernel (equal bits), the table and the records read back."""
    from sparseflow_bench.sections import neuron_pool

    ctx = SectionContext(str(tmp_path), {"device": "cpu"}, torch.device("cpu"), dry=True)
    out = neuron_pool.run(ctx)
    assert [(r["case"], r["T"], r["static"]) for r in out["rows"]] == [("stem", 4, True), ("dvs", 16, False)]
    for r in out["rows"]:
        assert r["bit_equal"] is True and 0 < r["spike_rate"] < 1 and r["bits_us"] is None
    assert json.loads((tmp_path / "neuron_pool_dry.json").read_text())["rows"][1]["S"] == 8
    timed = {**out, "rows": [{**r, "bits_us": 30.0, "steps_us": 290.0, "pair_us": 59.0}
                             for r in out["rows"]]}
    table = neuron_pool.markdown(timed, str(tmp_path))
    assert "| stem | 4 | 1 | 8 | 8 | 3/2/1 | yes | 30.0 | 290.0 | 59.0 | yes |" in table
    recs = records.rows_of(timed, "neuron_pool.json")
    assert len(recs) == 2 and all(r.baseline == "neuron_then_pool" and r.section == "neuron_pool" for r in recs)
    assert {t.provider: t.value for t in recs[0].timings}["neuron_pool_bits"] == 0.03
