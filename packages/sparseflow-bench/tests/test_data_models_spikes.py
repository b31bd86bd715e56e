"""Tests for sparseflow_bench.data, .models and .spikes (CPU, small sizes)."""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

try:
    import sparseflow_bench.data  # noqa: F401
except ImportError:  # not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sparseflow_bench import data, models, spikes

MEAN = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)


# --------------------------------------------------------------------------------------------- data


def test_natural_images_shape_and_determinism() -> None:
    a = data.natural_images(5, size=32, seed=0)
    b = data.natural_images(5, size=32, seed=0)
    c = data.natural_images(5, size=32, seed=1)
    assert a.shape == (5, 3, 32, 32)
    assert a.dtype == torch.float32
    assert a.is_contiguous()
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # different sources give different images
    assert not torch.allclose(a[0], a[1])
    # size only changes the resize: same crops, so a downsampled 64px batch is close to the 32px one
    big = data.natural_images(5, size=64, seed=0)
    down = torch.nn.functional.interpolate(big, size=(32, 32), mode="bilinear", antialias=True)
    assert (down - a).abs().mean() < 0.1


def test_natural_images_normalisation() -> None:
    x = data.natural_images(len(data.available_sources()), size=48, seed=3)
    raw = x * STD + MEAN
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    # natural images: a spread of intensities, normalised values roughly standardised
    assert 0.1 < raw.mean() < 0.9
    assert 0.5 < x.std() < 2.0
    assert x.min() < -1.0 and x.max() > 1.0


def test_available_sources_and_grey_replication() -> None:
    names = data.available_sources()
    assert len(names) >= 8
    assert "cat" not in names  # duplicate of chelsea
    assert names[0] == "astronaut"
    idx = names.index("camera")  # a greyscale photograph
    raw = data.natural_images(idx + 1, size=32, seed=0)[idx : idx + 1] * STD + MEAN
    assert torch.allclose(raw[:, 0], raw[:, 1], atol=1e-5)
    assert torch.allclose(raw[:, 1], raw[:, 2], atol=1e-5)
    colour = data.natural_images(1, size=32, seed=0) * STD + MEAN  # astronaut
    assert (colour[:, 0] - colour[:, 2]).abs().max() > 0.05


def test_natural_images_argument_checks() -> None:
    assert data.natural_images(0, size=16).shape == (0, 3, 16, 16)
    with pytest.raises(ValueError):
        data.natural_images(-1)
    with pytest.raises(ValueError):
        data.natural_images(1, size=0)


def test_repeat_time() -> None:
    x = torch.randn(2, 3, 4, 5)
    y = data.repeat_time(x, 3)
    assert y.shape == (3, 2, 3, 4, 5)
    assert y.is_contiguous()
    for t in range(3):
        assert torch.equal(y[t], x)
    y[0, 0, 0, 0, 0] = 123.0  # a real copy, not a view
    assert x[0, 0, 0, 0] != 123.0 and y[1, 0, 0, 0, 0] != 123.0
    assert torch.equal(models.model_input(x, 2), data.repeat_time(x, 2))
    with pytest.raises(ValueError):
        data.repeat_time(x, 0)


# --------------------------------------------------------------------------------------- generators


@pytest.mark.parametrize("density", [0.02, 0.1, 0.3])
def test_generator_densities(density: float) -> None:
    shape = (4, 32, 32, 32)  # 131072 elements
    gens = {
        "iid": spikes.iid_spikes(shape, density, seed=1),
        "clustered": spikes.clustered_spikes(shape, density, blob=8, seed=1),
        "silent": spikes.silent_channel_spikes(shape, density, silent_frac=0.4, seed=1),
    }
    for name, x in gens.items():
        assert x.shape == shape, name
        assert x.dtype == torch.float32, name
        assert ((x == 0) | (x == 1)).all(), name
        # clustered draws per-plane blobs: larger variance, larger tolerance
        tol = 0.15 if name == "clustered" else 0.05
        assert abs(x.mean().item() - density) <= tol * density + 1e-3, (name, x.mean().item())


