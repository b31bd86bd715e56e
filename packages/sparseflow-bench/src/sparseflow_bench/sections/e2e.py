"""``--sections e2e``: whole models (``ctx.models``: spiking_resnet34, sew_resnet34, spikformer_ti; T=4, N=8, 224 px
natural images, recalibrated BatchNorm; a model of ``models.MODEL_INPUTS`` on its own input, such as the DVS
network on event frames at T=16 and 128 px; ``E2E_BATCHES=1,8,32`` adds other batches, written as
``<model>@N<batch>``; the element density of each input is recorded) end to end: SpikingJelly eager fp32, a CUDA
graph of it, the dense model in fp16 (the best of three dense runs: see :func:`_baselines`), SparseFlow fp16, fp32 and fp32
``numerics="faithful"`` (CUDA graphs; ``E2E_RUNS=fp16,...`` picks; on sm_90+ also a graph with programmatic
dependent launch set the other way); kernels per forward; logits error and
last-spike flips against the dense fp32 model (TF32 off), beside how far the dense model itself moves in fp16 and
with another fp32 summation order; NVML energy. -> ``e2e.json`` (written after each model; ``markdown``:
``e2e.md`` and ``e2e.png``). ``E2E_COMPILE_ONLY=1`` times the dense models only.
"""

from __future__ import annotations

import copy
import json
import os
import time
import traceback

import torch

from ..figures import page
from ..records import Row, Timing

#: SparseFlow's runs: (tag, storage dtype, numerics)
RUNS = (("fp16", torch.float16, "fast"), ("fp32", torch.float32, "fast"), ("fp32_faithful", torch.float32, "faithful"))


def last_spiking_output(model):
    """Hook storing the spikes the classifier head pools: the input of ``avgpool`` (CNNs), else nothing."""
    store = {}
    pool = getattr(model, "avgpool", None)
    if pool is None:
        return store, []
    h = pool.register_forward_pre_hook(lambda mod, a: store.__setitem__("s", a[0].detach().clone()))
    return store, [h]


def _against(r, prefix, model, x, ref_logits, ref_spk, logits_key=None, flips_key=None):
    """Run ``model`` on ``x`` (neurons reset); record its logits' relative error and its last spikes' flip rate
    against the dense fp32 reference under ``<prefix>logits_rel_err`` / ``<prefix>last_spike_flip_rate``."""
    from sparseflow_core import reset_states

    st, hs = last_spiking_output(model)
    reset_states(model)
    logits = model(x).float()
    for h in hs:
        h.remove()
    r[logits_key or f"{prefix}logits_rel_err"] = float((logits - ref_logits).norm() / ref_logits.norm())
    if st.get("s") is not None and ref_spk is not None:
        r[flips_key or f"{prefix}last_spike_flip_rate"] = float((st["s"].float() != ref_spk.float()).float().mean())


def _sparseflow(r, energy, model, x, ref_logits, ref_spk, tag, dt, numerics):
    """SparseFlow at storage dtype ``dt``: exactness, CUDA-graph time, energy, what it replaced, the paths."""
    from sparseflow_core import optimize, reset_states
    from sparseflow_core.arguments import cast_inputs
    from sparseflow_core.cuda_graph import CudaGraphModel
    from sparseflow_kernels import dispatch

    from ..timing import bench_ms, kernels_per_call

    xs = cast_inputs(x, dt)  # (as the dtype= cast of each call would: an image repeated by stride 0 stays so)
    dispatch.clear_cache()  # each model measures its own layers, as in a process of its own
    opt, rep = optimize(copy.deepcopy(model), xs, dtype=dt if dt != torch.float32 else None, numerics=numerics,
                        return_report=True)
    for _ in range(2):
        reset_states(opt)
        opt(xs)
    _against(r, "", opt, xs, ref_logits, ref_spk, f"logits_rel_err_{tag}", f"last_spike_flip_rate_{tag}")
    r[f"replaced_{tag}"] = {"fused": len(rep.by_action("fused")), "sparse": len(rep.by_action("sparse")),
                            "neuron_kernel": len(rep.by_action("neuron-kernel")), "left": len(rep.by_action("left"))}
    r[f"kernels_per_forward_sparseflow_{tag}"] = kernels_per_call(lambda: (reset_states(opt), opt(xs)))
    gopt = CudaGraphModel(opt)
    for _ in range(3):
        gopt(xs)
    r[f"sparseflow_{tag}_ms"] = bench_ms(lambda: gopt(xs), graph=False)["median"]
    r[f"graph_calls_{tag}"] = dict(gopt.calls)  # replays, captures and eager calls (with why) while timed
    r[f"sparseflow_{tag}_eager_ms"] = bench_ms(lambda: (reset_states(opt), opt(xs)), graph=False)["median"]
    r[f"energy_sparseflow_{tag}_J"] = energy.joules_per_call(lambda: gopt(xs))
    _other_pdl(r, tag, opt, xs)
    rep.refresh(opt)
    r[f"paths_{tag}"] = {}
    for e in rep.layers:
        if e.path:
            r[f"paths_{tag}"][e.path] = r[f"paths_{tag}"].get(e.path, 0) + 1
    if dt == torch.float16:  # which layer took which path, in the timed run (with the input shape it saw)
        r[f"layer_paths_{tag}"] = {e.name: f"{e.path} {list(e.in_shape or ())}" for e in rep.layers if e.path}
        r[f"spiking_candidates_us_{tag}"] = _spiking_candidates(dt)
    torch.cuda.empty_cache()


