"""A static image repeated over T: an input built as ``frame.expand(T, ...)`` (stride 0) or declared with
``optimize(..., static_input=True)`` is convolved once per sample, gives the dense model's outputs, is named in the
report, survives the ``dtype=`` cast and the CUDA graph, and an input whose steps differ is refused by name."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sf_core_nets import calibrate_bns, small_sj_net
from spikingjelly.activation_based import functional

from sparseflow_core import CudaGraphModel, optimize, restore
from sparseflow_core.arguments import StaticInput, cast_inputs
from sparseflow_kernels import force_path, repeated_over_steps
from sparseflow_ops import runs_static_frames_once

STATIC = {"spiking": "cudnn_static"}  # the path a stride-0 input offers the stem (measured on a GPU, forced here)


def _frames(T=3, N=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    frame = torch.randn(N, 3, 16, 16, generator=g) * 1.5 + 0.3
    return frame.unsqueeze(0).expand(T, *frame.shape)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    m = small_sj_net()
    with torch.no_grad():
        calibrate_bns(m, _frames().contiguous())
    functional.reset_net(m)
    return m


def _dense(net, x):
    m = copy.deepcopy(net)
    with torch.no_grad():
        functional.reset_net(m)
        return m(x.contiguous())


def _run(model, x):
    with torch.no_grad(), force_path(STATIC):
        functional.reset_net(model)
        return model(x)


def test_stride_zero_input_runs_the_stem_once_and_matches_dense(net):
    x = _frames()
    opt, rep = optimize(copy.deepcopy(net), x, return_report=True)
    out = _run(opt, x)
    ref = _dense(net, x)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), (out - ref).abs().max()
    stem = opt[0]
    assert stem.last_path == "cudnn_static"
    assert any("static input" in n and "cudnn_static" in n for n in rep.notes)
    # a materialized input of the same frames takes the ordinary path, and the report does not claim the repeat
    opt2, rep2 = optimize(copy.deepcopy(net), x.contiguous(), return_report=True)
    out2 = _run(opt2, x.contiguous())
    assert opt2[0].last_path != "cudnn_static"
    assert not any("static input" in n for n in rep2.notes)
    assert torch.allclose(out, out2, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("path", ["cudnn_static", "fused_dense_static", "im2col_8x8_static", "im2col_pair_static"])
def test_static_path_follows_dense_over_calls_resets_and_train(net, path):
    """A stride-0 input on each static path of the stem (the cuDNN pair, the fused kernel's steps-looped tilings and
    the im2col kernel's pair, which convolve the frame once), against the dense model: first call, a second call
    without reset (the membranes carry over), a call after reset_net, and a call after train() (the dense modules
    run then)."""
    x = _frames(seed=3)
    opt = optimize(copy.deepcopy(net), x)
    dense = copy.deepcopy(net)
    with torch.no_grad(), force_path({"spiking": path}):
        functional.reset_net(opt)
        functional.reset_net(dense)
        for step in ("first", "no reset", "after reset", "after train"):
            if step == "after reset":
                functional.reset_net(opt)
                functional.reset_net(dense)
            if step == "after train":
                opt.train()
                dense.train()
            out, ref = opt(x), dense(x.contiguous())
            assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), (step, (out - ref).abs().max())
            if step == "first":
                assert opt[0].last_path == path


def test_static_input_flag_checks_and_repeats(net):
    x = _frames(seed=1).contiguous()
    opt, rep = optimize(copy.deepcopy(net), x, static_input=True, return_report=True)
    assert any("static input" in n for n in rep.notes)
    out = _run(opt, x)
    assert opt[0].last_path == "cudnn_static"
    assert torch.allclose(out, _dense(net, x), atol=1e-4, rtol=1e-4)
    moving = x.clone()
    moving[1] += 0.5
    with pytest.raises(ValueError, match=r"static_input=True\): the input's time steps differ"):
        _run(opt, moving)
    restore(opt)
    assert not any(isinstance(h, StaticInput) for h in opt._forward_pre_hooks.values())
    assert torch.allclose(_run(opt, moving), _dense(net, moving), atol=1e-5)  # restored: any input again


def test_static_input_argument_checked(net):
    with pytest.raises(TypeError, match="static_input must be True or False"):
        optimize(copy.deepcopy(net), _frames(), static_input="yes")


@pytest.mark.parametrize("path", ["torch", "dense"])
def test_stem_without_neuron_convolves_the_frame_once(path):
    """A neuron-first network (MS-ResNet: the stem is conv -> BatchNorm with no neuron, and its output feeds the
    first block's neuron, its downsampling convolution and the residual sum): on a stride-0 input the stem convolves
    each frame once and hands its output on repeated by stride 0, so the downsampling convolution runs once per frame
    too. Outputs and every membrane equal the same optimized model's on the materialized input, and the dense
    model's within fp32 rounding, over calls without and after a reset."""
    from test_sum_neurons import neuron_states, tiny_net

    base = tiny_net(blocks=((12, 2, "out+identity"), (12, 1, "identity+out")))  # block 0 downsamples the stem
    frame = torch.randn(2, 3, 12, 12) * 1.5 + 0.2
    x = frame.unsqueeze(0).expand(3, *frame.shape)
    paths = {"conv": path, "spiking": "cudnn"}  # (cuDNN on the CPU: torch's conv)
    with force_path(paths):
        opt, rep = optimize(copy.deepcopy(base), x, block_size=8, return_report=True)
        moving = optimize(copy.deepcopy(base), x.contiguous(), block_size=8)
    dense = copy.deepcopy(base)
    seen = {}
    opt.stem.register_forward_hook(lambda m, i, o: seen.update(stem=o))
    with torch.no_grad(), force_path(paths):
        for call in ("first", "no reset", "after reset"):
            if call == "after reset":
                for net in (opt, moving, dense):
                    functional.reset_net(net)
            x = frame.unsqueeze(0).expand(3, *frame.shape)
            out, ref, dref = opt(x), moving(x.contiguous()), dense(x.contiguous())
            assert seen["stem"].stride(0) == 0 and torch.equal(seen["stem"], seen["stem"][:1].expand_as(seen["stem"]))
            assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), (call, (out - ref).abs().max())
            assert torch.allclose(out, dref, atol=1e-4, rtol=1e-4), (call, (out - dref).abs().max())
            a, b = neuron_states(opt), neuron_states(moving)
            assert all(torch.allclose(torch.as_tensor(a[n]), torch.as_tensor(b[n]), atol=1e-5) for n in a)
        assert opt.stem[0].last_path == opt.blocks[0].downsample[0].last_path == f"{path}_static"
        assert moving.stem[0].last_path == path
        # train(): the dense modules run (every step convolved), as the dense model in train mode
        for net in (opt, dense):
            net.train()
            functional.reset_net(net)
        out, dref = opt(x), dense(x.contiguous())
        assert seen["stem"].stride(0) != 0
        assert torch.allclose(out, dref, atol=1e-4, rtol=1e-4), (out - dref).abs().max()
    assert any("static input" in n and "without a neuron" in n for n in rep.notes)


class _StemWithWriter(torch.nn.Module):
    """conv -> BN (no neuron), then a reader that writes into the stem's output (an in-place ReLU, or an in-place
    add), then a spiking layer."""

    def __init__(self, writer):
        super().__init__()
        from spikingjelly.activation_based import layer, neuron

        self.writer = writer
        self.stem = torch.nn.Sequential(layer.Conv2d(3, 8, 3, 1, 1, bias=False), layer.BatchNorm2d(8))
        self.relu = torch.nn.ReLU(inplace=True)
        self.lif = neuron.LIFNode(tau=2.0, step_mode="m")
        self.conv = layer.Conv2d(8, 8, 3, 1, 1, bias=False)
        self.bn = layer.BatchNorm2d(8)
        self.lif2 = neuron.LIFNode(tau=2.0, step_mode="m")

    def forward(self, x):
        y = self.stem(x)
        if self.writer == "relu":
            y = self.relu(y)
        else:
            y += 0.25
        return self.lif2(self.bn(self.conv(self.lif(y))))


@pytest.mark.parametrize("writer", ["relu", "add_"])
def test_stem_output_written_in_place_is_not_repeated_by_stride_zero(writer):
    """Where a reader writes into the stem's output, every step would share that write: the stem then convolves all
    the steps (no stride-0 output), the model runs as the dense one, and the report says why."""
    torch.manual_seed(0)
    net = _StemWithWriter(writer)
    functional.set_step_mode(net, "m")
    frame = torch.randn(2, 3, 10, 10)
    x = frame.unsqueeze(0).expand(3, *frame.shape)
    with torch.no_grad():
        calibrate_bns(net, x.contiguous())
    net.eval()
    with force_path({"conv": "torch", "spiking": "cudnn"}):
        opt, rep = optimize(copy.deepcopy(net), x, block_size=8, return_report=True)
        with torch.no_grad():
            functional.reset_net(opt)
            out = opt(x)
    ref = _dense(net, x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5) and ref.abs().sum() > 0
    assert opt.stem[0].last_path == "torch" and not opt.stem[0].static_passthrough
    entry = {e.name: e for e in rep.layers}["stem.0"]
    assert "a static input is convolved at every step" in entry.reason, entry.reason


class _PooledStem(torch.nn.Module):
    """A Spikformer / QKFormer patch stem: conv -> BN -> max pool 3 / 2 / 1 -> LIF, then a spiking layer; with
    ``writer`` an in-place ReLU between the pool and the neuron."""

    def __init__(self, writer=False):
        super().__init__()
        from spikingjelly.activation_based import layer, neuron

        self.stem = torch.nn.Sequential(layer.Conv2d(3, 8, 3, 1, 1, bias=True), layer.BatchNorm2d(8))
        self.pool = layer.MaxPool2d(3, 2, 1)
        self.relu = torch.nn.ReLU(inplace=True) if writer else torch.nn.Identity()
        self.lif = neuron.LIFNode(tau=2.0, step_mode="m")
        self.conv = layer.Conv2d(8, 8, 3, 1, 1, bias=False)
        self.bn = layer.BatchNorm2d(8)
        self.lif2 = neuron.LIFNode(tau=2.0, step_mode="m")

    def forward(self, x):
        return self.lif2(self.bn(self.conv(self.lif(self.relu(self.pool(self.stem(x)))))))


def _calibrated(net):
    """(``net`` in eval mode with its BatchNorms calibrated on a static input, that input's frames [N, 3, 12, 12])."""
    functional.set_step_mode(net, "m")
    frame = torch.randn(2, 3, 12, 12) * 1.5 + 0.2
    with torch.no_grad():
        calibrate_bns(net, frame.unsqueeze(0).expand(3, *frame.shape).contiguous())
    return net.eval(), frame


def _pooled_stem(writer):
    torch.manual_seed(0)
    return _calibrated(_PooledStem(writer))


def _static_and_materialized(net, frame, paths):
    """(the stride-0 input, ``net`` optimized on it with its report, ``net`` optimized on it materialized)."""
    x = frame.unsqueeze(0).expand(3, *frame.shape)
    with force_path(paths):
        opt, rep = optimize(copy.deepcopy(net), x, block_size=8, return_report=True)
        moving = optimize(copy.deepcopy(net), x.contiguous(), block_size=8)
    return x, opt, rep, moving


def _matches_over_calls(opt, moving, dense, x, paths, repeated):
    """Three calls (first, no reset, after reset): ``opt`` on the stride-0 ``x`` gives ``moving``'s outputs and
    membranes on it materialized and the dense model's outputs; ``repeated()`` (the stride-0 outputs) holds. Then in
    train mode (the dense modules run, every step): the dense model's outputs, and ``repeated()`` does not hold. The
    models are back in eval mode and reset afterwards."""
    from test_sum_neurons import neuron_states

    with torch.no_grad(), force_path(paths):
        for call in ("first", "no reset", "after reset"):
            if call == "after reset":
                for m in (opt, moving, dense):
                    functional.reset_net(m)
            out, ref, dref = opt(x), moving(x.contiguous()), dense(x.contiguous())
            assert repeated(), call
            assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), (call, (out - ref).abs().max())
            assert torch.allclose(out, dref, atol=1e-4, rtol=1e-4), (call, (out - dref).abs().max())
            assert 0 < out.mean() < 1
            a, b = neuron_states(opt), neuron_states(moving)
            assert all(torch.allclose(torch.as_tensor(a[n]), torch.as_tensor(b[n]), atol=1e-5) for n in a)
        for m in (opt, dense):
            m.train()
            functional.reset_net(m)
        out, dref = opt(x), dense(x.contiguous())
        assert not repeated()
        assert torch.allclose(out, dref, atol=1e-4, rtol=1e-4), (out - dref).abs().max()
        for m in (opt, moving, dense):
            m.eval()
            functional.reset_net(m)


