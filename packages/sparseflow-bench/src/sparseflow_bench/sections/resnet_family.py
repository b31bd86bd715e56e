"""GPU section ``resnet_family``: every 1x1 and 3x3 spike convolution of the spiking ResNet family, SparseBatchNorm2d,
block size default vs auto, and ``optimize()`` end to end.

For ``sew_resnet34`` (cnf ADD: block outputs are 0/1/2 sums), ``spiking_resnet50`` (1x1 bottlenecks and
downsamples) and ``spiking_vgg11`` (T=4, N=8, 224 px natural images, recalibrated BatchNorm; ``ctx.T/N/size``;
``SPARSEFLOW_FAMILY_MODELS=a,b`` picks some of them) one
dense forward records the input of every convolution the analyzer proves spike-fed. Then, per 1x1 / 3x3 layer and
on those same inputs, in the same run:

* cuDNN fp16 channels_last and cuDNN fp32 (NCHW, TF32 as torch allows it) ``F.conv2d``: the baselines;
* ``sparse_conv2d`` fp16 channels_last with 8x8 and 16x16 skip tiles and without skipping (``dense=True``), and fp32
  at the default rule's tile (prescan included in every sparse time);
* 1x1 stride-1 layers also as a GEMM over channels (``sparse_linear`` on the channels_last rows, zero row tiles
  skipped): the dedicated 1x1 candidate;
* the block size the default rule picks and the one ``block_size="auto"`` measures
  (``sparseflow_core.blocks.measure_block_size`` on a ``SparseConv2d`` of the layer, fp16 channels_last);
* densities: elements, (sample, tile, 16 channels) blocks with halo at 8 and 16 px, silent (sample, channel) planes;
* exactness: fp32 against float64, fp16 against the fp32 reference.

Layers repeated with one geometry (ResNet stages) are sampled: the first layer of every geometry is measured
first, then the last of each, as long as the time budget lasts; the summaries (sum over the 1x1 and over the 3x3
layers) weight each measured layer by the number of layers of its geometry. Then SparseBatchNorm2d (kernel
alone, with the producer's occupancy, and with a prescan) against ``nn.BatchNorm2d`` fp16 channels_last / fp32 on
spike maps of each resolution, and ``optimize()`` logits relative error against the dense fp32 model for each
model (< 1e-3, TF32 off for that check).

Writes ``resnet_family.json`` and ``resnet_family.md`` into the output folder.
"""

from __future__ import annotations

import copy
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from . import reset as _reset
from . import strict_fp32

MODELS = ("sew_resnet34", "spiking_resnet50", "spiking_vgg11")
BUDGET_S = 140.0  # the whole section


def _rel(y, ref) -> float:
    y, ref = y.detach().double(), ref.detach().double()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def _capture(model, x):
    """Dense logits and the fp16 input (values are small integers: exact) of every spike-fed Conv2d."""
    from sparseflow_core import analyze

    an = analyze(model, x, collect_stats=False)
    fed = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and an.spike_fed(n)[0]}
    recs, handles = {}, []
    for name, m in model.named_modules():
        if name in fed:
            def hook(mod, args, name=name):
                a = args[0].detach()
                recs[name] = {"x": (a.flatten(0, 1) if a.dim() == 5 else a).to(torch.float16), "module": mod}
            handles.append(m.register_forward_pre_hook(hook))
    _reset(model)
    with torch.no_grad(), strict_fp32():
        logits = model(x)
    _reset(model)
    for h in handles:
        h.remove()
    return recs, logits, sorted(fed)


def _pick(recs, names):
    """The 1x1 and 3x3 layers to measure, in order: the first layer of every (kernel, C, CO, H, stride) geometry,
    then the last of each (layers repeated with one geometry, as in ResNet stages, are sampled). Returns the
    names and {name: (geometry key, number of layers of that geometry)}."""
    groups = {}
    for n in names:
        m = recs[n]["module"]
        if m.kernel_size not in ((1, 1), (3, 3)):
            continue
        key = (m.kernel_size, m.in_channels, m.out_channels, recs[n]["x"].shape[-1], m.stride)
        groups.setdefault(key, []).append(n)
    order = [ns[0] for ns in groups.values()] + [ns[-1] for ns in groups.values() if len(ns) > 1]
    group = {n: (str(key), len(ns)) for key, ns in groups.items() for n in ns}
    return order, group


