"""Every results JSON of ``gpu_run`` as one long table: one record per (file, op, shape, provider) timing.

``collect(results_dir)`` reads every ``*.json`` in the folder (not recursively) and turns what it recognizes
into :class:`Record` rows: the files of the original sections (``fused_<model>.json``,
``fused_batch_sweep.json``, ``sparse_conv_<model>.json``, ``e2e*.json``, ``density.json``, ``profile_<model>.json``)
through their own readers, and any
other file (a new ``sections/<topic>.py``) through a generic reader of ``rows``-like lists: each row's
``*_ms`` numbers (or ``{"median", "p20", "p80"}`` dicts from ``ctx.bench``) become providers, ``op`` /
``layer`` / ``name`` its op, ``shape`` its shape, ``elem_density`` (or ``density``) and the first
``block_density*`` key its densities. A file it cannot read is skipped with a message, never an error.

Writers: :func:`write_csv` (the long-format CSV, :data:`CSV_COLUMNS`) and :func:`write_pytest_benchmark`
(a file ``pytest-benchmark compare`` reads; times in seconds as pytest-benchmark stores them, with
``q1``/``q3`` the p20/p80 of ``do_bench`` and min/max those same quantiles: the raw samples are not kept).
"""

from __future__ import annotations

import csv
import datetime
import glob
import json
import os
import platform
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields

#: roles: "baseline" (the dense op SparseFlow is measured against), "sparseflow" (what SparseFlow runs, the
#: dispatch's pick), "sparse" (a block-skipping kernel forced on), "reference" (other timings)
ROLES = ("baseline", "sparseflow", "sparse", "reference")


@dataclass
class Record:
    source: str
    section: str
    op: str
    shape: str
    provider: str
    median_ms: float
    p20_ms: float | None = None
    p80_ms: float | None = None
    elem_density: float | None = None
    block_density: float | None = None
    block_size: int | None = None
    model: str = ""
    layer: str = ""
    dtype: str = ""
    role: str = "reference"
    baseline: str = ""
    device: str = ""
    versions: str = ""
    date: str = ""

    @property
    def key(self) -> tuple:
        """What identifies one timing across runs (the regression guard matches records by it)."""
        return (self.section, self.model, self.layer, self.op, self.shape, self.provider)

    @property
    def name(self) -> str:
        where = ".".join(p for p in (self.model, self.layer) if p) or self.op
        return f"{self.section}::{where}[{self.shape}]::{self.provider}"


CSV_COLUMNS = [f.name for f in fields(Record)]


# ------------------------------------------------------------------------------------------- helpers
def _shape(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (list, tuple)):
        return "x".join(str(int(s)) if isinstance(s, (int, float)) else str(s) for s in v)
    return str(v)


def _env(obj: dict) -> dict:
    env = obj.get("_env") or obj.get("env")
    if isinstance(env, dict):
        return env
    return {k: obj[k] for k in ("device", "torch", "triton", "date") if isinstance(obj.get(k), str)}


def _versions(env: dict) -> str:
    parts = [f"{k} {env[k]}" for k in ("torch", "triton", "cuda") if env.get(k)]
    if env.get("driver"):
        parts.append(f"driver {env['driver']}")
    return "; ".join(parts)


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _timing(v) -> tuple[float, float | None, float | None] | None:
    """(median, p20, p80) from a number or a ``ctx.bench`` dict; None if it is neither."""
    if isinstance(v, dict) and _num(v.get("median")) is not None:
        return float(v["median"]), _num(v.get("p20")), _num(v.get("p80"))
    n = _num(v)
    return None if n is None else (n, None, None)


class _Builder:
    def __init__(self, source: str, section: str, env: dict):
        self.common = {"source": source, "section": section, "device": env.get("device", ""),
                       "versions": _versions(env), "date": str(env.get("date", ""))}
        self.out: list[Record] = []

    def add(self, provider: str, t, **kw) -> None:
        tm = _timing(t)
        if tm is None or not tm[0] > 0:  # None, NaN, 0 or negative: not a timing
            return
        self.out.append(Record(provider=provider, median_ms=tm[0], p20_ms=tm[1], p80_ms=tm[2], **self.common, **kw))


def _block_size_of_key(key: str) -> int | None:
    m = re.search(r"(\d+)x\1", key)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------------------------------- readers
