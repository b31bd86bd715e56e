"""Where the GPU time of one optimized forward goes (kernel by kernel), next to the dense compiled model.

    python scripts/profile_e2e.py [--models spiking_resnet34] [--out DIR]

Runs on a CUDA machine: builds each model (T=4, N=8, 224 px natural images, recalibrated BatchNorm), optimizes a
copy in fp16, and records torch.profiler kernel times over 5 forwards of (a) the optimized model, (b) the dense
fp16 channels_last model under torch.compile (default mode: same kernels as reduce-overhead, without graphs).
Writes kernels/<model>.txt (top kernels by CUDA time) and kernels/<model>.json (per-forward totals) into DIR.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch


def kernel_table(fn, steps=5):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append((e.key, t / steps / 1e3, e.count // steps))
    rows.sort(key=lambda r: -r[1])
    return rows


def copy_add_table(fn, steps=3):
    """The elementwise adds and copies of one forward, by input shapes (which layer left a layout change)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key in ("aten::add", "aten::add_", "aten::copy_"):
            t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            if t > 0:
                rows.append((e.key, str(e.input_shapes)[:120], t / steps / 1e3, e.count // steps))
    rows.sort(key=lambda r: -r[2])
    return rows


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="spiking_resnet34")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = p.parse_args(argv)
    from sparseflow_bench.models import prepared_model
    from sparseflow_core import optimize, reset_states

    for name in a.models.split(","):
        model, x = prepared_model(name, 4, 8, 224, torch.device("cuda"))
        out = {}
        lines = []
        with torch.no_grad():
            opt = optimize(copy.deepcopy(model), x.half(), dtype=torch.float16)
            x16 = x.half()
            for _ in range(3):
                reset_states(opt)
                opt(x16)

            def f_opt():
                reset_states(opt)
                return opt(x16)

            from sparseflow_kernels import dispatch as kdispatch
            from sparseflow_ops import SparseModule

            out["paths"] = [{"module": n, "type": type(m).__name__, "kind": m.kind() if hasattr(m, "kind") else "",
                             "path": getattr(m, "last_path", None)}
                            for n, m in opt.named_modules() if isinstance(m, SparseModule)]
            out["dispatch_ms"] = [{"key": str(k)[:300], "ms": v} for k, v in kdispatch.timings().items()]
            lines.append(f"== {name}: paths the dispatch chose")
            lines += [f"  {r['module']:40s} {r['kind']:38s} {r['path']}" for r in out["paths"]]
            lines.append(f"== {name}: dispatch timings (ms, in a CUDA graph)")
            lines += [f"  {r['key'][:150]}\n      " + ", ".join(f"{c}={t:.4f}" for c, t in r["ms"].items())
                      for r in out["dispatch_ms"]]
            lines.append(f"== {name}: adds and copies of the optimized fp16 forward (ms per forward)")
            lines += [f"  {ms:8.4f} ms {c:4d}x {k} {shapes}" for k, shapes, ms, c in copy_add_table(f_opt)]
            m16 = copy.deepcopy(model).half().to(memory_format=torch.channels_last)
            cm = torch.compile(m16)

            def f_c():
                reset_states(m16)
                return cm(x16)

            for _ in range(3):
                f_c()
            for tag, fn in (("sparseflow_fp16", f_opt), ("compile_fp16", f_c)):
                rows = kernel_table(fn)
                tot = sum(r[1] for r in rows)
                n = sum(r[2] for r in rows)
                out[tag] = {"gpu_ms_per_forward": tot, "kernels_per_forward": n,
                            "top": [{"kernel": k[:160], "ms": ms, "calls": c} for k, ms, c in rows[:40]]}
                lines.append(f"== {name} {tag}: {tot:.3f} ms GPU per forward, {n} kernels")
                for k, ms, c in rows[:40]:
                    lines.append(f"{ms:8.4f} ms {c:5d}x  {k[:150]}")
        txt = "\n".join(lines)
        print(txt, flush=True)
        kdir = os.path.join(a.out, "kernels")  # beside the report's files (profile_<model>.json is the profiler's)
        os.makedirs(kdir, exist_ok=True)
        with open(os.path.join(kdir, f"{name}.txt"), "w") as f:
            f.write(txt + "\n")
        with open(os.path.join(kdir, f"{name}.json"), "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