def _layer_row(ctx, name, rec, bench):
    from sparseflow_core.blocks import measure_block_size, select_block_size
    from sparseflow_core.stats import block_density, element_density, silent_planes
    from sparseflow_kernels import default_config, prescan, sparse_conv2d, sparse_linear
    from sparseflow_kernels.conv import pack_weight
    from sparseflow_kernels.linear import default_linear_config, pack_linear_weight
    from sparseflow_ops import SparseConv2d

    m = rec["module"]
    x16 = rec["x"].contiguous(memory_format=torch.channels_last)
    x32 = rec["x"].float().contiguous()
    w32 = m.weight.detach().float()
    w16 = w32.half().contiguous(memory_format=torch.channels_last)
    st, pd, dl = m.stride, m.padding, m.dilation
    k = m.kernel_size[0]
    H = x32.shape[-1]
    row = {"layer": name, "kernel": f"{k}x{k}", "stride": st[0], "C": m.in_channels, "CO": m.out_channels,
           "H": H, "batch": x32.shape[0], "elem_density": element_density(x32), "silent_planes": silent_planes(x32),
           "max_value": float(x32.max()), "block_density": {}, "ms": {}, "exact": {}}
    for tile in (8, 16):
        row["block_density"][f"tile{tile}_g16"] = block_density(x32, tile=tile, group=16, kernel=k, stride=st[0],
                                                                padding=pd[0])
    occ8 = prescan(x16, 8, 16)
    row["block_density"]["prescan8_any"] = occ8.block_density()
    ref = F.conv2d(x32.double(), w32.double(), None, st, pd, dl)  # float64: no TF32
    ref32 = ref.float()
    ms = row["ms"]
    packed = {}

    def conv(x, w, bs, dense=False):  # weights packed once, outside the timed calls (as SparseConv2d caches them)
        cfg = default_config(m.in_channels, m.out_channels, bs)
        key = (bs, x.dtype)
        if key not in packed:
            packed[key] = pack_weight(w, cfg.block_k, cfg.block_n, x.dtype)
        return sparse_conv2d(x, w, None, st, pd, dl, config=cfg, packed_weight=packed[key], dense=dense)

    ms["cudnn_fp16_cl"] = bench(lambda: F.conv2d(x16, w16, None, st, pd, dl))
    ms["cudnn_fp32"] = bench(lambda: F.conv2d(x32, w32, None, st, pd, dl))
    for bs in (8, 16):
        row["exact"][f"fp16_b{bs}"] = _rel(conv(x16, w16, bs), ref32)
        ms[f"sparse_fp16_b{bs}"] = bench(lambda bs=bs: conv(x16, w16, bs))
    ms["dense_kernel_fp16"] = bench(lambda: conv(x16, w16, 8, dense=True))
    default = select_block_size(H)
    bs32 = default if isinstance(default, int) else 8
    row["exact"]["fp32"] = _rel(conv(x32, w32, bs32), ref)
    ms["sparse_fp32"] = bench(lambda: conv(x32, w32, bs32))
    if k == 1 and st == (1, 1) and pd == (0, 0):
        rows = x16.permute(0, 2, 3, 1).reshape(-1, m.in_channels)  # a view: channels_last rows
        w2 = w16.reshape(m.out_channels, m.in_channels).contiguous()
        lcfg = default_linear_config(m.in_channels, m.out_channels)
        lpw = pack_linear_weight(w2, lcfg.block_k, lcfg.block_n, torch.float16)
        y = sparse_linear(rows, w2, config=lcfg, packed_weight=lpw)
        row["exact"]["fp16_gemm_rows"] = _rel(y.view(x16.shape[0], H, -1, m.out_channels).permute(0, 3, 1, 2), ref32)
        ms["sparse_fp16_gemm_rows"] = bench(lambda: sparse_linear(rows, w2, config=lcfg, packed_weight=lpw))
    sparse16 = {k2: v for k2, v in ms.items() if k2.startswith("sparse_fp16")}
    row["best_sparse_fp16"] = min(sparse16, key=sparse16.get)
    row["speedup_best_vs_cudnn_fp16_cl"] = ms["cudnn_fp16_cl"] / sparse16[row["best_sparse_fp16"]]
    row["speedup_fp32_vs_cudnn_fp32"] = ms["cudnn_fp32"] / ms["sparse_fp32"]
    # block size: the default rule vs block_size="auto" (the module's own measurement, fp16 channels_last)
    conv16 = copy.deepcopy(m).half().eval()
    sm = SparseConv2d.from_dense(conv16, block_size=default)
    win, t = measure_block_size(sm, (x16,)) if not ctx.dry else (default, {})
    row["block_size"] = {"default": default, "auto": win, "auto_ms": {str(a): b for a, b in t.items()}}
    row["ok"] = row["exact"]["fp32"] < 1e-4 and all(v < 5e-3 for kk, v in row["exact"].items() if "fp16" in kk)
    return row


