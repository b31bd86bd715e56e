"""Diagnostic (GPU): the spiking U-Net of ``tests/gpu/test_gpu_grouped_transposed.py`` against its dense fp32 model (TF32 off).

    python scripts/diag_unet.py MODES [SEEDS]      e.g.  sparse,auto,dense  0,1,2,3,4,5,6,7

For each weight seed (default: no seed, the process's initial RNG state) and each ``optimize()`` mode: the relative
error of the optimized model's output against the dense fp32 model, beside how far the same dense model moves by
itself when only its fp32 summation order changes (channels_last: another cuDNN algorithm) and how far dense fp32
is from the float64 model. Where the dense model's own reordering moves the output by far more than 1e-3, the
network amplifies rounding (spikes flipping at threshold ties), and no fp32 implementation can be held to 1e-3.
"""

import copy
import sys

import torch
from spikingjelly.activation_based import functional

from sparseflow_bench.data import natural_images, repeat_time
from sparseflow_bench.models import build_model, recalibrate_bn
from sparseflow_core import optimize

torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
T = 4


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def run(model, x):
    functional.reset_net(model)
    with torch.no_grad():
        return model(x).double()


modes = sys.argv[1].split(",")
seeds = [int(s) for s in sys.argv[2].split(",")] if len(sys.argv) > 2 else [None]
for seed in seeds:
    if seed is not None:
        torch.manual_seed(seed)
    model = build_model("spiking_unet", T=T, num_classes=10, base=16, depth=3).cuda()
    recalibrate_bn(model, natural_images(8, 64).cuda(), T)
    x = repeat_time(natural_images(4, 64, seed=1), T).cuda()
    ref = run(model, x)
    reordered = rel(run(copy.deepcopy(model).to(memory_format=torch.channels_last), x), ref)
    f64 = rel(ref, run(copy.deepcopy(model).double(), x.double()))
    for mode in modes:
        opt = optimize(copy.deepcopy(model), x, mode=mode)
        y = run(opt, x)
        per_t = [rel(y[t], ref[t]) for t in range(T)]
        paths = {}
        for _, m in opt.named_modules():
            if getattr(m, "last_path", None):
                key = f"{type(m).__name__}:{m.last_path}"
                paths[key] = paths.get(key, 0) + 1
        print(f"seed {seed} mode {mode}: rel err {rel(y, ref):.3g} (per t {['%.1e' % e for e in per_t]}); dense fp32 "
              f"reordered {reordered:.3g}, dense fp32 vs fp64 {f64:.3g}; paths {paths}", flush=True)
