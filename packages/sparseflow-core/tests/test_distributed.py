"""sparseflow_core.distributed: the dispatch choices broadcast from rank 0, the reports and the throughput
gathered, on 2 CPU processes (gloo, spawned: a forked child of a process that ran torch ops can hang in
OpenMP)."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from sparseflow_core import blocks, distributed, optimize
from sparseflow_kernels import dispatch

KERNEL_KEY = ("conv", (4, 3, 8, 8), (192, 64, 8, 1), torch.float16, 8, (3, 3), True)
BLOCK_KEY = ("SparseConv2d", 4, 8, (3, 3), (1, 1), torch.float16, False)


def _net():
    from spikingjelly.activation_based import functional, layer, neuron

    torch.manual_seed(0)
    net = nn.Sequential(layer.Conv2d(3, 4, 3, padding=1, bias=False), layer.BatchNorm2d(4),
                        neuron.LIFNode(tau=2.0), layer.Conv2d(4, 4, 3, padding=1), neuron.LIFNode(tau=2.0))
    with torch.no_grad():
        net[0].weight.mul_(4.0)
        net[3].weight.mul_(12.0)
    functional.set_step_mode(net, "m")
    return net.eval()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    info = distributed.init_distributed("cpu")
    torch.manual_seed(1)
    try:
        assert (info.rank, info.world_size, info.backend, info.initialized_here) == (rank, world, "gloo", True)
        dispatch.clear_cache()
        blocks.clear_auto_cache()
        if rank == 0:  # what rank 0 measured
            dispatch.set_choice(KERNEL_KEY, "torch")
            blocks.set_auto_choices({BLOCK_KEY: 16})
        else:  # a different choice of its own, replaced by rank 0's
            dispatch.set_choice(KERNEL_KEY, "sparse")
        n = distributed.broadcast_dispatch(src=0)
        assert n == 2
        assert dispatch.cached(KERNEL_KEY) == "torch"
        assert blocks.auto_choices() == {BLOCK_KEY: 16}

        x = torch.rand(2, 1, 3, 8, 8) * 2
        model = optimize(_net(), x)
        with torch.no_grad():
            model(x)
        # a loop that is not SparseFlow's: lazily optimized, rank 0's choices taken on the first call
        key2 = ("batchnorm", (9,), (1,), torch.float32, False)
        if rank == 0:
            dispatch.set_choice(key2, "torch")
        lazy = distributed.broadcast_on_first_call(optimize(_net()))
        x2 = torch.rand(2, 2, 3, 8, 8) * 2  # the same on both ranks (same seed)
        with torch.no_grad():
            y = lazy(x2)
            dense = _net()(x2)
        assert dispatch.cached(key2) == "torch"
        assert not lazy._forward_pre_hooks  # both hooks removed themselves
        assert y.std() > 0  # spikes
        torch.testing.assert_close(y, dense)  # rank 0's measuring call left no neuron state behind
        reports = distributed.gather_reports(model)
        thr = distributed.gather_throughput(samples=rank + 1, seconds=0.5 * (rank + 1))
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"reports": reports, "throughput": thr,
                           "disagree": distributed.path_disagreements(reports)}, f, default=str)
        else:
            assert reports is None
    finally:
        distributed.shutdown(info)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_broadcast_dispatch_gather_reports_and_throughput(tmp_path) -> None:
    out = tmp_path / "rank0.json"
    mp.start_processes(_worker, args=(2, _free_port(), str(out)), nprocs=2, start_method="spawn")
    res = json.loads(out.read_text())
    reps = res["reports"]
    assert [r["rank"] for r in reps] == [0, 1]
    assert all(r["device"] == "cpu" for r in reps)
    fused = [[e for e in r["layers"] if e["action"] == "fused"] for r in reps]
    assert all(len(f) == 2 and all(e["path"] for e in f) for f in fused)  # the path each rank's layer took
    assert res["disagree"] == {}
    thr = res["throughput"]
    assert [(r["rank"], r["samples"], r["seconds"]) for r in thr["per_rank"]] == [(0, 1, 0.5), (1, 2, 1.0)]
    assert thr["per_rank"][1]["samples_per_s"] == pytest.approx(2.0)
    assert (thr["samples"], thr["seconds"], thr["samples_per_s"]) == (3, 1.0, pytest.approx(3.0))


def test_single_process_without_group() -> None:
    """No torchrun environment: world size 1, no group; the collectives act on this process alone."""
    env = {k: os.environ.pop(k) for k in ("WORLD_SIZE", "MASTER_ADDR", "RANK") if k in os.environ}
    try:
        info = distributed.init_distributed("cpu")
        assert (info.rank, info.world_size, info.backend, info.is_main) == (0, 1, None, True)
        thr = distributed.gather_throughput(10, 2.0)
        assert (thr["samples"], thr["samples_per_s"]) == (10, 5.0)
        x = torch.rand(2, 1, 3, 8, 8) * 2
        model, rep = optimize(_net(), x, return_report=True)
        (only,) = distributed.gather_reports(model)
        assert only["rank"] == 0 and only["layers"] == rep.to_dict()["layers"]
        with pytest.raises(ValueError, match="no SparseFlow report"):
            distributed.gather_reports(_net())
    finally:
        os.environ.update(env)


def test_export_import_dispatch_round_trip() -> None:
    dispatch.clear_cache()
    blocks.clear_auto_cache()
    try:
        dispatch.set_choice(KERNEL_KEY, "dense")
        blocks.set_auto_choices({BLOCK_KEY: 8})
        state = distributed.export_dispatch()
        dispatch.clear_cache()
        blocks.clear_auto_cache()
        assert dispatch.cached(KERNEL_KEY) is None
        assert distributed.import_dispatch(state) == 2
        assert dispatch.cached(KERNEL_KEY) == "dense" and blocks.auto_choices() == {BLOCK_KEY: 8}
        with pytest.raises(ValueError, match="'kernels' and 'block_sizes'"):
            distributed.import_dispatch({"kernels": {}})
    finally:
        dispatch.clear_cache()
        blocks.clear_auto_cache()


def test_path_disagreements_names_the_layer() -> None:
    reps = [{"layers": [{"name": "a", "path": "sparse"}, {"name": "b", "path": "torch"}]},
            {"layers": [{"name": "a", "path": "sparse"}, {"name": "b", "path": "fused_dense"}]}]
    assert distributed.path_disagreements(reps) == {"b": ["torch", "fused_dense"]}
    assert distributed.path_disagreements(reps[:1]) == {}