def _bn_rows(ctx, recs, bench, limit):
    """SparseBatchNorm2d vs nn.BatchNorm2d on one spike map per resolution."""
    from sparseflow_kernels import prescan
    from sparseflow_kernels.batchnorm import batch_norm_affine, bn_eval_affine

    by_h = {}
    for name, rec in recs.items():
        by_h.setdefault(rec["x"].shape[-1], name)
    rows = []
    for _h, name in sorted(by_h.items(), reverse=True)[:limit]:
        x = recs[name]["x"]
        C = x.shape[1]
        bn = nn.BatchNorm2d(C).to(x.device).eval()
        with torch.no_grad():
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        row = {"input_of": name, "shape": list(x.shape), "elem_density": float((x != 0).float().mean()),
               "ms": {}, "exact": {}}
        for dt, tag in ((torch.float16, "fp16_cl"), (torch.float32, "fp32")):
            xd = x.to(dt)
            if dt == torch.float16:
                xd = xd.contiguous(memory_format=torch.channels_last)
            bnd = copy.deepcopy(bn).to(dt)
            aff = bn_eval_affine(bnd.running_mean, bnd.running_var, bnd.weight, bnd.bias, bnd.eps)
            occ = prescan(xd, 8, 16)
            ref = F.batch_norm(xd.double(), bn.running_mean.double(), bn.running_var.double(), bn.weight.double(),
                               bn.bias.double(), False, 0.0, bn.eps)
            row["exact"][tag] = _rel(batch_norm_affine(xd, *aff, occupancy=occ), ref)
            row["ms"][f"nn_batchnorm_{tag}"] = bench(lambda bnd=bnd, xd=xd: bnd(xd))
            row["ms"][f"sparse_kernel_{tag}"] = bench(lambda xd=xd, aff=aff: batch_norm_affine(xd, *aff))
            row["ms"][f"sparse_with_occupancy_{tag}"] = bench(
                lambda xd=xd, aff=aff, occ=occ: batch_norm_affine(xd, *aff, occupancy=occ))
            row["ms"][f"prescan_plus_sparse_{tag}"] = bench(
                lambda xd=xd, aff=aff: batch_norm_affine(xd, *aff, occupancy=prescan(xd, 8, 16)))
            row["block_density_8x8_g16"] = occ.block_density()
            row[f"speedup_occupancy_vs_nn_{tag}"] = (row["ms"][f"nn_batchnorm_{tag}"]
                                                     / row["ms"][f"sparse_with_occupancy_{tag}"])
        row["ok"] = row["exact"]["fp32"] < 1e-5 and row["exact"]["fp16_cl"] < 2e-3
        rows.append(row)
    return rows


def _e2e(ctx, model, x, logits):
    from sparseflow_core import get_report, optimize

    opt = copy.deepcopy(model)
    _reset(opt)
    with torch.no_grad():
        optimize(opt, x, mode="torch" if ctx.dry else "auto")  # dry: the cuDNN paths (the interpreter is slow)
        _reset(opt)
        opt(x)  # the first call measures the paths (TF32 allowed, as in use)
        _reset(opt)
        with strict_fp32():
            y = opt(x)
        _reset(opt)
    rep = get_report(opt)
    out = {"logits_rel_err_fp32": _rel(y, logits),
           "logits_max_rel_err_fp32": float((y - logits).abs().max() / logits.abs().max().clamp_min(1e-30)),
           "replaced": {e.name: f"{e.action}: {e.detail or e.reason}" for e in rep.layers} if rep else {},
           "folded": [list(f) for f in rep.folded] if rep else []}
    out["ok"] = out["logits_rel_err_fp32"] < 1e-3
    if not ctx.dry and ctx.left() > 30:
        out.update(ctx.time_forwards(x, dense_fp32=model, optimized_fp32=opt))
    del opt
    return out