def test_generators_deterministic_and_value() -> None:
    shape = (2, 3, 4, 16, 16)  # with a leading T
    for fn in (spikes.iid_spikes, spikes.clustered_spikes, spikes.silent_channel_spikes):
        a = fn(shape, 0.2, seed=7)
        assert a.shape == shape
        assert torch.equal(a, fn(shape, 0.2, seed=7))
        assert not torch.equal(a, fn(shape, 0.2, seed=8))
        g = torch.Generator().manual_seed(7)
        assert torch.equal(a, fn(shape, 0.2, seed=g))
        v = fn(shape, 0.2, seed=7, value=2.5)
        assert set(v.unique().tolist()) == {0.0, 2.5}
        assert torch.equal(v != 0, a != 0)
    assert spikes.iid_spikes((2, 3, 8, 8), 0.0).sum() == 0
    assert spikes.iid_spikes((2, 3, 8, 8), 1.0).sum() == 2 * 3 * 64
    assert spikes.clustered_spikes((2, 3, 8, 8), 0.0).sum() == 0
    assert spikes.clustered_spikes((2, 3, 8, 8), 1.0).sum() == 2 * 3 * 64
    with pytest.raises(ValueError):
        spikes.iid_spikes((2, 2), 1.5)


def test_clustered_is_clustered_and_not_tile_aligned() -> None:
    shape, density = (4, 32, 32, 32), 0.05
    iid = spikes.spike_stats(spikes.iid_spikes(shape, density, seed=0))
    clu_x = spikes.clustered_spikes(shape, density, blob=8, seed=0, fill=1.0)
    clu = spikes.spike_stats(clu_x)
    # clustering: far fewer non-zero 8x8 tiles than i.i.d. spikes of the same density
    assert clu["tile8_chan"] < 0.5 * iid["tile8_chan"]
    # solid 8x8 blobs aligned to the 8x8 grid would give exactly `coverage` = density tiles;
    # unaligned blobs straddle tile borders and touch noticeably more tiles
    assert clu["tile8_chan"] > 1.5 * clu["elem"]
    # blobs start at arbitrary offsets: row starts of active runs are not all multiples of 8
    rows = clu_x.flatten(0, 1).any(dim=2)  # [planes, H]: rows with activity
    starts = (rows[:, 1:] & ~rows[:, :-1]).nonzero()[:, 1] + 1
    assert starts.numel() > 0 and (starts % 8 != 0).any()


def test_clustered_share_channels_follows_one_mask_per_sample() -> None:
    """share_channels: every channel of a sample fires only inside the same regions, so the 16-channel blocks
    of a conv see about the covered fraction of tiles, far fewer than with patches drawn per channel."""
    shape, density = (4, 32, 32, 32), 0.05
    x = spikes.clustered_spikes(shape, density, blob=8, seed=0, fill=0.5, share_channels=True)
    assert abs(x.mean().item() - density) < 0.3 * density
    # where any of the 32 channels fired: the shared regions (coverage density / fill = 0.1); with patches drawn
    # per channel the union would cover 1 - 0.9 ** 32 = 97 % of the plane
    union = x.amax(dim=1).mean().item()
    assert 0.05 < union < 0.2
    per_chan = spikes.clustered_spikes(shape, density, blob=8, seed=0, fill=0.5)
    assert spikes.spike_stats(x)["tile8_g16_halo"] < 0.6 * spikes.spike_stats(per_chan)["tile8_g16_halo"]
    with pytest.raises(ValueError):
        spikes.clustered_spikes((8, 8), 0.1, share_channels=True)


def test_silent_channel_spikes_planes() -> None:
    shape = (4, 50, 16, 16)
    x = spikes.silent_channel_spikes(shape, 0.3, silent_frac=0.4, seed=2)
    planes_silent = (x.flatten(2).amax(dim=2) == 0).float().mean().item()
    assert planes_silent == pytest.approx(0.4, abs=1e-6)  # exactly round(0.4 * 200) planes
    active = x.flatten(2)[x.flatten(2).amax(dim=2) > 0]
    assert active.mean().item() == pytest.approx(0.3 / 0.6, abs=0.02)
    st = spikes.spike_stats(x)
    assert st["chan_silent"] == pytest.approx(0.4, abs=1e-6)
    with pytest.raises(ValueError):
        spikes.silent_channel_spikes(shape, 0.8, silent_frac=0.4)


