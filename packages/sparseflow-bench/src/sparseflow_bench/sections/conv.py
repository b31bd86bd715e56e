"""``--sections conv``: the standalone ``sparse_conv2d`` (prescan included) on the inputs of the fused layers of
``ctx.model`` (see :mod:`.layers`) against cuDNN fp16 channels_last and fp32, with the dispatch's pick (the faster of
sparse and cuDNN per layer). -> ``sparse_conv_<model>.json`` (``sparse_conv_dry.json`` under ``ctx.dry``;
``markdown``: ``sparse_conv_<model>.md``).
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from ..figures import env_line
from ..records import Row, Timing
from .layers import _densities, spiking_layers


def _row(ctx, name, rec) -> dict:
    from sparseflow_kernels import ConvConfig, sparse_conv2d
    from sparseflow_kernels.conv import pack_weight

    m = rec["module"]
    flat = rec["x"].flatten(0, 1)
    xh = flat.half().contiguous(memory_format=torch.channels_last)
    wh = m.weight.half().contiguous(memory_format=torch.channels_last)
    x32 = flat.float().contiguous()
    w32 = m.weight.float()
    row = {"layer": name, "shape": list(flat.shape), "C_out": m.out_channels, "stride": m.stride[0],
           **_densities(flat, m.stride[0])}
    row["cudnn_fp16_cl_ms"] = ctx.bench(lambda: F.conv2d(xh, wh, None, m.stride, m.padding))["median"]
    row["cudnn_fp32_ms"] = ctx.bench(lambda: F.conv2d(x32, w32, None, m.stride, m.padding))["median"]
    bs = 16 if flat.shape[2] >= 56 else 8
    cfg = ConvConfig(bs, bs, 64, 16, False, 8 if bs == 16 else 4, 3)
    wp = pack_weight(wh, 16, 64, torch.float16)
    row["sparse_fp16_ms"] = ctx.bench(lambda: sparse_conv2d(xh, wh, None, m.stride, m.padding, config=cfg,
                                                            packed_weight=wp))["median"]
    row["dense_kernel_fp16_ms"] = ctx.bench(lambda: sparse_conv2d(xh, wh, None, m.stride, m.padding, config=cfg,
                                                                  packed_weight=wp, dense=True))["median"]
    wp32 = pack_weight(w32, 16, 64, torch.float32)
    x32cl = x32.contiguous(memory_format=torch.channels_last)
    row["sparse_fp32_tf32x3_ms"] = ctx.bench(lambda: sparse_conv2d(x32cl, w32, None, m.stride, m.padding,
                                                                   config=cfg, packed_weight=wp32))["median"]
    row["block_size"] = bs
    row["dispatch_fp16_ms"] = min(row["sparse_fp16_ms"], row["cudnn_fp16_cl_ms"])
    return row


def run(ctx) -> dict:
    rows = []
    for name, rec in spiking_layers(ctx)[2].items():
        if ctx.left() < 30:
            break
        rows.append(_row(ctx, name, rec))
        ctx.log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}))

    def s(k):
        return sum(r[k] for r in rows)

    summary = {"layers": len(rows), "sum_cudnn_fp16_cl_ms": s("cudnn_fp16_cl_ms"), "sum_cudnn_fp32_ms": s("cudnn_fp32_ms"),
               "sum_sparse_fp16_ms": s("sparse_fp16_ms"), "sum_dispatch_fp16_ms": s("dispatch_fp16_ms"),
               "sum_sparse_fp32_ms": s("sparse_fp32_tf32x3_ms")}
    summary["speedup_sparse_vs_cudnn_fp16"] = summary["sum_cudnn_fp16_cl_ms"] / summary["sum_sparse_fp16_ms"]
    summary["speedup_sparse_vs_cudnn_fp32"] = summary["sum_cudnn_fp32_ms"] / summary["sum_sparse_fp16_ms"]
    summary["speedup_dispatch_vs_cudnn_fp16"] = summary["sum_cudnn_fp16_cl_ms"] / summary["sum_dispatch_fp16_ms"]
    out = {"env": ctx.env, "summary": summary, "rows": rows}
    ctx.dump(f"sparse_conv_{'dry' if ctx.dry else ctx.model}.json", out, env_key="env")
    return out


def rows(obj, source):
    model = os.path.splitext(source)[0].removeprefix("sparse_conv_")
    for r in obj["rows"]:
        bs = r.get("block_size", 8)
        ts = [Timing("cudnn_fp16_cl", r.get("cudnn_fp16_cl_ms"), "baseline", "float16"),
              Timing("cudnn_fp32", r.get("cudnn_fp32_ms"), dtype="float32"),
              Timing("sparse_fp16", r.get("sparse_fp16_ms"), "sparse", "float16"),
              Timing("dense_kernel_fp16", r.get("dense_kernel_fp16_ms"), dtype="float16"),
              Timing("sparse_fp32_tf32x3", r.get("sparse_fp32_tf32x3_ms"), dtype="float32"),
              Timing("dispatch_fp16", r.get("dispatch_fp16_ms"), "sparseflow", "float16")]
        yield Row("sparse_conv", "conv2d", ts, shape=r.get("shape"), model=model, layer=r.get("layer", ""),
                  elem_density=r.get("elem_density"), block_density=r.get(f"block_density_{bs}x{bs}_16ch_halo"),
                  block_size=bs, baseline="cudnn_fp16_cl")


def markdown(r: dict, d: str) -> str:
    s = r["summary"]
    lines = ["# Standalone sparse_conv2d on spiking_resnet34 spike maps (3x3 layers, batch T*N = 32)", "",
             f"Device: {env_line(r['env'])}. `do_bench_cudagraph` medians. sparse = prescan + sparse kernel (fp16; "
             "fp32 uses tf32x3 for fp32 accuracy); cuDNN fp32 runs with torch's default (TF32 allowed).", "",
             f"Sums: cuDNN fp16 channels_last {s['sum_cudnn_fp16_cl_ms']:.3f} ms, cuDNN fp32 {s['sum_cudnn_fp32_ms']:.3f} ms, "
             f"sparse fp16 {s['sum_sparse_fp16_ms']:.3f} ms ({s['speedup_sparse_vs_cudnn_fp16']:.2f}x of cuDNN fp16, "
             f"{s['speedup_sparse_vs_cudnn_fp32']:.2f}x of cuDNN fp32), sparse fp32 {s['sum_sparse_fp32_ms']:.3f} ms; "
             f"with the dispatch (the faster of sparse and cuDNN per layer) {s['sum_dispatch_fp16_ms']:.3f} ms "
             f"({s['speedup_dispatch_vs_cudnn_fp16']:.2f}x).", "",
             "| layer | input | elem dens | block dens 8x8 | block dens 16x16 | cuDNN fp16 cl ms | cuDNN fp32 ms | sparse fp16 ms "
             "| dense kernel fp16 ms | sparse fp32 ms | sparse vs cuDNN fp16 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['layer']} | {row['shape'][1:]} | {row['elem_density']:.3f} | "
                     f"{row['block_density_8x8_16ch_halo']:.2f} | {row['block_density_16x16_16ch_halo']:.2f} | "
                     f"{row['cudnn_fp16_cl_ms']:.4f} | {row['cudnn_fp32_ms']:.4f} | {row['sparse_fp16_ms']:.4f} | "
                     f"{row['dense_kernel_fp16_ms']:.4f} | {row['sparse_fp32_tf32x3_ms']:.4f} | "
                     f"{row['cudnn_fp16_cl_ms'] / row['sparse_fp16_ms']:.2f}x |")
    return "\n".join(lines) + "\n"
