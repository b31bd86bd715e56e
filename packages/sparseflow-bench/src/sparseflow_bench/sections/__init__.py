"""Pluggable sections of ``python -m sparseflow_bench.gpu_run``.

A module ``sections/<name>.py`` defining ``run(ctx: SectionContext) -> dict`` is run by
``gpu_run --sections <name>``. It times its ops against their dense baselines in the same run (use
``ctx.bench`` = ``timing.bench_ms``), writes its JSON with ``ctx.dump(filename, obj)`` (the environment is
added), checks ``ctx.left()`` before starting new work, and under ``ctx.dry`` (CPU, interpreter) runs every
code path once on tiny shapes without timing claims.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import time
from dataclasses import dataclass, field

import torch


@dataclass
class SectionContext:
    out_dir: str
    env: dict
    device: torch.device
    dry: bool
    T: int = 4
    N: int = 8
    size: int = 224
    deadline: float = float("inf")
    models: list = field(default_factory=list)

    def left(self) -> float:
        return self.deadline - time.time()

    def log(self, *a) -> None:
        print(*a, flush=True)

    def dump(self, name: str, obj) -> str:
        path = os.path.join(self.out_dir, name)
        with open(path, "w") as f:
            json.dump({**obj, "_env": self.env} if isinstance(obj, dict) else obj, f, indent=1, default=str)
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


def find_section(name: str):
    """The ``run`` function of ``sections/<name>.py``, or None."""
    try:
        mod = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{name}":
            return None
        raise
    return getattr(mod, "run", None)