# -------------------------------------------------------------------------------------- spike_stats


def test_spike_stats_all_zero() -> None:
    st = spikes.spike_stats(torch.zeros(2, 4, 16, 16))
    assert st["elem"] == 0.0
    assert st["binary"] and st["integer"]
    assert st["max_value"] == 0.0
    assert st["chan_silent"] == 1.0
    for key, val in st.items():
        if key.startswith("tile"):
            assert val == 0.0, key
    expected = {f"tile{b}_{s}" for b in (8, 16) for s in ("chan", "chan_halo", "any")}
    expected |= {f"tile{b}_g{g}_halo" for b in (8, 16) for g in (16, 32, 64)}
    assert expected <= set(st)


def test_spike_stats_single_spike_at_tile_corner() -> None:
    x = torch.zeros(1, 32, 16, 16)
    x[0, 0, 7, 7] = 1.0  # bottom-right corner of the top-left 8x8 tile
    st = spikes.spike_stats(x)
    assert st["elem"] == pytest.approx(1 / (32 * 256))
    assert st["chan_silent"] == pytest.approx(31 / 32)
    # 8x8 tiles: 2x2 per channel, 128 per-channel tiles in total
    assert st["tile8_chan"] == pytest.approx(1 / 128)
    assert st["tile8_chan_halo"] == pytest.approx(4 / 128)  # 3x3 halo touches all four tiles
    assert st["tile8_any"] == pytest.approx(1 / 4)
    assert st["tile8_g16_halo"] == pytest.approx(4 / 8)  # 4 tiles x 2 channel groups
    assert st["tile8_g32_halo"] == pytest.approx(1.0)  # 4 tiles x 1 group
    assert st["tile8_g64_halo"] == pytest.approx(1.0)  # partial group of 32 channels
    # 16x16 tiles: one per channel
    assert st["tile16_chan"] == pytest.approx(1 / 32)
    assert st["tile16_chan_halo"] == pytest.approx(1 / 32)
    assert st["tile16_any"] == pytest.approx(1.0)
    assert st["tile16_g16_halo"] == pytest.approx(1 / 2)


@pytest.mark.parametrize(
    ("pos", "tiles8", "halo8"),
    [((0, 0), 1, 1), ((3, 4), 1, 1), ((8, 8), 1, 4), ((7, 3), 1, 2), ((9, 9), 1, 1), ((8, 0), 1, 2)],
)
def test_spike_stats_partial_edge_tiles(pos: tuple[int, int], tiles8: int, halo8: int) -> None:
    x = torch.zeros(1, 1, 10, 10)  # 8x8 tiling: 2x2 tiles, three of them partial
    x[0, 0, pos[0], pos[1]] = 1.0
    st = spikes.spike_stats(x, tiles=(8,), groups=(16,))
    assert st["tile8_chan"] == pytest.approx(tiles8 / 4)
    assert st["tile8_chan_halo"] == pytest.approx(halo8 / 4)
    assert st["tile8_g16_halo"] == pytest.approx(halo8 / 4)


def test_spike_stats_one_silent_channel() -> None:
    x = torch.ones(2, 4, 8, 8)
    x[0, 1] = 0.0
    st = spikes.spike_stats(x)
    assert st["chan_silent"] == pytest.approx(1 / 8)
    assert st["elem"] == pytest.approx(7 / 8)
    assert st["tile8_chan"] == pytest.approx(7 / 8)
    assert st["tile8_chan_halo"] == pytest.approx(7 / 8)
    assert st["tile8_any"] == pytest.approx(1.0)
    assert st["tile8_g16_halo"] == pytest.approx(1.0)
    assert st["binary"] and st["integer"] and st["max_value"] == 1.0


