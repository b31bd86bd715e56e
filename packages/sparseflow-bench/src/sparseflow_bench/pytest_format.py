"""The records in pytest-benchmark's JSON layout: a file ``pytest-benchmark compare`` reads (times in seconds as
pytest-benchmark stores them, with ``q1``/``q3`` the p20/p80 of ``do_bench`` and min/max those same quantiles: the
raw samples are not kept), and records back from such a file."""

from __future__ import annotations

import datetime
import json
import os
import platform
from dataclasses import asdict, fields

from .records import Record


def _commit_info(root: str | None) -> dict:
    info = {"id": None, "time": None, "author_time": None, "dirty": None, "project": "sparseflow", "branch": None}
    try:
        import subprocess

        run = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=10,
                                        check=True).stdout.strip()
        info["id"] = run("rev-parse", "HEAD")
        info["branch"] = run("rev-parse", "--abbrev-ref", "HEAD")
        info["time"] = info["author_time"] = run("log", "-1", "--format=%cI")
        info["dirty"] = bool(run("status", "--porcelain", "--untracked-files=no"))
    except Exception:
        pass
    return info


def pytest_benchmark_dict(records: list[Record], root: str | None = None) -> dict:
    """The records in pytest-benchmark's JSON layout (one benchmark per record; seconds)."""
    benches = []
    for r in records:
        med = r.median_ms / 1e3
        q1 = (r.p20_ms if r.p20_ms is not None else r.median_ms) / 1e3
        q3 = (r.p80_ms if r.p80_ms is not None else r.median_ms) / 1e3
        stats = {"min": q1, "max": q3, "mean": med, "stddev": 0.0, "rounds": 1, "median": med, "iqr": q3 - q1,
                 "q1": q1, "q3": q3, "iqr_outliers": 0, "stddev_outliers": 0, "outliers": "0;0", "ld15iqr": q1,
                 "hd15iqr": q3, "ops": 1.0 / med, "total": med, "iterations": 1}
        params = {"shape": r.shape, "provider": r.provider}
        benches.append({
            "group": f"{r.section}:{r.model}" if r.model else r.section,
            "name": r.name, "fullname": f"{r.source}::{r.name}",
            "params": params, "param": f"{r.shape}-{r.provider}",
            "extra_info": {k: v for k, v in asdict(r).items() if k not in ("median_ms", "p20_ms", "p80_ms")}
            | {"stats_note": "from do_bench quantiles: q1/min = p20, q3/max = p80, mean = median"},
            "options": {"disable_gc": False, "timer": "triton.testing.do_bench_cudagraph", "min_rounds": 1,
                        "max_time": 0.0, "min_time": 0.0, "warmup": True},
            "stats": stats,
        })
    dev = next((r.device for r in records if r.device), "")
    ver = next((r.versions for r in records if r.versions), "")
    machine = {"node": platform.node(), "processor": platform.processor(), "machine": platform.machine(),
               "python_compiler": platform.python_compiler(), "python_implementation": platform.python_implementation(),
               "python_implementation_version": platform.python_version(), "python_version": platform.python_version(),
               "python_build": list(platform.python_build()), "release": platform.release(),
               "system": platform.system(), "cpu": {}, "gpu": dev, "versions": ver,
               "note": "machine fields describe where the report was generated; gpu/versions where it was measured"}
    try:
        from importlib.metadata import version

        pbv = version("pytest-benchmark")
    except Exception:
        pbv = "5.1.0"
    return {"machine_info": machine, "commit_info": _commit_info(root), "benchmarks": benches,
            "datetime": max((r.date for r in records if r.date), default="") or
            datetime.datetime.now(datetime.timezone.utc).isoformat(), "version": pbv}


def write_pytest_benchmark(records: list[Record], path: str, root: str | None = None) -> str:
    with open(path, "w") as f:
        json.dump(pytest_benchmark_dict(records, root), f, indent=1)
    return path


def read_pytest_benchmark(path: str) -> list[Record]:
    """Records back from :func:`write_pytest_benchmark`'s file (or any pytest-benchmark JSON: its medians)."""
    with open(path) as f:
        obj = json.load(f)
    out = []
    names = {f.name for f in fields(Record)}
    for b in obj.get("benchmarks", []):
        st = b["stats"]
        info = {k: v for k, v in (b.get("extra_info") or {}).items() if k in names}
        info.setdefault("source", os.path.basename(path))
        info.setdefault("section", b.get("group") or "")
        info.setdefault("op", b.get("name", ""))
        info.setdefault("shape", "")
        info.setdefault("provider", b.get("param") or "")
        ours = "stats_note" in (b.get("extra_info") or {})
        out.append(Record(median_ms=st["median"] * 1e3, p20_ms=st.get("q1", st["median"]) * 1e3 if ours else None,
                          p80_ms=st.get("q3", st["median"]) * 1e3 if ours else None, **info))
    return out
