"""The README's status lines, read from the results files of one device folder (so they cannot contradict the
results table under them): where and when the figures were measured, the end-to-end speed-ups, the exactness of
``numerics="faithful"``, and where SparseFlow's kernels stay behind the dense libraries."""

from __future__ import annotations

import os

from .figures import load_json as _load
from .layout import result_envs as _envs


def measured_on(d: str) -> str | None:
    """"NVIDIA H100 80GB HBM3, 2026-11-25 to 2026-11-26" for the files of ``d`` (None without any)."""
    envs = _envs(d)
    if not envs:
        return None
    devices = sorted({str(e.get("device", "?")) for e in envs})
    dates = sorted({str(e.get("date", ""))[:10] for e in envs if e.get("date")})
    when = "" if not dates else dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    return ", ".join(devices) + (f", {when}" if when else "")


def _span(vals: list[float], f: str) -> str:
    lo, hi = min(vals), max(vals)
    return f"{lo:{f}}x" if f"{lo:{f}}" == f"{hi:{f}}" else f"{lo:{f}}-{hi:{f}}x"


def baseline_of(m: dict) -> tuple[float | None, str | None]:
    """The dense baseline of an ``e2e.json`` model entry: (ms, kind): the best of the dense fp16 runs
    (``baseline_ms``, ``baseline_kind``), or (``torch.compile`` fp16, None) in files that predate that."""
    if m.get("baseline_ms"):
        return m["baseline_ms"], m.get("baseline_kind")
    return m.get("compile_fp16_ms"), None


def status_lines(d: str, link_dir: str) -> list[str]:
    """Markdown bullet lines of the status, every figure read from ``d`` (``link_dir``: how the README names it)."""
    lines = []
    where = measured_on(d)
    if where:
        lines.append(f"* Measured on {where} (`{link_dir}/`; each file records its device, versions and date).")
    e2e = _load(d, "e2e.json") or {}
    models = {k: m for k, m in e2e.items() if not k.startswith("_") and isinstance(m, dict) and m.get("sparseflow_ms")}
    eager = {k: m["eager_fp32_ms"] / m["sparseflow_ms"] for k, m in models.items() if m.get("eager_fp32_ms")}
    # a speed-up over the best dense run only where every dense run was timed (``baseline_skipped``: one was not)
    base = {k: baseline_of(m) for k, m in models.items() if baseline_of(m)[0] and not m.get("baseline_skipped")}
    comp = {k: ms / models[k]["sparseflow_ms"] for k, (ms, _) in base.items()}
    kinds = sorted({kind for _, kind in base.values() if kind})
    if eager:
        txt = f"* End to end, fp16 + CUDA graph ({', '.join(models)}): {_span(list(eager.values()), '.1f')} over " \
              "SpikingJelly eager fp32"
        if comp:
            txt += f", {_span(list(comp.values()), '.2f')} over " + (
                f"the best dense fp16 run ({', '.join(kinds)})" if kinds else "`torch.compile` fp16")
            if len(comp) < len(models):
                txt += f" ({', '.join(comp)}; the others' dense runs were not all timed)"
        lines.append(txt + " (`e2e.json`).")
    ex = (_load(d, "exactness.json") or {}).get("models", {})
    if ex:
        exact = [k for k, m in ex.items() if all(m.get("faithful_bit_identical") or [False])]
        lines.append(f"* `numerics=\"faithful\"` (fp32) gives the dense fp32 model's logits bit for bit on three calls "
                     f"for {len(exact)} of {len(ex)} models ({', '.join(exact) or 'none'}; `exactness.json`).")
    fused = next((f for f in sorted(os.listdir(d)) if f.startswith("fused_") and f.endswith(".json")
                  and ((_load(d, f) or {}).get("summary") or {}).get("sum_speedup_vs_compile_graph")), None)
    if fused:
        s = _load(d, fused)["summary"]
        lines.append(f"* The {s['layers']} fused spiking layers of {s['model']}: "
                     f"{s['sum_speedup_vs_compile_graph']:.2f}x over `torch.compile` + CUDA graph fp16 in sum "
                     f"(`{fused}`).")
    dens = [r for r in ((_load(d, "density.json") or {}).get("rows") or []) if r.get("speedup_sparse_vs_baseline")]
    if dens:
        best = max(r["speedup_sparse_vs_baseline"] for r in dens)
        lines.append(f"* The standalone block-skipping kernels reach at most {best:.2f}x of cuDNN / cuBLAS fp16 on "
                     "synthetic spikes (`density.json`): the per-layer dispatch keeps the dense library where it is "
                     "faster.")
    return lines