def test_spike_stats_non_binary() -> None:
    x = torch.zeros(1, 2, 4, 4)
    x[0, 0, 0, 0] = 2.0
    st = spikes.spike_stats(x)
    assert not st["binary"] and st["integer"] and st["max_value"] == 2.0
    x[0, 1, 1, 1] = 0.5
    st = spikes.spike_stats(x)
    assert not st["binary"] and not st["integer"] and st["max_value"] == 2.0
    assert st["elem"] == pytest.approx(2 / 32)
    x[0, 1, 1, 1] = -3.0  # negative values count as non-zero too
    st = spikes.spike_stats(x)
    assert st["elem"] == pytest.approx(2 / 32) and st["integer"] and st["max_value"] == 2.0


def _reference_stats(x: torch.Tensor, tiles: tuple[int, ...], groups: tuple[int, ...]) -> dict[str, float]:
    """Loop-based reference for the tile statistics."""
    nz = x != 0
    bsz, c, h, w = x.shape
    halo = torch.zeros_like(nz)
    for i, j in itertools.product(range(h), range(w)):
        halo[:, :, i, j] = nz[:, :, max(0, i - 1) : i + 2, max(0, j - 1) : j + 2].flatten(2).any(2)
    ref: dict[str, float] = {}
    for b in tiles:
        th, tw = math.ceil(h / b), math.ceil(w / b)
        chan = torch.zeros(bsz, c, th, tw, dtype=torch.bool)
        chan_h = torch.zeros_like(chan)
        for ti, tj in itertools.product(range(th), range(tw)):
            sl = (slice(None), slice(None), slice(ti * b, ti * b + b), slice(tj * b, tj * b + b))
            chan[:, :, ti, tj] = nz[sl].flatten(2).any(2)
            chan_h[:, :, ti, tj] = halo[sl].flatten(2).any(2)
        ref[f"tile{b}_chan"] = chan.float().mean().item()
        ref[f"tile{b}_chan_halo"] = chan_h.float().mean().item()
        ref[f"tile{b}_any"] = chan.any(1).float().mean().item()
        for g in groups:
            vals = [chan_h[:, k : k + g].any(1) for k in range(0, c, g)]
            ref[f"tile{b}_g{g}_halo"] = torch.stack(vals, 1).float().mean().item()
    return ref


def test_spike_stats_matches_loop_reference() -> None:
    x = spikes.clustered_spikes((2, 20, 13, 11), 0.04, blob=3, seed=5)
    x += spikes.iid_spikes(x.shape, 0.005, seed=6)
    tiles, groups = (4, 8), (3, 16)
    st = spikes.spike_stats(x, tiles=tiles, groups=groups)
    ref = _reference_stats(x, tiles, groups)
    for key, val in ref.items():
        assert st[key] == pytest.approx(val, abs=1e-6), key
    # a leading T is flattened into the batch
    st5 = spikes.spike_stats(x.view(2, 1, 20, 13, 11), tiles=tiles, groups=groups)
    assert st5 == st
    with pytest.raises(ValueError):
        spikes.spike_stats(torch.zeros(3, 4, 5))


# ------------------------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def calibrated_resnet18() -> nn.Module:
    model = models.build_model("spiking_resnet18", T=2, num_classes=10)
    images = data.natural_images(4, size=64, seed=0)
    return models.recalibrate_bn(model, images, T=2, batches=2)


def test_registry_and_errors() -> None:
    expected = {
        "spiking_resnet18", "spiking_resnet34", "spiking_resnet50",
        "sew_resnet18", "sew_resnet34", "sew_resnet50",
        "spiking_vgg11", "spikformer_ti", "sdt_8_384", "spiking_mobilenetv2", "spiking_unet",
        "ms_resnet34", "qkformer_10_384", "dvs_gesture_plif",
    }  # fmt: skip
    assert expected <= set(models.MODELS)
    with pytest.raises(KeyError, match="no_such_model"):
        models.build_model("no_such_model")
    with pytest.raises(RuntimeError, match="sew_resnet18"):
        models.build_model("sew_resnet18", num_classes=10, bogus_argument=1)


