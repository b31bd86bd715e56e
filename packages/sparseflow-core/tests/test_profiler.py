"""sparseflow_core.profiler: densities counted on crafted inputs (against a loop-by-loop reference of the
block definition, including partial tiles at the edge of odd-sized maps), MACs, the dense-op comparison of
SparseFlow layers, and the report formats (table, JSON, CSV)."""

from __future__ import annotations

import csv
import io
import itertools
import json

import pytest
import torch
from sf_core_nets import calibrate_bns, image_input, small_sj_net
from torch import nn

from sparseflow_core import LayerProfile, ProfileReport, optimize, profile
from sparseflow_core.profiler import CSV_COLUMNS, block_counts, dense_op


# ----------------------------------------------------------------------------------------- references
def ref_conv2d_blocks(x, kernel, stride, padding, dilation, bs, group):
    """(active, total) blocks by definition: block (sample, channel group, output tile) is active when any input
    pixel read by any output pixel of the tile (partial tiles included) is non-zero in the group's channels."""
    B, C, H, W = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    nz = (x != 0).tolist()
    active = total = 0
    for b, g0 in itertools.product(range(B), range(0, C, group)):
        for ty, tx in itertools.product(range(0, Ho, bs), range(0, Wo, bs)):
            total += 1
            hit = False
            for oy, ox in itertools.product(range(ty, min(ty + bs, Ho)), range(tx, min(tx + bs, Wo))):
                for i, j in itertools.product(range(kh), range(kw)):
                    iy, ix = oy * sh - ph + i * dh, ox * sw - pw + j * dw
                    if 0 <= iy < H and 0 <= ix < W and any(nz[b][c][iy][ix] for c in range(g0, min(g0 + group, C))):
                        hit = True
                        break
                if hit:
                    break
            active += hit
    return active, total


