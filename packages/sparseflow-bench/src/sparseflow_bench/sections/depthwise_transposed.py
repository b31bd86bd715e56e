"""GPU section ``depthwise_transposed``: depthwise, pointwise and transposed convolutions of the spiking
MobileNetV2 and U-Net on their real spikes.

Models: ``spiking_unet`` (128 px), ``spiking_mobilenetv2`` (224 px), then ``spiking_unet`` at 256 px while time
is left; T=4, N=8, natural images, recalibrated BatchNorm. One dense forward keeps the input of every spike-fed
depthwise (``groups == C``), pointwise (1x1) and transposed convolution (stem / first encoder conv see the image
and are not listed). Then, per layer and on those same inputs:

* cuDNN fp16 channels_last and cuDNN fp32 (``F.conv2d`` / ``F.conv_transpose2d``) - the baselines;
* SparseFlow fp16 channels_last, prescan included: depthwise ``grouped_conv2d`` (direct kernel, a few tile
  configs), pointwise ``sparse_conv2d``, transposed ``sparse_conv_transpose2d`` (a few configs); the best config
  is the row's ``sparse_fp16_ms`` (every config's time is kept), plus the same kernel without skipping
  (``dense=True``) and the fp32 sparse kernel;
* densities: element density, and the block density the kernel sees (fraction of its (tile, channel group)
  blocks with a non-zero in the receptive field, halo included);
* exactness: relative error (max |y - ref| / max |ref|) of the sparse fp32 and fp16 results against float64;
* the prescan alone and the sparse kernel given a ready occupancy: what runs when the fused layer that produces
  the spikes writes their occupancy (``optimize(..., write_occupancy=True)``); a memory-bound depthwise conv
  pays a full read of its input for its own prescan.

Per model and kind: summed times and the speed-up of the sparse kernels against cuDNN fp16 channels_last (the
target: depthwise layers together and ConvTranspose2d layers together at least 1.5x), and of the
per-layer dispatch (min of sparse and cuDNN). End to end: ``optimize(mode="sparse")`` on an fp32 copy, model
output relative error (norm) against the dense model (< 1e-3), with ``write_occupancy=True``.

Writes ``depthwise_transposed.json`` and ``.md`` into the output folder (``depthwise_transposed_dry.*`` under
``--dry``).
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from sparseflow_kernels import ConvConfig, prescan, sparse_conv2d
from sparseflow_kernels.conv import pack_weight
from sparseflow_kernels.conv_transpose import pack_transpose_weight, sparse_conv_transpose2d
from sparseflow_kernels.depthwise import DepthwiseConfig, grouped_conv2d, occupancy_group

from . import reset as _reset
from . import strict_fp32

SECTION_BUDGET_S = 115.0
DW_CONFIGS = {
    "t8x8c32": DepthwiseConfig(8, 8, 32, 4),
    "t4x8c64": DepthwiseConfig(4, 8, 64, 4),
    "t4x4c64": DepthwiseConfig(4, 4, 64, 2),
}
CT_CONFIGS = {
    "t8x8n64k16": ConvConfig(8, 8, 64, 16, False, 4, 3),
    "t8x8n64k32": ConvConfig(8, 8, 64, 32, False, 4, 3),
    "t16x8n64k32": ConvConfig(16, 8, 64, 32, False, 8, 3),
}
TOL = {"fp32": 1e-5, "fp16": 2e-3}


def _rel(y, ref) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.ConvTranspose2d):
        return "transposed"
    if isinstance(m, nn.Conv2d):
        if m.groups > 1 and m.groups == m.in_channels:
            return "depthwise"
        if m.groups == 1 and m.kernel_size == (1, 1):
            return "pointwise"
    return None


def _capture(model, x):
    """Inputs ([T*N, C, H, W]) of the spike-fed depthwise / pointwise / transposed convs, one dense forward."""
    from sparseflow_core.stats import is_integer_valued

    recs, handles = {}, []
    for name, m in model.named_modules():
        kind = _kind(m)
        if kind is None:
            continue

        def hook(mod, args, name=name, kind=kind):
            xin = args[0].detach()
            xin = xin.flatten(0, 1) if xin.dim() == 5 else xin
            if name not in recs and is_integer_valued(xin):
                recs[name] = {"x": xin.clone(), "module": mod, "kind": kind}

        handles.append(m.register_forward_pre_hook(hook))
    _reset(model)
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    _reset(model)
    return recs


def _prepare(name, T, N, size, device, dry, **kw):
    from ..data import natural_images, repeat_time
    from ..models import build_model, recalibrate_bn

    model = build_model(name, T=T, **kw).to(device)
    recalibrate_bn(model, natural_images(4 if dry else 16, size, seed=0).to(device), T=T, batches=2)
    x = repeat_time(natural_images(N, size, seed=1), T).to(device)
    _reset(model)
    return model.eval(), x


def _configs(ctx, cfgs: dict) -> dict:
    return dict(list(cfgs.items())[:1]) if ctx.dry else cfgs


def _time_row(ctx, rec, rep):
    """Timings, densities and errors of one layer on its captured input (one config per kind under dry)."""
    from sparseflow_core.stats import block_density, element_density

    m, kind = rec["module"], rec["kind"]
    flat = rec["x"]
    xh = flat.half().contiguous(memory_format=torch.channels_last)
    x32 = flat.float().contiguous()
    x32cl = x32.contiguous(memory_format=torch.channels_last)
    w32 = m.weight.detach().float()
    wh = w32.half()
    bench = lambda fn: ctx.bench(fn, rep=rep)["median"]
    row = {"layer": rec["name"], "kind": kind, "shape": list(flat.shape), "C_out": m.out_channels,
           "kernel": list(m.kernel_size), "stride": list(m.stride), "padding": list(m.padding),
           "elem_density": element_density(flat)}
    if kind == "transposed":
        op = list(m.output_padding)
        row["output_padding"] = op
        ref = F.conv_transpose2d(flat.double(), w32.double(), None, m.stride, m.padding, op)
        whcl = wh.contiguous(memory_format=torch.channels_last)
        row["cudnn_fp16_cl_ms"] = bench(lambda: F.conv_transpose2d(xh, whcl, None, m.stride, m.padding, op))
        row["cudnn_fp32_ms"] = bench(lambda: F.conv_transpose2d(x32, w32, None, m.stride, m.padding, op))
        cfgs = {}
        for cname, cfg in _configs(ctx, CT_CONFIGS).items():
            wp = pack_transpose_weight(wh, m.stride, m.padding, cfg.block_k, cfg.block_n, torch.float16)
            cfgs[cname] = bench(lambda cfg=cfg, wp=wp: sparse_conv_transpose2d(
                xh, wh, None, m.stride, m.padding, op, config=cfg, packed_weight=wp))
        best = min(cfgs, key=cfgs.get)
        cfg = CT_CONFIGS[best]
        wp = pack_transpose_weight(wh, m.stride, m.padding, cfg.block_k, cfg.block_n, torch.float16)
        row["dense_kernel_fp16_ms"] = bench(lambda: sparse_conv_transpose2d(
            xh, wh, None, m.stride, m.padding, op, config=cfg, packed_weight=wp, dense=True))
        wp32 = pack_transpose_weight(w32, m.stride, m.padding, cfg.block_k, cfg.block_n, torch.float32)
        row["sparse_fp32_ms"] = bench(lambda: sparse_conv_transpose2d(
            x32cl, w32, None, m.stride, m.padding, op, config=cfg, packed_weight=wp32))
        y32 = sparse_conv_transpose2d(x32cl, w32, None, m.stride, m.padding, op, config=cfg)
        y16 = sparse_conv_transpose2d(xh, wh, None, m.stride, m.padding, op, config=cfg)
        occ = prescan(xh, (cfg.tile_h, cfg.tile_w), cfg.block_k)
        row["prescan_fp16_ms"] = bench(lambda: prescan(xh, (cfg.tile_h, cfg.tile_w), cfg.block_k))
        row["sparse_fp16_given_occ_ms"] = bench(lambda: sparse_conv_transpose2d(
            xh, wh, None, m.stride, m.padding, op, config=cfg, packed_weight=wp, occupancy=occ))
        row["block_density_input"] = occ.block_density()
        kt = -(-m.kernel_size[0] // m.stride[0])
        row["block_density_halo"] = block_density(flat, cfg.tile_h, cfg.block_k, kt, 1, kt - 1)
    elif kind == "depthwise":
        g = m.groups
        ref = F.conv2d(flat.double(), w32.double(), None, m.stride, m.padding, m.dilation, g)
        whcl = wh.contiguous(memory_format=torch.channels_last)
        row["cudnn_fp16_cl_ms"] = bench(lambda: F.conv2d(xh, whcl, None, m.stride, m.padding, m.dilation, g))
        row["cudnn_fp32_ms"] = bench(lambda: F.conv2d(x32, w32, None, m.stride, m.padding, m.dilation, g))
        cfgs = {}
        for cname, cfg in _configs(ctx, DW_CONFIGS).items():
            cfgs[cname] = bench(lambda cfg=cfg: grouped_conv2d(xh, wh, None, m.stride, m.padding, m.dilation, g,
                                                               config=cfg))
        best = min(cfgs, key=cfgs.get)
        cfg = DW_CONFIGS[best]
        row["dense_kernel_fp16_ms"] = bench(lambda: grouped_conv2d(xh, wh, None, m.stride, m.padding, m.dilation,
                                                                   g, config=cfg, dense=True))
        row["sparse_fp32_ms"] = bench(lambda: grouped_conv2d(x32cl, w32, None, m.stride, m.padding, m.dilation, g,
                                                             config=cfg))
        y32 = grouped_conv2d(x32cl, w32, None, m.stride, m.padding, m.dilation, g, config=cfg)
        y16 = grouped_conv2d(xh, wh, None, m.stride, m.padding, m.dilation, g, config=cfg)
        og = occupancy_group(cfg, 1, m.out_channels // g)
        occ = prescan(xh, (cfg.tile_h, cfg.tile_w), og)
        row["prescan_fp16_ms"] = bench(lambda: prescan(xh, (cfg.tile_h, cfg.tile_w), og))
        row["sparse_fp16_given_occ_ms"] = bench(lambda: grouped_conv2d(
            xh, wh, None, m.stride, m.padding, m.dilation, g, config=cfg, occupancy=occ))
        row["block_density_input"] = occ.block_density()
        row["block_density_halo"] = block_density(flat, cfg.tile_h, og, m.kernel_size[0], m.stride[0],
                                                  m.padding[0])
    else:  # pointwise
        ref = F.conv2d(flat.double(), w32.double(), None, m.stride, m.padding)
        whcl = wh.contiguous(memory_format=torch.channels_last)
        row["cudnn_fp16_cl_ms"] = bench(lambda: F.conv2d(xh, whcl, None, m.stride, m.padding))
        row["cudnn_fp32_ms"] = bench(lambda: F.conv2d(x32, w32, None, m.stride, m.padding))
        bs = 16 if flat.shape[2] >= 56 else 8
        cfgs = {}
        cands = {f"t{bs}x{bs}n64k16": ConvConfig(bs, bs, 64, 16, False, 8 if bs == 16 else 4, 3),
                 f"t{bs}x{bs}n64k32": ConvConfig(bs, bs, 64, 32, False, 8 if bs == 16 else 4, 3)}
        for cname, c in _configs(ctx, cands).items():
            wp = pack_weight(wh, c.block_k, c.block_n, torch.float16)
            cfgs[cname] = bench(lambda c=c, wp=wp: sparse_conv2d(xh, wh, None, m.stride, m.padding, config=c,
                                                                 packed_weight=wp))
        best = min(cfgs, key=cfgs.get)
        cfg = cands[best]
        wp = pack_weight(wh, cfg.block_k, cfg.block_n, torch.float16)
        row["dense_kernel_fp16_ms"] = bench(lambda: sparse_conv2d(xh, wh, None, m.stride, m.padding, config=cfg,
                                                                  packed_weight=wp, dense=True))
        wp32 = pack_weight(w32, cfg.block_k, cfg.block_n, torch.float32)
        row["sparse_fp32_ms"] = bench(lambda: sparse_conv2d(x32cl, w32, None, m.stride, m.padding, config=cfg,
                                                            packed_weight=wp32))
        y32 = sparse_conv2d(x32cl, w32, None, m.stride, m.padding, config=cfg)
        y16 = sparse_conv2d(xh, wh, None, m.stride, m.padding, config=cfg)
        occ = prescan(xh, (cfg.tile_h, cfg.tile_w), cfg.block_k)
        row["prescan_fp16_ms"] = bench(lambda: prescan(xh, (cfg.tile_h, cfg.tile_w), cfg.block_k))
        row["sparse_fp16_given_occ_ms"] = bench(lambda: sparse_conv2d(xh, wh, None, m.stride, m.padding, config=cfg,
                                                                      packed_weight=wp, occupancy=occ))
        row["block_density_input"] = occ.block_density()
        row["block_density_halo"] = block_density(flat, cfg.tile_h, cfg.block_k, 1, m.stride[0], 0)
    row["configs_fp16_ms"] = cfgs
    row["best_config"] = best
    row["sparse_fp16_ms"] = cfgs[best]
    row["dispatch_fp16_ms"] = min(row["sparse_fp16_ms"], row["cudnn_fp16_cl_ms"])
    row["speedup_vs_cudnn_fp16"] = row["cudnn_fp16_cl_ms"] / row["sparse_fp16_ms"]
    row["speedup_vs_cudnn_fp32"] = row["cudnn_fp32_ms"] / row["sparse_fp16_ms"]
    row["speedup_given_occ_vs_cudnn_fp16"] = row["cudnn_fp16_cl_ms"] / row["sparse_fp16_given_occ_ms"]
    row["rel_err_fp32"] = _rel(y32, ref)
    row["rel_err_fp16"] = _rel(y16, ref)
    row["exact"] = row["rel_err_fp32"] < TOL["fp32"] and row["rel_err_fp16"] < TOL["fp16"]
    return row


def _summary(rows):
    out = {}
    for kind in ("depthwise", "pointwise", "transposed"):
        rs = [r for r in rows if r["kind"] == kind]
        if not rs:
            continue
        s = lambda k, rs=rs: sum(r[k] for r in rs)
        d = {"layers": len(rs), "sum_cudnn_fp16_cl_ms": s("cudnn_fp16_cl_ms"), "sum_cudnn_fp32_ms": s("cudnn_fp32_ms"),
             "sum_sparse_fp16_ms": s("sparse_fp16_ms"), "sum_dispatch_fp16_ms": s("dispatch_fp16_ms"),
             "sum_dense_kernel_fp16_ms": s("dense_kernel_fp16_ms"), "sum_sparse_fp32_ms": s("sparse_fp32_ms"),
             "sum_sparse_fp16_given_occ_ms": s("sparse_fp16_given_occ_ms"), "sum_prescan_fp16_ms": s("prescan_fp16_ms"),
             "all_exact": all(r["exact"] for r in rs),
             "mean_elem_density": sum(r["elem_density"] for r in rs) / len(rs),
             "mean_block_density_halo": sum(r["block_density_halo"] for r in rs) / len(rs)}
        d["speedup_sparse_vs_cudnn_fp16"] = d["sum_cudnn_fp16_cl_ms"] / d["sum_sparse_fp16_ms"]
        d["speedup_sparse_vs_cudnn_fp32"] = d["sum_cudnn_fp32_ms"] / d["sum_sparse_fp16_ms"]
        d["speedup_dispatch_vs_cudnn_fp16"] = d["sum_cudnn_fp16_cl_ms"] / d["sum_dispatch_fp16_ms"]
        d["speedup_skipping_vs_dense_kernel"] = d["sum_dense_kernel_fp16_ms"] / d["sum_sparse_fp16_ms"]
        # what runs when the producing fused layer writes the occupancy (optimize(write_occupancy=True))
        d["speedup_given_occ_vs_cudnn_fp16"] = d["sum_cudnn_fp16_cl_ms"] / d["sum_sparse_fp16_given_occ_ms"]
        out[kind] = d
    return out


def _model_exactness(model, x):
    """optimize(mode="sparse", write_occupancy=True) on an fp32 copy: output relative error (norm) against the
    dense model."""
    from sparseflow_core import optimize

    _reset(model)
    with torch.no_grad():
        ref = model(x).double()
    opt, rep = optimize(copy.deepcopy(model), x, mode="sparse", write_occupancy=True, return_report=True)
    _reset(opt)
    with torch.no_grad():
        y = opt(x).double()
    _reset(opt)
    replaced = {k: 0 for k in ("SparseGroupedConv2d", "SparseConvTranspose2d", "SparseConv2d")}
    for mm in opt.modules():
        if type(mm).__name__ in replaced:
            replaced[type(mm).__name__] += 1
    err = float((y - ref).norm() / ref.norm().clamp_min(1e-30))
    return {"output_rel_err": err, "ok": err < 1e-3, "replaced": replaced,
            "report_counts": {a: len(rep.by_action(a)) for a in ("fused", "sparse", "kernel", "neuron-kernel", "left")}}


def _md(results) -> str:
    lines = ["# Depthwise, pointwise and transposed convolutions on real spikes", ""]
    env = results.get("env", {})
    lines.append(f"Device: {env.get('device')}, torch {env.get('torch')}, triton {env.get('triton')}. "
                 "Times are medians in ms (CUDA-graph replay); sparse = SparseFlow fp16 channels_last, prescan "
                 "included, best config; speed-up = cuDNN fp16 channels_last / sparse.")
    for mres in results["models"]:
        lines += ["", f"## {mres['model']} ({mres['size']} px, T={mres['T']}, N={mres['N']})", ""]
        e = mres.get("e2e")
        if e:
            lines.append(f"Model output vs dense (fp32, optimize mode='sparse'): relative error "
                         f"{e['output_rel_err']:.2e} ({'ok' if e['ok'] else 'FAIL'} < 1e-3); replaced {e['replaced']}.")
            lines.append("")
        lines.append("| kind | layers | cuDNN fp16 CL | cuDNN fp32 | sparse fp16 | of which prescan | sparse fp16, "
                     "producer's occupancy | dense kernel fp16 | sparse fp32 | speed-up vs fp16 | vs fp32 "
                     "| with producer's occupancy | dispatch speed-up | elem dens | block dens | exact |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for kind, d in mres["summary"].items():
            lines.append(f"| {kind} | {d['layers']} | {d['sum_cudnn_fp16_cl_ms']:.3f} | {d['sum_cudnn_fp32_ms']:.3f} | "
                         f"{d['sum_sparse_fp16_ms']:.3f} | {d['sum_prescan_fp16_ms']:.3f} | "
                         f"{d['sum_sparse_fp16_given_occ_ms']:.3f} | {d['sum_dense_kernel_fp16_ms']:.3f} | "
                         f"{d['sum_sparse_fp32_ms']:.3f} | {d['speedup_sparse_vs_cudnn_fp16']:.2f}x | "
                         f"{d['speedup_sparse_vs_cudnn_fp32']:.2f}x | {d['speedup_given_occ_vs_cudnn_fp16']:.2f}x | "
                         f"{d['speedup_dispatch_vs_cudnn_fp16']:.2f}x | "
                         f"{d['mean_elem_density']:.3f} | {d['mean_block_density_halo']:.3f} | {d['all_exact']} |")
        lines += ["", "| layer | kind | input [B,C,H,W] | k / s | elem dens | block dens | cuDNN fp16 CL | cuDNN fp32 "
                  "| sparse fp16 (cfg) | given occ. | sparse fp32 | speed-up fp16 | err fp32 / fp16 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in mres["rows"]:
            lines.append(f"| {r['layer']} | {r['kind']} | {r['shape']} | {r['kernel'][0]} / {r['stride'][0]} | "
                         f"{r['elem_density']:.3f} | {r['block_density_halo']:.3f} | {r['cudnn_fp16_cl_ms']:.4f} | "
                         f"{r['cudnn_fp32_ms']:.4f} | {r['sparse_fp16_ms']:.4f} ({r['best_config']}) | "
                         f"{r['sparse_fp16_given_occ_ms']:.4f} | "
                         f"{r['sparse_fp32_ms']:.4f} | {r['speedup_vs_cudnn_fp16']:.2f}x | "
                         f"{r['rel_err_fp32']:.1e} / {r['rel_err_fp16']:.1e} |")
    return "\n".join(lines) + "\n"


def _rows(ctx, mres, recs, names, rep, left, margin):
    for lname in names:
        if left() < margin:
            mres["truncated"] = True
            return
        row = _time_row(ctx, {**recs[lname], "name": lname}, rep)
        mres["rows"].append(row)
        ctx.log(f"depthwise_transposed {mres['model']}@{mres['size']} {lname} {row['kind']}: "
                f"cudnn16 {row['cudnn_fp16_cl_ms']:.4f} "
                f"sparse16 {row['sparse_fp16_ms']:.4f} ({row['best_config']}) given-occ "
                f"{row['sparse_fp16_given_occ_ms']:.4f} x{row['speedup_vs_cudnn_fp16']:.2f} "
                f"dens {row['elem_density']:.3f}/{row['block_density_halo']:.3f} exact {row['exact']}")


@strict_fp32()
def run(ctx) -> dict:
    """Phase 1, per model: exactness of the whole model, then its depthwise and transposed layers (the
    target). Phase 2: the pointwise layers of every model while time is left. The 256 px U-Net comes last.

    TF32 is off throughout (``strict_fp32``): measured on the H200, the spiking U-Net's output differs by 0.9 from
    a TF32 reference and by 2.4e-8 from a true-fp32 one."""
    t_start = time.time()
    deadline = min(ctx.deadline, t_start + SECTION_BUDGET_S)
    left = lambda: deadline - time.time()
    dev = ctx.device
    if ctx.dry:
        T, N, rep, margin = 2, 1, 1, 1
        plan = [("spiking_mobilenetv2", 32, dict(width_mult=0.25, last_channels=32,
                                                 stages=((1, 16, 1, 1, 3), (2, 24, 2, 2, 3), (2, 32, 1, 2, 5)))),
                ("spiking_unet", 16, dict(base=4, depth=2))]
    else:
        T, N, rep, margin = ctx.T, ctx.N, 20, 5
        # the U-Net first: its few transposed convs must not wait behind MobileNet's compile-heavy layers
        plan = [("spiking_unet", 128, {}), ("spiking_mobilenetv2", 224, {}), ("spiking_unet", 256, {})]
    results = {"env": ctx.env, "T": T, "N": N, "models": []}
    pending = []
    for i, (name, size, kw) in enumerate(plan):
        need = (5 if ctx.dry else 25) if i < 2 else (5 if ctx.dry else 45)
        if left() < need:
            ctx.log(f"depthwise_transposed: skipping {name} {size} px (time)")
            results.setdefault("skipped", []).append(f"{name}@{size}")
            continue
        model, x = _prepare(name, T, N, size, dev, ctx.dry, **kw)
        mres = {"model": name, "size": size, "T": T, "N": N, "rows": []}
        try:
            mres["e2e"] = _model_exactness(model, x)
            ctx.log(f"depthwise_transposed {name}@{size}: e2e {mres['e2e']}")
        except Exception as e:  # report and go on with the per-layer table
            mres["e2e"] = None
            mres["e2e_error"] = f"{type(e).__name__}: {e}"
            ctx.log(f"depthwise_transposed {name}@{size}: e2e failed: {mres['e2e_error']}")
        recs = _capture(model, x)
        model = x = None
        main = [n for n in recs if recs[n]["kind"] != "pointwise"]
        _rows(ctx, mres, recs, sorted(main, key=lambda n, r=recs: r[n]["kind"] != "transposed"), rep, left, margin)
        pw = {n: r for n, r in recs.items() if r["kind"] == "pointwise"}
        if pw:
            pending.append((mres, pw))
        results["models"].append(mres)
        recs = main = None
        if i == 1:  # the pointwise layers of the first two models before the optional 256 px U-Net
            for mres_p, pw_p in pending:
                _rows(ctx, mres_p, pw_p, list(pw_p), rep, left, margin)
            pending = []
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    for mres_p, pw_p in pending:
        _rows(ctx, mres_p, pw_p, list(pw_p), rep, left, margin)
    pending = None
    for mres in results["models"]:
        mres["summary"] = _summary(mres["rows"])
    results["section_s"] = time.time() - t_start
    stem = "depthwise_transposed_dry" if ctx.dry else "depthwise_transposed"
    ctx.dump(f"{stem}.json", results)
    ctx.write_text(f"{stem}.md", _md(results))
    return results