@pytest.mark.parametrize("path", ["torch", "dense"])
def test_pooled_stem_convolves_and_pools_the_frame_once(path):
    """conv -> BN -> max pool -> LIF on a stride-0 input: the stem convolves each frame once (its bias left to the
    pool on the cuDNN path), the pool pools it once, and both hand their output on repeated by stride 0; the neuron
    runs over the steps. Outputs and membranes equal the same optimized model's on the materialized input and the
    dense model's, over calls without and after a reset."""
    net, frame = _pooled_stem(False)
    paths = {"conv": path, "spiking": "cudnn"}
    x, opt, rep, moving = _static_and_materialized(net, frame, paths)
    assert opt.pool.static_passthrough and opt.stem[0].static_passthrough
    assert any("static input" in n and "a max pool included" in n for n in rep.notes)
    assert opt.stem[0].defer_shift  # (the cuDNN path leaves its bias to the pool)
    seen = {}
    opt.pool.register_forward_hook(lambda m, i, o: seen.update(pool_in=i[0], pool=o))
    _matches_over_calls(opt, moving, copy.deepcopy(net), x, paths,
                        lambda: seen["pool_in"].stride(0) == 0 and seen["pool"].stride(0) == 0)
    with torch.no_grad(), force_path(paths):
        opt(x), moving(x.contiguous())
    assert opt.stem[0].last_path == f"{path}_static" and moving.stem[0].last_path == path


