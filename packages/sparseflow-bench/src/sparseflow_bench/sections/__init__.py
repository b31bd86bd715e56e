"""The benchmark sections: every figure SparseFlow reports comes from one of them.

A module ``sections/<name>.py`` defining ``run(ctx: SectionContext) -> dict`` is run by ``--sections <name>``
(``sparseflow-bench`` and ``python -m sparseflow_bench.gpu_run``, both through :func:`run_sections`). It times
its ops against their dense baselines in the same run (use ``ctx.bench`` = ``timing.bench_ms``), writes its JSON
with ``ctx.dump(filename, obj)`` (the environment is added), checks ``ctx.left()`` before starting new work, and
under ``ctx.dry`` (CPU, interpreter) runs every code path once on tiny shapes without timing claims.

Reading the results back (:mod:`sparseflow_bench.records`): :data:`RESULT_FILES` names the section that wrote
each results file. That section may map its JSON to the one row schema (:class:`sparseflow_bench.records.Row`)
with ``rows(obj, source)`` (else the generic mapping of ``records`` reads its ``rows``-like lists), and render its
markdown table with ``markdown(obj, d)`` (``sparseflow-bench report`` writes it beside the JSON).
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib
import json
import os
import time
import traceback
from dataclasses import dataclass, field

import torch


@dataclass
class SectionContext:
    """What one run gives its sections: where to write, the environment, the device, ``dry`` (CPU smoke run), the
    shapes and models, the deadline, and what the sections of the run share."""

    out_dir: str
    env: dict
    device: torch.device
    dry: bool
    T: int = 4
    N: int = 8
    size: int = 224
    deadline: float = float("inf")
    models: list = field(default_factory=list)
    model: str = "spiking_resnet34"  # the model of the per-layer sections (layers, sweep, conv)
    #: the profile section: storage dtype, optimize() block size and mode, the models, per-model image sizes
    dtype: str = "float16"
    block_size: int | str | None = None
    mode: str | None = None
    profile_models: list = field(default_factory=list)
    sizes: dict = field(default_factory=dict)
    #: what sections of one run share (the per-layer sections: one prepared model and its captured layers)
    cache: dict = field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - time.time()

    def log(self, *a) -> None:
        print(*a, flush=True)

    def dump(self, name: str, obj, env_key: str = "_env") -> str:
        """Write ``obj`` as ``out_dir/name`` with the environment under ``env_key`` (unless it holds it already)."""
        path = os.path.join(self.out_dir, name)
        if isinstance(obj, dict) and env_key not in obj:
            obj = {**obj, env_key: self.env}
        with open(path, "w") as f:
            json.dump(obj, f, indent=1, default=str)
        self.log(f"wrote {path}")
        return path

    def bench(self, fn, **kw) -> dict:
        from ..timing import bench_ms

        return bench_ms(fn, **kw)

    def write_text(self, name: str, text: str) -> str:
        """Write ``text`` (a section's markdown table) to ``out_dir/name``."""
        path = os.path.join(self.out_dir, name)
        with open(path, "w") as f:
            f.write(text)
        self.log(f"wrote {path}")
        return path

    def time_forwards(self, x, **models) -> dict:
        """``{"ms_<name>": median ms}`` of a no-grad forward of each model on ``x``, neurons reset before each
        forward (eager, no CUDA graph: what a user's plain call costs)."""
        out = {}
        for name, model in models.items():
            def forward(model=model):
                reset(model)
                with torch.no_grad():
                    return model(x)

            out[f"ms_{name}"] = self.bench(forward, graph=False, rep=20)["median"]
        return out


def reset(model) -> None:
    """SpikingJelly's ``functional.reset_net``: every neuron back to its initial state."""
    from spikingjelly.activation_based import functional

    functional.reset_net(model)


@contextlib.contextmanager
def strict_fp32():
    """No TF32 in cuDNN / cuBLAS inside the block: exactness checks compare against a true-fp32 dense model (cuDNN's
    default TF32 convolutions flip spikes at threshold by themselves), and fp32 baselines are IEEE fp32."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def section_module(name: str):
    """The module ``sections/<name>.py``, or None."""
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{name}":
            return None
        raise


def find_section(name: str):
    """The ``run`` function of ``sections/<name>.py``, or None."""
    return getattr(section_module(name), "run", None)


def run_sections(names, ctx: SectionContext, min_left: float = 0.0) -> int:
    """Run each named section on ``ctx`` in order (a failing section is reported and the next one runs; one
    that would start with less than ``min_left`` seconds left is skipped): 0, or 1 if any failed."""
    status = 0
    for name in names:
        t0 = time.time()
        if ctx.left() < min_left:
            ctx.log(f"{name}: skipped (budget)")
            continue
        try:
            run = find_section(name)
            if run is None:
                raise ValueError(f"unknown section {name!r} (no run() in sparseflow_bench/sections/{name}.py)")
            run(ctx)
        except Exception:
            traceback.print_exc()
            status = 1
        ctx.log(f"section {name}: {time.time() - t0:.1f} s")
    return status


#: which section wrote a results file (file-name patterns, the most specific first)
RESULT_FILES = (("fused_batch_sweep.json", "sweep"), ("fused_*.json", "layers"), ("sparse_conv_*.json", "conv"),
                ("e2e*.json", "e2e"), ("density.json", "density"), ("profile_*.json", "profile"),
                ("conv_shapes*.json", "shapes"), ("neuron_pool*.json", "neuron_pool"))


def writer_of(source: str):
    """The module of the section that wrote the results file named ``source``, or None."""
    for pattern, name in RESULT_FILES:
        if fnmatch.fnmatch(source, pattern):
            return section_module(name)
    return None
