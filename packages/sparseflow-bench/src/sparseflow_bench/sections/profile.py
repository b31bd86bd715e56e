"""``--sections profile``: ``sparseflow.profile`` of each model of ``ctx.profile_models`` (``optimize()`` at
``ctx.dtype`` / ``ctx.block_size`` / ``ctx.mode``): per-layer latency against each layer's dense op, densities,
SOPs and energy. -> ``profile_<model>.json``, ``.csv`` and ``.png`` per model (``--dry``: fp32, T=2, 32 px at most,
the torch paths).
"""

from __future__ import annotations

import json
import os
import traceback

import torch

from ..records import Row, Timing

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def profile_model(model_name: str, T: int, batch: int, size: int, dtype: torch.dtype, block_size, device,
                  out: str | None, reps: int = 5, mode: str = "auto"):
    """optimize() ``model_name`` (at ``dtype``, ``block_size``, ``mode``), profile it against each layer's dense
    op; save ``profile_<model>.json``/``.csv``/``.png`` into ``out`` (with the environment) when given. On a GPU
    the optimized model is wrapped in its CUDA graph: the layers are timed eagerly (hooks), the whole forward's
    time and NVML energy are those of the replayed graph, as inference runs it (``whole_forward`` says which)."""
    from sparseflow_core import optimize, profile

    from ..models import prepared_model

    model, x = prepared_model(model_name, T, batch, size, device, calib_images=4,
                              num_classes=10 if device.type == "cpu" else 1000)
    if dtype != torch.float32:
        x = x.to(dtype)
    graph = device.type == "cuda"
    opt, report = optimize(model, x, block_size=block_size, dtype=dtype if dtype != torch.float32 else None,
                           mode=mode, cuda_graph=graph, return_report=True)
    prof = profile(opt, x, reps=reps, block_size=block_size if isinstance(block_size, int) else None, dense=True)
    if out:
        from ..timing import environment

        os.makedirs(out, exist_ok=True)
        d = prof.to_dict()
        d.update({"model": model_name, "T": T, "N": batch, "size": size, "dtype": str(dtype).removeprefix("torch."),
                  "block_size": block_size, "whole_forward": "cuda graph replay" if graph else "eager",
                  "_env": environment()})
        if graph:
            d["graph_calls"] = dict(opt.calls)
        with open(os.path.join(out, f"profile_{model_name}.json"), "w") as f:
            json.dump(d, f, indent=1, default=str)
        prof.save(os.path.join(out, f"profile_{model_name}.csv"))
        try:  # firing rate and SOPs per layer
            from sparseflow_core.sops import plot_layers

            plot_layers(prof, os.path.join(out, f"profile_{model_name}.png"))
        except ImportError:
            pass
    return report, prof


def run(ctx) -> dict:
    out, failed = {}, []
    for name in ctx.profile_models or ctx.models:
        if ctx.left() < (10 if ctx.dry else 40):
            ctx.log(f"profile {name}: skipped (budget)")
            failed.append(name)
            continue
        size = min(ctx.sizes.get(name, ctx.size), 32) if ctx.dry else ctx.sizes.get(name, ctx.size)
        try:
            _, prof = profile_model(name, 2 if ctx.dry else ctx.T, 1 if ctx.dry else ctx.N, size,
                                    torch.float32 if ctx.dry else DTYPES[ctx.dtype], ctx.block_size, ctx.device,
                                    ctx.out_dir, reps=1 if ctx.dry else 5,
                                    mode="torch" if ctx.dry else (ctx.mode or "auto"))  # dry: torch ops
            ctx.log(f"sparseflow.profile of {name} ({size} px):")
            ctx.log(prof.table())
            out[name] = prof
        except Exception as e:
            traceback.print_exc()
            ctx.log(f"profile {name}: {type(e).__name__}: {e}")
            failed.append(name)
    if failed:
        raise RuntimeError(f"profile: no profile of {', '.join(failed)}")
    return out


def rows(obj, source):
    """Per SparseFlow layer its CUDA-event time and its dense op's, and the whole forward."""
    model = str(obj.get("model") or os.path.splitext(source)[0].removeprefix("profile_"))
    dtype = str(obj.get("dtype") or "")
    for e in obj["layers"]:
        if e.get("dense_ms") is None:
            continue  # only layers with both timings: the SparseFlow modules
        yield Row("profile", e.get("type", ""), [Timing("dense_op", e.get("dense_ms"), "baseline"),
                                                 Timing("sparseflow", e.get("ms"), "sparseflow")],
                  shape=e.get("in_shape"), model=model, layer=e.get("name", ""), dtype=dtype, baseline="dense_op",
                  elem_density=e.get("elem_density"), block_density=e.get("block_density"),
                  block_size=e.get("block_size"))
    T, N, size = obj.get("T"), obj.get("N"), obj.get("size")
    yield Row("profile", "model_forward", [Timing("sparseflow_profiled", obj.get("forward_ms"))],
              shape=[T, N, 3, size, size] if None not in (T, N, size) else "", model=model, dtype=dtype)
