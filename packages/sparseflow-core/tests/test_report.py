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
    lines = table.splitlines()
    cells = " ".join(line.split(" | ")[-1].strip() for line in lines if " | " in line)  # wrapped text, joined
    for e in rep.layers:
        for text in (e.name, e.type, e.action):
            assert text in table
        assert e.detail in cells and e.reason in cells
    assert "0.123" in table and "0.500" in table and "dense" in table
    flat = " ".join(table.split())
    assert ("1 fused spiking layer, 1 sparse layer, 0 other layers on SparseFlow kernels, 1 neuron on the kernel, "
            "1 layer left as it was") in flat
    assert "2 BatchNorms folded" in flat
    assert "note: a note" in table
    assert lines[0].split(" | ")[0].strip() == "layer"
    rows = [line.split(" | ")[0].strip() for line in lines[2:] if " | " in line]
    assert [r for r in rows if r] == [e.name for e in rep.layers]  # one row per layer (plus wrapped lines)
    assert max(map(len, lines)) <= 120


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


# ------------------------------------------------------------------------------------- a readable report
def _sj(*mods):
    from spikingjelly.activation_based import functional

    net = nn.Sequential(*mods)
    functional.set_step_mode(net, "m")
    return net.eval()


def test_table_lines_fit_and_wrap_long_text():
    rep = sample_report()
    long = "a reason with many words that goes on " * 8 + "END"
    rep.add(LayerEntry("deep.block.layer.with.a.long.name.conv", "Conv2d", "left", reason=long))
    rep.notes.append("a long note " * 20)
    lines = rep.table().splitlines()
    assert max(map(len, lines)) <= 120, max(map(len, lines))
    text = " ".join(lines)
    assert "END" in text
    names = "".join(line.split(" | ")[0].strip() for line in lines[2:] if " | " in line)
    assert "deep.block.layer.with.a.long.name.conv" in names


def test_counts_singular_and_plural():
    rep = OptimizeReport()
    rep.add(LayerEntry("a", "Conv2d", "sparse"))
    rep.add(LayerEntry("b", "Conv2d", "left", reason="x"))
    rep.folded.append(("bn", "a"))
    table = " ".join(rep.table().split())
    assert "1 sparse layer," in table and "1 sparse layers" not in table
    assert "1 layer left as it was" in table and "1 BatchNorm folded" in table
    assert "0 fused spiking layers" in table


def test_path_column_fills_after_the_first_call():
    from spikingjelly.activation_based import layer, neuron

    net = _sj(layer.Conv2d(3, 8, 3, padding=1), neuron.LIFNode(), layer.Conv2d(8, 8, 3, padding=1),
              layer.BatchNorm2d(8), neuron.LIFNode())
    x = torch.randn(2, 1, 3, 14, 14) * 3
    opt, rep = optimize(net, x, mode="torch", return_report=True)
    before = rep.table()
    assert "after 1st call" in before and "fills after the model's first call" in before
    opt(x)
    from sparseflow_core import get_report

    after = get_report(opt).table()
    assert "after 1st call" not in after and "fills after" not in after
    assert all(e.path for e in get_report(opt).replaced)


def test_rows_in_model_order_with_user_type_names():
    from spikingjelly.activation_based import layer, neuron

    from sparseflow_core.report import user_type
    from sparseflow_ops.pool import TritonMaxPool2d

    net = _sj(layer.Conv2d(3, 8, 3, padding=1), neuron.LIFNode(), layer.Conv2d(8, 8, 3, padding=1),
              layer.MaxPool2d(2), neuron.LIFNode(), layer.Flatten(), layer.Linear(8 * 8 * 8, 4))
    x = torch.randn(2, 1, 3, 16, 16) * 3
    opt, rep = optimize(net, x, block_size=8, return_report=True)
    order = [n for n, _ in opt.named_modules()]
    names = [e.name for e in rep.layers]
    assert names == sorted(names, key=order.index) and "3" in names and "6" in names, rep.table()
    by = {e.name: e for e in rep.layers}
    assert isinstance(opt[3], TritonMaxPool2d) and by["3"].type == "MaxPool2d"
    assert user_type(opt[3]) == "MaxPool2d" and user_type(opt[6]) == "Linear" and user_type(opt[2]) == "Conv2d"


def test_batchnorm_reasons_say_whether_it_was_folded():
    from spikingjelly.activation_based import layer, neuron

    net = _sj(layer.Conv2d(3, 8, 3, padding=1), neuron.LIFNode(), layer.Conv2d(8, 8, 3, padding=1, groups=2),
              layer.BatchNorm2d(8), neuron.LIFNode(), layer.Conv2d(8, 8, 3, padding=1), layer.BatchNorm2d(8),
              neuron.LIFNode())
    net[5].register_forward_hook(lambda m, i, o: o)  # this convolution stays as it is
    x = torch.randn(2, 1, 3, 16, 16) * 3
    _, rep = optimize(net, x, mode="torch", block_size=8, return_report=True)
    by = {e.name: e for e in rep.layers}
    assert ("3", "2") in rep.folded and "3" not in by, rep.table()  # folded into the grouped convolution: counted
    assert by["5"].action == "left" and by["6"].action == "left", rep.table()
    assert "folded into it" not in by["6"].reason and "fed by convolution 5, which stays as it is" in by["6"].reason


def test_dense_reason_names_the_map_size():
    from spikingjelly.activation_based import layer, neuron

    net = _sj(layer.Conv2d(3, 8, 3, padding=1), neuron.LIFNode(), layer.Conv2d(8, 8, 3, padding=1),
              layer.BatchNorm2d(8), layer.MaxPool2d(2), neuron.LIFNode())
    x = torch.randn(2, 1, 3, 10, 10) * 3
    twin = copy.deepcopy(net)
    _, rep = optimize(net, x, mode="torch", return_report=True)
    reason = {e.name: e for e in rep.layers}["2"].reason
    assert "10 px" in reason and "under 14 px" in reason and "<= 7" not in reason, reason
    _, rep = optimize(twin, x, mode="torch", block_size="dense", return_report=True)
    assert "block_size='dense'" in {e.name: e for e in rep.layers}["2"].reason
