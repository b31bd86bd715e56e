"""``sparseflow-bench``: the benchmark command (``nox -s bench`` runs it).

    sparseflow-bench [run options]                       benchmarks (GPU) or the CPU demo, then the report
    sparseflow-bench report --results DIR [--readme F]   long-format CSV, pytest-benchmark JSON, plots, tables
    sparseflow-bench compare NEW OLD [--threshold 0.05]  regression guard: exit 1 on a slow-down > threshold
    sparseflow-bench eval --model M --data D [...]       a data set through the optimized model (torchrun: many
                                                         GPUs; see docs/distributed.md)
    sparseflow-bench diagnose MODEL [--modes ...]        where an optimized model departs from the dense one

With a CUDA GPU, ``run`` executes the sections given in --sections (:mod:`sparseflow_bench.sections`: per-layer
fused and standalone-conv tables, the batch sweep, end-to-end models, the density sweep, ...; each against its
dense baseline in the same run), then the ``profile`` section (--model, or the end-to-end and other benchmark
models, optimized at --dtype/--block-size, with ``sparseflow.profile``: per-layer latency against each layer's
dense op, densities, energy), then writes the report into --out (default ``benchmarks/results/<device>/``, see
:mod:`sparseflow_bench.layout`): ``results.csv``, markdown tables and PNG plots. A progress bar follows the
steps. Without a GPU it runs the CPU demo (:mod:`sparseflow_bench.demo`): SparseFlow's kernels through Triton's
interpreter on a small spiking CNN, what ``optimize()`` fused, made sparse or left (and why), firing rates,
element and block densities and kernel paths per layer, and the optimized model's outputs against the dense
model's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from .sections.profile import DTYPES

E2E_MODELS = "spiking_resnet34,sew_resnet34,spikformer_ti"
# Profiled after the end-to-end models in the default run: the other benchmark models (per-layer tables and bars).
# The spiking MobileNetV2 is left to `--sections depthwise_transposed` (its per-layer table and bars): its many
# depthwise shapes compile for over a minute, past what a 10-minute GPU call leaves after the models above.
OTHER_MODELS = ("spiking_resnet50", "sdt_8_384", "spiking_unet")
PROFILE_SIZE = {"spiking_unet": 128}  # the U-Net's default input (224 px gives it 4 levels of mostly empty maps)


class _Steps:
    """A progress bar over named steps (tqdm when installed, else one line per step)."""

    def __init__(self, names: list[str], enabled: bool = True):
        self.names, self.t0, self.bar = names, time.time(), None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=len(names), unit="step", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass
        self.i = 0

    def start(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_description(name)
        else:
            print(f"[{self.i + 1}/{len(self.names)} {time.time() - self.t0:6.1f} s] {name}", flush=True)

    def done(self) -> None:
        self.i += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _block_size(v: str | None):
    if v is None or v == "dense":
        return v
    try:
        bs = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"block size must be an integer or 'dense', got {v!r}") from None
    if bs < 1:
        raise argparse.ArgumentTypeError(f"block size must be positive, got {bs}")
    return bs


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparseflow-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model of the per-layer benchmarks and of the profile (default "
                   "spiking_resnet34; CPU demo: demo_cnn, a small spiking CNN)")
    p.add_argument("--models", default=E2E_MODELS, help="end-to-end models (comma-separated)")
    p.add_argument("--profile-models", default=None,
                   help="models profiled with sparseflow.profile (comma-separated; default: --model if given, else "
                   f"the end-to-end models then {', '.join(OTHER_MODELS)})")
    p.add_argument("--T", type=int, default=None, help="time steps (default 4; CPU demo 2)")
    p.add_argument("--batch", type=int, default=None, help="batch N (default 8; CPU demo 1)")
    p.add_argument("--size", type=int, default=None, help="image size (default 224; CPU demo 16)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="GPU: storage dtype of the profiled model (default float16; the gpu_run sections time fp16 "
                   "and fp32 themselves)")
    p.add_argument("--mode", default=None, choices=["auto", "sparse", "dense", "torch"],
                   help="optimize()'s mode (default: auto on the GPU, which times each layer's paths; sparse in the "
                   "CPU demo, whose interpreted kernels give no timings to choose by)")
    p.add_argument("--block-size", type=_block_size, default=None,
                   help="block size of optimize() and of the profile's block densities: an integer or 'dense' "
                   "(default: per layer, from its feature-map size)")
    p.add_argument("--sections", default="density,e2e",
                   help="GPU sections, comma-separated (default: the per-op density sweep and the end-to-end "
                   "models; then the profile of every --profile-models model unless --no-profile): layers, conv, "
                   "sweep (the fused spiking layers of --model one by one, its standalone sparse convs, the fused "
                   "layers' batch sweep), e2e, density, exactness, resnet_family, transformer, depthwise_transposed "
                   "(any sections/<name>.py)")
    p.add_argument("--results-root", default=None, help="folder of the per-device results folders (default "
                   "benchmarks/results); the CPU demo shows the newest of them")
    p.add_argument("--out", default=None, help="output folder of the GPU run: JSON, CSV, markdown, PNG (default "
                   "<results root>/<device>, e.g. benchmarks/results/h200)")
    p.add_argument("--demo-out", default=None, help="CPU demo: write its profile (JSON, CSV) here (default: nothing "
                   "is written)")
    p.add_argument("--budget-s", type=float, default=540.0, help="GPU: stop starting new work after this many s")
    p.add_argument("--no-profile", action="store_true", help="GPU: skip the sparseflow.profile step")
    p.add_argument("--no-report", action="store_true", help="GPU: skip the report step")
    p.add_argument("--readme", default=None, help="GPU: also regenerate the Results block of this README")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dry", action="store_true", help="run the GPU code paths on the CPU on tiny shapes "
                   "(interpreter; smoke test, no timing claims)")
    return p


def run(argv=None) -> int:
    a = _run_parser().parse_args(argv)
    if (a.T is not None and a.T < 1) or (a.batch is not None and a.batch < 1) or (a.size is not None and a.size < 8):
        print("sparseflow-bench: --T and --batch must be >= 1, --size >= 8", file=sys.stderr)
        return 2
    from .layout import RESULTS_ROOT, device_results_dir

    root = a.results_root or RESULTS_ROOT
    if not torch.cuda.is_available() and not a.dry:
        from .demo import DEMO_MODEL, run_demo

        print("No CUDA GPU on this machine: running the CPU demo (the benchmarks need a GPU; on a GPU machine "
              "`nox -s bench` runs them and writes the results, plots and the README's results block).\n",
              flush=True)
        return run_demo(a.T or 2, a.batch or 1, a.size or 16, a.block_size, a.mode or "sparse",
                        a.model or DEMO_MODEL, a.demo_out, root, log=lambda *x: print(*x, flush=True))
    from . import report
    from .gpu_run import context
    from .sections import run_sections

    out = a.out or device_results_dir(root)
    os.makedirs(out, exist_ok=True)
    models = [m for m in a.models.split(",") if m]
    if a.profile_models is not None:
        profile_models = [m for m in a.profile_models.split(",") if m]
    elif a.model:
        profile_models = [a.model]
    else:
        profile_models = list(dict.fromkeys(models + list(OTHER_MODELS)))
    steps = [s for s in a.sections.split(",") if s and s != "profile"]
    steps += ([] if a.no_profile else ["profile"]) + ([] if a.no_report else ["report"])
    ctx = context(out, a.dry, a.T or 4, a.batch or 8, a.size or 224, time.time() + a.budget_s, models,
                  model=a.model or "spiking_resnet34", dtype=a.dtype or "float16", block_size=a.block_size,
                  mode=a.mode, profile_models=profile_models, sizes={} if a.size else dict(PROFILE_SIZE))
    bar = _Steps(steps, not a.no_progress)
    status = 0
    for name in steps:
        bar.start(name)
        if name != "report":
            status |= run_sections([name], ctx, min_left=0 if name == "profile" else 20)
        elif a.readme and a.dry:
            print(f"report: {a.readme} left as it is (a --dry run has no timings to show)", flush=True)
            report.build(out)
        else:
            report.build(out, a.readme)
        bar.done()
    bar.close()
    return status


def _use_interpreter(from_command_line: bool, argv: list[str]) -> None:
    """Without a CUDA GPU, run SparseFlow's kernels through Triton's CPU interpreter: ``TRITON_INTERPRET=1`` must
    be set before triton is imported (it decides at each kernel's definition). If triton is already loaded, a
    command-line call starts itself again with the variable set."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or torch.cuda.is_available():
        return
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
        return
    if from_command_line:
        os.environ["TRITON_INTERPRET"] = "1"
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "sparseflow_bench.cli", *argv])
    print("sparseflow-bench: triton was imported before TRITON_INTERPRET=1 was set, so CPU tensors run the dense "
          "torch ops, not SparseFlow's kernels; set TRITON_INTERPRET=1 before importing triton", file=sys.stderr)


def main(argv=None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        from . import report

        return report.main(argv[1:])
    if argv and argv[0] == "compare":
        from . import compare

        return compare.main(argv[1:])
    if argv and argv[0] == "eval":
        from . import evaluate

        return evaluate.main(argv[1:])
    if argv and argv[0] == "diagnose":
        _use_interpreter(from_command_line, argv)
        from . import diagnose

        return diagnose.main(argv[1:])
    if argv and argv[0] == "run":
        argv = argv[1:]
    if "--dry" in argv:  # the kernels run on the CPU through Triton's interpreter (chosen before triton loads)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    _use_interpreter(from_command_line, argv)
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