def test_recalibrate_bn_sets_stats_and_restores_state(calibrated_resnet18: nn.Module) -> None:
    model = calibrated_resnet18
    bns = models.batchnorm_layers(model)
    assert len(bns) == 20  # resnet18: bn1 + 2 per block x 8 + 3 downsample
    assert not any(m.training for m in model.modules())
    for name, bn in bns:
        assert bn.momentum == 0.1, name
        assert bn.num_batches_tracked.item() == 2, name
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var)), name
    assert not torch.allclose(model.bn1.running_mean, torch.zeros(64))


def test_resnet18_conv_inputs_after_recalibration(calibrated_resnet18: nn.Module) -> None:
    model = calibrated_resnet18
    x = data.repeat_time(data.natural_images(2, size=64, seed=1), 2)
    captured = spikes.capture_conv_inputs(model, x)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert set(captured) == set(convs)
    assert all(not m._forward_pre_hooks for m in convs.values())  # hooks removed
    for name, inp in captured.items():
        assert inp.ndim == 5 and inp.shape[:2] == (2, 2), name
        assert inp.shape[2] == convs[name].in_channels, name
    assert torch.equal(captured["conv1"], x)
    spiking = {n: v for n, v in captured.items() if n != "conv1"}
    assert all(bool(((v == 0) | (v == 1)).all()) for v in spiking.values())
    dens = {n: (v != 0).float().mean().item() for n, v in spiking.items()}
    in_range = [n for n, d in dens.items() if 0.0 < d < 1.0]
    assert len(in_range) >= 0.8 * len(dens), dens
    assert 0.005 < sum(dens.values()) / len(dens) < 0.5, dens

    # stats on the fly agree with stats of the captured tensors; neurons were reset, so reruns agree
    stats = spikes.capture_conv_stats(model, x)
    assert set(stats) == set(convs)
    for name in ("layer1.0.conv1", "layer2.0.downsample.0"):
        ref = spikes.spike_stats(captured[name].flatten(0, 1))
        for key in ("elem", "tile8_chan", "tile8_chan_halo", "tile16_g32_halo", "chan_silent"):
            assert stats[name][key] == pytest.approx(ref[key]), (name, key)
    s = stats["layer2.0.conv1"]
    assert (s["in_channels"], s["out_channels"], s["kernel_size"], s["stride"], s["padding"]) == (
        64, 128, (3, 3), (2, 2), (1, 1),
    )  # fmt: skip
    assert (s["in_h"], s["in_w"], s["T"], s["N"]) == (16, 16, 2, 2)
    assert stats["layer2.0.downsample.0"]["kernel_size"] == (1, 1)


def test_uncalibrated_vs_calibrated_activity(calibrated_resnet18: nn.Module) -> None:
    # recalibration changes the activity (random init BN stats are (0, 1))
    fresh = models.build_model("spiking_resnet18", T=2, num_classes=10)
    fresh.load_state_dict(calibrated_resnet18.state_dict())
    for _, bn in models.batchnorm_layers(fresh):
        bn.reset_running_stats()
    x = data.repeat_time(data.natural_images(2, size=64, seed=1), 2)
    a = spikes.capture_conv_stats(calibrated_resnet18, x)
    b = spikes.capture_conv_stats(fresh, x)
    assert any(abs(a[n]["elem"] - b[n]["elem"]) > 0.01 for n in a)


def test_sew_resnet_add_gives_integer_inputs() -> None:
    model = models.build_model("sew_resnet18", T=2, num_classes=10)
    models.recalibrate_bn(model, data.natural_images(2, size=32, seed=0), T=2, batches=1)
    stats = spikes.capture_conv_stats(model, data.repeat_time(data.natural_images(2, size=32, seed=1), 2))
    inner = [s for n, s in stats.items() if n != "conv1"]
    assert all(s["integer"] for s in inner)
    assert any(s["max_value"] > 1 for s in inner)  # ADD connections sum spikes


