"""Diagnostic (GPU): the spiking U-Net against dense per mode (TF32 off), per time step."""

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
model = build_model("spiking_unet", T=T, num_classes=10, base=16, depth=3).cuda()
recalibrate_bn(model, natural_images(8, 64).cuda(), T)
x = repeat_time(natural_images(4, 64, seed=1), T).cuda()
functional.reset_net(model)
with torch.no_grad():
    ref = model(x).double()
for mode in sys.argv[1].split(","):
    opt = optimize(copy.deepcopy(model), x, mode=mode)
    functional.reset_net(opt)
    with torch.no_grad():
        y = opt(x).double()
    per_t = [float((y[t] - ref[t]).norm() / ref[t].norm()) for t in range(T)]
    paths = {}
    for n, m in opt.named_modules():
        if getattr(m, "last_path", None):
            paths[f"{type(m).__name__}:{m.last_path}"] = paths.get(f"{type(m).__name__}:{m.last_path}", 0) + 1
    print(mode, float((y - ref).norm() / ref.norm()), ["%.1e" % e for e in per_t], paths, flush=True)
