"""The GPU benchmark run (device machine): ``python -m sparseflow_bench.gpu_run --sections a,b,...``.

Runs the named sections of :mod:`sparseflow_bench.sections` on one :class:`~sparseflow_bench.sections.SectionContext`
(each writes its JSON as soon as it finishes): ``layers`` (every fused spiking layer of ``--model``), ``conv`` (its
standalone sparse convs), ``sweep`` (the fused layers' batch sweep), ``e2e`` (whole models), and any other
``sections/<name>.py`` (density, exactness, resnet_family, transformer, depthwise_transposed, deploy, profile).
``sparseflow-bench`` runs the same sections, then the report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from .sections import SectionContext, run_sections


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("SPARSEFLOW_RESULTS_DIR"),
                   help="results folder (default: benchmarks/results/<device>, see sparseflow_bench.layout)")
    p.add_argument("--sections", default="layers,conv,e2e,sweep")
    p.add_argument("--models", default="spiking_resnet34,sew_resnet34,spikformer_ti")
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--N", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--budget-s", type=float, default=540.0, help="stop starting new work after this")
    p.add_argument("--model", default="spiking_resnet34", help="model of the per-layer sections")
    p.add_argument("--dry", action="store_true", help="CPU smoke run of the code paths (interpreter)")
    a = p.parse_args(argv)
    deadline = time.time() + a.budget_s
    if not torch.cuda.is_available() and not a.dry:
        print("sparseflow_bench.gpu_run needs a CUDA GPU; on this machine run `nox -s bench` for the CPU demo.")
        return 2
    if a.out is None:
        from .layout import device_results_dir

        a.out = device_results_dir()  # benchmarks/results/cpu for a --dry run without a GPU (not committed)
    os.makedirs(a.out, exist_ok=True)
    ctx = context(a.out, a.dry, a.T, a.N, a.size, deadline, [m for m in a.models.split(",") if m], model=a.model)
    return run_sections([s for s in a.sections.split(",") if s], ctx)


def context(out: str, dry: bool, T: int, N: int, size: int, deadline: float, models: list, **kw) -> SectionContext:
    """The context of one run on this machine (its environment logged; cuDNN picks its fastest algorithms)."""
    from .timing import environment

    torch.backends.cudnn.benchmark = True
    env = environment()
    print(json.dumps(env), flush=True)
    return SectionContext(out, env, torch.device("cpu" if dry else "cuda"), dry, T, N, size, deadline, models, **kw)


if __name__ == "__main__":
    sys.exit(main())
