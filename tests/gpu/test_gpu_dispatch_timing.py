"""``sparseflow_kernels.dispatch.measure_all`` on the GPU: every candidate captured before any is timed, then timed in
turns; a candidate that raises is out (``inf``), one that cannot be captured is timed eagerly, and the ranking follows
the work each candidate does."""

from __future__ import annotations

import math

import pytest
import torch

from sparseflow_kernels import dispatch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_measure_all_ranks_by_work_and_keeps_failures_out():
    def raises():
        raise RuntimeError("does not fit")

    def host_sync():  # .item() waits for the GPU: not capturable in a CUDA graph
        torch.cuda._sleep(20_000)
        return torch.ones(1, device="cuda").item()

    cands = {"long": lambda: torch.cuda._sleep(400_000), "short": lambda: torch.cuda._sleep(40_000),
             "raises": raises, "host_sync": host_sync}
    r = dispatch.measure_all(cands)
    assert list(r) == list(cands)
    assert r["raises"] == math.inf
    assert r["short"] > 0 and r["long"] > 5 * r["short"], r  # ten times the cycles
    assert 0 < r["host_sync"] < math.inf


def test_choose_caches_the_fastest_measured():
    dispatch.clear_cache()
    key = ("test_measure_all", 1)
    try:
        best = dispatch.choose(key, {"slow": lambda: torch.cuda._sleep(400_000),
                                     "fast": lambda: torch.cuda._sleep(40_000)},
                               fallback="slow", device=torch.device("cuda"))
        assert best == "fast" and dispatch.cached(key) == "fast"
        t = dispatch.timings(key)
        assert set(t) == {"slow", "fast"} and t["fast"] < t["slow"]
    finally:
        dispatch.clear_cache()