def _read_fused_layers(source, obj):
    s, env = obj["summary"], _env(obj)
    b = _Builder(source, "fused_layers", env)
    model = s.get("model", "")
    for r in obj["rows"]:
        common = dict(op="spiking_conv2d", shape=_shape(r.get("shape")), elem_density=r.get("elem_density"),
                      block_density=r.get("block_density_8x8_16ch_halo"), block_size=8, model=model,
                      layer=r.get("layer", ""), baseline="compile_graph_fp16")
        b.add("compile_graph_fp16", r.get("compile_graph_fp16_ms"), role="baseline", dtype="float16", **common)
        b.add("eager_fp32", r.get("eager_fp32_ms"), dtype="float32", **common)
        b.add("sparseflow", r.get("sparseflow_ms"), role="sparseflow", dtype="float16", **common)
        for cand, ms in (r.get("candidates_ms") or {}).items():
            b.add(f"path:{cand}", ms, role="sparse" if "sparse" in cand else "reference", dtype="float16", **common)
    return b.out


def _read_batch_sweep(source, obj):
    b = _Builder(source, "batch_sweep", _env(obj))
    for r in obj["rows"]:
        common = dict(op="spiking_conv2d", shape=_shape([r.get("T"), r.get("N"), r.get("C"), r.get("H"), r.get("H")]),
                      elem_density=r.get("elem_density"), block_density=r.get("work_fraction"), block_size=8,
                      model=f"{r.get('size')}px", layer=r.get("layer", ""), dtype="float16",
                      baseline="fused_dense_same_cfg")
        b.add("fused_dense_same_cfg", r.get("fused_dense_same_cfg_ms"), role="baseline", **common)
        b.add("fused_dense_best_cfg", r.get("fused_dense_best_cfg_ms"), **common)
        b.add("fused_sparse_with_prescan", r.get("fused_sparse_with_prescan_ms"), role="sparse", **common)
        b.add("fused_sparse_kernel_only", r.get("fused_sparse_kernel_only_ms"), **common)
        b.add("prescan", r.get("prescan_ms"), **common)
    return b.out


def _read_density(source, obj):
    """``density.json`` (``sections/density.py``): per op and spike pattern the sparse kernel (prescan included),
    the same kernel over every block, and the dense baseline (cuDNN fp16 channels_last for convs, cuBLAS fp16 for
    the GEMM); each (pattern, density) is its own row (``layer``), so speed-ups stay apart by density."""
    b = _Builder(source, "density", _env(obj))
    for r in obj["rows"]:
        base = "cublas_fp16" if r.get("op") == "linear" else "cudnn_fp16_cl"
        common = dict(op=str(r.get("op", "")), shape=_shape(r.get("shape")), elem_density=_num(r.get("elem_density")),
                      block_density=_num(r.get("block_density")), block_size=8 if r.get("op") != "linear" else None,
                      model="synthetic", layer=f"{r.get('pattern')}@{r.get('target_density')}", dtype="float16",
                      baseline=base)
        b.add(base, r.get("baseline_ms"), role="baseline", **common)
        b.add("sparse_fp16", r.get("sparse_ms"), role="sparse", **common)
        b.add("dense_kernel_fp16", r.get("dense_kernel_ms"), **common)
    return b.out


def _read_sparse_conv(source, obj):
    b = _Builder(source, "sparse_conv", _env(obj))
    model = os.path.splitext(source)[0].removeprefix("sparse_conv_")
    for r in obj["rows"]:
        bs = r.get("block_size", 8)
        common = dict(op="conv2d", shape=_shape(r.get("shape")), elem_density=r.get("elem_density"),
                      block_density=r.get(f"block_density_{bs}x{bs}_16ch_halo"), block_size=bs, model=model,
                      layer=r.get("layer", ""), baseline="cudnn_fp16_cl")
        b.add("cudnn_fp16_cl", r.get("cudnn_fp16_cl_ms"), role="baseline", dtype="float16", **common)
        b.add("cudnn_fp32", r.get("cudnn_fp32_ms"), dtype="float32", **common)
        b.add("sparse_fp16", r.get("sparse_fp16_ms"), role="sparse", dtype="float16", **common)
        b.add("dense_kernel_fp16", r.get("dense_kernel_fp16_ms"), dtype="float16", **common)
        b.add("sparse_fp32_tf32x3", r.get("sparse_fp32_tf32x3_ms"), dtype="float32", **common)
        b.add("dispatch_fp16", r.get("dispatch_fp16_ms"), role="sparseflow", dtype="float16", **common)
    return b.out


