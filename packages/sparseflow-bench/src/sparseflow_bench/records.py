"""Every results JSON of the benchmark sections as one long table: one record per (file, op, shape, provider) timing.

``collect(results_dir)`` reads every ``*.json`` in the folder (not recursively). Each file is mapped to the one
row schema, :class:`Row` (op, shape, model, layer, densities, block size, and its timings, each a :class:`Timing`
with its provider, role, dtype and baseline), by the section that wrote it (``rows(obj, source)`` of the module
:data:`sparseflow_bench.sections.RESULT_FILES` names for the file), else by the generic mapping of ``rows``-like
lists: each row's ``*_ms`` numbers (or ``{"median", "p20", "p80"}`` dicts from ``ctx.bench``) become providers,
``op`` / ``layer`` / ``name`` its op, ``shape`` its shape, ``elem_density`` (or ``density``) and the first
``block_density*`` key its densities. One reader, :func:`read_file`, turns the rows into :class:`Record` rows. A
file it cannot read is skipped with a message, never an error.

Writers: :func:`write_csv` (the long-format CSV, :data:`CSV_COLUMNS`) and
:func:`sparseflow_bench.pytest_format.write_pytest_benchmark` (a file ``pytest-benchmark compare`` reads).
"""

from __future__ import annotations

import csv
import glob
import json
import os
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


@dataclass
class Timing:
    """One timing of a row: its provider, the time (ms, or a ``ctx.bench`` dict ``{"median", "p20", "p80"}``;
    anything else, or a time that is not positive, is no timing), its role and dtype, and the provider it is
    compared against (None: the row's baseline)."""

    provider: str
    value: object
    role: str = "reference"
    dtype: str = ""
    baseline: str | None = None


@dataclass
class Row:
    """The one row schema every section's JSON is mapped to: what was timed, on what, and its timings."""

    section: str
    op: str
    timings: list[Timing]
    shape: object = ""  # sizes (a list) or a string
    model: str = ""
    layer: str = ""
    elem_density: float | None = None
    block_density: float | None = None
    block_size: int | None = None
    dtype: str = ""  # of the timings that do not name their own
    baseline: str = ""


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


def to_records(rows: Iterable[Row], source: str, env: dict) -> list[Record]:
    """The records of ``rows`` (of the file ``source``, measured in ``env``): one per valid timing, the first of
    each provider in a row."""
    common = {"source": source, "device": env.get("device", ""), "versions": _versions(env),
              "date": str(env.get("date", ""))}
    out = []
    for row in rows:
        seen = set()
        for t in row.timings:
            tm = _timing(t.value)
            if tm is None or not tm[0] > 0 or t.provider in seen:  # None, NaN, 0 or negative: not a timing
                continue
            seen.add(t.provider)
            out.append(Record(section=row.section, op=row.op, shape=_shape(row.shape), provider=t.provider,
                              median_ms=tm[0], p20_ms=tm[1], p80_ms=tm[2], elem_density=_num(row.elem_density),
                              block_density=_num(row.block_density), block_size=row.block_size, model=row.model,
                              layer=row.layer, dtype=t.dtype or row.dtype, role=t.role,
                              baseline=row.baseline if t.baseline is None else t.baseline, **common))
    return out


# ----------------------------------------------------------------------------------- the generic mapping
_BASELINE_HINTS = ("cudnn", "cublas", "compile", "module", "torch", "nn_", "dense", "eager")
_DTYPE_TAG = re.compile(r"(fp16|bf16|fp32|float16|bfloat16|float32)")
_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
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


def _generic_row(r: dict, section: str, op_default: str, model: str) -> Row | None:
    timings = _row_timings(r)
    if not timings:
        return None
    base = _baselines([p for p, _ in timings], r.get("baseline") if isinstance(r.get("baseline"), str) else None)
    block, bs = _block_density(r)
    shape = r.get("shape") or r.get("input_shape")
    if shape is None:
        shape = "x".join(f"{k}{r[k]}" for k in _SHAPE_KEYS if isinstance(r.get(k), int))
        if isinstance(r.get("kernel"), str):
            shape += f"xk{r['kernel']}"
    dtype = str(r.get("dtype") or "")
    ts = [Timing(p, v, "baseline" if p == base[p] and p in set(base.values()) else _generic_role(p),
                 dtype or _DTYPES.get(_tag(p), ""), base[p]) for p, v in timings]
    return Row(section, str(r.get("op") or r.get("kind") or op_default), ts, shape=shape,
               model=str(r.get("model") or model), layer=str(r.get("layer") or r.get("name") or ""),
               elem_density=r.get("elem_density", r.get("density")), block_density=block, block_size=bs)


def _is_rows(v) -> bool:
    return isinstance(v, list) and any(isinstance(r, dict) and _row_timings(r) for r in v)


def generic_rows(obj: dict, source: str) -> list[Row]:
    """Rows-like lists anywhere in the object (``rows``, ``models -> name -> layers``, ``models: [{model, rows}]``):
    one section per list (``<stem>.<list name>`` for lists not called ``rows``), the model from the key under
    ``models`` or the ``model`` field (with ``@size``) of the object holding the list; rows grouped by section."""
    stem = os.path.splitext(source)[0]
    by_section: dict[str, list[Row]] = {}

    def add(rows: list, section: str, op: str, model: str) -> None:
        out = by_section.setdefault(section, [])
        out += [row for r in rows if isinstance(r, dict) for row in [_generic_row(r, section, op, model)] if row]

    def walk(o, model: str, depth: int):
        if depth > 6 or not isinstance(o, dict):
            return
        if isinstance(o.get("model"), str):
            model = o["model"] + (f"@{o['size']}" if isinstance(o.get("size"), int) else "")
        for k, v in o.items():
            if k in _SKIP_KEYS:
                continue
            if _is_rows(v):
                add(v, stem if k == "rows" else f"{stem}.{k}", stem if k == "rows" else k, model)
            elif isinstance(v, dict) and k in ("models", "results"):
                for name, sub in v.items():  # one model's results under its name
                    if _is_rows(sub):
                        add(sub, stem, stem, str(name))
                    else:
                        walk(sub, str(name), depth + 1)
            elif isinstance(v, dict):
                walk(v, model, depth + 1)
            elif isinstance(v, list):
                for item in v:
                    walk(item, model, depth + 1)

    walk(obj, "", 0)
    return [row for rows in by_section.values() for row in rows]


def rows_of(obj: dict, source: str) -> list[Row]:
    """The rows of one results file: by the section that wrote it, else by the generic mapping."""
    from .sections import writer_of

    return list(getattr(writer_of(source), "rows", generic_rows)(obj, source))


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
    if not isinstance(obj, dict):
        log(f"skipped {source}: not a JSON object of results")
        return []
    try:
        recs = to_records(rows_of(obj, source), source, _env(obj))
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


def load(path: str, log=print) -> list[Record]:
    """Records from a results folder, a long-format CSV, a pytest-benchmark JSON or one results JSON."""
    if os.path.isdir(path):
        return collect(path, log)
    if path.endswith(".csv"):
        return read_csv(path)
    with open(path) as f:
        head = json.load(f)
    if isinstance(head, dict) and isinstance(head.get("benchmarks"), list) and "machine_info" in head:
        from .pytest_format import read_pytest_benchmark

        return read_pytest_benchmark(path)
    return read_file(path, log)