def _other_pdl(r, tag, opt, xs) -> None:
    """The optimized model captured again, in a CUDA graph of its own, with programmatic dependent launch set the
    other way from the timed graph (sm_90+ only): ``sparseflow_<tag>_pdl_on_ms`` or ``sparseflow_<tag>_no_pdl_ms``.
    Its output must be the timed graph's, bit for bit; otherwise the kernels race, and no time is claimed for either
    (``sparseflow_<tag>_pdl_error``)."""
    from sparseflow_core.cuda_graph import CudaGraphModel
    from sparseflow_kernels import pdl_enabled, set_pdl

    from ..timing import bench_ms

    if xs.device.type != "cuda" or torch.cuda.get_device_capability(xs.device)[0] < 9:
        return
    on = not pdl_enabled(xs.device)
    was = set_pdl(on)
    try:
        g = CudaGraphModel(opt)
        for _ in range(3):
            out = g(xs).clone()
        r[f"sparseflow_{tag}_{'pdl_on' if on else 'no_pdl'}_ms"] = bench_ms(lambda: g(xs), graph=False)["median"]
    finally:
        set_pdl(was)
    g_default = CudaGraphModel(opt)
    for _ in range(3):
        out_default = g_default(xs)
    if not torch.equal(out, out_default):
        r[f"sparseflow_{tag}_pdl_error"] = "the CUDA graphs with and without programmatic dependent launch differ"
        r[f"sparseflow_{tag}_ms"] = r[f"sparseflow_{tag}_{'pdl_on' if on else 'no_pdl'}_ms"] = None


def _spiking_candidates(dt) -> dict:
    """What the spiking convolutions' dispatch measured in ``dt``, per layer kind (input shape, output channels,
    stride, a residual; or a layer writing a sum that a neuron reads): every candidate's median, us, fastest first."""
    from sparseflow_kernels import dispatch

    out = {}
    for key, ms in dispatch.timings().items():
        # keys as SparseConv2d builds them: ("spiking", input shape, dtype, out channels, kernel, stride, padding,
        # occupancy in, out, neuron, residual, ...) and ("sum", input shape, its strides, dtype, out channels,
        # kernel, stride, padding, ...)
        if not (isinstance(key, tuple) and len(key) > 9):
            continue
        if key[0] == "spiking" and len(key) > 10 and key[2] == dt:
            name = f"{'x'.join(map(str, key[1]))} -> {key[3]} stride {key[5][0]}{' + residual' if key[10] else ''}"
        elif key[0] == "sum" and key[3] == dt:
            name = f"{'x'.join(map(str, key[1]))} -> {key[4]} stride {key[6][0]}, writing a sum"
        else:
            continue
        out[name] = {c: round(v * 1000, 2) for c, v in sorted(ms.items(), key=lambda kv: kv[1])}
    return out