_E2E_ROLES = {"compile_fp16": "baseline", "sparseflow_fp16": "sparseflow"}


def _read_e2e(source, obj):
    b = _Builder(source, "e2e", _env(obj))
    for model, m in obj.items():
        if model.startswith("_") or not isinstance(m, dict):
            continue
        flat = {**(m.get("details") or {}), **{k: v for k, v in m.items() if k != "details"}}
        T, N, size = flat.get("T"), flat.get("N"), flat.get("size")
        shape = _shape([T, N, 3, size, size]) if None not in (T, N, size) else ""
        seen = set()
        for k, v in flat.items():
            if not k.endswith("_ms"):
                continue
            prov = k[:-3]
            if prov == "sparseflow":  # the headline alias of sparseflow_fp16_ms
                prov = "sparseflow_fp16"
            if prov in seen:
                continue
            before = len(b.out)
            dtype = "float16" if "fp16" in prov else "float32" if "fp32" in prov else ""
            b.add(prov, v, op="model_forward", shape=shape, model=model, dtype=dtype,
                  role=_E2E_ROLES.get(prov, "reference"), baseline="compile_fp16")
            if len(b.out) > before:
                seen.add(prov)
    return b.out


def _read_profile(source, obj):
    """``sparseflow.profile`` JSON (``sparseflow-bench`` writes ``profile_<model>.json``): per layer the
    SparseFlow module's CUDA-event time and its dense op's, plus the whole forward."""
    b = _Builder(source, "profile", _env(obj) or {"device": obj.get("device", "")})
    model = str(obj.get("model") or os.path.splitext(source)[0].removeprefix("profile_"))
    dtype = str(obj.get("dtype") or "")
    for e in obj["layers"]:
        if e.get("dense_ms") is None:
            continue  # only layers with both timings: the SparseFlow modules
        common = dict(op=e.get("type", ""), shape=_shape(e.get("in_shape")), elem_density=_num(e.get("elem_density")),
                      block_density=_num(e.get("block_density")), block_size=e.get("block_size"), model=model,
                      layer=e.get("name", ""), dtype=dtype, baseline="dense_op")
        b.add("dense_op", e.get("dense_ms"), role="baseline", **common)
        b.add("sparseflow", e.get("ms"), role="sparseflow", **common)
    T, N, size = obj.get("T"), obj.get("N"), obj.get("size")
    shape = _shape([T, N, 3, size, size]) if None not in (T, N, size) else ""
    b.add("sparseflow_profiled", obj.get("forward_ms"), op="model_forward", shape=shape, model=model, dtype=dtype)
    return b.out


_BASELINE_HINTS = ("cudnn", "cublas", "compile", "module", "torch", "nn_", "dense", "eager")
_DTYPE_TAG = re.compile(r"(fp16|bf16|fp32|float16|bfloat16|float32)")
_TIMING_DICTS = ("ms", "times", "timings")
_SKIP_KEYS = {"env", "_env", "configs", "summary"}


def _generic_role(prov: str) -> str:
    p = prov.lower()
    if p.startswith(("sparseflow", "dispatch")):
        return "sparseflow"
    if "sparse" in p and "dense" not in p:
        return "sparse"
    return "reference"


def _row_timings(r: dict) -> list[tuple[str, object]]:
    """(provider, timing) of one row: ``*_ms`` numbers or ``ctx.bench`` dicts, ``*_ms`` dicts of them
    (``candidates_ms``), a ``ms`` dict of them, any ``ctx.bench`` dict."""
    out = []
    for k, v in r.items():
        if k.startswith("sum_"):
            continue
        if k in _TIMING_DICTS and isinstance(v, dict):
            out += [(str(sub), sv) for sub, sv in v.items()]
        elif k.endswith("_ms") and isinstance(v, dict) and _timing(v) is None:
            out += [(f"{k[:-3]}:{sub}", sv) for sub, sv in v.items()]
        elif k.endswith("_ms") or (isinstance(v, dict) and _timing(v) is not None):
            out.append((k.removesuffix("_ms"), v))
    return [(p, v) for p, v in out if _timing(v) is not None]


