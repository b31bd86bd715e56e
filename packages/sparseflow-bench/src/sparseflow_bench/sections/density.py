"""Per-op density sweep on synthetic spikes: i.i.d., spatially clustered (per channel, or regions shared by all
channels), whole channels silent.

For each op (3x3 conv 64->64 @56, 1x1 conv 256->64 @28, projection GEMM 6272x256->768) and each pattern and
density, in one run on the same inputs: SparseFlow's sparse kernel (prescan included), the same kernel over every
block, and the dense baseline (cuDNN / cuBLAS fp16, channels_last for convs). Element density and the block
density the kernel sees (8x8 tiles x 16 channels with the 3x3 halo for convs; 64-row x 32-column blocks for the GEMM)
are recorded beside each timing, so the report can plot speed-up against block density with the ideal 1/density.
Writes ``density.json`` and ``density.md``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..records import Row, Timing
from ..spikes import clustered_spikes, iid_spikes, silent_channel_spikes, spike_stats

# i.i.d. spikes fill every block already at 0.5-2 % of elements (a 16-channel 10x10 halo block holds 1,600 of
# them), so the i.i.d. sweep starts far lower; "regions" are activity patches shared by all channels of a sample
# (objects in the image: 5 % of elements in about 40 % of 8x8x16 blocks, as on real spike maps), swept over the
# covered fraction at a 50 % firing rate inside; "clustered" draws its patches per channel; "silent_channels"
# silences whole (sample, channel) planes (90 % of them for the second entry).
PATTERNS = ([("iid", d) for d in (0.0002, 0.001, 0.005, 0.02, 0.1, 0.5)]
            + [("regions", d) for d in (0.01, 0.03, 0.06, 0.15, 0.3)]
            + [("clustered", d) for d in (0.02, 0.1)]
            + [("silent_channels", d) for d in (0.05,)] + [("silent_channels_90", d) for d in (0.02,)])


def _spikes(pattern, shape, density, seed):
    if pattern == "iid":
        return iid_spikes(shape, density, seed=seed)
    if pattern == "regions":
        return clustered_spikes(shape, density, blob=8, fill=0.5, seed=seed, share_channels=True)
    if pattern == "clustered":
        return clustered_spikes(shape, density, seed=seed)
    return silent_channel_spikes(shape, density, silent_frac=0.9 if pattern.endswith("_90") else 0.6, seed=seed)


def run(ctx):
    from sparseflow_kernels import sparse_conv2d
    from sparseflow_kernels.linear import linear_block_flags, sparse_linear

    dry = ctx.dry
    dev = ctx.device
    B = 2 if dry else 32
    ops = [("conv3x3", (B, 64, 16 if dry else 56, 16 if dry else 56), 64, 3),
           ("conv1x1", (B, 64 if dry else 256, 8 if dry else 28, 8 if dry else 28), 64, 1),
           ("linear", (64 if dry else 6272, 256), 768, None)]
    patterns = [PATTERNS[i] for i in (0, 6, 13)] if dry else PATTERNS
    rows = []
    for op, shape, co, k in ops:
        g = torch.Generator(device="cpu").manual_seed(0)
        w = (torch.randn((co, shape[1], k, k) if k else (co, shape[1]), generator=g) * 0.1).to(dev)
        for pattern, dens in patterns:
            if ctx.left() < 20:
                ctx.log("density: deadline")
                break
            if k:
                x32 = _spikes(pattern, shape, dens, seed=1).to(dev)
                st = spike_stats(x32)
                block = st["tile8_g16_halo"] if k == 3 else st["tile8_chan"]
                elem = st["elem"]
            else:
                # tokens as 8x8 "images" of K channels: the same three patterns over (token, feature)
                x32 = _spikes(pattern, (shape[0] // 64, shape[1], 8, 8), dens, seed=1)
                x32 = x32.permute(0, 2, 3, 1).reshape(shape).to(dev)
                elem = float((x32 != 0).float().mean())
                flags = linear_block_flags(x32, 64, 32)
                block = float(flags.float().mean())
            row = {"op": op, "shape": list(shape), "C_out": co, "pattern": pattern, "target_density": dens,
                   "elem_density": elem, "block_density": block}
            dtypes = [torch.float32] if dry else [torch.float16]
            for dt in dtypes:
                x = x32.to(dt)
                wd = w.to(dt)
                if k:
                    x = x.contiguous(memory_format=torch.channels_last)
                    wcl = wd.contiguous(memory_format=torch.channels_last)
                    pad = k // 2
                    fns = {"sparse": lambda x=x, wd=wd, pad=pad: sparse_conv2d(x, wd, None, 1, pad, block_size=8),
                           "dense_kernel": lambda x=x, wd=wd, pad=pad: sparse_conv2d(x, wd, None, 1, pad, block_size=8,
                                                                                   dense=True),
                           "baseline": lambda x=x, wcl=wcl, pad=pad: F.conv2d(x, wcl, None, 1, pad)}
                else:
                    fns = {"sparse": lambda x=x, wd=wd: sparse_linear(x, wd),
                           "dense_kernel": lambda x=x, wd=wd: sparse_linear(x, wd, dense=True),
                           "baseline": lambda x=x, wd=wd: F.linear(x, wd)}
                ref = fns["baseline"]().double()
                out = fns["sparse"]().double()
                row["rel_err"] = float((out - ref).norm() / ref.norm().clamp_min(1e-12))
                for name, fn in fns.items():
                    row[f"{name}_ms"] = None if dry else ctx.bench(fn)["median"]
                if not dry:
                    row["speedup_sparse_vs_baseline"] = row["baseline_ms"] / row["sparse_ms"]
                    row["speedup_sparse_vs_dense_kernel"] = row["dense_kernel_ms"] / row["sparse_ms"]
            rows.append(row)
            ctx.log({k2: (round(v, 4) if isinstance(v, float) else v) for k2, v in row.items()})
    baseline = "cuDNN fp16 channels_last (convs) / cuBLAS fp16 (linear)"
    ctx.dump("density.json", {"baseline": baseline, "rows": rows})
    lines = ["# Density sweep on synthetic spikes (fp16)", "",
             f"Baseline: {baseline}, timed in the same run on the same inputs; sparse includes its prescan.", "",
             "| op | pattern | elem dens | block dens | sparse ms | same kernel dense ms | baseline ms | "
             "sparse / baseline | sparse / dense kernel | rel err |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(v):
            return "" if v is None else f"{v:.4f}"
        sp = r.get("speedup_sparse_vs_baseline")
        sd = r.get("speedup_sparse_vs_dense_kernel")
        lines.append(f"| {r['op']} | {r['pattern']} | {r['elem_density']:.3f} | {r['block_density']:.3f} | "
                     f"{f(r.get('sparse_ms'))} | {f(r.get('dense_kernel_ms'))} | {f(r.get('baseline_ms'))} | "
                     f"{'' if sp is None else f'{sp:.2f}x'} | {'' if sd is None else f'{sd:.2f}x'} | "
                     f"{r['rel_err']:.1e} |")
    ctx.write_text("density.md", "\n".join(lines) + "\n")
    return {"rows": rows}


def rows(obj, source):
    """Per op and spike pattern the sparse kernel (prescan included), the same kernel over every block, and the
    dense baseline (cuDNN fp16 channels_last for convs, cuBLAS fp16 for the GEMM); each (pattern, density) is its
    own row (``layer``), so speed-ups stay apart by density."""
    for r in obj["rows"]:
        base = "cublas_fp16" if r.get("op") == "linear" else "cudnn_fp16_cl"
        ts = [Timing(base, r.get("baseline_ms"), "baseline"), Timing("sparse_fp16", r.get("sparse_ms"), "sparse"),
              Timing("dense_kernel_fp16", r.get("dense_kernel_ms"))]
        yield Row("density", str(r.get("op", "")), ts, shape=r.get("shape"), model="synthetic",
                  layer=f"{r.get('pattern')}@{r.get('target_density')}", elem_density=r.get("elem_density"),
                  block_density=r.get("block_density"), block_size=8 if r.get("op") != "linear" else None,
                  dtype="float16", baseline=base)
