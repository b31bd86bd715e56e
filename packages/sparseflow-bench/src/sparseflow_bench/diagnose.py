"""``sparseflow-bench diagnose MODEL``: where an optimized model departs from the dense one (a GPU tool; without a
GPU it runs through Triton's interpreter, slowly: keep the shapes small).

For each weight seed (``--seeds``; default: the process's RNG state) and each ``optimize()`` mode (``--modes``),
with TF32 off: the output's relative error against the dense fp32 model, overall and per time step, beside how far
the dense model moves by itself when only its fp32 summation order changes (channels_last: another cuDNN
algorithm) and how far dense fp32 is from float64. Where the dense model's own reordering moves the output by far
more than 1e-3, the network amplifies rounding (spikes flipping at threshold ties) and no fp32 implementation can
be held to 1e-3. Then the first neuron or pooling layer whose output differs (its flip rate per time step) and the
kernel paths the optimized modules took. ``--compile``: also the first modules whose outputs differ between the
optimized model run eagerly and under ``torch.compile``.
"""

from __future__ import annotations

import argparse
import copy

import torch


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _outputs(model, x, keep=lambda m: True, call=None):
    """The model's output and, in call order, (name, output) of each module ``keep`` selects (``call``: what runs
    the model, e.g. its ``torch.compile``)."""
    from sparseflow_core import reset_states

    rec, hs = [], []
    for n, m in model.named_modules():
        if n and keep(m):
            hs.append(m.register_forward_hook(
                lambda mod, a, o, n=n: rec.append((n, o.detach().double().clone())) if torch.is_tensor(o) else None))
    reset_states(model)
    with torch.no_grad():
        y = (call or model)(x)
    for h in hs:
        h.remove()
    return y.double(), rec


def _first_differences(a: list, b: list, most: int = 1) -> list[dict]:
    """The first ``most`` modules (matched in call order) whose outputs differ: max |diff|, flips per time step."""
    out = []
    for (na, ta), (nb, tb) in zip(a, b):
        if na == nb and ta.shape == tb.shape and torch.equal(ta, tb):
            continue
        d = (ta != tb).double() if ta.shape == tb.shape else None
        out.append({"module": na if na == nb else f"{na} | {nb}", "shape": list(ta.shape),
                    "max_abs_diff": float((ta - tb).abs().max()) if d is not None else None,
                    "flip_rate": float(d.mean()) if d is not None else None,
                    "flip_rate_per_t": [float(d[t].mean()) for t in range(min(4, d.shape[0]))]
                    if d is not None and d.dim() >= 4 else []})
        if len(out) >= most:
            break
    return out


def _paths(model) -> dict:
    paths = {}
    for m in model.modules():
        if getattr(m, "last_path", None):
            key = f"{type(m).__name__}:{m.last_path}"
            paths[key] = paths.get(key, 0) + 1
    return paths


def diagnose(name: str, modes, seeds=(None,), T: int = 4, N: int = 2, size: int = 64, compile_: bool = False,
             device=None, log=print) -> list[dict]:
    """One dict per (seed, mode) with what the module docstring lists (also logged)."""
    from sparseflow_core import optimize
    from sparseflow_core.registry import is_spiking_module

    from .models import prepared_model

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    neurons = lambda m: is_spiking_module(m) or isinstance(m, torch.nn.MaxPool2d)
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    out = []
    try:
        for seed in seeds:
            if seed is not None:
                torch.manual_seed(seed)
            model, x = prepared_model(name, T, N, size, device, calib_images=8, num_classes=10)
            ref, ref_rec = _outputs(model, x, neurons)
            reordered = _rel(_outputs(copy.deepcopy(model).to(memory_format=torch.channels_last), x)[0], ref)
            f64 = _rel(ref, _outputs(copy.deepcopy(model).double(), x.double())[0])
            for mode in modes:
                opt = optimize(copy.deepcopy(model), x, mode=mode)
                _outputs(opt, x)  # the first call measures the paths
                y, rec = _outputs(opt, x, neurons)
                r = {"seed": seed, "mode": mode, "rel_err": _rel(y, ref),
                     "rel_err_per_t": [_rel(y[t], ref[t]) for t in range(y.shape[0])] if y.dim() >= 3 else [],
                     "dense_reordered_rel_err": reordered, "dense_fp32_vs_fp64": f64,
                     "first_difference": _first_differences(rec, ref_rec), "paths": _paths(opt)}
                if compile_:
                    compiled = torch.compile(opt)
                    r["compiled_vs_eager"] = _first_differences(_outputs(opt, x)[1],
                                                                _outputs(opt, x, call=compiled)[1], most=12)
                    log(f"seed {seed} mode {mode}: torch.compile against eager: {r['compiled_vs_eager']}")
                out.append(r)
                log(f"seed {seed} mode {mode}: rel err {r['rel_err']:.3g} (per t "
                    f"{[f'{e:.1e}' for e in r['rel_err_per_t']]}); dense fp32 reordered {reordered:.3g}, dense fp32 "
                    f"vs fp64 {f64:.3g}; first difference {r['first_difference']}; paths {r['paths']}")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="sparseflow-bench diagnose", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a benchmark model (sparseflow_bench.models), e.g. spiking_unet")
    p.add_argument("--modes", default="sparse,auto,dense", help="optimize() modes, comma-separated")
    p.add_argument("--seeds", default=None, help="weight seeds, comma-separated (default: none set)")
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--compile", action="store_true", help="also torch.compile of the optimized model against eager")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else [None]
    diagnose(a.model, [m for m in a.modes.split(",") if m], seeds, a.T, a.batch, a.size, a.compile)
    return 0