@pytest.mark.parametrize("name", ["spikformer_ti", "sdt_8_384"])
def test_transformers_build_and_run(name: str) -> None:
    from spikingjelly.activation_based import neuron, surrogate

    model = models.build_model(name, T=2, num_classes=7)
    assert not model.training
    lifs = [m for m in model.modules() if isinstance(m, neuron.BaseNode)]
    assert lifs and all(isinstance(m, neuron.LIFNode) for m in lifs)
    for m in lifs:
        assert m.step_mode == "m" and m.tau == 2.0 and m.v_reset == 0.0 and m.detach_reset
        assert isinstance(m.surrogate_function, surrogate.ATan)
    assert {m.v_threshold for m in lifs} == {1.0, 0.5}  # attention LIFs keep the paper's 0.5
    images = data.natural_images(2, size=32, seed=0)
    models.recalibrate_bn(model, images, T=2, batches=1)
    with torch.no_grad():
        y = model(data.repeat_time(images, 2))
    assert y.shape[-2:] == (2, 7) and torch.isfinite(y).all()
    stats = spikes.capture_conv_stats(model, data.repeat_time(images, 2), types=(nn.Conv1d, nn.Conv2d))
    assert stats and all(0.0 <= s["elem"] <= 1.0 for s in stats.values())
    assert any(s["binary"] and 0.0 < s["elem"] < 1.0 for s in stats.values())


def test_event_frames_are_on_off_events_at_the_asked_density() -> None:
    e = data.event_frames(2, 6, size=64, seed=3, density=0.1)
    assert e.shape == (6, 2, 2, 64, 64) and e.dtype == torch.float32
    assert set(e.unique().tolist()) <= {0.0, 1.0}
    assert not (e[:, :, 0] * e[:, :, 1]).any()  # a pixel fires ON or OFF, not both
    assert abs(float(e.mean()) - 0.1) < 2e-3
    assert not torch.equal(e[0], e[1])  # the scene moves: the frames differ over time
    assert torch.equal(e, data.event_frames(2, 6, size=64, seed=3, density=0.1))
    assert not torch.equal(e, data.event_frames(2, 6, size=64, seed=4, density=0.1))
    for bad in ({"T": 0}, {"density": 0.5}, {"size": 0}):
        with pytest.raises(ValueError, match="event_frames"):
            data.event_frames(**{"n": 1, "T": 2, "size": 8, **bad})


def test_dvs_network_is_calibrated_and_fed_event_frames() -> None:
    """The DVS network's benchmark input is a recording at its sensor's size and T (not images repeated over T);
    its BatchNorms are calibrated on recordings, and the five spiking conv stages fire after calibration (the
    head's neurons follow Linear layers without BatchNorm: random weights may leave them silent)."""
    from spikingjelly.activation_based import neuron

    assert models.model_input_spec("dvs_gesture_plif", 4, 224) == ("events", 16, 128)
    assert models.model_input_spec("spiking_resnet34", 4, 224) == ("images", 4, 224)
    model, x = models.prepared_model("dvs_gesture_plif", 3, 1, 128, torch.device("cpu"), calib_images=2,
                                     channels=8)
    assert x.shape == (3, 1, 2, 128, 128) and abs(float((x != 0).float().mean()) - 0.13) < 5e-3
    assert not any(m.training for m in model.modules())
    rates = []
    hooks = [m.register_forward_hook(lambda m, a, y: rates.append(float(y.mean())))
             for m in model.modules() if isinstance(m, neuron.ParametricLIFNode)]
    with torch.no_grad():
        assert model(x).shape == (3, 1, 11)
    for h in hooks:
        h.remove()
    assert len(rates) >= 5 and all(0.0 < r < 1.0 for r in rates[:5]), rates


def test_recalibrate_bn_takes_a_recording_as_it_is() -> None:
    """A [T, M, C, H, W] recording is fed as it is (chunks over M), not repeated over T."""
    seen = []
    model = models.build_model("spiking_resnet18", T=2, num_classes=10)
    h = model.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    rec = torch.randn(2, 4, 3, 32, 32)
    models.recalibrate_bn(model, rec, T=2, batches=2)
    h.remove()
    assert [s.shape for s in seen] == [(2, 2, 3, 32, 32)] * 2
    assert torch.equal(seen[0], rec[:, :2]) and torch.equal(seen[1], rec[:, 2:])
    with pytest.raises(ValueError, match="recording"):
        models.recalibrate_bn(model, torch.randn(2, 0, 3, 8, 8), T=2)
