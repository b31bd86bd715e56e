"""OptimizeReport / LayerEntry: the table, the action views, refresh(), JSON round trips."""

from __future__ import annotations

import copy
import json

import torch
from torch import nn

from sparseflow_core import LayerEntry, OptimizeReport, optimize
from sparseflow_ops import SparseConv2d


def sample_report():
    rep = OptimizeReport()
    rep.add(LayerEntry("stem.conv", "Conv2d", "left", reason="input does not come from a spiking module",
                       in_shape=(2, 1, 3, 32, 32)))
    rep.add(LayerEntry("block.conv1", "Conv2d", "fused", detail="conv+bn+neuron (block.bn1, block.sn1)",
                       block_size=8, in_shape=(2, 1, 16, 16, 16), elem_density=0.1234, block_density=0.5))
    rep.add(LayerEntry("block.conv2", "Conv2d", "sparse", detail="conv+bn (block.bn2)", block_size="dense"))
    rep.add(LayerEntry("block.sn0", "LIFNode", "neuron-kernel", detail="multi-step Triton neuron"))
    rep.folded += [("block.bn1", "block.conv1"), ("block.bn2", "block.conv2")]
    rep.notes.append("a note")
    return rep


def test_views():
    rep = sample_report()
    assert [e.name for e in rep.by_action("fused")] == ["block.conv1"]
    assert [e.name for e in rep.replaced] == ["block.conv1", "block.conv2"]
    assert [e.name for e in rep.skipped] == ["stem.conv"]
    assert rep.by_action("nothing") == []


def test_table_contains_everything():
    rep = sample_report()
    table = rep.table()
    assert str(rep) == table
    for e in rep.layers:
        for text in (e.name, e.type, e.action, e.detail, e.reason):
            assert text in table
    assert "0.123" in table and "0.500" in table and "dense" in table
    assert ("1 fused spiking layers, 1 sparse layers, 0 other layers on SparseFlow kernels, 1 neurons on the kernel, "
            "1 layers left") in table
    assert "2 BatchNorms folded" in table
    assert "note: a note" in table
    lines = table.splitlines()
    assert lines[0].split(" | ")[0].strip() == "layer"
    assert len(lines) == 2 + len(rep.layers) + 1 + len(rep.notes)


def test_empty_table():
    table = OptimizeReport().table()
    assert "layer" in table and "0 fused spiking layers" in table


def test_json_round_trip():
    rep = sample_report()
    text = rep.to_json(indent=1)
    data = json.loads(text)
    assert data == json.loads(json.dumps(rep.to_dict(), default=str))
    back = OptimizeReport(
        layers=[LayerEntry(**{**d, "in_shape": tuple(d["in_shape"]) if d["in_shape"] else None})
                for d in data["layers"]],
        folded=[tuple(f) for f in data["folded"]],
        notes=data["notes"],
    )
    assert back.layers == rep.layers
    assert back.folded == rep.folded and back.notes == rep.notes
    assert back.table() == rep.table()


def test_refresh_fills_paths():
    rep = OptimizeReport()
    rep.add(LayerEntry("0", "Conv2d", "sparse"))
    rep.add(LayerEntry("1", "ReLU", "left", reason="x"))
    conv = SparseConv2d.from_dense(nn.Conv2d(4, 4, 3, padding=1).eval(), mode="torch")
    model = nn.Sequential(conv, nn.ReLU())
    model(torch.zeros(1, 4, 5, 5))
    assert rep.refresh(model) is rep
    assert rep.layers[0].path == "torch" and rep.layers[1].path is None
    assert "torch" in rep.table()


def test_report_of_a_real_optimize_round_trips():
    from spikingjelly.activation_based import functional, layer, neuron

    net = nn.Sequential(layer.Conv2d(3, 8, 3, padding=1), neuron.LIFNode(),
                        layer.Conv2d(8, 8, 3, padding=1), layer.BatchNorm2d(8), neuron.LIFNode())
    functional.set_step_mode(net, "m")
    net.eval()
    x = torch.randn(2, 1, 3, 14, 14) * 3
    _, rep = optimize(copy.deepcopy(net), x, mode="torch", return_report=True)
    data = json.loads(rep.to_json())
    names = [d["name"] for d in data["layers"]]
    assert sorted(names) == ["0", "1", "2"]  # both convs and the unfused neuron; "4" is fused into "2"
    assert data["folded"] == [["3", "2"]]
    by_name = {d["name"]: d for d in data["layers"]}
    assert by_name["2"]["action"] == "fused" and by_name["2"]["in_shape"] == [2, 1, 8, 14, 14]
    for d in data["layers"]:
        assert d["name"] in rep.table()
