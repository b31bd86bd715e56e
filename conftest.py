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


@pytest.fixture(autouse=True)
def _inference(request):
    """Tests run as inference runs, under ``torch.no_grad()``: with autograd recording (grad mode and parameters
    that require grad) the optimized modules run the dense torch ops, for exact gradients. Tests of autograd and
    training opt out with ``@pytest.mark.autograd``."""
    if request.node.get_closest_marker("autograd") is not None:
        yield
        return
    with torch.no_grad():
        yield


@pytest.fixture
def strict_fp32():
    """fp32 in true fp32 for the test: cuDNN convolutions and CUDA matmuls may use TF32 by default, which would
    judge exactness against a rounded reference (restored afterwards; no effect on the CPU)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def pytest_runtest_logreport(report):
    """On the device machine (``SPARSEFLOW_GPU_RUN=1``), a failure's traceback is written the moment the test fails
    (to ``$SPARSEFLOW_FAILURE_LOG`` when set, else to stderr), not only in the summary at the end: a run stopped at
    its time limit still says why each of its failed tests failed."""
    if os.environ.get("SPARSEFLOW_GPU_RUN") != "1" or not report.failed or os.environ.get("PYTEST_XDIST_WORKER"):
        return  # (pytest-xdist: the controller writes its workers' reports, once)
    text = f"\n=== FAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n"
    path = os.environ.get("SPARSEFLOW_FAILURE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(text)
    else:
        import sys

        sys.stderr.write(text)
