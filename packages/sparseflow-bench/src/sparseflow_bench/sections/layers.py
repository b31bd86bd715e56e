"""``--sections layers``: every conv -> BatchNorm (-> + residual) -> neuron layer of ``ctx.model`` (spiking_resnet34;
T=4, N=8, 224 px natural images, recalibrated BatchNorm) on its real input spikes.

Per layer, in the same run: SparseFlow's fused layer (every candidate path, and the one dispatch picks = the
fastest) against ``torch.compile`` of the same dense block in fp16 channels_last replayed in a CUDA graph, the
convolution alone on cuDNN (the bounds of the summary) and SpikingJelly eager fp32; spike flips of the fp16 and
fp32 paths and of the compiled block against a float64 reference. -> ``fused_<model>.json`` (``markdown``:
``fused_<model>.md`` and ``fused_layers.png``).

:func:`spiking_layers` prepares the model and records each fused layer's input once per run: ``sweep`` and
``conv`` measure the same layers.
"""

from __future__ import annotations

import copy
import json

import torch
import torch.nn.functional as F

from ..figures import env_line, page
from ..records import Row, Timing


def capture_spiking_layers(model, x):
    """optimize() a copy, then record the input (and residual) of every fused spiking layer."""
    from sparseflow_core import optimize, reset_states
    from sparseflow_ops import SparseConv2d

    opt = optimize(copy.deepcopy(model), x, mode="torch")
    recs, handles = {}, []
    for name, m in opt.named_modules():
        if isinstance(m, SparseConv2d) and m.fused_neuron is not None:
            def hook(mod, args, kwargs, name=name):
                r = kwargs.get("residual")
                recs[name] = {"x": args[0].detach().clone(), "residual": None if r is None else r.detach().clone(),
                              "module": mod}
            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    reset_states(opt)
    with torch.no_grad():
        opt(x)
    for h in handles:
        h.remove()
    return opt, recs


def spiking_layers(ctx):
    """(model, input, {layer: its recorded input, residual and module}) of ``ctx.model``, prepared once per run."""
    from ..models import prepared_model

    key = ("spiking_layers", ctx.model, ctx.T, ctx.N, ctx.size)
    if key not in ctx.cache:
        model, x = prepared_model(ctx.model, ctx.T, ctx.N, ctx.size, ctx.device)
        ctx.cache[key] = (model, x, capture_spiking_layers(model, x)[1])
    return ctx.cache[key]


def layer_params(m):
    from sparseflow_ops import find_adapter
    from sparseflow_ops.conv import bn_affine

    bn, neuron = m.folded_bn, m.fused_neuron
    spec = find_adapter(neuron).spec(neuron)
    scale, shift = bn_affine(bn) if bn is not None else (None, None)
    return bn, spec, scale, shift


def _dense_block(x, w, rm, rv, g, b, res, T: int, N: int, stride: int, pad: int, decay: float, v_th: float,
                 v_reset: float, hard: bool, eps: float):
    y = F.conv2d(x, w, None, stride, pad)
    y = F.batch_norm(y, rm, rv, g, b, False, 0.0, eps)
    y = y.view(T, N, *y.shape[1:])
    if res is not None:
        y = y + res
    v = torch.full_like(y[0], v_reset if hard else 0.0)
    out = []
    for t in range(T):
        h = v + (y[t] - (v - (v_reset if hard else 0.0))) * decay
        s = (h >= v_th).to(y.dtype)
        v = s * v_reset + (1.0 - s) * h if hard else h - s * v_th
        out.append(s)
    return torch.stack(out)


def compiled_block(ctx):
    """``torch.compile`` of the dense block, one per run (eager under ``ctx.dry``)."""
    if "compiled_block" not in ctx.cache:
        import torch._dynamo.config as dcfg

        # one compiled graph per layer shape: raise the recompile limit so that no layer falls back to eager
        for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(dcfg, knob):
                setattr(dcfg, knob, max(getattr(dcfg, knob), 256))
        ctx.cache["compiled_block"] = _dense_block if ctx.dry else torch.compile(_dense_block, dynamic=False)
    return ctx.cache["compiled_block"]


def sparse_path(m, w, spec, scale, shift, dtype):
    """SparseFlow's block-skipping fused path at the configuration the tables compare (8x8 tiles, 16 channels):
    ``f(x5, **kw)`` with the weights packed once, and that configuration."""
    from sparseflow_kernels import ConvConfig, spiking_conv2d
    from sparseflow_kernels.conv import pack_weight

    cfg = ConvConfig(8, 8, 64, 16, False, 4, 3)
    wp = pack_weight(w, 16, 64, dtype)
    return (lambda x5, **kw: spiking_conv2d(x5, w, None, m.stride, m.padding, scale=scale, shift=shift, neuron=spec,
                                            config=cfg, packed_weight=wp, **kw)), cfg