def _baselines(ctx, r, energy, model, x, ref_logits, ref_spk, compile_only):
    """The dense model in fp16 channels_last: its drift from fp32, then the strongest dense runs, each timed on the
    same input: eager in a CUDA graph (``graph_eager_fp16``), ``torch.compile`` default captured with the reset in a
    CUDA graph (``compile_fp16_default_graph``) and ``torch.compile`` ``reduce-overhead``
    (``compile_fp16_reduce-overhead``). The fastest is the baseline (``baseline_ms``, ``baseline_kind``).

    Each run has its own copy of the model and is timed, and its energy read, as soon as it exists, before the next
    one is built: a captured graph is never replayed after another run has compiled, captured or freed memory."""
    from sparseflow_core import reset_states

    from ..timing import bench_ms, graph_of, kernels_per_call

    m16 = copy.deepcopy(model).half().to(memory_format=torch.channels_last)
    x16 = x.half()
    try:  # how far plain fp16 inference drifts from fp32 (the same measure as SparseFlow's fp16)
        _against(r, "dense_fp16_", m16, x16, ref_logits, ref_spk)
    except Exception as e:
        r["dense_fp16_error"] = f"{type(e).__name__}: {e}"[:200]

    def with_reset(m, fn):
        def run(xx):
            reset_states(m)
            return fn(xx)
        return run

    r["kernels_per_forward_dense_fp16"] = kernels_per_call(lambda: with_reset(m16, m16)(x16))
    timed = []

    def add(kind, fn):  # timed, and its energy read, while it is the newest thing on the device
        r[f"{kind}_ms"] = bench_ms(fn, graph=False)["median"]
        r[f"energy_{kind}_J"] = energy.joules_per_call(fn)
        timed.append(kind)

    cap = graph_of(with_reset(m16, m16), x16)
    if cap is not None:
        add("graph_eager_fp16", cap[0])
    del cap
    for mode in (() if ctx.dry else ("default", "reduce-overhead")):
        if ctx.left() < (45 if compile_only else 100):
            r.setdefault("baseline_skipped", []).append(f"compile_fp16_{mode}: the section's time budget ran out")
            continue
        try:
            t0 = time.time()
            mc = copy.deepcopy(m16)
            cm = torch.compile(mc, mode=mode)
            for _ in range(3):
                with_reset(mc, cm)(x16)
            r[f"compile_fp16_{mode}_compile_s"] = time.time() - t0
            if mode == "default":
                cap = graph_of(with_reset(mc, cm), x16)
                if cap is not None:
                    add("compile_fp16_default_graph", cap[0])
                del cap
            else:
                add(f"compile_fp16_{mode}", lambda: with_reset(mc, cm)(x16))
        except Exception as e:
            r[f"compile_fp16_{mode}_error"] = f"{type(e).__name__}: {e}"[:300]
    if timed:
        kind = min(timed, key=lambda k: r[f"{k}_ms"])
        r["baseline_ms"], r["baseline_kind"] = r[f"{kind}_ms"], kind
        r["energy_baseline_J"] = r[f"energy_{kind}_J"]
        # a best of fewer than the three dense runs is no baseline to claim a speed-up against
        if r["sparseflow_ms"] and not r.get("baseline_skipped"):
            r["speedup_vs_best_dense"] = r["baseline_ms"] / r["sparseflow_ms"]


def _model(ctx, r, name, energy, compile_only) -> None:
    from sparseflow_core import reset_states
    from sparseflow_core.cuda_graph import CudaGraphModel

    from ..models import model_input_spec, prepared_model
    from ..timing import bench_ms

    model, x = prepared_model(name, r["T"], r["N"], r["size"], ctx.device)
    r["input_density"] = float((x != 0).float().mean())
    if model_input_spec(name, r["T"], r["size"])[0] != "events" and os.environ.get("E2E_STATIC", "1") == "1":
        # a static image at every step, given as a user would write it without copying: frame.expand(T, ...); every
        # run gets this tensor (the dense fp16 runs take a contiguous fp16 copy, as .half() makes one)
        x = x[:1].expand(x.shape)
        r["input"] = "one image per sample, repeated over T by stride 0"
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = False

    def eager():
        reset_states(model)
        return model(x)

    with torch.no_grad():
        r["eager_fp32_ms"] = bench_ms(eager, graph=False, rep=200)["median"]
        r["energy_eager_fp32_J"] = energy.joules_per_call(eager)
        try:
            g = CudaGraphModel(model)
            for _ in range(3):
                g(x)
            r["graph_eager_fp32_ms"] = bench_ms(lambda: g(x), graph=False)["median"]
        except Exception as e:
            r["graph_eager_fp32_error"] = f"{type(e).__name__}: {e}"[:300]
        # exact fp32 reference (no TF32 anywhere) and its last spikes
        torch.backends.cudnn.allow_tf32 = False
        st, hs = last_spiking_output(model)
        reset_states(model)
        ref_logits = model(x).float().clone()
        ref_spk = st.get("s")
        for h in hs:
            h.remove()
        try:  # the same fp32 model with another cuDNN algorithm (channels_last): how much the network
            # amplifies a mere change of fp32 summation order
            mcl = copy.deepcopy(model).to(memory_format=torch.channels_last)
            _against(r, "dense_fp32_reordered_", mcl, x.contiguous(), ref_logits, ref_spk)
            del mcl
        except Exception as e:
            r["dense_fp32_reordered_error"] = f"{type(e).__name__}: {e}"[:200]
        # SparseFlow fp32 (exactness) and fp16 (speed); fp32_faithful: the dense model's fp32 arithmetic bit for bit
        wanted = os.environ.get("E2E_RUNS")
        runs = [run for run in RUNS if wanted is None or run[0] in wanted.split(",")]
        for tag, dt, numerics in (() if compile_only else runs):
            try:
                _sparseflow(r, energy, model, x, ref_logits, ref_spk, tag, dt, numerics)
            except Exception as e:
                r[f"sparseflow_{tag}_error"] = f"{type(e).__name__}: {e}"[:400]
                traceback.print_exc()
        torch.backends.cudnn.allow_tf32 = True
        r["sparseflow_ms"] = r.get("sparseflow_fp16_ms")
        _baselines(ctx, r, energy, model, x, ref_logits, ref_spk, compile_only)
        r["kernels_per_forward"] = {run: r.get(f"kernels_per_forward_{run}_fp16") for run in ("dense", "sparseflow")}
        if r["sparseflow_ms"]:
            r["speedup_vs_eager_fp32"] = r["eager_fp32_ms"] / r["sparseflow_ms"]
    torch.cuda.empty_cache()