def _tag(prov: str) -> str:
    m = _DTYPE_TAG.search(prov.lower())
    return {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}.get(m.group(1), m.group(1)) if m else ""


def _baselines(provs: list[str], given: str | None) -> dict[str, str]:
    """Each provider's dense baseline: ``given`` (the row's ``baseline``) or the first provider (hint order) that
    is no SparseFlow timing, preferring the provider's own dtype, then fp16."""
    if given:
        return {p: given for p in provs}
    dense = [p for p in provs if _generic_role(p) == "reference"]
    out = {}
    for p in provs:
        tag = _tag(p)
        for hint in _BASELINE_HINTS:
            cands = [q for q in dense if hint in q.lower()]
            if cands:
                same = [q for q in cands if _tag(q) == tag] or [q for q in cands if _tag(q) == "fp16"] or cands
                out[p] = same[0]
                break
        else:
            out[p] = ""
    return out


def _block_density(r: dict) -> tuple[float | None, int | None]:
    """(block density, block size) of a row: the scalar ``block_density*`` keys (those with the halo first) or
    the entries of a ``block_density`` dict (an 8-wide tile first)."""
    cands = [(k, _num(v)) for k, v in r.items() if k.startswith("block_density") and _num(v) is not None]
    if isinstance(r.get("block_density"), dict):
        cands += [(str(k), _num(v)) for k, v in r["block_density"].items() if _num(v) is not None]
    if not cands:
        return None, None
    rank = lambda kv: (0 if "halo" in kv[0] else 1, 0 if re.search(r"(tile8|8x8)(?!\d)", kv[0]) else 1)
    key, val = sorted(cands, key=rank)[0]
    bs = r.get("block_size") if isinstance(r.get("block_size"), int) else None
    if bs is None:
        m = re.search(r"(\d+)x\1|tile(\d+)", key)
        bs = int(m.group(1) or m.group(2)) if m else None
    return val, bs


_SHAPE_KEYS = ("T", "N", "batch", "B", "M", "C", "K", "CO", "H", "W", "L")


def _read_rows(b: _Builder, rows: list, op_default: str, model: str) -> None:
    for r in rows:
        if not isinstance(r, dict):
            continue
        timings = _row_timings(r)
        if not timings:
            continue
        base = _baselines([p for p, _ in timings], r.get("baseline") if isinstance(r.get("baseline"), str) else None)
        block, bs = _block_density(r)
        elem = _num(r.get("elem_density", r.get("density")))
        shape = r.get("shape") or r.get("input_shape")
        if shape is None:
            shape = "x".join(f"{k}{r[k]}" for k in _SHAPE_KEYS if isinstance(r.get(k), int))
            if isinstance(r.get("kernel"), str):
                shape += f"xk{r['kernel']}"
        op = str(r.get("op") or r.get("kind") or op_default)
        layer = str(r.get("layer") or r.get("name") or "")
        dtype = str(r.get("dtype") or "")
        for prov, v in timings:
            tag = _tag(prov)
            b.add(prov, v, op=op, shape=_shape(shape), elem_density=elem, block_density=block, block_size=bs,
                  model=str(r.get("model") or model), layer=layer,
                  dtype=dtype or {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}.get(tag, ""),
                  role="baseline" if prov == base[prov] and prov in set(base.values()) else _generic_role(prov),
                  baseline=base[prov])


def _is_rows(v) -> bool:
    return isinstance(v, list) and any(isinstance(r, dict) and _row_timings(r) for r in v)


def _read_generic(source, obj):
    """Rows-like lists anywhere in the object (``rows``, ``models -> name -> layers``, ``models: [{model, rows}]``):
    one section per file (``<stem>.<list name>`` for lists not called ``rows``), the model from the key under
    ``models`` or the ``model`` field (with ``@size``) of the object holding the list."""
    env = _env(obj)
    stem = os.path.splitext(source)[0]
    builders: dict[str, _Builder] = {}

    def walk(o, model: str, depth: int):
        if depth > 6 or not isinstance(o, dict):
            return
        if isinstance(o.get("model"), str):
            model = o["model"] + (f"@{o['size']}" if isinstance(o.get("size"), int) else "")
        for k, v in o.items():
            if k in _SKIP_KEYS:
                continue
            if _is_rows(v):
                section = stem if k == "rows" else f"{stem}.{k}"
                _read_rows(builders.setdefault(section, _Builder(source, section, env)), v,
                           stem if k == "rows" else k, model)
            elif isinstance(v, dict) and k in ("models", "results"):
                for name, sub in v.items():  # one model's results under its name
                    if _is_rows(sub):
                        _read_rows(builders.setdefault(stem, _Builder(source, stem, env)), sub, stem, str(name))
                    else:
                        walk(sub, str(name), depth + 1)
            elif isinstance(v, dict):
                walk(v, model, depth + 1)
            elif isinstance(v, list):
                for item in v:
                    walk(item, model, depth + 1)

    walk(obj, "", 0)
    return [r for b in builders.values() for r in b.out]


