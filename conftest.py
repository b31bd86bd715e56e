"""Shared setup of every CPU test suite: the Triton interpreter and per-test seeds."""

from __future__ import annotations

import os

# The kernels run on the CPU through Triton's interpreter; it must be chosen before triton is imported.
if os.environ.get("SPARSEFLOW_GPU_RUN") != "1":  # scripts/gpu_check.sh runs the real kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import zlib

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed(request):
    """A fixed seed per test (from its id): every test draws its own inputs, reproducibly."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