def candidates(x5, m, spec, scale, shift, res, dtype):
    """Every SparseFlow path for one layer (fp16/bf16/fp32 storage), as zero-argument callables."""
    from sparseflow_kernels import ConvConfig, spiking_conv2d
    from sparseflow_kernels.conv import pack_weight, tma_supported
    from sparseflow_kernels.spiking import new_spike_tensor
    from sparseflow_ops.conv import spiking_configs

    w = m.weight.to(dtype)
    xs = new_spike_tensor(*x5.shape, dtype, x5.device)  # each step channels_last, as the fused layers write it
    xs.copy_(x5)
    rs = res.to(dtype) if res is not None else None
    kw = dict(scale=scale, shift=shift, neuron=spec, residual=rs)
    cands = {}
    # what the module's dispatch measures, plus two configurations kept for the tables
    tma = tma_supported(xs.flatten(0, 1), m.kernel_size, m.stride, m.padding)
    cfgs = spiking_configs(x5.shape[2], m.out_channels, x5.shape[0], tma, N=x5.shape[1])
    cfgs["fused_dense_k16"] = ConvConfig(8, 8, 64, 16, False, 4, 3)
    if m.out_channels > 64:
        cfgs["fused_dense_n128"] = ConvConfig(8, 8, 128, 32, False, 8, 3)
    for name, cfg in cfgs.items():
        wp = pack_weight(w, cfg.block_k, cfg.block_n, dtype)
        cands[name] = (lambda cfg=cfg, wp=wp: spiking_conv2d(xs, w, None, m.stride, m.padding, config=cfg,
                                                              packed_weight=wp, **kw))
    sparse, _ = sparse_path(m, w, spec, scale, shift, dtype)
    cands["fused_sparse"] = lambda: sparse(xs, sparse=True, residual=rs)
    cands["cudnn"] = lambda: spiking_conv2d(xs, w, None, m.stride, m.padding, path="cudnn", **kw)
    return cands


def _densities(flat, stride: int) -> dict:
    from sparseflow_core.stats import block_density, element_density

    return {"elem_density": element_density(flat),
            "block_density_8x8_16ch_halo": block_density(flat, 8, 16, 3, stride, 1),
            "block_density_16x16_16ch_halo": block_density(flat, 16, 16, 3, stride, 1)}


def _layer_row(ctx, name, rec, block) -> dict:
    from sparseflow_kernels import spiking_conv2d
    from sparseflow_kernels.naive import spiking_conv2d_reference

    m, x5, res = rec["module"], rec["x"], rec["residual"]
    T, N = x5.shape[:2]
    bn, spec, scale, shift = layer_params(m)
    flat = x5.flatten(0, 1)
    row = {"layer": name, "shape": list(x5.shape), "C_out": m.out_channels, "stride": m.stride[0],
           "residual": res is not None, **_densities(flat, m.stride[0])}
    # baseline: torch.compile of the dense block, fp16 channels_last, replayed in a CUDA graph
    xh = flat.half().contiguous(memory_format=torch.channels_last)
    args = (xh, m.weight.half().contiguous(memory_format=torch.channels_last),
            bn.running_mean.half(), bn.running_var.half(), bn.weight.half(), bn.bias.half(),
            res.half().contiguous() if res is not None else None, T, N, m.stride[0], m.padding[0],
            spec.decay, spec.v_threshold, spec.v_reset if spec.hard_reset else 0.0, spec.hard_reset, bn.eps)
    base = block(*args)
    row["compile_graph_fp16_ms"] = ctx.bench(lambda: block(*args))["median"]
    # the convolution alone on cuDNN (fp16 channels_last, graph): what a fused layer costs at best when its
    # conv runs at cuDNN's speed and its BatchNorm/neuron epilogue is free (the bounds in the summary)
    row["cudnn_conv_fp16_cl_ms"] = ctx.bench(lambda: F.conv2d(xh, args[1], None, m.stride, m.padding))["median"]
    neuron = m.fused_neuron

    def eager():  # SpikingJelly eager fp32 of the block (the user's code: modules, multi-step)
        y = F.conv2d(flat, m.weight, m.bias, m.stride, m.padding)
        z = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        z = z.view(T, N, *z.shape[1:])
        if res is not None:
            z = z + res
        neuron.reset()
        return type(neuron).forward(neuron, z)

    row["eager_fp32_ms"] = ctx.bench(eager, graph=False)["median"]
    times, outs = {}, {}
    for cname, fn in candidates(x5, m, spec, scale, shift, res, torch.float16).items():
        try:
            outs[cname] = fn()
            times[cname] = ctx.bench(fn)["median"]
        except Exception as e:
            times[cname] = None
            ctx.log(f"{name} {cname}: {type(e).__name__}: {e}"[:300])
    ok = {k: v for k, v in times.items() if v is not None}
    best = min(ok, key=ok.get)
    row.update(sparseflow_ms=ok[best], path=best, candidates_ms=times,
               # the whole fused layer's time over cuDNN's convolution alone (a bound of its conv's fraction)
               sparseflow_over_cudnn_conv=ok[best] / row["cudnn_conv_fp16_cl_ms"],
               speedup_vs_compile_graph=row["compile_graph_fp16_ms"] / ok[best],
               speedup_vs_eager_fp32=row["eager_fp32_ms"] / ok[best],
               sparse_vs_dense_fused_same_cfg=(ok["fused_dense_k16"] / ok["fused_sparse"]
                                               if "fused_sparse" in ok and "fused_dense_k16" in ok else None))
    # exactness: spikes of the chosen fp16 path and of the fp32 path against a float64 reference
    ref = spiking_conv2d_reference(x5.double(), m.weight.double(), None, m.stride, m.padding,
                                   scale=scale.double(), shift=shift.double(),
                                   residual=res.double() if res is not None else None, spec=spec)[0]
    row["flip_rate_fp16_vs_fp64"] = float((outs[best].double() != ref).float().mean())
    row["flip_rate_compile_fp16_vs_fp64"] = float((base.double() != ref).float().mean())
    s32 = spiking_conv2d(x5, m.weight, None, m.stride, m.padding, scale=scale, shift=shift, neuron=spec,
                         residual=res)
    row["flip_rate_fp32_vs_fp64"] = float((s32.double() != ref).float().mean())
    return row


