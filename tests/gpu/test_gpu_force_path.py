"""``sparseflow_kernels.force_path`` on the GPU, where the modules time their paths: a forced path is taken without
timing or caching anything, and outside the block the module measures and caches its own choice."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparseflow_kernels import dispatch, force_path
from sparseflow_ops import SparseConv2d, SparseLinear

# the torch path and the references are cuDNN convolutions: judged in real fp32, without TF32
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.usefixtures("strict_fp32")]


@pytest.mark.parametrize("forced", ["torch", "dense", "sparse"])
def test_gpu_forced_path_taken_untimed(forced):
    torch.manual_seed(0)
    lin = nn.Linear(256, 128).cuda().eval()
    conv = nn.Conv2d(32, 64, 3, padding=1).cuda().eval()
    m, c = SparseLinear.from_dense(lin), SparseConv2d.from_dense(conv)
    x = (torch.rand(64, 256, device="cuda") < 0.2).float()
    xc = (torch.rand(2, 32, 28, 28, device="cuda") < 0.2).float()
    dispatch.clear_cache()
    try:
        with torch.no_grad():
            with force_path(forced):
                y, yc = m(x), c(xc)
            assert m.last_path == forced and c.last_path == forced
            assert dispatch.choices() == {} and dispatch.timings() == {}  # nothing measured, nothing cached
            torch.testing.assert_close(y, lin(x), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(yc, conv(xc), rtol=1e-4, atol=1e-4)
            with force_path({"conv": forced}):
                m(x)
                c(xc)
            assert c.last_path == forced  # the linear layer measured and cached its own choice, the conv none
            assert dispatch.choices() and {k[0] for k in dispatch.choices()} == {"linear"}
    finally:
        dispatch.clear_cache()
