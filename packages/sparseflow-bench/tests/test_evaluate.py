"""``sparseflow-bench eval``: a data set through the optimized model, alone and under torchrun (2 CPU ranks, gloo).

The kernels run in Triton's interpreter (TRITON_INTERPRET=1), so the model is tiny: conv-BN-LIF twice and a
linear classifier, with weights scaled so that both LIF layers spike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseflow_bench import evaluate
from sparseflow_bench.eval_data import ShardSampler, batch_sizes, load_model, model_input, open_dataset

ROOT = Path(__file__).resolve().parents[3]

TINY_MODEL = '''
import torch
from torch import nn
from spikingjelly.activation_based import functional, layer, neuron


def build(T=2, num_classes=5, size=8):
    torch.manual_seed(0)
    net = nn.Sequential(
        layer.Conv2d(3, 4, 3, padding=1, bias=False), layer.BatchNorm2d(4), neuron.LIFNode(tau=2.0),
        layer.Conv2d(4, 4, 3, padding=1, bias=False), layer.BatchNorm2d(4), neuron.LIFNode(tau=2.0),
        layer.Flatten(), layer.Linear(4 * size * size, num_classes),
    )
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(4.0)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    functional.set_step_mode(net, "m")
    return net.eval()
'''


def _env() -> dict:
    paths = [str(ROOT / "packages" / p / "src") for p in
             ("sparseflow-kernels", "sparseflow-ops", "sparseflow-core", "sparseflow-bench")] + [str(ROOT / "src")]
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    return env


@pytest.fixture()
def tiny(tmp_path):
    (tmp_path / "tiny.py").write_text(TINY_MODEL)
    return f"{tmp_path / 'tiny.py'}:build"


def _image_folder(root: Path, n: int, size: int = 8) -> Path:
    """``n`` random RGB images in two class folders (ImageFolder layout), PNG."""
    from skimage import io

    g = torch.Generator().manual_seed(7)
    for i in range(n):
        d = root / f"class_{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        px = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
        io.imsave(d / f"img_{i:02d}.png", px, check_contrast=False)
    return root


def _dense_logits(spec: str, inputs: torch.Tensor, T: int) -> torch.Tensor:
    """The un-optimized model's logits for samples ``inputs`` [N, ...] one at a time."""
    from spikingjelly.activation_based import functional

    model = load_model(spec, T, 5)
    out = []
    with torch.no_grad():
        for x in inputs:
            out.append(model(model_input(x[None], T)).mean(0))
            functional.reset_net(model)
    return torch.cat(out)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), world=st.integers(1, 8), batch=st.integers(1, 9))