def _summary(rows, model_name, x) -> dict:
    base_sum = sum(r["compile_graph_fp16_ms"] for r in rows)
    ours_sum = sum(r["sparseflow_ms"] for r in rows)
    conv_sum = sum(r["cudnn_conv_fp16_cl_ms"] for r in rows)
    skip_sum = sum(r["cudnn_conv_fp16_cl_ms"] * r["block_density_8x8_16ch_halo"] for r in rows)
    return {
        "model": model_name, "T": int(x.shape[0]), "N": int(x.shape[1]), "size": int(x.shape[-1]),
        "layers": len(rows),
        "sum_compile_graph_fp16_ms": base_sum, "sum_sparseflow_ms": ours_sum,
        "sum_eager_fp32_ms": sum(r["eager_fp32_ms"] for r in rows),
        "sum_speedup_vs_compile_graph": base_sum / ours_sum if ours_sum else None,
        "min_layer_speedup_vs_compile_graph": min((r["speedup_vs_compile_graph"] for r in rows), default=None),
        "paths": {p: sum(r["path"] == p for r in rows) for p in {r["path"] for r in rows}},
        "sum_cudnn_conv_fp16_cl_ms": conv_sum,
        # upper bounds of sum_speedup_vs_compile_graph: every layer's conv at cuDNN's speed with a free epilogue,
        # and that with every block without a spike in its receptive field skipped at no cost
        "bound_sum_speedup_conv_at_cudnn": base_sum / conv_sum if conv_sum else None,
        "bound_sum_speedup_perfect_skipping": base_sum / skip_sum if skip_sum else None,
    }


def run(ctx) -> dict:
    _model, x, recs = spiking_layers(ctx)
    block = compiled_block(ctx)
    rows = []
    for name, rec in recs.items():
        if ctx.left() < 60:
            ctx.log("layers: deadline, stopping")
            break
        if rec["x"].dim() != 5:
            continue
        row = _layer_row(ctx, name, rec, block)
        rows.append(row)
        ctx.log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                            if k != "candidates_ms"}))
    out = {"env": ctx.env, "summary": _summary(rows, ctx.model, x), "rows": rows}
    ctx.dump(f"fused_{ctx.model}.json", out, env_key="env")
    return out


