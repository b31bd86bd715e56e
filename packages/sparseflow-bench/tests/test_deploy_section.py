"""The ``deploy`` section in its CPU dry mode (interpreter) on a small SpikingJelly net standing in for the
benchmark models: the exported program checked against the optimized model, the operators it holds, and the
profile files with SOP and energy columns."""

from __future__ import annotations

import csv
import json

import torch
from spikingjelly.activation_based import functional, layer, neuron
from torch import nn

from sparseflow_bench import models
from sparseflow_bench.sections import SectionContext, deploy


def _small(*args, **kwargs):
    torch.manual_seed(0)
    net = nn.Sequential(
        layer.Conv2d(3, 16, 3, padding=1, bias=False), layer.BatchNorm2d(16), neuron.LIFNode(),
        layer.Conv2d(16, 16, 3, padding=1, bias=False), layer.BatchNorm2d(16), neuron.IFNode(),
        layer.Flatten(), layer.Linear(16 * 8 * 8, 10),
    )
    functional.set_step_mode(net, "m")
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.fill_(0.8)
    return net.eval(), torch.rand(2, 1, 3, 8, 8)


def test_deploy_section_dry_run(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "prepared_model", _small)  # the exported model and the profiled one
    ctx = SectionContext(str(tmp_path), {"device": "cpu"}, torch.device("cpu"), True, models=["small"])
    out = deploy.run(ctx)
    r = out["models"]["small"]
    assert "export_error" not in r, r
    assert r["program_max_abs_diff_vs_optimized"] == 0.0
    assert r["sparseflow_ops"].get("sparseflow::spiking_conv2d") == 2, r
    assert r["frozen_inputs"][0]["shape"] == [2, 1, 3, 8, 8]
    saved = json.loads((tmp_path / "deploy.json").read_text())
    assert saved["models"]["small"]["sparseflow_ops"] == r["sparseflow_ops"]
    prof = json.loads((tmp_path / "profile_small.json").read_text())
    assert prof["total_sops"] > 0 and prof["theoretical_energy_j"] > 0
    assert out["profiles"]["small"]["total_sops"] == prof["total_sops"]
    assert "not available" in prof["energy_source"]
    rows = list(csv.DictReader((tmp_path / "profile_small.csv").open()))
    assert {"sops", "firing_rate", "energy_j", "input"} <= set(rows[0])
    assert any(r["firing_rate"] for r in rows)
    assert (tmp_path / "profile_small.png").stat().st_size > 0
