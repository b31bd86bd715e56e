"""``sparseflow-bench``: the benchmark command (``nox -s bench`` runs it).

With a CUDA GPU it runs :mod:`sparseflow_bench.gpu_run` (per-layer fused and sparse tables, the batch sweep,
end-to-end models; JSON under ``--out``, then markdown tables and plots). Without one it says so and runs a
small CPU demo of ``optimize()``: it prints the report (what was fused or replaced, and why not) with the
element and block densities of every layer's input, and checks that the optimized model's output equals
the dense one.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch


def cpu_demo(model_name: str, T: int, batch: int, size: int, block_size) -> int:
    from sparseflow_core import optimize, reset_states

    from .data import natural_images, repeat_time
    from .models import build_model, recalibrate_bn

    t0 = time.time()
    print(f"CPU demo: {model_name}, T={T}, batch={batch}, {size}x{size} natural images from skimage.data, "
          "BatchNorm statistics recalibrated on them (no trained weights here).")
    model = build_model(model_name, T=T, num_classes=10)
    recalibrate_bn(model, natural_images(4, size, seed=0), T=T, batches=2)
    x = repeat_time(natural_images(batch, size, seed=1), T)
    dense = copy.deepcopy(model)
    opt, report = optimize(model, x, block_size=block_size, return_report=True)
    print(report.table())
    with torch.no_grad():
        reset_states(dense)
        reset_states(opt)
        a, b = dense(x), opt(x)
    err = float((a - b).abs().max())
    print(f"\nmax |optimized - dense| over the logits: {err:.3g} (CPU tensors run the dense torch ops; "
          "the Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 for the slow CPU interpreter)")
    print(f"demo took {time.time() - t0:.1f} s")
    return 0 if err == 0.0 else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="sparseflow-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model of the per-layer benchmarks (default spiking_resnet34; "
                   "CPU demo: spiking_resnet18)")
    p.add_argument("--models", default="spiking_resnet34,sew_resnet34,spikformer_ti", help="end-to-end models")
    p.add_argument("--T", type=int, default=4, help="time steps")
    p.add_argument("--batch", type=int, default=None, help="batch N (default 8; CPU demo 1)")
    p.add_argument("--size", type=int, default=None, help="image size (default 224; CPU demo 64)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="storage dtype of the per-layer SparseFlow timings")
    p.add_argument("--block-size", default=None, help="block size override (int or 'dense')")
    p.add_argument("--sections", default="layers,conv,e2e,sweep", help="GPU sections to run")
    p.add_argument("--out", default="benchmarks/results", help="output folder (JSON, markdown, PNG)")
    p.add_argument("--budget-s", type=float, default=540.0, help="GPU: stop starting new work after this")
    a = p.parse_args(argv)
    bs = a.block_size
    if bs is not None and bs != "dense":
        bs = int(bs)
    if not torch.cuda.is_available():
        print("No CUDA GPU on this machine: SparseFlow's timings need one (run `bash scripts/gpu_check.sh` there). "
              "Running the CPU demo of optimize() instead.\n")
        return cpu_demo(a.model or "spiking_resnet18", min(a.T, 2), a.batch or 1, a.size or 64, bs)
    from . import gpu_run, report

    args = ["--out", a.out, "--sections", a.sections, "--models", a.models, "--T", str(a.T),
            "--N", str(a.batch or 8), "--size", str(a.size or 224), "--budget-s", str(a.budget_s),
            "--model", a.model or "spiking_resnet34"]
    status = gpu_run.main(args)
    report.main([a.out])
    return status


if __name__ == "__main__":
    sys.exit(main())
