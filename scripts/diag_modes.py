"""Diagnostic (GPU): where an optimized model first departs from the dense one, per mode and time step."""
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "packages", "sparseflow-core", "tests"))
import test_model_zoo as zoo
from spikingjelly.activation_based import functional

from sparseflow_core import optimize
from sparseflow_core.registry import is_spiking_module

torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


def outs(model, x):
    rec, hs = {}, []
    for n, m in model.named_modules():
        if is_spiking_module(m) or isinstance(m, torch.nn.MaxPool2d):
            hs.append(m.register_forward_hook(lambda mod, a, o, n=n: rec.__setitem__(n, o.detach().double())))
    functional.reset_net(model)
    with torch.no_grad():
        y = model(x)
    for h in hs:
        h.remove()
    return y.double(), rec


for name in sys.argv[1].split(","):
    torch.manual_seed(0)
    net, shape = zoo.build(name)
    x = (torch.rand(shape) * 2).cuda()
    net = net.cuda()
    zoo.recalibrate(net, x)
    ref, rref = outs(copy.deepcopy(net), x)
    for mode in sys.argv[2].split(","):
        kw = {}
        if mode.endswith("-nopool"):
            from sparseflow_core.registry import _HANDLERS
            _HANDLERS[:] = [(c, h) for c, h in _HANDLERS if h.name != "maxpool2d"]
            mode = mode[:-7]
        opt = optimize(copy.deepcopy(net), x, mode=mode)
        functional.reset_net(opt)
        with torch.no_grad():
            opt(x)
        y, ro = outs(opt, x)
        err = float((y - ref).norm() / ref.norm())
        per_t = [float((y[t] - ref[t]).norm() / ref[t].norm().clamp_min(1e-9)) for t in range(y.shape[0])] if y.dim() >= 3 else []
        print(f"{name} mode={mode}{kw}: rel err {err:.2e} per t {['%.1e' % e for e in per_t]}", flush=True)
        first = None
        for n in rref:
            if n in ro and ro[n].shape == rref[n].shape:
                d = (ro[n] != rref[n]).double()
                if d.sum() > 0 and first is None:
                    first = n
                    flips_t = [float(d[t].mean()) for t in range(d.shape[0])] if d.dim() >= 4 else []
                    print(f"   first differing output: {n} flip rate {float(d.mean()):.2e} per t {flips_t[:4]}")
        paths = {}
        for n, m in opt.named_modules():
            p = getattr(m, "last_path", None)
            if p:
                paths[p] = paths.get(p, 0) + 1
        print("   paths", paths, flush=True)