def _summary(rows):
    out = {}
    for k in ("1x1", "3x3"):
        rs = [r for r in rows if r["kernel"] == k]
        if not rs:
            continue
        measured = {}
        for r in rs:
            measured[r["group"]] = measured.get(r["group"], 0) + 1
        for r in rs:  # each measured layer stands for its share of the layers of its geometry
            r["weight"] = r["group_size"] / measured[r["group"]]
        cud = sum(r["ms"]["cudnn_fp16_cl"] * r["weight"] for r in rs)
        best = sum(min(v for kk, v in r["ms"].items() if kk.startswith("sparse_fp16")) * r["weight"] for r in rs)
        b8 = sum(r["ms"]["sparse_fp16_b8"] * r["weight"] for r in rs)
        out[k] = {"layers_measured": len(rs), "layers_represented": sum(r["weight"] for r in rs),
                  "sum_cudnn_fp16_cl_ms": cud, "sum_best_sparse_fp16_ms": best, "sum_sparse_fp16_b8_ms": b8,
                  "speedup_sum_best_vs_cudnn_fp16_cl": cud / best if best else math.nan,
                  "sum_cudnn_fp32_ms": sum(r["ms"]["cudnn_fp32"] * r["weight"] for r in rs),
                  "sum_sparse_fp32_ms": sum(r["ms"]["sparse_fp32"] * r["weight"] for r in rs),
                  "auto_differs_from_default": sum(str(r["block_size"]["auto"]) != str(r["block_size"]["default"])
                                                   for r in rs),
                  "mean_elem_density": sum(r["elem_density"] for r in rs) / len(rs)}
    return out


def _md(results) -> str:
    lines = ["# Spiking ResNet family: 1x1 / 3x3 spike convolutions, SparseBatchNorm2d, block size, end to end", ""]
    for name, res in results.items():
        e2e = res.get("e2e", {})
        lines += [f"## {name}", "", f"input {res['input_shape']}; optimize() logits rel err (fp32) "
                  f"{e2e.get('logits_rel_err_fp32', float('nan')):.2e}", ""]
        lines += ["| layer | k/s | C->CO @H | elem | blocks 8/16 | silent planes | cuDNN fp16 cl | cuDNN fp32 | "
                  "sparse fp16 b8 | b16 | dense kernel fp16 | 1x1 GEMM fp16 | sparse fp32 | best vs cuDNN fp16 | "
                  "block default/auto | exact |", "|" + "---|" * 16]
        for r in res["layers"]:
            ms, bd = r["ms"], r["block_density"]
            gemm = ms.get("sparse_fp16_gemm_rows")
            lines.append(
                f"| {r['layer']} | {r['kernel']}/{r['stride']} | {r['C']}->{r['CO']} @{r['H']} | "
                f"{r['elem_density']:.3f} | {bd['tile8_g16']:.2f}/{bd['tile16_g16']:.2f} | {r['silent_planes']:.2f} | "
                f"{ms['cudnn_fp16_cl']:.4f} | {ms['cudnn_fp32']:.4f} | {ms['sparse_fp16_b8']:.4f} | "
                f"{ms['sparse_fp16_b16']:.4f} | {ms['dense_kernel_fp16']:.4f} | "
                f"{'' if gemm is None else f'{gemm:.4f}'} | {ms['sparse_fp32']:.4f} | "
                f"{r['speedup_best_vs_cudnn_fp16_cl']:.2f}x | {r['block_size']['default']}/{r['block_size']['auto']} | "
                f"{r['ok']} |")
        for k, s in res["summary"].items():
            lines.append("")
            lines.append(f"{k}: {s['layers_represented']} layers ({s['layers_measured']} measured): best sparse fp16 "
                         f"{s['sum_best_sparse_fp16_ms']:.3f} ms vs cuDNN fp16 cl {s['sum_cudnn_fp16_cl_ms']:.3f} ms "
                         f"-> {s['speedup_sum_best_vs_cudnn_fp16_cl']:.2f}x; fp32 sparse {s['sum_sparse_fp32_ms']:.3f} "
                         f"vs cuDNN {s['sum_cudnn_fp32_ms']:.3f} ms; auto != default on "
                         f"{s['auto_differs_from_default']}")
        lines += ["", "| BatchNorm on spikes of | elem | blocks 8x8 | nn fp16 cl | kernel | with occupancy | "
                  "prescan + kernel | nn fp32 | with occupancy fp32 | speedup fp16 (occ) | exact |",
                  "|" + "---|" * 11]
        for r in res["batchnorm"]:
            ms = r["ms"]
            lines.append(
                f"| {r['input_of']} {r['shape']} | {r['elem_density']:.3f} | {r['block_density_8x8_g16']:.2f} | "
                f"{ms['nn_batchnorm_fp16_cl']:.4f} | {ms['sparse_kernel_fp16_cl']:.4f} | "
                f"{ms['sparse_with_occupancy_fp16_cl']:.4f} | {ms['prescan_plus_sparse_fp16_cl']:.4f} | "
                f"{ms['nn_batchnorm_fp32']:.4f} | {ms['sparse_with_occupancy_fp32']:.4f} | "
                f"{r['speedup_occupancy_vs_nn_fp16_cl']:.2f}x | {r['ok']} |")
        lines.append("")
    lines.append("Times in ms (median of CUDA graph replays, same run and inputs). Sparse conv times include the "
                 "prescan; 'with occupancy' BatchNorm times assume the producer wrote it. Summaries weight each "
                 "measured layer by the number of layers of its geometry (the first and last of each geometry are "
                 "measured, first ones first, as long as the time budget lasts).")
    return "\n".join(lines) + "\n"