def test_pooled_stem_with_a_writer_after_the_pool_pools_every_step():
    """An in-place ReLU reads the pool's output: the pool then returns every step's map (no stride-0 output), the
    model runs as the dense one, and the pool's report entry says why."""
    net, frame = _pooled_stem(True)
    x = frame.unsqueeze(0).expand(3, *frame.shape)
    seen = {}
    with force_path({"conv": "torch", "spiking": "cudnn"}):
        opt, rep = optimize(copy.deepcopy(net), x, block_size=8, return_report=True)
        opt.pool.register_forward_hook(lambda m, i, o: seen.update(pool_in=i[0], pool=o))
        with torch.no_grad():
            functional.reset_net(opt)
            out = opt(x)
    assert not opt.pool.static_passthrough
    assert seen["pool_in"].stride(0) == 0 and seen["pool"].stride(0) != 0
    ref = _dense(net, x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5) and ref.abs().sum() > 0
    entry = {e.name: e for e in rep.layers}["pool"]
    assert "a static input is pooled at every step: its output is read by relu" in (entry.detail or ""), entry


class _ContainerStem(torch.nn.Module):
    """Spikformer's patch stem: ``SeqToANNContainer(Conv2d, BatchNorm2d, MaxPool2d)`` -> LIF, then a spiking
    layer; ``inner`` a module put after the pool inside the container; ``after`` one between it and the LIF."""

    def __init__(self, inner=None, after=None):
        super().__init__()
        from spikingjelly.activation_based import layer, neuron

        mods = [torch.nn.Conv2d(3, 8, 3, 1, 1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.MaxPool2d(3, 2, 1)]
        self.stem = layer.SeqToANNContainer(*mods, *([inner] if inner is not None else []))
        self.after = after if after is not None else torch.nn.Identity()
        self.lif = neuron.LIFNode(tau=2.0, step_mode="m")
        self.conv = layer.Conv2d(8, 8, 3, 1, 1, bias=False, step_mode="m")
        self.bn = layer.BatchNorm2d(8, step_mode="m")
        self.lif2 = neuron.LIFNode(tau=2.0, step_mode="m")

    def forward(self, x):
        return self.lif2(self.bn(self.conv(self.lif(self.after(self.stem(x))))))


def _container_stem(inner=None, after=None):
    torch.manual_seed(1)
    return _calibrated(_ContainerStem(inner, after))


@pytest.mark.parametrize("path", ["torch", "dense"])
def test_container_stem_runs_one_frame_per_sample(path):
    """A SeqToANNContainer of frame-wise modules on a stride-0 input runs them on x[0] and hands the result on
    repeated by stride 0: outputs and membranes equal the same optimized model's on the materialized input and the
    dense model's, over calls without and after a reset; a hook on a module inside, train mode and restore() run
    the container's own forward (every step)."""
    net, frame = _container_stem()
    paths = {"conv": path, "spiking": "cudnn"}
    x, opt, rep, moving = _static_and_materialized(net, frame, paths)
    assert runs_static_frames_once(opt.stem)
    assert any("frame-wise containers stem run their modules on one frame per sample" in n for n in rep.notes)
    dense = copy.deepcopy(net)
    # pickled and loaded (torch.save), the container runs one frame per sample again
    back = pickle.loads(pickle.dumps(opt))
    assert runs_static_frames_once(back.stem) and back.stem.forward.module is back.stem
    with torch.no_grad(), force_path(paths):
        torch.testing.assert_close(back(x), dense(x.contiguous()), atol=1e-4, rtol=1e-4)
        functional.reset_net(dense)
    seen = {}
    opt.stem.register_forward_hook(lambda m, i, o: seen.update(out=o))
    _matches_over_calls(opt, moving, dense, x, paths,
                        lambda: seen["out"].stride(0) == 0 and seen["out"].shape[:2] == (3, 2))
    with torch.no_grad(), force_path(paths):
        # a hook inside the container sees what it sees in the dense model: every step's frames
        shapes = []
        h = opt.stem[2].register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
        functional.reset_net(opt)
        functional.reset_net(dense)
        out, dref = opt(x), dense(x.contiguous())
        h.remove()
        assert shapes == [(6, 8, 12, 12)] and seen["out"].stride(0) != 0
        assert torch.allclose(out, dref, atol=1e-4, rtol=1e-4)
    restore(opt)
    assert not runs_static_frames_once(opt.stem)


@pytest.mark.parametrize("inner", ["relu_inplace", "batchnorm_1d", "writer_after"])
def test_container_stem_not_frame_wise_runs_every_step(inner):
    """A container holding a module that writes in place, or one not known to be frame-wise, keeps its own forward;
    the report's note says why; the model is the dense one."""
    class PerBatch(torch.nn.Module):  # (any module of unknown kind)
        def forward(self, y):
            return y - y.mean(0, keepdim=True)

    mod = {"relu_inplace": torch.nn.ReLU(inplace=True), "batchnorm_1d": PerBatch(), "writer_after": None}[inner]
    net, frame = _container_stem(mod, torch.nn.ReLU(inplace=True) if inner == "writer_after" else None)
    x = frame.unsqueeze(0).expand(3, *frame.shape)
    with force_path({"conv": "torch", "spiking": "cudnn"}):
        opt, rep = optimize(copy.deepcopy(net), x, block_size=8, return_report=True)
        with torch.no_grad():
            functional.reset_net(opt)
            out = opt(x)
    assert not runs_static_frames_once(opt.stem)
    why = {"relu_inplace": "stem (3 (ReLU) writes in place",
           "batchnorm_1d": "stem (3 (PerBatch) is not known to compute each frame on its own",
           "writer_after": "stem (its output is read by after (ReLU), which may write into it"}[inner]
    assert any("these run every step: " + why in n for n in rep.notes), rep.notes
    ref = _dense(net, x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5) and ref.abs().sum() > 0


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 5), N=st.integers(1, 3), expanded=st.booleans(),
       dtype=st.sampled_from([torch.float16, torch.bfloat16]))
