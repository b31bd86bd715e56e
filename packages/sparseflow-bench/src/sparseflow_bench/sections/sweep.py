"""``--sections sweep``: skipping inside the fused spiking layer, measured: the fused layer with and without block
skipping (the same configuration, and the best dense one) on one layer per stage of ``ctx.model``, batch 1-128 (the
real spike maps repeated along the batch), at ``ctx.size`` and twice that. -> ``fused_batch_sweep.json``
(``markdown``: ``fused_batch_sweep.md`` and ``.png``).
"""

from __future__ import annotations

import json

import torch

from ..figures import env_line, page
from ..records import Row, Timing
from .layers import candidates, capture_spiking_layers, layer_params, sparse_path, spiking_layers

# one layer per stage; layer4 (512 channels: 7x7 at 224 px, 14x14 at 448) is the one at <= 50% block density
PICK = ("layer1.1.conv1", "layer2.1.conv1", "layer3.1.conv1", "layer4.1.conv1")


def _row(ctx, size, lname, m, xn, sms):
    """One layer at one batch: None when it does not fit in memory."""
    from sparseflow_core.stats import block_density, element_density
    from sparseflow_kernels import prescan

    n = xn.shape[1]
    _, spec, scale, shift = layer_params(m)
    try:
        cands = candidates(xn, m, spec, scale, shift, None, torch.float16)
        dense = ctx.bench(cands["fused_dense"])["median"]
        same_cfg, _ = sparse_path(m, m.weight.half(), spec, scale, shift, torch.float16)
        dense16 = ctx.bench(lambda: same_cfg(xn))["median"]
        sparse = ctx.bench(cands["fused_sparse"])["median"]
        occ = prescan(xn.flatten(0, 1), 8, 16)
        occ_t = ctx.bench(lambda: prescan(xn.flatten(0, 1), 8, 16))["median"]
        sparse_only = ctx.bench(lambda: same_cfg(xn, occupancy=occ))["median"]
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None
    H = xn.shape[3] // m.stride[0]
    programs = n * (-(-H // 8)) ** 2 * -(-m.out_channels // 64)
    flat = xn.flatten(0, 1)
    return {"size": size, "layer": lname, "N": n, "T": int(xn.shape[0]), "C": int(xn.shape[2]),
            "H": int(xn.shape[3]), "work_fraction": block_density(flat, 8, 16, 3, m.stride[0], 1),
            "elem_density": element_density(flat), "programs": programs, "waves_1_per_sm": programs / sms,
            "fused_dense_best_cfg_ms": dense, "fused_dense_same_cfg_ms": dense16,
            "fused_sparse_with_prescan_ms": sparse, "fused_sparse_kernel_only_ms": sparse_only,
            "prescan_ms": occ_t,
            "speedup_sparse_vs_dense_same_cfg": dense16 / sparse,
            "speedup_sparse_vs_dense_best": dense / sparse}


def run(ctx) -> dict:
    from ..models import prepared_model

    sources = {ctx.size: spiking_layers(ctx)[2]}
    if ctx.left() > 200:
        try:
            model448, x448 = prepared_model(ctx.model, ctx.T, 8, 2 * ctx.size, ctx.device)
            _, sources[2 * ctx.size] = capture_spiking_layers(model448, x448)
            del model448, x448
        except Exception as e:
            ctx.log(f"sweep {2 * ctx.size}: {type(e).__name__}: {e}")
    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 1
    for size, recs in sources.items():
        for lname in PICK:
            if lname not in recs:
                continue
            m = recs[lname]["module"]
            x8 = recs[lname]["x"].half()
            for n in ((1, 2) if ctx.device.type == "cpu" else (1, 8, 32, 128)):
                if ctx.left() < 40:
                    break
                xn = x8.repeat(1, -(-n // x8.shape[1]), 1, 1, 1)[:, :n].contiguous()  # the spike maps, repeated
                row = _row(ctx, size, lname, m, xn, sms)
                if row is not None:
                    rows.append(row)
                    ctx.log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
    out = {"env": ctx.env, "rows": rows}
    ctx.dump("fused_batch_sweep.json", out, env_key="env")
    return out


def rows(obj, source):
    for r in obj["rows"]:
        ts = [Timing("fused_dense_same_cfg", r.get("fused_dense_same_cfg_ms"), "baseline"),
              Timing("fused_dense_best_cfg", r.get("fused_dense_best_cfg_ms")),
              Timing("fused_sparse_with_prescan", r.get("fused_sparse_with_prescan_ms"), "sparse"),
              Timing("fused_sparse_kernel_only", r.get("fused_sparse_kernel_only_ms")),
              Timing("prescan", r.get("prescan_ms"))]
        yield Row("batch_sweep", "spiking_conv2d", ts, shape=[r.get("T"), r.get("N"), r.get("C"), r.get("H"), r.get("H")],
                  model=f"{r.get('size')}px", layer=r.get("layer", ""), elem_density=r.get("elem_density"),
                  block_density=r.get("work_fraction"), block_size=8, dtype="float16", baseline="fused_dense_same_cfg")


def markdown(r: dict, d: str) -> str:
    lines = ["# Skipping inside the fused layer: batch sweep", "",
             f"Device: {env_line(r['env'])}. Real spike maps of spiking_resnet34 (224 px) repeated along the batch. "
             "Fused sparse = one-pass prescan + the same kernel visiting only non-zero (time step, 8x8 tile, 16-channel) "
             "blocks; fused dense = the same configuration visiting all. Work fraction = blocks visited.", "",
             "| size | layer | N | work fraction | programs / SMs | dense ms | sparse (incl. prescan) ms | sparse kernel only ms "
             "| prescan ms | sparse vs dense |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['size']} | {row['layer']} | {row['N']} | {row['work_fraction']:.2f} | "
                     f"{row['waves_1_per_sm']:.1f} | {row['fused_dense_same_cfg_ms']:.3f} | "
                     f"{row['fused_sparse_with_prescan_ms']:.3f} | {row['fused_sparse_kernel_only_ms']:.3f} | "
                     f"{row['prescan_ms']:.4f} | {row['speedup_sparse_vs_dense_same_cfg']:.2f}x |")

    def draw(ax):
        for layer in sorted({row["layer"] for row in r["rows"]}):
            rr = [row for row in r["rows"] if row["layer"] == layer]
            ax.plot([row["N"] for row in rr], [row["speedup_sparse_vs_dense_same_cfg"] for row in rr], "o-",
                    label=f"{layer} (work {rr[-1]['work_fraction']:.2f})")
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(1.5, color="tab:red", lw=0.8, ls="--", label="goal 1.5x")
        ax.set_xlabel("batch N (T=4)")
        ax.set_ylabel("fused sparse / fused dense speed-up")
        ax.legend(fontsize=7)

    return page(lines, d, "fused_batch_sweep.png", "sparse vs dense against batch", draw, (6, 4))