def run(ctx) -> dict:
    from ..models import prepared_model

    T, N, size = (2, 1, 32) if ctx.dry else (ctx.T, ctx.N, ctx.size)
    stop = time.time() + min(BUDGET_S, max(0.0, ctx.left()))

    def left():
        return min(stop - time.time(), ctx.left())

    reps = 20

    def bench(fn):
        return ctx.bench(fn, rep=reps)["median"]

    models = tuple(m for m in os.environ.get("SPARSEFLOW_FAMILY_MODELS", ",".join(MODELS)).split(",") if m)
    results = {}
    for mi, name in enumerate(models):
        if left() < 15 and not ctx.dry:
            ctx.log(f"resnet_family: skipping {name}, {left():.0f} s left")
            continue
        torch.manual_seed(0)
        model, x = prepared_model(name, T, N, size, ctx.device, calib_images=2 if ctx.dry else 16)
        recs, logits, fed = _capture(model, x)
        names, group = _pick(recs, fed)
        if ctx.dry:  # every code path once: the smallest 3x3 and 1x1 layers (a stride-1 1x1 if there is one)
            def cost(n, recs=recs):
                mm = recs[n]["module"]
                return (mm.stride != (1, 1) and mm.kernel_size == (1, 1), mm.in_channels * mm.out_channels)
            ones = sorted((n for n in names if recs[n]["module"].kernel_size == (1, 1)), key=cost)
            threes = sorted((n for n in names if n not in ones), key=cost)
            names = threes[:1] + ones[:1]
        res = {"input_shape": list(x.shape), "T": T, "N": N, "size": size, "spike_fed_convs": len(fed),
               "layers": []}
        share = left() / (len(models) - mi)  # this model's share of what is left
        t_model = time.time()
        for n in names:
            if not ctx.dry and (time.time() - t_model > share * 0.65 or left() < 10):
                ctx.log(f"resnet_family: {name}: time share used, {len(res['layers'])} layers measured")
                break
            row = _layer_row(ctx, n, recs[n], bench)
            row["group"], row["group_size"] = group[n] if not ctx.dry else (n, 1)
            res["layers"].append(row)
            ctx.log(f"resnet_family: {name} {n} {row['kernel']} H={row['H']} dens={row['elem_density']:.3f} "
                    f"best={row['best_sparse_fp16']} {row['speedup_best_vs_cudnn_fp16_cl']:.2f}x ok={row['ok']}")
        res["summary"] = _summary(res["layers"])
        res["batchnorm"] = _bn_rows(ctx, recs, bench, 1 if ctx.dry else 8) if ctx.dry or left() > 8 else []
        res["e2e"] = _e2e(ctx, model, x, logits) if ctx.dry or left() > 8 else {"skipped": "time budget"}
        results[name] = res
        ctx.dump("resnet_family.json", {"models": results})
        model = recs = None  # free the captured maps before the next model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    ctx.write_text("resnet_family.md", _md(results))
    return results
