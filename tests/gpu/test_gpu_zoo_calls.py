"""Every buildable model of SpikingJelly's zoo on the GPU, N=2, in every numerics mode and dtype, over three calls:
a first call, a second call without ``reset_net`` (the membranes carried over) and a call after ``reset_net``.

* ``faithful-fp32``: ``numerics="faithful"``, the dense fp32 logits bit for bit (``torch.equal``) on every call.
* ``fast-fp32``: ``numerics="fast"``, ``mode="auto"`` (each layer times its paths on its first call: the timing
  runs must leave no trace in the neuron state), TF32 off; the optimized and the dense fp32 models both against
  the dense model in fp64: the optimized model's error at most twice the dense fp32 model's own (or 2e-2). The
  kernels' fp32 sums are ordered unlike cuDNN's, so a spike at a threshold tie may flip somewhere in a deep net,
  and the carried-over membranes of the second call amplify it as much as the dense model's own fp32 rounding;
  a membrane that is not carried over is far larger (SpikingJelly's QKFormer: 0.10 on the second call).
* ``fast-fp16``: likewise in fp16, both against the dense model in fp32: the optimized model's error at most
  twice the dense fp16 model's own (or 2e-2). On an H200 the deep ResNets of
  the zoo, randomly initialised, differ from their fp32 selves by tens of percent in fp16 (and by about 10% in fp32
  merely with another cuDNN algorithm), so a fixed bound against the dense fp16 model cannot tell a carried-over
  membrane from rounding; this bound can.

A failing call names the first neuron whose membrane differs from the dense model's after it (the module whose
state was not carried over, or was advanced twice). ``SPARSEFLOW_GPU_ZOO`` selects models as in
``test_gpu_properties.py``; the measured errors go to the junit XML (``rel_err``).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

#: mode id -> (numerics, optimize mode, dtype, metric, rtol, drift factor against the dense model in a wider dtype)
MODES = {
    "faithful-fp32": ("faithful", "auto", torch.float32, "exact", 0.0, None),
    "fast-fp32": ("fast", "auto", torch.float32, "norm", 2e-2, 2.0),
    "fast-fp16": ("fast", "auto", torch.float16, "norm", 2e-2, 2.0),
}


def _names():
    from test_gpu_properties import _zoo_names

    return _zoo_names()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", _names())
def test_gpu_zoo_three_calls(name, mode, strict_fp32, record_property):
    import test_model_zoo as zoo

    from sparseflow_kernels import dispatch

    numerics, opt_mode, dtype, metric, rtol, drift = MODES[mode]
    dispatch.clear_cache()  # every model times its own paths on its first call
    errors: list[float] = []
    try:
        zoo.run_zoo_case(name, device="cuda", mode=opt_mode, dtype=dtype, rtol=rtol, metric=metric, errors=errors,
                         numerics=numerics, batch=2, drift_factor=drift)
    finally:
        record_property("rel_err", ",".join(f"{e:.3g}" for e in errors))