def test_cast_keeps_the_repeat(T, N, expanded, dtype):
    frame = torch.randn(N, 3, 4, 4)
    x = frame.unsqueeze(0).expand(T, N, 3, 4, 4)
    if not expanded:
        x = x.contiguous()
    y = cast_inputs(x, dtype)
    assert y.dtype == dtype and torch.equal(y.float(), x.to(dtype).float())
    assert repeated_over_steps(y) == (expanded and T > 1)
    assert repeated_over_steps(StaticInput.repeat(x)) == (T > 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("how", ["expanded", "flag"])
def test_cuda_graph_keeps_the_repeat(net, how):
    """The graph replays the static path (one frame in its input buffer), and its outputs are the eager optimized
    model's on the same input, bit for bit (the same kernels)."""
    frame = _frames(T=4, N=2, seed=2)[0].cuda()
    x = frame.unsqueeze(0).expand(4, *frame.shape)
    if how == "flag":
        x = x.contiguous()
    g = optimize(copy.deepcopy(net).cuda(), x, dtype=torch.float16, cuda_graph=True, static_input=how == "flag")
    assert isinstance(g, CudaGraphModel)
    with torch.no_grad():
        outs = [g(x).clone() for _ in range(5)]
        assert g.calls["replays"] >= 2 and g.calls["captures"] == 1
        assert all(torch.equal(o, outs[-1]) for o in outs[2:])
        functional.reset_net(g.model)
        eager = g.model(frame.half().unsqueeze(0).expand(4, *frame.shape))
    assert torch.equal(outs[-1], eager)
    assert any(getattr(m, "last_path", None) == "cudnn_static" for m in g.model.modules())
    if how == "flag":
        moving = x.clone()
        moving[1] += 0.5
        with pytest.raises(ValueError, match="time steps differ"):
            g(moving)
