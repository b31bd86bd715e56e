"""``--sections deploy``: ``sparseflow.export`` of the headline models and their SOP/energy profiles.

For spiking_resnet34, sew_resnet34 and spikformer_ti (fp16, ``ctx.T`` x ``ctx.N``, ``ctx.size`` px natural images,
recalibrated BatchNorm), while ``ctx.left()`` allows:

1. ``sparseflow.export`` -> ``<out>/deploy/<model>.pt2`` (or the reason it cannot be exported);
2. the package loaded in a fresh Python process that cannot import sparseflow, SpikingJelly or triton (an import
   hook refuses them), run on the saved input; its logits against the optimized model's (same run), and
   ``sys.modules`` checked for those packages afterwards;
3. the package against the optimized model replayed in a CUDA graph (``optimize(..., cuda_graph=True)``), both
   timed with ``triton.testing.do_bench`` on the same input in this process (and the package replayed in a
   CUDA graph, where it can be captured);
4. ``profile_<model>.json/.csv/.png`` with SOPs, firing rates, theoretical energy and NVML joules.

-> ``deploy.json`` (and the profiles). ``ctx.dry`` (CPU): tiny shapes, the exported program only, no package.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
import traceback

import torch

MODELS = ("spiking_resnet34", "sew_resnet34", "spikformer_ti")

# runs in a fresh interpreter: no sparseflow, SpikingJelly or triton may be imported, only torch
CHILD = r"""
import json, sys, time
BLOCKED = ("sparseflow", "spikingjelly", "triton")
# absent, as where only torch is installed: find_spec() gives None and an import raises ImportError
for name in ("sparseflow", "sparseflow_core", "sparseflow_ops", "sparseflow_kernels", "sparseflow_bench",
             "spikingjelly", "triton"):
    sys.modules[name] = None
sys.path = [p for p in sys.path if "sparseflow" not in p]
import torch
pkg, inp, outp = sys.argv[1:4]
x = torch.load(inp)
t0 = time.time()
try:
    import torch._inductor
    model = torch._inductor.aoti_load_package(pkg)
    loader = "torch._inductor.aoti_load_package"
    run = lambda x: model(x)
except ImportError as e:
    raw = torch._C._aoti.AOTIModelPackageLoader(pkg, "model", False, 1, -1)
    loader = f"torch._C._aoti.AOTIModelPackageLoader ({e})"
    run = lambda x: raw.run([x])[0]
load_s = time.time() - t0
with torch.no_grad():
    y = run(x)
    y2 = run(x)
torch.cuda.synchronize()
torch.save({"y": y.cpu(), "y2": y2.cpu()}, outp)
bad = sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0].startswith(BLOCKED))
print(json.dumps({"loader": loader, "load_s": load_s, "forbidden_modules": bad,
                  "sys_path_sparseflow": [p for p in sys.path if "sparseflow" in p]}))
"""


def compare_outputs(a: torch.Tensor, b: torch.Tensor) -> dict:
    """``a`` against the reference ``b``: largest difference, bit identity, every element within two fp16 units
    of rounding at ``b``'s magnitude, and the fraction of rows whose top class agrees."""
    a, b = a.float(), b.float()
    d = (a - b).abs()
    ulp = torch.finfo(torch.float16).eps * b.abs().clamp_min(1e-3)  # fp16 rounding at each logit's magnitude
    return {"max_abs_diff": float(d.max()), "bit_identical": bool(torch.equal(a, b)),
            "within_fp16_rounding": bool((d <= 2 * ulp).all()),
            "argmax_agree": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def run_in_fresh_process(pkg: str, x: torch.Tensor, work: str, timeout: float) -> tuple[dict, dict | None]:
    """Load the package ``pkg`` in a new interpreter where sparseflow, SpikingJelly and triton cannot be imported,
    run it twice on ``x``: (what the process reports: loader, load time, any of those modules imported; its
    outputs ``{"y", "y2"}``, or None with ``{"error": ...}``)."""
    inp, outp = os.path.join(work, "input.pt"), os.path.join(work, "child_out.pt")
    torch.save(x, inp)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", CHILD, pkg, inp, outp], capture_output=True,
                          text=True, timeout=timeout, env=env)
    if proc.returncode != 0:  # a crash (negative: the signal) prints the Python stack on stderr (faulthandler)
        return {"error": f"exit status {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}"}, None
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    return info, torch.load(outp)