def sparse_input(shape, density, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    vals = torch.randint(1, 3, shape, generator=g).float()  # 1 and 2 (SEW sums), not only spikes
    return vals * (torch.rand(shape, generator=g) < density)


CONV_CASES = [
    # (C, H, W, kernel, stride, padding, dilation, bs, group, density)
    (5, 13, 11, (3, 3), (1, 1), (1, 1), (1, 1), 8, 4, 0.01),  # odd map, partial tiles on both edges
    (20, 9, 7, (3, 3), (2, 2), (1, 1), (1, 1), 4, 16, 0.005),  # stride 2, partial channel group
    (3, 17, 17, (1, 1), (1, 1), (0, 0), (1, 1), 8, 16, 0.01),  # 1x1: no halo
    (4, 10, 12, (3, 1), (1, 2), (2, 0), (1, 1), 4, 2, 0.02),  # non-square kernel, padding > k // 2
    (6, 11, 11, (3, 3), (1, 1), (2, 2), (2, 2), 8, 3, 0.005),  # dilation 2
    (2, 7, 5, (5, 5), (1, 1), (2, 2), (1, 1), 16, 16, 0.01),  # one tile larger than the map
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"C{c[0]}_{c[1]}x{c[2]}_k{c[3]}_s{c[4]}_p{c[5]}_"
                         f"d{c[6]}_bs{c[7]}_g{c[8]}")
def test_conv2d_block_counts_match_definition(case):
    C, H, W, k, s, p, d, bs, group, dens = case
    conv = nn.Conv2d(C, 4, k, s, p, d, bias=False)
    x = sparse_input((3, C, H, W), dens)
    assert 0 < int((x != 0).sum()) < x.numel()
    got = block_counts(conv, x, bs, group)
    assert got == ref_conv2d_blocks(x, k, s, p, d, bs, group)
    assert 0 < got[0] < got[1]  # neither all nor none active: the case tests something
    # the output of the conv has the tile grid the counts assume
    Ho, Wo = conv(x).shape[-2:]
    assert got[1] == 3 * -(-C // group) * -(-Ho // bs) * -(-Wo // bs)


def test_block_counts_edge_pixel_of_odd_map():
    """13x13 map, 3x3 pad 1, 8x8 tiles (2x2 tiles, the second 5 wide): pixel (12, 12) is read by output
    pixels 11..12 only -> the bottom-right partial tile; pixel (7, 0) is read by output rows 6..8 -> two tiles."""
    conv = nn.Conv2d(16, 8, 3, padding=1)
    x = torch.zeros(1, 16, 13, 13)
    x[0, 3, 12, 12] = 1.0
    assert block_counts(conv, x, 8, 16) == (1, 4)
    x[0, 9, 7, 0] = -0.5
    assert block_counts(conv, x, 8, 16) == (3, 4)


def test_block_counts_multistep_input_and_nan():
    """[T, N, C, H, W] counts like the flattened batch; NaN is a non-zero."""
    conv = nn.Conv2d(2, 2, 3, padding=1)
    x = torch.zeros(2, 3, 2, 8, 8)
    x[1, 2, 0, 0, 0] = float("nan")
    assert block_counts(conv, x, 8, 16) == (1, 6)
    assert block_counts(conv, x.flatten(0, 1), 8, 16) == (1, 6)


def test_block_counts_linear_and_conv1d():
    lin = nn.Linear(40, 3)
    x = torch.zeros(2, 5, 40)  # 10 rows; blocks of 4 rows x 16 features: 3 row tiles x 3 feature groups
    x[0, 0, 0] = 1.0  # row 0, group 0
    x[1, 4, 39] = 2.0  # row 9 (the partial row tile), group 2
    assert block_counts(lin, x, 4, 16) == (2, 9)
    c1 = nn.Conv1d(3, 2, 3, padding=1)
    y = torch.zeros(2, 3, 9)  # output 9 positions, tiles of 4: 3 tiles per sample, 1 group of 16 channels
    y[0, 1, 4] = 1.0  # read by outputs 3..5: tiles 0 and 1
    y[1, 0, 8] = 1.0  # read by outputs 7..8: tile 1 and the partial tile 2
    assert block_counts(c1, y, 4, 16) == (4, 6)
    assert block_counts(nn.ReLU(), y, 4, 16) is None
    assert block_counts(c1, torch.zeros(0, 3, 9), 4, 16) is None


class TwoConvs(nn.Module):
    """The same conv called twice per forward (counts add up over calls), then a linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.head = nn.Linear(4 * 9 * 9, 3)

    def forward(self, x):
        y = self.conv(x)
        y = self.conv((y > 0).float())
        return self.head(y.flatten(1))


def test_profile_counts_on_crafted_model():
    net = TwoConvs().eval()
    with torch.no_grad():
        net.conv.weight.fill_(1.0)  # non-negative input -> output > 0 exactly where the 3x3 window holds a spike
    x = torch.zeros(2, 4, 9, 9)
    x[0, 1, 4, 4] = 1.0
    x[1, 3, 0, 8] = 2.0
    rep = profile(net, x, reps=2, block_size=4, group=4)
    rows = {e.name: e for e in rep.layers}
    assert list(rows) == ["conv", "head"]
    conv = rows["conv"]
    assert conv.calls == 2 and conv.in_shape == [2, 4, 9, 9] and conv.block_size == 4
    y1 = (net.conv(x) > 0).float()
    want_elem = (2 + int((y1 != 0).sum())) / (2 * x.numel())
    assert conv.elem_density == pytest.approx(want_elem)
    a0 = ref_conv2d_blocks(x, (3, 3), (1, 1), (1, 1), (1, 1), 4, 4)
    a1 = ref_conv2d_blocks(y1, (3, 3), (1, 1), (1, 1), (1, 1), 4, 4)
    assert conv.block_density == pytest.approx((a0[0] + a1[0]) / (a0[1] + a1[1]))
    assert conv.skippable == pytest.approx(1 - conv.block_density) and conv.skipped == 0.0  # dense module
    assert conv.macs == 2 * (2 * 4 * 9 * 9) * 4 * 9
    assert conv.dense_ms is None and conv.speedup is None and conv.path is None
    head = rows["head"]
    assert head.calls == 1 and head.macs == 2 * 3 * 324
    assert rep.batch == 2 and rep.reps == 2 and rep.device == "cpu"
    assert rep.forward_ms > 0 and rep.throughput_per_s == pytest.approx(1e3 / rep.forward_ms)
    assert rep.samples_per_s == pytest.approx(2 * rep.throughput_per_s)
    assert rep.skippable_work == pytest.approx(
        (conv.macs * conv.skippable + head.macs * head.skippable) / (conv.macs + head.macs))


@pytest.fixture(scope="module")
def sj_net_and_input():
    torch.manual_seed(5)
    net = small_sj_net()
    x = image_input(T=2, N=2, H=16, W=16)
    calibrate_bns(net, x)
    return net, x


def test_profile_spiking_net_layer_list_and_spike_densities(sj_net_and_input):
    net, x = sj_net_and_input
    rep = profile(net, x, reps=1, block_size=8)
    names = [e.name for e in rep.layers]
    assert names == ["0", "2", "3", "5", "6", "9", "10", "12", "13", "15", "17"]  # convs, neurons, linear
    types = {e.name: e.type for e in rep.layers}
    assert types["2"] == "LIFNode" and types["17"] == "Linear"
    spikes_in = [e for e in rep.layers if e.name in ("3", "6", "10", "13")]
    for e in spikes_in:  # spike-fed layers: strictly between 0 and 1, and blocks at least as dense as elements
        assert 0 < e.elem_density < 1 and e.elem_density <= e.block_density <= 1
    assert rep.layers[0].elem_density == 1.0  # image input
    assert all(e.block_density is None for e in rep.layers if "Node" in e.type)


def tiny_spiking_net():
    """image conv/bn/LIF -> conv/bn/LIF (spike-fed, fused) -> conv (spike-fed) at 8x8: quick in the interpreter."""
    from spikingjelly.activation_based import functional, layer, neuron

    net = nn.Sequential(layer.Conv2d(3, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8), neuron.LIFNode(),
                        layer.Conv2d(8, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8), neuron.LIFNode(),
                        layer.Conv2d(8, 4, 3, padding=1))
    functional.set_step_mode(net, "m")
    return net.eval()


def test_profile_optimized_net_dense_comparison():
    net = tiny_spiking_net()
    x = image_input(T=2, N=1, H=8, W=8)
    calibrate_bns(net, x)
    opt = optimize(net, x)
    rep = profile(opt, x, reps=1, dense=True)
    sparse = [e for e in rep.layers if e.type == "SparseConv2d"]
    assert len(sparse) >= 2
    for e in sparse:
        assert e.sparse_module and e.path and e.dense_ms is not None and e.dense_ms > 0
        assert e.speedup == pytest.approx(e.dense_ms / e.ms)
        assert e.skipped == (e.skippable if "sparse" in e.path else 0.0)
    plain = [e for e in rep.layers if e.type != "SparseConv2d"]
    assert all(e.dense_ms is None for e in plain)
    # neurons a fused layer took over are marked as such, the others ran themselves
    fused = [e for e in rep.layers if e.path == "fused"]
    assert {e.name for e in fused} <= {"2", "5"}
    if any(e.path.startswith("fused_") for e in sparse):  # kernels ran (interpreter): their neurons were taken over
        assert fused
    assert all(e.elem_density is None and e.block_density is None for e in fused)  # no input of their own
    assert rep.layers[-1].elem_density < 1 and rep.layers[-1].block_density is not None


def test_dense_op_reproduces_fused_layer(sj_net_and_input):
    """The dense op the profiler times computes what the fused SparseConv2d computes (conv + BN + LIF)."""
    from spikingjelly.activation_based import functional

    from sparseflow_ops import SparseConv2d

    net, x = sj_net_and_input
    import copy

    ref_net = copy.deepcopy(net)
    conv, bn, lif = ref_net[3], ref_net[4], ref_net[5]
    with torch.no_grad():
        s = ref_net[2](ref_net[1](ref_net[0](x)))
        functional.reset_net(ref_net)
        want = lif(bn(conv(s)))
        functional.reset_net(ref_net)
        fused = SparseConv2d.from_dense(copy.deepcopy(conv), copy.deepcopy(bn), copy.deepcopy(lif), time_steps=2)
        got = dense_op(fused)(s)
        assert torch.equal(got, want)
        got_conv = dense_op(fused, with_fused=False)(s)
        assert torch.equal(got_conv, conv(s))


@pytest.mark.parametrize("after", [False, True], ids=["resnet", "sew"])
def test_dense_op_reproduces_fused_residual_layer(sj_net_and_input, after):
    """A fused layer called with a residual (added before the neuron, or after it to the spikes with
    ``residual_after`` as in a SEW-ResNet block): the dense op takes the same call and computes the same."""
    import copy

    from spikingjelly.activation_based import functional

    from sparseflow_ops import SparseConv2d

    net, x = sj_net_and_input
    ref_net = copy.deepcopy(net)
    conv, bn, lif = ref_net[3], ref_net[4], ref_net[5]
    with torch.no_grad():
        s = ref_net[2](ref_net[1](ref_net[0](x)))
        residual = torch.randn(*s.shape[:2], conv.out_channels, *s.shape[3:])
        functional.reset_net(ref_net)
        want = residual + lif(bn(conv(s))) if after else lif(bn(conv(s)) + residual)
        functional.reset_net(ref_net)
        fused = SparseConv2d.from_dense(copy.deepcopy(conv), copy.deepcopy(bn), copy.deepcopy(lif), time_steps=2)
        got = dense_op(fused)(s, residual=residual, residual_after=after)
        assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["spiking_resnet18", "sew_resnet18"])
def test_profile_times_the_dense_op_of_every_residual_layer(kind):
    """Every replaced layer of a ResNet (residual added before the neuron) and a SEW-ResNet (added to the spikes)
    gets its dense op's time: none is reported as failing."""
    from sf_core_nets import build_resnet

    net, xs = build_resnet(kind)
    opt = optimize(net, xs[0], mode="torch")
    rep = profile(opt, xs[0], reps=1, dense=True)
    replaced = [e for e in rep.layers if e.sparse_module]
    assert len(replaced) >= 16
    for e in replaced:
        assert "dense op failed" not in (e.path or ""), e
        assert e.dense_ms is not None and e.dense_ms > 0, e


def test_report_formats(tmp_path):
    layers = [LayerProfile("a.conv", "SparseConv2d", 2, 0.5, 0.25, 0.75, "fused_sparse", 8, 1.0, 1000, [4, 2, 3, 8, 8],
                           True),
              LayerProfile("a.lif", "LIFNode", 2, 0.0, 1.0, None, "fused"),
              LayerProfile("fc", "Linear", 1, 0.25, 0.5, 1.0, None, 8, None, 3000, [2, 10])]
    rep = ProfileReport(layers, forward_ms=2.0, throughput_per_s=500.0, device="cpu", samples_per_s=1000.0, batch=2,
                        reps=3)
    assert layers[0].skipped == pytest.approx(0.25) and layers[0].speedup == pytest.approx(2.0)
    assert layers[2].skipped == 0.0 and layers[1].skipped is None
    assert rep.skipped_work == pytest.approx(1000 * 0.25 / 4000)
    assert rep.skippable_work == pytest.approx(1000 * 0.25 / 4000)
    rows = list(csv.DictReader(io.StringIO(rep.to_csv())))
    assert list(rows[0]) == CSV_COLUMNS
    assert [r["layer"] for r in rows] == ["a.conv", "a.lif", "fc"]
    assert rows[0]["in_shape"] == "4x2x3x8x8" and float(rows[0]["speedup"]) == pytest.approx(2.0)
    assert rows[1]["block_density"] == "" and rows[1]["path"] == "fused"
    d = json.loads(rep.to_json())
    assert d["layers"][0]["skipped"] == pytest.approx(0.25) and d["layers"][0]["speedup"] == pytest.approx(2.0)
    assert d["samples_per_s"] == 1000.0 and d["skipped_work"] == pytest.approx(0.0625)
    table = rep.table()
    assert "a.conv" in table and "2.00x" in table and "fused_sparse" in table and "6.2%" in table
    for ext in ("json", "csv", "txt"):
        rep.save(str(tmp_path / "sub" / f"p.{ext}"))
    assert json.loads((tmp_path / "sub" / "p.json").read_text())["batch"] == 2
    assert (tmp_path / "sub" / "p.csv").read_text().splitlines()[0] == ",".join(CSV_COLUMNS)
    assert (tmp_path / "sub" / "p.txt").read_text().startswith("layer")


def test_profile_save_and_print(tmp_path, capsys):
    net = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Linear(5, 2)).eval()
    x = sparse_input((1, 2, 5, 5), 0.3)
    rep = profile(net, x, reps=1, save=[str(tmp_path / "p.json"), str(tmp_path / "p.csv")], print_table=True)
    assert "forwards/s" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "p.json").read_text())["layers"]) == len(rep.layers) == 2


