"""Markdown tables and PNG plots from the JSON results of ``gpu_run`` (``python -m sparseflow_bench.report DIR``).

Every figure in the tables is read from the JSON files in DIR; nothing is typed in by hand.
"""

from __future__ import annotations

import json
import os
import sys


def _load(d, name):
    p = os.path.join(d, name)
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f)


def _env_line(env: dict) -> str:
    return (f"{env.get('device', '?')}, torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
            f"CUDA {env.get('cuda', '?')}, driver {env.get('driver', '?')}, {env.get('date', '?')}")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot(d: str, fname: str, alt: str, draw, figsize) -> list[str]:
    """Draw one figure with ``draw(ax)``, save it as ``d/fname``; the markdown lines that show it (plots are
    optional: without matplotlib the table says why the plot is missing)."""
    try:
        plt = _plt()
        fig, ax = plt.subplots(figsize=figsize)
        draw(ax)
        fig.tight_layout()
        fig.savefig(os.path.join(d, fname), dpi=120)
        plt.close(fig)
        return ["", f"![{alt}]({fname})"]
    except Exception as e:
        return ["", f"(plot skipped: {e})"]


def fused_tables(d: str) -> str | None:
    r = _load(d, "fused_spiking_resnet34.json")
    if r is None:
        return None
    s = r["summary"]
    lines = [f"# Fused spiking layers of {s['model']} (T={s['T']}, N={s['N']}, {s['size']} px)", "",
             f"Device: {_env_line(r['env'])}. `do_bench_cudagraph` medians; every path replayed in a CUDA graph.",
             "Baseline: `torch.compile` (default mode) of the same dense block (conv -> BatchNorm -> (+ residual) -> LIF "
             "over T) in fp16 channels_last, replayed in a CUDA graph. SparseFlow: the fastest of its paths "
             "(what the per-layer dispatch picks), fp16 storage, fp32 accumulation and neuron.", "",
             f"**Sum over {s['layers']} layers: {s['sum_sparseflow_ms']:.3f} ms vs {s['sum_compile_graph_fp16_ms']:.3f} ms "
             f"= {s['sum_speedup_vs_compile_graph']:.2f}x** (goal 2x); slowest layer "
             f"{s['min_layer_speedup_vs_compile_graph']:.2f}x; SpikingJelly eager fp32 sum {s['sum_eager_fp32_ms']:.2f} ms. "
             f"Paths chosen: {s['paths']}.", "",
             "| layer | input [C,H,W] | res | elem dens | block dens (8x8, 16 ch, halo) | eager fp32 ms | compile+graph fp16 ms "
             "| SparseFlow ms | path | speed-up | fused sparse / fused dense (same cfg) | flips fp16 / fp32 / compile vs fp64 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        sd = row.get("sparse_vs_dense_fused_same_cfg")
        lines.append(
            f"| {row['layer']} | {row['shape'][2:]} | {'yes' if row['residual'] else ''} | {row['elem_density']:.3f} "
            f"| {row['block_density_8x8_16ch_halo']:.2f} | {row['eager_fp32_ms']:.3f} | {row['compile_graph_fp16_ms']:.4f} "
            f"| {row['sparseflow_ms']:.4f} | {row['path']} | {row['speedup_vs_compile_graph']:.2f}x "
            f"| {'' if sd is None else f'{sd:.2f}x'} | {row['flip_rate_fp16_vs_fp64']:.1e} / "
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

    lines += _plot(d, "fused_layers.png", "speed-up per layer", draw, (12, 4))
    return "\n".join(lines) + "\n"


def sweep_tables(d: str) -> str | None:
    r = _load(d, "fused_batch_sweep.json")
    if r is None:
        return None
    lines = ["# Skipping inside the fused layer: batch sweep", "",
             f"Device: {_env_line(r['env'])}. Real spike maps of spiking_resnet34 (224 px) repeated along the batch. "
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

    lines += _plot(d, "fused_batch_sweep.png", "sparse vs dense against batch", draw, (6, 4))
    return "\n".join(lines) + "\n"


def conv_tables(d: str) -> str | None:
    r = _load(d, "sparse_conv_spiking_resnet34.json")
    if r is None:
        return None
    s = r["summary"]
    lines = ["# Standalone sparse_conv2d on spiking_resnet34 spike maps (3x3 layers, batch T*N = 32)", "",
             f"Device: {_env_line(r['env'])}. `do_bench_cudagraph` medians. sparse = prescan + sparse kernel (fp16; "
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


def e2e_tables(d: str) -> str | None:
    r = _load(d, "e2e.json")
    if r is None:
        return None
    lines = ["# End to end (T=4, N=8, 224 px, natural images, recalibrated BatchNorm)", ""]
    for name, m in r.items():
        if name.startswith("_") or not isinstance(m, dict):
            continue
        lines.append(f"- **{name}** ({m.get('device')}): " + ", ".join(
            f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in m.items()
            if k not in ("device",)))
    models = [k for k, v in r.items() if not k.startswith("_") and isinstance(v, dict)]

    def draw(ax):
        keys = [("eager_fp32_ms", "SpikingJelly eager fp32"), ("compile_fp16_ms", "torch.compile fp16"),
                ("sparseflow_ms", "SparseFlow fp16 + graph")]
        w = 0.25
        for i, (k, label) in enumerate(keys):
            ax.bar([j + i * w for j in range(len(models))], [r[m].get(k) or 0 for m in models], w, label=label)
        ax.set_xticks([j + w for j in range(len(models))], models)
        ax.set_ylabel("ms per forward")
        ax.legend()

    lines += _plot(d, "e2e.png", "end to end", draw, (7, 4))
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    d = argv[0] if argv else "benchmarks/results"
    for fname, fn in (("fused_spiking_resnet34.md", fused_tables), ("fused_batch_sweep.md", sweep_tables),
                      ("sparse_conv_spiking_resnet34.md", conv_tables), ("e2e.md", e2e_tables)):
        text = fn(d)
        if text:
            with open(os.path.join(d, fname), "w") as f:
                f.write(text)
            print("wrote", os.path.join(d, fname))
    return 0


if __name__ == "__main__":
    sys.exit(main())
