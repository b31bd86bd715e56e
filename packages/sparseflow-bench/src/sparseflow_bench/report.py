"""The report of a results folder (``sparseflow-bench report DIR``, ``python -m sparseflow_bench.report DIR``).

Every figure is read from the JSON files in DIR; nothing is typed in by hand. :func:`build` writes each section's
markdown table (the ``markdown`` of the section that wrote the file), the long-format ``results.csv`` and
``pytest_benchmark.json`` (:mod:`sparseflow_bench.records`), the speed-up plots, and on request the README's
results block (:func:`readme_results`).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys

from .figures import load_json as _load
from .figures import plot as _plot
from .pytest_format import write_pytest_benchmark
from .records import Record, collect, write_csv
from .status import baseline_of

# ------------------------------------------------------------------------ long format, plots, README
#: files the plots and the README do not read: the smoke runs of ``--dry`` (no timings worth showing)
SUPERSEDED = re.compile(r"_dry\.json$")


def current(records: list[Record]) -> list[Record]:
    """Records of the measured files (not of ``--dry`` smoke runs: ``depthwise_transposed_dry.json`` ...)."""
    return [r for r in records if not SUPERSEDED.search(r.source)]


def _group(r: Record) -> tuple:
    return (r.source, r.section, r.model, r.layer, r.op, r.shape)


def speedups(records: list[Record], roles=("sparse",)) -> list[dict]:
    """For each record of ``roles`` with a baseline timing in its group (the provider its ``baseline`` names,
    else the group's baseline): its speed-up over that baseline."""
    base, named = {}, {}
    for r in records:
        named.setdefault((*_group(r), r.provider), r)
        if r.role == "baseline":
            base.setdefault(_group(r), r)
    out = []
    for r in records:
        b = named.get((*_group(r), r.baseline)) if r.baseline else None
        b = b or base.get(_group(r))
        if r.role in roles and b is not None and r.median_ms > 0:
            out.append({"record": r, "baseline": b, "speedup": b.median_ms / r.median_ms})
    return out


def best_per_group(records: list[Record], roles=("sparse",)) -> list[dict]:
    """:func:`speedups`, one per group (row): the fastest timing of ``roles``, fp16 ones first when the group has
    any (sections time several configurations and dtypes per row)."""
    best: dict[tuple, dict] = {}
    for p in speedups(records, roles):
        g = _group(p["record"])
        rank = (p["record"].dtype != "float16", p["record"].median_ms)
        if g not in best or rank < best[g][0]:
            best[g] = (rank, p)
    return [p for _, p in best.values()]


def speedup_density_plot(records: list[Record], d: str, fname: str = "speedup_vs_block_density.png") -> str | None:
    """Speed-up of every block-skipping kernel over its dense baseline against the block density of its input,
    with the ideal ``1 / density`` (time proportional to the blocks visited)."""
    pts = [p for p in best_per_group(records) if p["record"].block_density]
    if not pts:
        return None
    series: dict[str, list] = {}
    for p in pts:
        series.setdefault(p["record"].section, []).append(p)
    for sec, ps in list(series.items()):
        provs = sorted({p["record"].provider for p in ps})
        bases = sorted({p["baseline"].provider for p in ps})
        what = provs[0] if len(provs) == 1 else "fastest block-skipping timing"
        series[f"{sec}: {what} vs {', '.join(bases)}"] = series.pop(sec)
    dev = next((r.device for r in records if r.device), "?")

    def draw(ax):
        import numpy as np

        for label, ps in sorted(series.items()):
            ax.plot([p["record"].block_density for p in ps], [p["speedup"] for p in ps], "o", ms=4, alpha=0.8,
                    label=f"{label} ({len(ps)})")
        lo = max(0.01, min(p["record"].block_density for p in pts) * 0.8)
        xs = np.linspace(lo, 1.0, 200)
        ax.plot(xs, 1.0 / xs, "k--", lw=1, label="ideal: 1 / block density")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        from matplotlib.ticker import FormatStrFormatter, LogLocator

        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%gx"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter(""))
        ax.set_xlim(0, 1.02)
        ax.set_xlabel("block density of the input (blocks holding a non-zero, with the receptive-field halo)")
        ax.set_ylabel("speed-up over the dense baseline")
        ax.set_title(f"Block skipping against block density ({dev})", fontsize=10)
        ax.legend(fontsize=7)

    lines = _plot(d, fname, "speed-up vs block density", draw, (7, 4.5))
    return fname if lines[-1].startswith("![") else None


def layer_plots(records: list[Record], d: str) -> list[str]:
    """Per model, bars of SparseFlow's speed-up over the dense baseline for every layer (one bar series per
    section and baseline), the block density of each layer's input on a second axis. Files ``layers_<model>.png``."""
    per_model: dict[str, dict] = {}
    for section in sorted({r.section for r in records} - {"density"}):  # the density sweep has its own plot
        recs = [r for r in records if r.section == section]
        shapes: dict[tuple, set] = {}
        for r in recs:
            shapes.setdefault((r.model, r.layer), set()).add(r.shape)
        if any(len(v) > 1 for v in shapes.values()):
            continue  # a sweep (one layer at several shapes), not a per-layer table
        # what SparseFlow runs (the dispatch's pick) where the section records it, else its fastest sparse timing
        for p in best_per_group(recs, ("sparseflow",)) or best_per_group(recs, ("sparseflow", "sparse")):
            r = p["record"]
            if r.layer and r.model:
                label = f"{section} vs {p['baseline'].provider}"
                per_model.setdefault(r.model, {}).setdefault(label, []).append(p)
    written = []
    for model, series in sorted(per_model.items()):
        layers = []
        for ps in series.values():
            layers += [p["record"].layer for p in ps if p["record"].layer not in layers]
        if len(layers) < 2:
            continue
        fname = f"layers_{re.sub(r'[^A-Za-z0-9_.-]', '_', model)}.png"

        def draw(ax, series=series, layers=layers, model=model):
            w = 0.8 / len(series)
            dens = {}
            for i, (label, ps) in enumerate(sorted(series.items())):
                by = {p["record"].layer: p for p in ps}
                xs = [j + i * w for j, name in enumerate(layers) if name in by]
                ax.bar(xs, [by[name]["speedup"] for name in layers if name in by], w, label=label)
                for name, p in by.items():
                    if p["record"].block_density is not None:
                        dens.setdefault(name, p["record"].block_density)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xticks([j + 0.4 - w / 2 for j in range(len(layers))], layers, rotation=90, fontsize=7)
            ax.set_ylabel("speed-up over the dense baseline")
            ax.set_title(f"{model}: per layer", fontsize=10)
            ax.legend(fontsize=7, loc="lower left", framealpha=0.9)
            if dens:
                ax2 = ax.twinx()
                ax2.plot([j + 0.4 - w / 2 for j, n in enumerate(layers) if n in dens],
                         [dens[n] for n in layers if n in dens], "k.", label="block density")
                ax2.set_ylim(0, 1.05)
                ax2.set_ylabel("block density (dots)")

        if _plot(d, fname, f"{model} per layer", draw, (max(8, 0.3 * len(layers) + 3), 4.5))[-1].startswith("!["):
            written.append(fname)
    return written


def write_records(d: str, log=print) -> list[Record]:
    """``results.csv`` (long format) and ``pytest_benchmark.json`` from every results JSON of ``d``."""
    recs = collect(d, log)
    if not recs:
        log(f"no timings found in {d}")
        return recs
    write_csv(recs, os.path.join(d, "results.csv"))
    root = os.path.dirname(os.path.abspath(__file__))
    write_pytest_benchmark(recs, os.path.join(d, "pytest_benchmark.json"), root)
    log(f"wrote {os.path.join(d, 'results.csv')} and pytest_benchmark.json ({len(recs)} timings from "
        f"{len({r.source for r in recs})} files)")
    return recs


def _fx(v, f=".2f"):
    return "n/a" if v is None else f"{v:{f}}x"


def _short_env(env: dict) -> str:
    return (f"{env.get('device', '?')}, torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
            f"{str(env.get('date', '?'))[:10]}")


def _pct(v: float) -> str:
    """A fraction as a percentage with two significant digits below 1 % (0.02 %, 0.5 %), else one decimal."""
    return f"{v * 100:.2g}%" if v < 0.01 else f"{v:.1%}"


def density_line(d: str) -> str | None:
    """The README row of the per-op density sweep (``density.json``): per op, SparseFlow's sparse kernel (prescan
    included) over the dense baseline at the sparsest and the densest block density of the sweep."""
    obj = _load(d, "density.json")
    rows = [r for r in (obj or {}).get("rows", []) if r.get("speedup_sparse_vs_baseline")]
    if not rows:
        return None
    parts, ops = [], list(dict.fromkeys(r["op"] for r in rows))
    for op in ops:
        rs = sorted((r for r in rows if r["op"] == op), key=lambda r: r["block_density"])
        lo, hi = rs[0], rs[-1]
        parts.append(f"{op} {lo['speedup_sparse_vs_baseline']:.2f}x at {lo['block_density']:.0%} of blocks "
                     f"({_pct(lo['elem_density'])} of elements) .. {hi['speedup_sparse_vs_baseline']:.2f}x at "
                     f"{hi['block_density']:.0%}")
    pats = sorted({r["pattern"] for r in rows})
    return (f"| per-op density sweep, synthetic spikes ({', '.join(pats)}; {len(rows)} rows), fp16, `density.json` "
            f"| {obj.get('baseline', 'dense')} | sparse kernel, prescan included | {'; '.join(parts)} |")


def profile_lines(recs: list[Record]) -> list[str]:
    """README rows of ``sparseflow.profile`` per model: the sum over its SparseFlow layers, each timed alone with
    CUDA events, against the sum of each layer's dense op on the same recorded inputs."""
    lines = []
    for model in sorted({r.model for r in recs if r.section == "profile"}):
        sp = best_per_group([r for r in recs if r.section == "profile" and r.model == model], ("sparseflow",))
        if not sp:
            continue
        b, o = sum(p["baseline"].median_ms for p in sp), sum(p["record"].median_ms for p in sp)
        fwd = next((r for r in recs if r.section == "profile" and r.model == model and r.op == "model_forward"), None)
        shape = f" (input {fwd.shape}, {fwd.dtype})" if fwd and fwd.shape else ""
        lines.append(f"| `sparseflow.profile` of {model}{shape}: {len(sp)} SparseFlow layers, each timed alone in eager "
                     f"mode (CUDA events, launch-bound), sum, `{sp[0]['record'].source}` | each layer's dense op: "
                     f"{b:.3f} ms | {o:.3f} ms | {_fx(b / o)} |")
    return lines


def readme_results(d: str, link_dir: str | None = None, plot: bool = True) -> str:
    """The README's "Results" block: the status lines, the headline table (each row names its results file), the
    device and versions of every file it reads, and one plot, all read from the JSON files of ``d`` (a device
    folder, or the results root: then its newest device folder; ``link_dir``: how the README reaches ``d``, for
    the links; ``plot``: redraw the plot, else link it only if it exists)."""
    from .layout import current_results_dir
    from .status import status_lines

    if not glob.glob(os.path.join(d, "*.json")):
        sub = current_results_dir(d)
        if sub is not None:
            link_dir = None if link_dir is None else os.path.join(link_dir, os.path.basename(sub))
            d = sub
    link_dir = d if link_dir is None else link_dir
    recs = current(collect(d, log=lambda *_: None))
    names = sorted(os.listdir(d)) if os.path.isdir(d) else []
    fused_name = next((f for f in names if f.startswith("fused_") and f.endswith(".json")
                       and (_load(d, f) or {}).get("summary", {}).get("sum_compile_graph_fp16_ms") is not None), None)
    conv_name = next((f for f in names if f.startswith("sparse_conv_") and f.endswith(".json")), None)
    fused = _load(d, fused_name) if fused_name else None
    conv = _load(d, conv_name) if conv_name else None
    e2e = _load(d, "e2e.json")
    lines = [*status_lines(d, link_dir), "",
             f"Every figure here is read from `{link_dir}/*.json` by `sparseflow-bench report` "
             "(`sparseflow_bench.report.readme_results`); each ratio compares timings taken in the same run, and "
             "each row names its file (device and versions of each file below the table).", "",
             "| what | baseline | SparseFlow | speed-up |", "| --- | --- | --- | --- |"]
    used: list[str] = []
    for name, m in (e2e or {}).items():
        if name.startswith("_") or not isinstance(m, dict):
            continue
        ours, eager = m.get("sparseflow_ms"), m.get("eager_fp32_ms")
        comp, comp_name = baseline_of(m)
        det = m.get("details") or m
        shape = f" (T={det['T']}, N={det['N']}, {det['size']} px)" if all(k in det for k in ("T", "N", "size")) else ""
        if not ours:
            why = m.get("error") or m.get("sparseflow_fp16_error") or "not measured in this run"
            lines.append(f"| {name} end to end{shape}, `e2e.json` | {str(why)[:80]} | | |")
            continue
        skipped = "; ".join(m.get("baseline_skipped") or [])  # a dense run not timed: the best of the others
        base = [f"eager fp32 {eager:.2f} ms" if eager else None,
                f"{f'dense fp16 {comp_name}' if comp_name else 'compile fp16'} {comp:.2f} ms"
                f"{f' (not timed: {skipped})' if skipped else ''}" if comp else None]
        # no speed-up over a best of fewer than all the dense runs
        ratio = [_fx(eager / ours, ".1f") if eager else None,
                 ("none claimed" if skipped else _fx(comp / ours)) if comp else None]
        lines.append(f"| {name} end to end{shape}, fp16 + CUDA graph, `e2e.json` | "
                     f"{' / '.join(b for b in base if b)} | {ours:.2f} ms | {' / '.join(x for x in ratio if x)} |")
        err = m.get("logits_rel_err_fp32_faithful")
        if err is not None:
            lines.append(f"| {name}, fp32 `numerics=\"faithful\"`: logits relative error against the dense fp32 "
                         f"model, `e2e.json` | (goal < 1e-3) | {err:.3g} | |")
    if e2e:
        used.append("e2e.json")
    if fused:
        s = fused["summary"]
        lines.append(f"| {s['layers']} spiking layers of {s['model']} (T={s['T']}, N={s['N']}, {s['size']} px), "
                     f"sum, fused fp16, `{fused_name}` | `torch.compile` + CUDA graph fp16: "
                     f"{s['sum_compile_graph_fp16_ms']:.3f} ms | {s['sum_sparseflow_ms']:.3f} ms | "
                     f"{_fx(s['sum_speedup_vs_compile_graph'])} (slowest layer "
                     f"{_fx(s['min_layer_speedup_vs_compile_graph'])}) |")
        lines.append(f"| same layers | SpikingJelly eager fp32: {s['sum_eager_fp32_ms']:.2f} ms | "
                     f"{s['sum_sparseflow_ms']:.3f} ms | {_fx(s['sum_eager_fp32_ms'] / s['sum_sparseflow_ms'], '.1f')} |")
        used.append(fused_name)
    dl = density_line(d)
    if dl:
        lines.append(dl)
        used.append("density.json")
    pl = profile_lines(recs)
    lines += pl
    if conv:
        s = conv["summary"]
        lines.append(f"| standalone `sparse_conv2d`, {s['layers']} layers, `{conv_name}` | cuDNN fp16 channels_last "
                     f"{s['sum_cudnn_fp16_cl_ms']:.3f} ms | {s['sum_sparse_fp16_ms']:.3f} ms | "
                     f"{_fx(s['speedup_sparse_vs_cudnn_fp16'])} (dispatch: {_fx(s['speedup_dispatch_vs_cudnn_fp16'])}) |")
        used.append(conv_name)
    known = {"fused_layers", "batch_sweep", "sparse_conv", "e2e", "density", "profile"}
    for section in sorted({r.section for r in recs} - known):
        sp = best_per_group([r for r in recs if r.section == section], roles=("sparseflow", "sparse"))
        if not sp:
            continue
        b, o = sum(p["baseline"].median_ms for p in sp), sum(p["record"].median_ms for p in sp)
        provs = sorted({p["record"].provider for p in sp})
        bases = sorted({p["baseline"].provider for p in sp})
        srcs = sorted({p["record"].source for p in sp})
        what = provs[0] if len(provs) == 1 else "fastest SparseFlow timing of each"
        lines.append(f"| `{section}`: {len(sp)} rows, sum ({what}), {', '.join(f'`{x}`' for x in srcs)} | "
                     f"{', '.join(bases)}: {b:.3f} ms | {o:.3f} ms | {_fx(b / o)} |")
        used += srcs
    used += sorted({r.source for r in recs if r.section == "profile"})
    notes = [f"- {name}: {m['note']}" for name, m in (e2e or {}).items()
             if not name.startswith("_") and isinstance(m, dict) and m.get("note")]
    if notes:
        lines += ["", "Notes from `e2e.json`:", *notes]
    pts = [p for p in best_per_group(recs) if p["record"].block_density is not None]
    if pts:
        el = [p["record"].elem_density for p in pts if p["record"].elem_density is not None]
        bd = [p["record"].block_density for p in pts]
        sp = [p["speedup"] for p in pts]
        lines += ["", f"Block-skipping kernels forced on ({len(pts)} layers/rows): inputs with "
                  + (f"{min(el):.0%}-{max(el):.0%} non-zero elements but " if el else "")
                  + f"{min(bd):.0%}-{max(bd):.0%} non-zero blocks ran at {min(sp):.2f}-{max(sp):.2f}x of their dense "
                  "baselines; the dispatch keeps the faster path per layer."]
    envs = []
    for f in dict.fromkeys(used):
        obj = _load(d, f)
        env = (obj.get("_env") or obj.get("env")) if isinstance(obj, dict) else None
        if isinstance(env, dict):
            envs.append(f"`{f}`: {_short_env(env)}")
    if envs:
        lines += ["", "Devices and versions: " + "; ".join(envs) + "."]
    fname = "speedup_vs_block_density.png"
    if speedup_density_plot(recs, d, fname) if plot else os.path.exists(os.path.join(d, fname)):
        lines += ["", f"![speed-up vs block density]({link_dir}/{fname})"]
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- results:begin (generated by sparseflow-bench report) -->", "<!-- results:end -->"


def update_readme(readme: str, d: str) -> bool:
    """Replace the block between the results markers of ``readme`` with :func:`readme_results`; False (and no
    change) if the markers are missing."""
    with open(readme) as f:
        text = f.read()
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 or j < i:
        return False
    link = os.path.relpath(os.path.abspath(d), os.path.dirname(os.path.abspath(readme)))
    new = text[: i + len(BEGIN)] + "\n" + readme_results(d, link) + text[j:]
    if new != text:
        with open(readme, "w") as f:
            f.write(new)
    return True


def section_tables(d: str, log=print) -> list[str]:
    """``<file>.md`` beside each results file of ``d`` whose section renders a table (``markdown``)."""
    from .sections import writer_of

    written = []
    for path in sorted(glob.glob(os.path.join(d, "*.json"))):
        source = os.path.basename(path)
        render = getattr(writer_of(source), "markdown", None)
        if render is None or SUPERSEDED.search(source):
            continue
        fname = source.removesuffix(".json") + ".md"
        try:
            text = render(_load(d, source), d)
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # another layout: the long format has it
            log(f"{fname}: skipped ({type(e).__name__}: {e})")
            continue
        with open(os.path.join(d, fname), "w") as f:
            f.write(text)
        log(f"wrote {os.path.join(d, fname)}")
        written.append(fname)
    return written


def build(d: str, readme: str | None = None, log=print) -> list[Record]:
    """The report of the results folder ``d``: the sections' tables, ``results.csv``, ``pytest_benchmark.json``,
    the plots, and the results block of ``readme`` when given."""
    section_tables(d, log)
    recs = write_records(d, log)
    cur = current(recs)
    for name in filter(None, [speedup_density_plot(cur, d), *layer_plots(cur, d)]):
        log(f"wrote {os.path.join(d, name)}")
    if readme:
        log(("updated " if update_readme(readme, d) else f"no results markers ({BEGIN}) in ") + readme)
    return recs


def main(argv=None):
    p = argparse.ArgumentParser(prog="sparseflow-bench report", description=__doc__)
    p.add_argument("dir", nargs="?", default=None, help="results folder of one device (default: the newest under "
                   "benchmarks/results)")
    p.add_argument("--results", default=None, help="results folder (same as DIR)")
    p.add_argument("--readme", default=None, help="also regenerate the Results block of this README")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    from .layout import RESULTS_ROOT, current_results_dir

    d = a.results or a.dir or current_results_dir(RESULTS_ROOT) or RESULTS_ROOT
    if os.path.isdir(d) and not glob.glob(os.path.join(d, "*.json")) and current_results_dir(d):
        d = current_results_dir(d)  # the results root: its newest device folder
    if not os.path.isdir(d):
        print(f"no results folder {d}")
        return 2
    build(d, a.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