@pytest.mark.parametrize("kw,msg", [({"reps": 0}, "reps"), ({"block_size": 0}, "block_size"),
                                    ({"block_size": "dense"}, "block_size"), ({"group": 0}, "group")],
                         ids=["reps0", "bs0", "bs_str", "group0"])
def test_profile_rejects_bad_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        profile(nn.Linear(2, 2), torch.ones(1, 2), **kw)


def test_profile_cuda_graph_wrapper_profiles_the_wrapped_model():
    """Graph replays run no hooks: the layers come from the wrapped model (on the CPU the wrapper runs eagerly)."""
    from sparseflow_core import cuda_graph

    net = TwoConvs().eval()
    x = sparse_input((2, 4, 9, 9), 0.1)
    plain = profile(net, x, reps=1, block_size=4, group=4)
    wrapped = profile(cuda_graph(net), x, reps=1, block_size=4, group=4)
    assert [e.name for e in wrapped.layers] == [e.name for e in plain.layers] == ["conv", "head"]
    assert [(e.calls, e.elem_density, e.block_density, e.macs) for e in wrapped.layers] == [
        (e.calls, e.elem_density, e.block_density, e.macs) for e in plain.layers]
    assert wrapped.forward_ms > 0
    assert not net.conv._forward_hooks and not net.conv._forward_pre_hooks  # hooks removed