def _one(ctx, name: str, work: str) -> dict:
    from sparseflow_core import export, optimize

    from ..models import prepared_model
    from ..timing import graph_of

    r: dict = {"model": name}
    T, N, size = (1, 1, 32) if ctx.dry else (ctx.T, ctx.N, ctx.size)
    model, x = prepared_model(name, T, N, size, ctx.device)
    x16 = x.half()
    pkg = None if ctx.dry else os.path.join(work, f"{name}.pt2")
    t0 = time.time()
    try:
        res = export(copy.deepcopy(model), x16, pkg, dtype=torch.float16)
    except Exception as e:
        r["export_error"] = f"{type(e).__name__}: {e}"[:1500]
        traceback.print_exc()
        return r
    r["export_s"] = time.time() - t0
    r["sparseflow_ops"] = res.meta["sparseflow_ops"]
    r["other_ops"] = {k: v for k, v in res.ops.items() if not k.startswith(("sparseflow::", "aten::"))}
    r["program_max_abs_diff_vs_optimized"] = res.max_abs_diff
    r["frozen_inputs"] = res.inputs
    if pkg is None:
        return r
    r["package"] = pkg
    r["package_mb"] = os.path.getsize(pkg) / 2**20
    opt = res.model
    graph = optimize(opt, x16, cuda_graph=True)  # the same optimized model, replayed (starts from reset neurons)
    with torch.no_grad():
        for _ in range(4):
            ref = graph(x16)
        ref = ref.clone()
        info, child = run_in_fresh_process(pkg, x16, work, timeout=max(30.0, min(120.0, ctx.left())))
        r["fresh_process"] = info
        if child is not None:
            r["fresh_process_vs_optimized"] = compare_outputs(child["y"], ref.cpu())
            r["fresh_process_repeatable"] = bool(torch.equal(child["y"], child["y2"]))
        loaded = torch._inductor.aoti_load_package(pkg)
        y = loaded(x16)
        r["package_vs_optimized"] = compare_outputs(y, ref)
        r["ms_optimized_cuda_graph"] = ctx.bench(lambda: graph(x16), graph=False, rep=100)["median"]
        r["ms_package"] = ctx.bench(lambda: loaded(x16), graph=False, rep=100)["median"]
        cap = graph_of(loaded, x16)
        if cap is not None:
            r["ms_package_cuda_graph"] = ctx.bench(cap[0], graph=False, rep=100)["median"]
            r["package_cuda_graph_vs_optimized"] = compare_outputs(cap[1], ref)
        best = min(v for k, v in r.items() if k.startswith("ms_package"))
        r["package_vs_cuda_graph_time_ratio"] = best / r["ms_optimized_cuda_graph"]
        r["within_5_percent_or_faster"] = r["package_vs_cuda_graph_time_ratio"] <= 1.05
    return r


def run(ctx) -> dict:
    from .profile import profile_model

    work = os.path.join(ctx.out_dir, "deploy")
    os.makedirs(work, exist_ok=True)
    models = list(ctx.models or MODELS)
    out: dict = {"T": ctx.T, "N": ctx.N, "size": ctx.size, "dtype": "float16", "models": {}, "profiles": {}}
    for name in models:
        if ctx.left() < 30:
            out["models"][name] = {"skipped": "time budget"}
            continue
        try:
            out["models"][name] = _one(ctx, name, work)
        except Exception as e:
            traceback.print_exc()
            out["models"][name] = {"error": f"{type(e).__name__}: {e}"[:1500]}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        ctx.dump("deploy.json", out)
    for name in models:
        if ctx.left() < 20:
            out["profiles"][name] = {"skipped": "time budget"}
            continue
        try:
            T, N, size = (1, 1, 32) if ctx.dry else (ctx.T, ctx.N, ctx.size)
            _, prof = profile_model(name, T, N, size, torch.float16 if not ctx.dry else torch.float32, None,
                                    ctx.device, ctx.out_dir, reps=3)
            out["profiles"][name] = {k: v for k, v in prof.to_dict().items() if k != "layers"}
        except Exception as e:
            traceback.print_exc()
            out["profiles"][name] = {"error": f"{type(e).__name__}: {e}"[:800]}
        ctx.dump("deploy.json", out)
    return out