def run(ctx) -> dict:
    from ..models import model_input_spec
    from ..timing import Energy

    energy = Energy()
    compile_only = bool(os.environ.get("E2E_COMPILE_ONLY"))
    batches = [int(b) for b in os.environ.get("E2E_BATCHES", str(ctx.N)).split(",") if b.strip()]
    results = {}
    for name, N in ((name, N) for name in ctx.models for N in batches):
        key = name if N == ctx.N else f"{name}@N{N}"
        if ctx.left() < (60 if compile_only else 90):
            ctx.log(f"e2e: deadline before {key}")
            break
        kind, T, size = model_input_spec(name, ctx.T, ctx.size)
        r = {"device": ctx.env["device"], "T": T, "N": N, "size": size, "input": kind}
        try:
            _model(ctx, r, name, energy, compile_only)
        except Exception as e:
            r["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        results[key] = r
        ctx.log(json.dumps(r, default=str))
        ctx.dump("e2e.json", results)
    return results


def rows(obj, source):
    for model, m in obj.items():
        if model.startswith("_") or not isinstance(m, dict):
            continue
        flat = {**(m.get("details") or {}), **{k: v for k, v in m.items() if k != "details"}}
        T, N, size = flat.get("T"), flat.get("N"), flat.get("size")
        base = "baseline" if "baseline_ms" in flat else "compile_fp16"  # (files before the best-of-three baseline)
        roles = {base: "baseline", "sparseflow_fp16": "sparseflow"}
        ts = []
        for k, v in flat.items():
            if k.endswith("_ms"):
                prov = "sparseflow_fp16" if k == "sparseflow_ms" else k[:-3]  # the headline alias of sparseflow_fp16
                dtype = "float16" if "fp16" in prov else "float32" if "fp32" in prov else ""
                ts.append(Timing(prov, v, roles.get(prov, "reference"), dtype))
        yield Row("e2e", "model_forward", ts, shape=[T, N, 3, size, size] if None not in (T, N, size) else "",
                  model=model, baseline=base)


def _table(r: dict) -> list[str]:
    """One line per model: the baseline, SparseFlow, kernels per forward and last-layer spike flips."""
    def ms(v):
        return f"{v:.3f}" if isinstance(v, (int, float)) else "—"

    def pct(v):
        return f"{v:.2%}" if isinstance(v, (int, float)) else "—"

    lines = ["| model | T | N | best dense fp16 (kind) | SparseFlow fp16 | speed-up | kernels per forward, dense / "
             "SparseFlow | last-layer spike flips vs fp32, SparseFlow / dense fp16 | SparseFlow's layer paths |",
             "|---" * 9 + "|"]
    for name, m in r.items():
        if name.startswith("_") or not isinstance(m, dict):
            continue
        sp, base, kind = m.get("speedup_vs_best_dense"), m.get("baseline_ms"), m.get("baseline_kind", "—")
        if sp:
            speed = f"**{sp:.2f}x**" if sp >= 1 else f"{sp:.2f}x"
        elif m.get("baseline_skipped"):
            speed = "— (" + "; ".join(m["baseline_skipped"]) + ")"
        elif base is None and m.get("speedup_vs_compile_fp16"):  # a record with one dense run, torch.compile's
            base, kind = m.get("compile_fp16_ms"), f"compile {m.get('compile_fp16_mode')}, the one dense run"
            speed = f"{m['speedup_vs_compile_fp16']:.2f}x against that run alone"
        else:
            speed = "—"
        paths = ", ".join(f"{k} {v}" for k, v in (m.get("paths_fp16") or {}).items())
        lines.append(f"| {name} | {m.get('T')} | {m.get('N')} | {ms(base)} ms ({kind}) | "
                     f"{ms(m.get('sparseflow_ms'))} ms | {speed} | "
                     f"{m.get('kernels_per_forward_dense_fp16', '—')} / "
                     f"{m.get('kernels_per_forward_sparseflow_fp16', '—')} | "
                     f"{pct(m.get('last_spike_flip_rate_fp16'))} / {pct(m.get('dense_fp16_last_spike_flip_rate'))} "
                     f"| {paths or '—'} |")
    return lines


def _layer_table(name: str, m: dict) -> list[str]:
    """One line per spiking layer kind of a model, from its dispatch's medians (graph-replayed, in the model's run):
    the path taken, the fastest pair (cuDNN's convolution, the im2col kernel's for an image stem, or the measured
    convolution of a layer writing a sum, then the neuron kernel, and the max pool where one follows), the fastest
    fused kernel and their ratio."""
    kinds = m.get("spiking_candidates_us_fp16") or {}
    if not kinds:
        return []
    lines = [f"Spiking layers of {name} (N = {m.get('N')}), per layer kind: the dispatch's medians, us", "",
             "| layer kind | taken | pair: convolution + neuron kernel | fastest fused (tiling) | fused / pair |",
             "|---" * 5 + "|"]
    for kind, c in kinds.items():
        timed = {k: v for k, v in c.items() if v is not None and v != float("inf")}
        # a pair: cuDNN's convolution (or the im2col kernel's) then the neuron kernel, with or without the max pool in
        # its pass ("cudnn", "cudnn_then_pool", "im2col_pair", each "_static" for a repeated image; "pair": a sum)
        pairs = [v for k, v in timed.items() if k.startswith("cudnn") or k == "pair" or "_pair" in k]
        pair = min(pairs) if pairs else None
        fused = {k: v for k, v in timed.items()
                 if not k.startswith("cudnn") and k != "pair" and "_pair" not in k}
        best = min(fused, key=fused.get) if fused else None
        ratio = f"{fused[best] / pair:.2f}" if best and pair else "—"
        lines.append(f"| {kind} | {min(c, key=c.get)} | {pair if pair is not None else '—'} | "
                     f"{f'{fused[best]} ({best})' if best else '—'} | {ratio} |")
    return [*lines, ""]


def markdown(r: dict, d: str) -> str:
    lines = ["# End to end (recalibrated BatchNorm; T, N, size and input per model below)", "", *_table(r), ""]
    for name, m in r.items():
        if not name.startswith("_") and isinstance(m, dict):
            lines += _layer_table(name, m)
    lines += ["Every field of each model:", ""]
    for name, m in r.items():
        if name.startswith("_") or not isinstance(m, dict):
            continue
        lines.append(f"- **{name}** ({m.get('device')}): " + ", ".join(
            f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in m.items()
            if k not in ("device", "spiking_candidates_us_fp16")))
    models = [k for k, v in r.items() if not k.startswith("_") and isinstance(v, dict)]

    def draw(ax):
        keys = [("eager_fp32_ms", "SpikingJelly eager fp32"), ("baseline_ms", "best dense fp16"),
                ("sparseflow_ms", "SparseFlow fp16 + graph")]
        w = 0.25
        for i, (k, label) in enumerate(keys):
            ax.bar([j + i * w for j in range(len(models))], [r[m].get(k) or 0 for m in models], w, label=label)
        ax.set_xticks([j + w for j in range(len(models))], models)
        ax.set_ylabel("ms per forward")
        ax.legend()

    return page(lines, d, "e2e.png", "end to end", draw, (7, 4))

