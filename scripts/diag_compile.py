"""Where a compiled optimized model first departs from the eager one (GPU diagnostic for
tests/gpu/test_gpu_compile.py): records every module's output, in call order, eagerly and under torch.compile, and
prints the first modules whose outputs differ.

    python scripts/diag_compile.py [model]      # default spikformer_ti, T=2, N=2, 64 px, fp16
"""

import copy
import sys

import torch

from sparseflow_bench.models import build_model, recalibrate_bn
from sparseflow_core import optimize, reset_states


def main(name="spikformer_ti"):
    torch.manual_seed(0)
    T, N, S = 2, 2, 64
    model = build_model(name, T=T, num_classes=10).cuda().eval()
    imgs = torch.rand(4, 3, S, S, device="cuda")
    recalibrate_bn(model, imgs, T)
    x = imgs[:N].unsqueeze(0).repeat(T, 1, 1, 1, 1).half()
    opt = optimize(copy.deepcopy(model).half(), x)
    rec = []

    def hook(mod, args, out, name=None):
        if isinstance(out, torch.Tensor):
            rec.append((name, out.detach().float().clone()))

    for n, m in opt.named_modules():
        if n:
            m.register_forward_hook(lambda mod, a, o, n=n: hook(mod, a, o, n))
    with torch.no_grad():
        reset_states(opt)
        opt(x)
        rec.clear()
        reset_states(opt)
        ref = opt(x).float()
        eager = list(rec)
        rec.clear()
        cm = torch.compile(opt)
        reset_states(opt)
        out = cm(x).float()
        comp = list(rec)
    print("logits max |diff|", float((out - ref).abs().max()), "eager records", len(eager), "compiled", len(comp))
    shown = 0
    for (ne, te), (nc, tc) in zip(eager, comp):
        same = ne == nc and te.shape == tc.shape and torch.equal(te, tc)
        if not same and shown < 12:
            d = float((te - tc).abs().max()) if te.shape == tc.shape else float("nan")
            print(f"DIFF {ne} | {nc} shape {tuple(te.shape)} max|diff| {d:.4g} "
                  f"frac {float((te != tc).float().mean()) if te.shape == tc.shape else -1:.3g}")
            shown += 1
    paths = {n: getattr(m, "last_path", None) for n, m in opt.named_modules() if getattr(m, "last_path", None)}
    print("paths", paths)


if __name__ == "__main__":
    main(*sys.argv[1:])