def test_shard_sampler_every_sample_once(n, world, batch) -> None:
    class _Len:
        def __len__(self):
            return n

    shards = [list(ShardSampler(_Len(), world, r)) for r in range(world)]
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(n))  # nothing dropped, nothing padded or repeated
    assert [len(ShardSampler(_Len(), world, r)) for r in range(world)] == [len(s) for s in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert all(s == sorted(s) for s in shards)  # each rank in data-set order
    seen = {len(s[j:j + batch]) for s in shards for j in range(0, len(s), batch)}
    assert seen == set(batch_sizes(n, world, batch))  # the warm-up covers every batch shape of the job


def test_eval_event_frames_match_dense_model(tiny, tmp_path) -> None:
    """World size 1 (no torchrun): [N, T, C, H, W] event frames from a .pt file, every sample's prediction and
    logits against the dense model's."""
    T, n = 2, 5
    frames = torch.randn(n, T, 3, 8, 8) * 2
    labels = torch.randint(0, 5, (n,))
    torch.save({"inputs": frames, "labels": labels}, tmp_path / "events.pt")
    out = tmp_path / "out"
    summary = evaluate.evaluate(["--model", tiny, "--data", str(tmp_path / "events.pt"), "--T", str(T),
                                 "--num-classes", "5", "--batch-size", "2", "--out", str(out), "--no-progress"])
    res = torch.load(out / "predictions.pt")
    assert torch.equal(res["index"], torch.arange(n))
    assert torch.equal(res["label"], labels)
    ref = _dense_logits(tiny, frames, T)
    assert ref.std(0).max() > 0.01  # the network spikes: the logits depend on the sample
    torch.testing.assert_close(res["logits"], ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(res["prediction"], ref.argmax(1))
    assert summary["throughput"]["samples"] == n and summary["throughput"]["samples_per_s"] > 0
    assert summary["accuracy"] == pytest.approx(float((ref.argmax(1) == labels).float().mean()))
    base = evaluate.evaluate(["--model", tiny, "--data", str(tmp_path / "events.pt"), "--T", str(T), "--num-classes",
                              "5", "--batch-size", "2", "--out", str(tmp_path / "dense"), "--no-optimize",
                              "--no-progress"])
    assert not base["optimized"] and summary["optimized"]
    torch.testing.assert_close(torch.load(tmp_path / "dense" / "predictions.pt")["logits"], ref)
    with pytest.raises(ValueError, match="T=2 time steps, the model was asked for T=3"):
        evaluate.evaluate(["--model", tiny, "--data", str(tmp_path / "events.pt"), "--T", "3", "--no-progress"])


def test_eval_torchrun_two_ranks_equals_one_process(tiny, tmp_path) -> None:
    """``torchrun --nproc_per_node=2`` (gloo) over 7 images: the predictions and logits of the single-process run,
    sample for sample; every sample exactly once; the throughput of both ranks gathered."""
    data = _image_folder(tmp_path / "images", 7)
    args = ["--model", tiny, "--data", str(data), "--T", "2", "--size", "8", "--num-classes", "5",
            "--batch-size", "3", "--warmup", "0"]  # the CPU measures nothing: no warm-up calls
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "sparseflow_bench.cli", "eval", *args, "--out", str(two)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "7 samples on 2 rank(s)" in proc.stdout

    one = tmp_path / "one"
    evaluate.evaluate([*args, "--out", str(one), "--no-progress"])
    a, b = torch.load(two / "predictions.pt"), torch.load(one / "predictions.pt")
    assert torch.equal(a["index"], torch.arange(7)) and torch.equal(b["index"], torch.arange(7))
    assert torch.equal(a["prediction"], b["prediction"])
    assert torch.equal(a["label"], torch.tensor([0, 0, 0, 0, 1, 1, 1]))  # by class folder, files sorted
    torch.testing.assert_close(a["logits"], b["logits"], atol=1e-5, rtol=1e-5)
    ds = open_dataset(data, size=8)
    ref = _dense_logits(tiny, torch.stack([ds[i][0] for i in range(7)]), 2)
    assert ref.std(0).max() > 0.01
    assert torch.equal(a["prediction"], ref.argmax(1))

    s = json.loads((two / "summary.json").read_text())
    assert s["world_size"] == 2 and s["backend"] == "gloo"
    per_rank = s["throughput"]["per_rank"]
    assert [r["samples"] for r in per_rank] == [4, 3]  # ranks 0 and 1: samples 0,2,4,6 and 1,3,5
    assert all(r["seconds"] > 0 and r["samples_per_s"] > 0 for r in per_rank)
    assert s["throughput"]["samples"] == 7
    assert s["throughput"]["seconds"] == pytest.approx(max(r["seconds"] for r in per_rank))
    assert s["path_disagreements"] == {}
    reports = json.loads((two / "reports.json").read_text())
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(any(e["action"] == "fused" for e in r["layers"]) for r in reports)
    rows = (two / "predictions.csv").read_text().splitlines()
    assert rows[0] == "index,label,prediction,source" and len(rows) == 8
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(7))


def test_eval_bad_inputs_name_the_problem(tiny, tmp_path) -> None:
    torch.save(torch.randn(3, 8, 8), tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        evaluate.evaluate(["--model", tiny, "--data", str(tmp_path / "bad.pt"), "--no-progress"])
    with pytest.raises(FileNotFoundError, match=r"folder of images or a \.pt file"):
        evaluate.evaluate(["--model", tiny, "--data", str(tmp_path / "missing"), "--no-progress"])
    torch.save(torch.randn(2, 3, 8, 8), tmp_path / "ok.pt")
    with pytest.raises(KeyError, match="unknown model 'no_such_model'"):
        evaluate.evaluate(["--model", "no_such_model", "--data", str(tmp_path / "ok.pt"), "--no-progress"])
