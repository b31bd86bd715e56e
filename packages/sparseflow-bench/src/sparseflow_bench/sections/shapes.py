"""``--sections shapes``: the fused spiking convolution against cuDNN, shape by shape: the 3x3 stride-1
conv -> BatchNorm -> LIF layer shapes of spiking_resnet34 (64 channels at 56x56, 128 at 28, 256 at 14, 512 at 7 for
224 px images; scaled with ``ctx.size``), T = ``ctx.T``, batch 1, 8 and 32, on synthetic Bernoulli spikes (15 %
non-zero, channels_last steps as SparseFlow's layers write them). Per shape and batch:

* cuDNN's fp16 channels_last convolution alone (the bound a fused kernel's convolution is held to) and cuDNN's
  convolution plus SparseFlow's BatchNorm/LIF kernel (``path="cudnn"``, what the dispatch falls back to);
* every configuration of :func:`sparseflow_kernels.tiling.spiking_configs` (the tensor-descriptor ones where the
  device has a tensor-memory accelerator), those without ``t_in_m`` once more with their per-step loops compiled
  as separate pipelines (:data:`sparseflow_kernels.conv.TMA_LOOP` ``flatten`` off, suffix ``_unflattened``), those
  with ``t_in_m`` once more per split-K factor of :data:`SPLITS` (suffix ``_split<S>``);
* each candidate's spike flips against the float64 reference, element and block density of the input.

At the batches of :data:`RESIDUAL_BATCHES` each shape is measured once more with a residual added before the neuron,
as the second layer of a ResNet block computes ``sn(bn(conv(x)) + identity)`` (``"residual": true`` in its row): the
fused kernel then loads the residual in its epilogue, and cuDNN's pair in its neuron kernel.

-> ``conv_shapes.json`` (``conv_shapes_dry.json`` under ``ctx.dry``; ``markdown``: ``conv_shapes.md``).
"""

from __future__ import annotations

import json

import torch

from ..figures import env_line

#: (channels, map side at 224 px) of spiking_resnet34's 3x3 stride-1 spiking layers
SHAPES = ((64, 56), (128, 28), (256, 14), (512, 7))
DENSITY = 0.15
#: split-K factors measured for the tensor-descriptor configurations with T in M
SPLITS = (2, 4)
#: the batches whose shapes are measured with a residual too
RESIDUAL_BATCHES = (1, 8)


def _inputs(T, N, C, H, device, gen):
    from sparseflow_kernels.spiking import new_spike_tensor

    x = new_spike_tensor(T, N, C, H, H, torch.float16, device)
    x.copy_((torch.rand(T, N, C, H, H, generator=gen, device=device) < DENSITY).half())
    w = (torch.randn(C, C, 3, 3, generator=gen, device=device) * 2 / C ** 0.5).half()  # fires ~10-20 %
    scale = torch.rand(C, generator=gen, device=device) + 0.5
    shift = torch.randn(C, generator=gen, device=device) * 0.1
    return x, w, scale, shift


def _candidates(x, w, scale, shift):
    """{name: (ConvConfig, flatten)} for one shape."""
    from sparseflow_kernels import ConvConfig
    from sparseflow_kernels.conv import tma_supported
    from sparseflow_kernels.tiling import spiking_configs

    T, N, C = x.shape[:3]
    cands = {}
    tma = tma_supported(x.flatten(0, 1), (3, 3), (1, 1), (1, 1))
    for name, cfg in spiking_configs(C, w.shape[0], T, tma, N=N).items():
        cands[name] = (cfg, True)
        if cfg.tma and not cfg.t_in_m:
            cands[f"{name}_unflattened"] = (cfg, False)
        if cfg.tma and cfg.t_in_m and cfg.split_k == 1:
            for split in SPLITS:
                cands[f"{name}_split{split}"] = (ConvConfig(**{**cfg.as_dict(), "split_k": split}), True)
    return cands