def rows(obj, source):
    model = obj["summary"].get("model", "")
    for r in obj["rows"]:
        ts = [Timing("compile_graph_fp16", r.get("compile_graph_fp16_ms"), "baseline", "float16"),
              Timing("eager_fp32", r.get("eager_fp32_ms"), dtype="float32"),
              Timing("sparseflow", r.get("sparseflow_ms"), "sparseflow", "float16")]
        ts += [Timing(f"path:{c}", ms, "sparse" if "sparse" in c else "reference", "float16")
               for c, ms in (r.get("candidates_ms") or {}).items()]
        yield Row("fused_layers", "spiking_conv2d", ts, shape=r.get("shape"), model=model, layer=r.get("layer", ""),
                  elem_density=r.get("elem_density"), block_density=r.get("block_density_8x8_16ch_halo"),
                  block_size=8, baseline="compile_graph_fp16")


def _bound_lines(s: dict) -> list[str]:
    """The bounds on the sum (runs that timed each layer's cuDNN conv alone)."""
    if s.get("bound_sum_speedup_conv_at_cudnn") is None:
        return []
    return ["", f"What the sum can reach at best: the convolutions alone on cuDNN take {s['sum_cudnn_conv_fp16_cl_ms']:.3f} "
            f"ms, so fused layers whose conv ran at cuDNN's speed with a free BatchNorm/neuron epilogue would be "
            f"{s['bound_sum_speedup_conv_at_cudnn']:.2f}x faster than the baseline; skipping every block without a spike "
            f"in its receptive field at no cost, at cuDNN's throughput, {s['bound_sum_speedup_perfect_skipping']:.2f}x."]


def _ratio(v) -> str:
    return "" if v is None else f"{v:.2f}"


def markdown(r: dict, d: str) -> str:
    s = r["summary"]
    lines = [f"# Fused spiking layers of {s['model']} (T={s['T']}, N={s['N']}, {s['size']} px)", "",
             f"Device: {env_line(r['env'])}. `do_bench_cudagraph` medians; every path replayed in a CUDA graph.",
             "Baseline: `torch.compile` (default mode) of the same dense block (conv -> BatchNorm -> (+ residual) -> LIF "
             "over T) in fp16 channels_last, replayed in a CUDA graph. SparseFlow: the fastest of its paths "
             "(what the per-layer dispatch picks), fp16 storage, fp32 accumulation and neuron.", "",
             f"**Sum over {s['layers']} layers: {s['sum_sparseflow_ms']:.3f} ms vs {s['sum_compile_graph_fp16_ms']:.3f} ms "
             f"= {s['sum_speedup_vs_compile_graph']:.2f}x** (goal 2x); slowest layer "
             f"{s['min_layer_speedup_vs_compile_graph']:.2f}x; SpikingJelly eager fp32 sum {s['sum_eager_fp32_ms']:.2f} ms. "
             f"Paths chosen: {s['paths']}.", *_bound_lines(s), "",
             "| layer | input [C,H,W] | res | elem dens | block dens (8x8, 16 ch, halo) | eager fp32 ms | compile+graph fp16 ms "
             "| SparseFlow ms | path | speed-up | SparseFlow / cuDNN conv alone | fused sparse / fused dense (same cfg) "
             "| flips fp16 / fp32 / compile vs fp64 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        sd = row.get("sparse_vs_dense_fused_same_cfg")
        lines.append(
            f"| {row['layer']} | {row['shape'][2:]} | {'yes' if row['residual'] else ''} | {row['elem_density']:.3f} "
            f"| {row['block_density_8x8_16ch_halo']:.2f} | {row['eager_fp32_ms']:.3f} | {row['compile_graph_fp16_ms']:.4f} "
            f"| {row['sparseflow_ms']:.4f} | {row['path']} | {row['speedup_vs_compile_graph']:.2f}x "
            f"| {_ratio(row.get('sparseflow_over_cudnn_conv'))} | {'' if sd is None else f'{sd:.2f}x'} | {row['flip_rate_fp16_vs_fp64']:.1e} / "
            f"{row['flip_rate_fp32_vs_fp64']:.1e} / {row['flip_rate_compile_fp16_vs_fp64']:.1e} |")

    def draw(ax):
        xs = range(len(r["rows"]))
        ax.bar(xs, [row["speedup_vs_compile_graph"] for row in r["rows"]], color="tab:blue")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(2.0, color="tab:red", lw=0.8, ls="--", label="goal 2x")
        ax.set_xticks(list(xs), [row["layer"] for row in r["rows"]], rotation=90, fontsize=7)
        ax.set_ylabel("speed-up vs torch.compile + CUDA graph (fp16)")
        ax.set_title(f"Fused spiking layers, {s['model']} T={s['T']} N={s['N']} ({r['env'].get('device')})")
        ax.legend()

    return page(lines, d, "fused_layers.png", "speed-up per layer", draw, (12, 4))
