"""The measured-choice cache (namespaces, export and clear) and ``force_path`` (by name, by op kind, nesting,
exceptions, threads)."""

from __future__ import annotations

import threading

import pytest
import torch

from sparseflow_kernels import dispatch, force_path

KEY = ("linear", (4, 8), (8, 1), torch.float32, 3)


@pytest.fixture(autouse=True)
def _clean():
    dispatch.clear_cache()
    yield
    dispatch.clear_cache()


def _choose(key=KEY, cands=("sparse", "dense", "torch")):
    return dispatch.choose(key, {c: (lambda: None) for c in cands}, fallback="sparse", device=torch.device("cpu"))


def test_namespaces_share_one_cache_without_mixing():
    dispatch.set_choice(KEY, "torch")
    dispatch.record(KEY, 16, {8: 2.0, 16: 1.0}, namespace="block_size")
    assert dispatch.cached(KEY) == "torch" and dispatch.cached(KEY, namespace="block_size") == 16
    assert dispatch.choices() == {KEY: "torch"} and dispatch.choices("block_size") == {KEY: 16}
    assert dispatch.timings(KEY, namespace="block_size") == {8: 2.0, 16: 1.0} and dispatch.timings() == {}
    assert len(dispatch._CACHE) == 2
    dispatch.clear_cache("block_size")
    assert dispatch.choices("block_size") == {} and dispatch.cached(KEY) == "torch"
    dispatch.clear_cache()
    assert dispatch._CACHE == {} and dispatch._TIMINGS == {}


def test_force_path_overrides_cache_and_fallback_and_caches_nothing():
    assert _choose() == "sparse"  # the CPU fallback
    dispatch.set_choice(KEY, "dense")
    with force_path("torch"):
        assert _choose() == "torch"
    assert _choose() == "dense" and dispatch.choices() == {KEY: "dense"}


def test_force_path_by_kind_nests_and_restores_on_exception():
    other = ("conv", 1)
    with force_path({"linear": "dense"}):
        assert _choose() == "dense" and _choose(other) == "sparse"
        with force_path({"conv": "torch"}):
            assert _choose() == "dense" and _choose(other) == "torch"
        with force_path("torch"):  # innermost wins
            assert _choose() == "torch"
        with pytest.raises(KeyError), force_path({("linear", (4, 8)): "torch"}):  # a longer key prefix
            assert _choose() == "torch" and _choose(("linear", (2, 8))) == "dense"
            raise KeyError("out")
        assert _choose() == "dense"
    assert _choose() == "sparse"


def test_force_path_name_not_offered_and_bad_arguments():
    with force_path("fused_dense"):
        assert _choose() == "sparse"
    for bad in (3, {}, {"linear": 1}):
        with pytest.raises(TypeError, match="force_path"), force_path(bad):
            pass


def test_force_path_belongs_to_its_thread():
    seen = {}
    inside, done = threading.Event(), threading.Event()

    def other():
        inside.wait(5)
        seen["other"] = _choose()
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with force_path("torch"):
        inside.set()
        done.wait(5)
        seen["main"] = _choose()
    t.join(5)
    assert seen == {"other": "sparse", "main": "torch"}