def _row(ctx, T, N, C, H, gen, residual=False) -> dict:
    import torch.nn.functional as F

    from sparseflow_core.stats import block_density, element_density
    from sparseflow_kernels import conv as conv_kernels
    from sparseflow_kernels import spiking_conv2d
    from sparseflow_kernels.conv import pack_weight
    from sparseflow_kernels.naive import spiking_conv2d_reference
    from sparseflow_kernels.neuron import NeuronSpec

    x, w, scale, shift = _inputs(T, N, C, H, ctx.device, gen)
    flat = x.flatten(0, 1)
    res = None
    if residual:  # a membrane-scale identity branch, channels_last as the layers write it
        res = torch.empty_like(x)
        res.copy_(torch.randn(x.shape, generator=gen, device=x.device).half() * 0.5)
    ref, _, _ = spiking_conv2d_reference(x.double(), w.double(), None, 1, 1, scale=scale.double(),
                                         shift=shift.double(), residual=None if res is None else res.double(),
                                         spec=NeuronSpec("lif", tau=2.0))
    wl = w.contiguous(memory_format=torch.channels_last)
    row = {"T": T, "N": N, "C": C, "H": H, "residual": residual, "elem_density": element_density(flat),
           "block_density_8x8_16ch_halo": block_density(flat, 8, 16, 3, 1, 1), "output_firing_rate": ref.mean().item()}
    if not ctx.dry:
        row["cudnn_conv_ms"] = ctx.bench(lambda: F.conv2d(flat, wl, None, 1, 1))["median"]
    kw = dict(scale=scale, shift=shift, neuron="lif", tau=2.0, residual=res)
    # (the weight channels_last, as a layer caches it: cuDNN's NHWC kernels take it without a conversion per call)
    row["cudnn_neuron_ms"] = None if ctx.dry else ctx.bench(
        lambda: spiking_conv2d(x, wl, None, 1, 1, path="cudnn", **kw))["median"]
    times, flips = {}, {}
    saved = dict(conv_kernels.TMA_LOOP)
    try:
        for name, (cfg, flatten) in _candidates(x, w, scale, shift).items():
            conv_kernels.TMA_LOOP["flatten"] = flatten
            wp = pack_weight(w, cfg.block_k, cfg.block_n, torch.float16)

            def fused(cfg=cfg, wp=wp):
                return spiking_conv2d(x, w, None, 1, 1, config=cfg, packed_weight=wp, **kw)

            flips[name] = (fused().double() != ref).double().mean().item()
            times[name] = None if ctx.dry else ctx.bench(fused)["median"]
    finally:
        conv_kernels.TMA_LOOP.update(saved)
    row["fused_ms"], row["flip_rate_vs_fp64"] = times, flips
    timed = {k: v for k, v in times.items() if v is not None}
    if timed:
        best = min(timed, key=timed.get)
        row.update(best=best, best_ms=timed[best], best_over_cudnn_conv=timed[best] / row["cudnn_conv_ms"],
                   best_vs_cudnn_neuron=row["cudnn_neuron_ms"] / timed[best])
    return row


def run(ctx) -> dict:
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    rows = []
    batches = (1, 2) if ctx.dry else (8, 1, 32)
    shapes = ((16, 4), (32, 3)) if ctx.dry else tuple((c, max(1, h * ctx.size // 224)) for c, h in SHAPES)
    with_residual = (1,) if ctx.dry else RESIDUAL_BATCHES
    runs = []
    for N in batches:  # per batch: the shapes, then (at RESIDUAL_BATCHES) the shapes with a residual
        runs += [(N, C, H, False) for C, H in shapes]
        if N in with_residual:
            runs += [(N, C, H, True) for C, H in shapes[:1 if ctx.dry else None]]
    for N, C, H, residual in runs:
        if ctx.left() < 30:
            break
        row = _row(ctx, ctx.T, N, C, H, gen, residual)
        rows.append(row)
        ctx.log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                            if not isinstance(v, dict)}))
    out = {"env": ctx.env, "density": DENSITY, "rows": rows}
    ctx.dump("conv_shapes_dry.json" if ctx.dry else "conv_shapes.json", out, env_key="env")
    return out


def rows(obj, source):
    from ..records import Row, Timing

    for r in obj["rows"]:
        ts = [Timing("cudnn_conv_alone", r.get("cudnn_conv_ms"), "baseline"),
              Timing("cudnn_conv_plus_neuron", r.get("cudnn_neuron_ms"), "reference"),
              Timing(f"fused_{r.get('best', '')}", r.get("best_ms"), "sparseflow")]
        op = "spiking_conv2d_residual" if r.get("residual") else "spiking_conv2d"
        yield Row("conv_shapes", op, ts, shape=[r["T"], r["N"], r["C"], r["H"], r["H"]],
                  elem_density=r.get("elem_density"), block_density=r.get("block_density_8x8_16ch_halo"),
                  block_size=8, dtype="float16", baseline="cudnn_conv_alone")


def markdown(r: dict, d: str) -> str:
    lines = ["# The fused spiking convolution against cuDNN, shape by shape", "",
             f"Device: {env_line(r['env'])}. 3x3 stride-1 conv -> BatchNorm (-> + residual, where the row says so) -> "
             f"LIF, fp16 channels_last, synthetic spikes ({r['density']:.0%} non-zero). Times in us; ratio = the "
             "fastest fused configuration's time over cuDNN's convolution alone (the fused time includes BatchNorm, "
             "the residual, the neuron over T and the spike stores).",
             "", "| T | N | channels | map | residual | block density | cuDNN conv | cuDNN conv + neuron kernel | "
             "fastest fused | configuration | fused / cuDNN conv | max spike flips vs fp64 |", "|---" * 12 + "|"]
    for row in r["rows"]:
        if row.get("best") is None:
            continue
        lines.append(f"| {row['T']} | {row['N']} | {row['C']} | {row['H']} | "
                     f"{'yes' if row.get('residual') else 'no'} | {row['block_density_8x8_16ch_halo']:.2f} | "
                     f"{row['cudnn_conv_ms'] * 1e3:.1f} | {row['cudnn_neuron_ms'] * 1e3:.1f} | "
                     f"{row['best_ms'] * 1e3:.1f} | `{row['best']}` | {row['best_over_cudnn_conv']:.2f} | "
                     f"{max(row['flip_rate_vs_fp64'].values()):.1e} |")
    return "\n".join(lines) + "\n"
