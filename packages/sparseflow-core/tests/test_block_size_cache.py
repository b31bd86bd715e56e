"""The block-size autotuner keeps its choices in the kernels' one dispatch cache (namespace "block_size"), and the
block-size rules are the kernels' tiling policy."""

from __future__ import annotations

from sparseflow_core import blocks
from sparseflow_kernels import dispatch, tiling

KEY = ("SparseConv2d", 16, 32, (3, 3), (1, 1), (1, 1), (1, 1), "conv", (2, 16, 28, 28), (1, 2, 3, 4), "fp16", False)


def test_block_sizes_live_in_the_dispatch_cache():
    dispatch.clear_cache()
    try:
        dispatch.set_choice(KEY, "dense")  # a path choice under the same key: another namespace
        blocks.set_auto_choices({KEY: 16})
        assert blocks.auto_choices() == {KEY: 16} == dispatch.choices("block_size")
        assert dispatch.choices() == {KEY: "dense"}
        dispatch.record(KEY, 8, {8: 1.0, 16: 2.0, "dense": 3.0}, namespace="block_size")
        assert blocks.auto_choices() == {KEY: 8} and blocks.auto_timings() == {KEY: {8: 1.0, 16: 2.0, "dense": 3.0}}
        blocks.clear_auto_cache()
        assert blocks.auto_choices() == {} and blocks.auto_timings() == {} and dispatch.cached(KEY) == "dense"
        blocks.set_auto_choices({KEY: 16})
        dispatch.clear_cache()  # one cache: clearing it clears the block sizes too
        assert blocks.auto_choices() == {}
    finally:
        dispatch.clear_cache()


def test_block_size_rules_are_the_kernels_tiling_policy():
    for h in (1, 13, 14, 55, 56, 224):
        assert blocks.select_block_size(h) == tiling.select_block_size(h)
    assert blocks.AUTO_CANDIDATES == tiling.AUTO_CANDIDATES == (8, 16, "dense")
    assert blocks.SPARSE_MIN_HEIGHT == tiling.SPARSE_MIN_HEIGHT == 14
    assert tiling.grouped_block_size(16, 1) == 8 and tiling.grouped_block_size(16, 16) == 16
    assert tiling.grouped_block_size("dense", 1) == "dense"
