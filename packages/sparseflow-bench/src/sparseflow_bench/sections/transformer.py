"""GPU section ``transformer``: spiking Transformers' projections, MLP and attention on their real spikes.

For ``spikformer_ti`` and ``sdt_8_384`` (T=4, N=8, 224 px natural images, recalibrated BatchNorm) the dense
model runs once with hooks that keep the input of every 1x1 projection (Spikformer's ``Conv1d(k=1)``, the
Spike-driven Transformer's 1x1 ``Conv2d``) and the q/k/v spikes of every attention. Then, per layer and on
those same inputs:

* projections / MLP: ``sparse_linear`` on the token-major ``[M, K]`` layout (three tile configs) and
  ``sparse_conv1x1`` on the module's own ``[B, C, L]`` layout (prescan included; the best is reported, all kept),
  against cuBLAS ``F.linear`` on ``[M, K]`` in fp16 and fp32 and the module's own op (``F.conv1d`` /
  ``F.conv2d`` channels_last) in fp16 and fp32; element density and the block density the GEMM sees;
  exactness against float64;
* attention: :func:`ssa_attention` (Spikformer) / :func:`channel_dot` + broadcast multiply (SDT) against the
  module's own torch computation of the same product (without the neuron both run), fp16 and fp32;
* end to end: ``optimize()`` on an fp32 copy, logits relative error against the dense model (< 1e-3).

Writes ``transformer.json`` and ``transformer.md`` (tables) into the output folder.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from sparseflow_kernels import LinearConfig, channel_dot, sparse_conv1x1, sparse_linear, ssa_attention
from sparseflow_kernels.linear import linear_block_flags, pack_linear_weight

from . import reset as _reset
from . import strict_fp32

MODELS = ("spikformer_ti", "sdt_8_384")
CONFIGS = {  # (block_m, block_n, block_k, warps)
    "m64n64k32": LinearConfig(64, 64, 32, 4),
    "m128n128k32": LinearConfig(128, 128, 32, 8),
    "m32n128k64": LinearConfig(32, 128, 64, 4),
}


def _capture(model, x, name):
    """Inputs of the 1x1 projections and q/k/v spikes of the attentions, from one dense forward."""
    from spikingjelly.activation_based.layer.attention import SpikeDrivenSelfAttention, SpikingSelfAttention

    proj, attn, handles = {}, {}, []
    for mname, m in model.named_modules():
        is_proj = (isinstance(m, torch.nn.Conv1d) and m.kernel_size == (1,)) or (
            isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and ".blocks." in f".{mname}")
        if is_proj:
            def hook(mod, args, mname=mname):
                xin = args[0].detach()
                proj[mname] = {"x": xin.flatten(0, 1) if xin.dim() == 5 else xin, "module": mod}
            handles.append(m.register_forward_pre_hook(hook))
        if isinstance(m, SpikingSelfAttention):
            def qkv_hook(mod, args, out, mname=mname, owner=m):
                attn[mname] = {"kind": "ssa", "qkv": out.detach(), "module": owner}
            handles.append(m.qkv_lif.register_forward_hook(qkv_hook))
        if isinstance(m, SpikeDrivenSelfAttention):
            for part in ("q", "k", "v"):
                def sdt_hook(mod, args, out, mname=mname, part=part, owner=m):
                    attn.setdefault(mname, {"kind": "sdsa", "module": owner})[part] = out.detach()
                handles.append(getattr(m, f"{part}_lif").register_forward_hook(sdt_hook))
    _reset(model)
    with torch.no_grad():
        logits = model(x)
    _reset(model)
    for h in handles:
        h.remove()
    return proj, attn, logits


def _rel(y, ref):
    return float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0))


def _projection_timings(ctx, lname, x, x3, xmk, w4, w2, ref, dt, tag, row):
    xd, x3d, wd, wd4 = xmk.to(dt), x3.to(dt), w2.to(dt), w4.to(dt)
    N = w2.shape[0]
    tol = 1e-5 if dt == torch.float32 else 2e-3
    row["ms"][f"cublas_linear_{tag}"] = _ms(ctx, lambda: F.linear(xd, wd))
    if x.dim() == 4:
        xcl = x.to(dt).contiguous(memory_format=torch.channels_last)
        row["ms"][f"module_conv2d_cl_{tag}"] = _ms(ctx, lambda: F.conv2d(xcl, wd4))
    else:
        row["ms"][f"module_conv1d_{tag}"] = _ms(ctx, lambda: F.conv1d(x3d, wd4))
    cfgs = CONFIGS if dt == torch.float16 else {"m64n64k32": CONFIGS["m64n64k32"]}
    for cname, cfg in cfgs.items():
        pw = pack_linear_weight(wd, cfg.block_k, cfg.block_n, dt)
        ys = sparse_linear(xd, wd, config=cfg, packed_weight=pw)
        yc = sparse_conv1x1(x3d, wd, config=cfg, packed_weight=pw)
        err = max(_rel(ys, ref), _rel(yc.transpose(1, 2).reshape(-1, N), ref))
        row["exact"][f"{tag}_{cname}"] = err
        if err >= tol:
            ctx.log(f"transformer: {lname} {tag} {cname} relative error {err:.2e}")
        row["ms"][f"sparse_rows_{tag}_{cname}"] = _ms(
            ctx, lambda cfg=cfg, pw=pw: sparse_linear(xd, wd, config=cfg, packed_weight=pw))
        if cname == "m64n64k32":  # the module's own [B, C, L] layout, read in place
            row["ms"][f"sparse_ncl_{tag}_{cname}"] = _ms(
                ctx, lambda cfg=cfg, pw=pw: sparse_conv1x1(x3d, wd, config=cfg, packed_weight=pw))
    cfg = CONFIGS["m64n64k32"]
    pw = pack_linear_weight(wd, cfg.block_k, cfg.block_n, dt)
    row["ms"][f"dense_kernel_rows_{tag}"] = _ms(
        ctx, lambda: sparse_linear(xd, wd, config=cfg, packed_weight=pw, dense=True))
    row["ms"][f"best_sparse_{tag}"] = min(v for k, v in row["ms"].items() if k.startswith("sparse_") and tag in k)


def _projection_rows(ctx, proj, keep):
    rows = []
    for lname, rec in proj.items():
        if not keep(lname):
            continue
        if ctx.left() < 20:
            ctx.log(f"transformer: time budget reached before {lname}")
            break
        m = rec["module"]
        x = rec["x"]  # [B, C, L] (Conv1d) or [B, C, H, W] (Conv2d)
        x3 = x.reshape(x.shape[0], x.shape[1], -1).contiguous()
        w2 = m.weight.detach().reshape(m.weight.shape[0], -1)
        N, K = w2.shape
        xmk = x3.transpose(1, 2).reshape(-1, K).contiguous()  # token-major [M, K]
        ref = F.linear(xmk.double(), w2.double())
        row = {"layer": lname, "M": xmk.shape[0], "K": K, "N": N,
               "elem_density": float((x3 != 0).float().mean()), "block_density": {}, "ms": {}, "exact": {}}
        for cname, cfg in CONFIGS.items():
            row["block_density"][f"rows_{cname}"] = float(linear_block_flags(xmk, cfg.block_m, cfg.block_k, "rows")
                                                          .float().mean())
            row["block_density"][f"ncl_{cname}"] = float(linear_block_flags(x3, cfg.block_m, cfg.block_k, "ncl")
                                                         .float().mean())
        for dt, tag in ((torch.float16, "fp16"), (torch.float32, "fp32")):
            _projection_timings(ctx, lname, x, x3, xmk, m.weight.detach(), w2, ref, dt, tag, row)
        row["ok"] = all(v < (1e-5 if k.startswith("fp32") else 2e-3) for k, v in row["exact"].items())
        row["speedup_vs_cublas_fp16"] = row["ms"]["cublas_linear_fp16"] / row["ms"]["best_sparse_fp16"]
        rows.append(row)
        ctx.log(f"transformer: {lname} M={row['M']} K={K} N={N} dens={row['elem_density']:.3f} "
                f"sparse16={row['ms']['best_sparse_fp16']:.4f} cublas16={row['ms']['cublas_linear_fp16']:.4f} ms")
    return rows


def _ms(ctx, fn) -> float:
    return ctx.bench(fn, rep=10)["median"]


def _ssa_row(ctx, m, qkv, row):
    T, N, C3, L = qkv.shape
    H = m.num_heads
    D = C3 // 3 // H
    row.update(shape=[T, N, H, D, L], elem_density=float((qkv != 0).float().mean()))
    for dt, tag in ((torch.float16, "fp16"), (torch.float32, "fp32")):
        q6 = qkv.to(dt).reshape(T, N, 3, H, D, L)
        q, k, v = q6[:, :, 0], q6[:, :, 1], q6[:, :, 2]
        ref = m._ssa_kernel_torch(q6.double(), m.scale)
        row["exact"][tag] = _rel(ssa_attention(q, k, v, m.scale), ref)
        row["ms"][f"module_torch_{tag}"] = _ms(ctx, lambda q6=q6: m._ssa_kernel_torch(q6, m.scale))
        row["ms"][f"sparse_{tag}"] = _ms(ctx, lambda q=q, k=k, v=v: ssa_attention(q, k, v, m.scale))
        row["ms"][f"dense_kernel_{tag}"] = _ms(
            ctx, lambda q=q, k=k, v=v: ssa_attention(q, k, v, m.scale, dense=True))


def _sdsa_row(ctx, m, q, k, v, row):
    T, N, C, Hh, W = q.shape
    heads, hd = m.num_heads, m.head_dim
    dens = sum(float((t != 0).float().mean()) for t in (q, k, v)) / 3
    row.update(shape=[T, N, C, Hh, W], elem_density=dens)

    def split(t):
        return t.flatten(3).transpose(-1, -2).reshape(T, N, Hh * W, heads, hd).permute(0, 1, 3, 2, 4)

    def module_math(q, k, v):  # the module's own torch ops (attn_lif left out: both paths run it)
        qs, ks, vs = split(q), split(k), split(v)
        kv = (ks * vs).sum(dim=-2, keepdim=True)
        return (qs * kv).transpose(3, 4).reshape(T, N, C, Hh, W)

    def ours(q, k, v):
        s = channel_dot(k.reshape(T * N, C, Hh * W), v.reshape(T * N, C, Hh * W))
        return q * s.view(T, N, C, 1, 1)

    for dt, tag in ((torch.float16, "fp16"), (torch.float32, "fp32")):
        qd, kd, vd = q.to(dt), k.to(dt), v.to(dt)
        row["exact"][tag] = _rel(ours(qd, kd, vd), module_math(q.double(), k.double(), v.double()))
        row["ms"][f"module_torch_{tag}"] = _ms(ctx, lambda qd=qd, kd=kd, vd=vd: module_math(qd, kd, vd))
        row["ms"][f"sparse_{tag}"] = _ms(ctx, lambda qd=qd, kd=kd, vd=vd: ours(qd, kd, vd))


def _attention_rows(ctx, attn, keep):
    rows = []
    for aname, rec in attn.items():
        if not keep(aname) or ctx.left() < 15:
            continue
        row = {"layer": aname, "kind": rec["kind"], "ms": {}, "exact": {}}
        if rec["kind"] == "ssa":
            _ssa_row(ctx, rec["module"], rec["qkv"], row)
        else:
            _sdsa_row(ctx, rec["module"], rec["q"], rec["k"], rec["v"], row)
        row["speedup_vs_module_fp16"] = row["ms"]["module_torch_fp16"] / row["ms"]["sparse_fp16"]
        row["ok"] = all(v < 1e-3 for v in row["exact"].values())
        rows.append(row)
        ctx.log(f"transformer: {aname} {row['kind']} sparse16={row['ms']['sparse_fp16']:.4f} "
                f"module16={row['ms']['module_torch_fp16']:.4f} ms exact={row['exact']}")
    return rows


def _e2e(ctx, model, x, logits):
    from sparseflow_core import get_report, optimize

    opt = copy.deepcopy(model)
    _reset(opt)
    with torch.no_grad():
        optimize(opt, x)
        _reset(opt)
        y = opt(x)
        _reset(opt)
    rep = get_report(opt)
    out = {"logits_rel_err_fp32": float((y - logits).abs().max() / logits.abs().max()),
           "replaced": {e.name: f"{e.action}: {e.detail or e.reason}" for e in rep.layers} if rep else {}}
    out["ok"] = out["logits_rel_err_fp32"] < 1e-3
    if not ctx.dry and ctx.left() > 40:
        out.update(ctx.time_forwards(x, dense_fp32=model, optimized_fp32=opt))
    return out


def _md(results) -> str:
    lines = ["# Spiking Transformers: sparse projections and attention vs cuBLAS / the module's own ops", ""]
    for name, res in results.items():
        lines += [f"## {name}", "", f"input {res['input_shape']}, end to end (fp32, optimize()): logits rel err "
                  f"{res['e2e'].get('logits_rel_err_fp32', float('nan')):.2e}", ""]
        lines += ["| layer | M x K -> N | elem dens | block dens (64x32) | sparse fp16 | cuBLAS fp16 | module fp16 | "
                  "sparse fp32 | cuBLAS fp32 | speedup vs cuBLAS fp16 | exact |", "|" + "---|" * 11]
        for r in res["projections"]:
            ms = r["ms"]
            mod16 = next((v for k, v in ms.items() if k.startswith("module_") and k.endswith("fp16")), float("nan"))
            lines.append(f"| {r['layer']} | {r['M']}x{r['K']}->{r['N']} | {r['elem_density']:.3f} | "
                         f"{r['block_density']['rows_m64n64k32']:.3f} | {ms['best_sparse_fp16']:.4f} | "
                         f"{ms['cublas_linear_fp16']:.4f} | {mod16:.4f} | {ms['best_sparse_fp32']:.4f} | "
                         f"{ms['cublas_linear_fp32']:.4f} | {r['speedup_vs_cublas_fp16']:.2f}x | {r['ok']} |")
        s = res["summary"]
        lines += ["", f"sum over projections: sparse fp16 {s['sum_sparse_fp16_ms']:.3f} ms, cuBLAS fp16 "
                  f"{s['sum_cublas_fp16_ms']:.3f} ms -> {s['speedup_sum_vs_cublas_fp16']:.2f}x (target 1.5x)", ""]
        lines += ["| attention | kind | shape | elem dens | sparse fp16 | module fp16 | sparse fp32 | module fp32 | "
                  "speedup fp16 | exact |", "|" + "---|" * 10]
        for r in res["attention"]:
            ms = r["ms"]
            lines.append(f"| {r['layer']} | {r['kind']} | {r['shape']} | {r['elem_density']:.3f} | "
                         f"{ms['sparse_fp16']:.4f} | {ms['module_torch_fp16']:.4f} | {ms['sparse_fp32']:.4f} | "
                         f"{ms['module_torch_fp32']:.4f} | {r['speedup_vs_module_fp16']:.2f}x | {r['ok']} |")
        lines.append("")
    lines.append("Times in ms (median, CUDA graph replay, same run and inputs). Sparse times include the prescan. "
                 "sdt_8_384: blocks 0, 3 and 7; its k_conv and v_conv read the same input as q_conv (same shape, "
                 "same densities) and are not timed separately.")
    return "\n".join(lines) + "\n"


@strict_fp32()
def run(ctx) -> dict:
    """The section with TF32 off throughout: its exactness checks compare against a true-fp32 dense model (with
    TF32, cuDNN's and cuBLAS's own rounding flips spikes: the SSA module moved by 0.099 with TF32 on, 0 off)."""
    from ..models import prepared_model

    T, N, size = (2, 1, 32) if ctx.dry else (ctx.T, ctx.N, ctx.size)
    results = {}
    for name in MODELS:
        if ctx.left() < 30:
            ctx.log(f"transformer: skipping {name}, {ctx.left():.0f} s left")
            continue
        torch.manual_seed(0)
        model, x = prepared_model(name, T, N, size, ctx.device, calib_images=2 if ctx.dry else 16)
        proj, attn, logits = _capture(model, x, name)
        if ctx.dry:
            keep = lambda n: ".blocks.0." in f".{n}" or n.startswith("blocks.0.")
        elif name == "sdt_8_384":  # 8 blocks of equal shapes: first, middle, last; k/v convs read q's input
            keep = lambda n: (any(n.startswith(f"blocks.{i}.") for i in (0, 3, 7))
                              and not n.endswith((".k_conv", ".v_conv")))
        else:
            keep = lambda n: True
        res = {"input_shape": list(x.shape), "T": T, "N": N, "size": size}
        res["projections"] = _projection_rows(ctx, proj, keep)
        res["attention"] = _attention_rows(ctx, attn, keep)
        p = res["projections"]
        s16 = sum(r["ms"]["best_sparse_fp16"] for r in p)
        c16 = sum(r["ms"]["cublas_linear_fp16"] for r in p)
        res["summary"] = {
            "sum_sparse_fp16_ms": s16, "sum_cublas_fp16_ms": c16,
            "speedup_sum_vs_cublas_fp16": c16 / s16 if s16 else math.nan,
            "sum_sparse_fp32_ms": sum(r["ms"]["best_sparse_fp32"] for r in p),
            "sum_cublas_fp32_ms": sum(r["ms"]["cublas_linear_fp32"] for r in p),
            "layers": len(p), "all_exact": all(r["ok"] for r in p) and all(r["ok"] for r in res["attention"]),
            "mean_elem_density": sum(r["elem_density"] for r in p) / max(1, len(p)),
            "mean_block_density_64x32": sum(r["block_density"]["rows_m64n64k32"] for r in p) / max(1, len(p)),
        }
        res["e2e"] = _e2e(ctx, model, x, logits) if ctx.left() > 20 else {"skipped": "time budget"}
        results[name] = res
        ctx.dump("transformer.json", {"models": results, "configs": {k: c.as_dict() for k, c in CONFIGS.items()}})
        del model, proj, attn
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    ctx.write_text("transformer.md", _md(results))
    return results