def _reader(source: str, obj):
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("summary"), dict) and isinstance(obj.get("rows"), list):
        if "sum_compile_graph_fp16_ms" in obj["summary"]:
            return _read_fused_layers
        if "sum_cudnn_fp16_cl_ms" in obj["summary"]:
            return _read_sparse_conv
    if source == "fused_batch_sweep.json" or (
            isinstance(obj.get("rows"), list) and obj["rows"] and "fused_dense_same_cfg_ms" in obj["rows"][0]):
        return _read_batch_sweep
    if isinstance(obj.get("layers"), list) and "forward_ms" in obj:
        return _read_profile
    if isinstance(obj.get("rows"), list) and obj["rows"] and isinstance(obj["rows"][0], dict) and {
            "pattern", "dense_kernel_ms", "baseline_ms"} <= set(obj["rows"][0]):
        return _read_density
    models = [v for k, v in obj.items() if not k.startswith("_") and isinstance(v, dict)]
    if models and source.startswith("e2e") and all(isinstance(m, dict) for m in models):
        return _read_e2e
    return _read_generic


#: files of the results folder that are outputs of this module, not inputs
OUTPUTS = ("pytest_benchmark.json",)


def read_file(path: str, log=print) -> list[Record]:
    """The records of one results JSON ([] with a message if it cannot be read or holds no timings)."""
    source = os.path.basename(path)
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        log(f"skipped {source}: not readable JSON ({type(e).__name__}: {e})")
        return []
    reader = _reader(source, obj)
    if reader is None:
        log(f"skipped {source}: not a JSON object of results")
        return []
    try:
        recs = reader(source, obj)
    except Exception as e:  # an unexpected schema: skip the file, keep the others
        log(f"skipped {source}: unexpected layout ({type(e).__name__}: {e})")
        return []
    if not recs:
        log(f"skipped {source}: no timings recognized (no *_ms values or ctx.bench dicts in rows)")
    return recs


def collect(results_dir: str, log=print, exclude: Iterable[str] = ()) -> list[Record]:
    """The records of every ``*.json`` of ``results_dir`` (sorted by file name), except our own outputs and
    ``exclude`` (file names)."""
    skip = set(OUTPUTS) | set(exclude)
    out: list[Record] = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        if os.path.basename(path) in skip:
            continue
        out += read_file(path, log)
    return out


# ------------------------------------------------------------------------------------------- writers
def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)  # exact round trip through read_csv
    return v


def write_csv(records: list[Record], path: str) -> str:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in records:
            d = asdict(r)
            w.writerow([_fmt(d[c]) for c in CSV_COLUMNS])
    return path


def read_csv(path: str) -> list[Record]:
    """Records back from :func:`write_csv`'s file."""
    types = {f.name: f.type for f in fields(Record)}
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            kw = {}
            for k, v in row.items():
                if k not in types:
                    continue
                t = str(types[k])
                if "float" in t:
                    kw[k] = float(v) if v != "" else None
                elif "int" in t:
                    kw[k] = int(float(v)) if v != "" else None
                else:
                    kw[k] = v
            out.append(Record(**kw))
    return out


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


def load(path: str, log=print) -> list[Record]:
    """Records from a results folder, a long-format CSV, a pytest-benchmark JSON or one results JSON."""
    if os.path.isdir(path):
        return collect(path, log)
    if path.endswith(".csv"):
        return read_csv(path)
    with open(path) as f:
        head = json.load(f)
    if isinstance(head, dict) and isinstance(head.get("benchmarks"), list) and "machine_info" in head:
        return read_pytest_benchmark(path)
    return read_file(path, log)
