"""The GPU benchmark run (device machine): every figure SparseFlow reports comes from one call of this.

Sections (each writes its JSON as soon as it finishes; ``--sections`` picks them):

* ``layers``: every conv -> BatchNorm (-> + residual) -> neuron layer of spiking_resnet34 (T=4, N=8,
  224 px natural images, recalibrated BatchNorm) on its real input spikes: SparseFlow's fused layer
  (every candidate path, and the one dispatch picks = the fastest) against ``torch.compile`` of the same
  dense block in fp16 channels_last replayed in a CUDA graph, and SpikingJelly eager fp32.
  -> ``fused_spiking_resnet34.json``
* ``sweep``: skipping measured: fused sparse vs fused dense at batch 1/8/32/128, 224 and 448 px.
  -> ``fused_batch_sweep.json``
* ``conv``: the standalone ``sparse_conv2d`` on the same inputs against cuDNN fp16 channels_last and fp32.
  -> ``sparse_conv_spiking_resnet34.json``
* ``e2e``: whole models: SpikingJelly eager fp32, CUDA graph of it, ``torch.compile`` fp16
  (reduce-overhead), SparseFlow fp16 and fp32 (CUDA graph); exactness and NVML energy. -> ``e2e.json``
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from sparseflow_core import optimize, reset_states
from sparseflow_core.cuda_graph import CudaGraphModel
from sparseflow_core.stats import block_density, element_density
from sparseflow_kernels import ConvConfig, prescan, sparse_conv2d, spiking_conv2d
from sparseflow_kernels.conv import pack_weight
from sparseflow_kernels.naive import spiking_conv2d_reference
from sparseflow_ops import SparseConv2d, find_adapter
from sparseflow_ops.conv import bn_affine, spiking_configs

from .data import natural_images, repeat_time
from .models import build_model, recalibrate_bn
from .timing import Energy, bench_ms, environment

DEADLINE = [float("inf")]
_DRY = [False]


def left() -> float:
    return DEADLINE[0] - time.time()


def log(*a):
    print(*a, flush=True)


def dump(out_dir, name, obj):
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    log(f"wrote {path}")


# ------------------------------------------------------------------------------------------- models
def prepared_model(name, T, N, size, device, calib_images=16, **kw):
    model = build_model(name, T=T, **kw).to(device)
    calib = natural_images(calib_images, size, seed=0).to(device)
    recalibrate_bn(model, calib, T=T, batches=2)
    x = repeat_time(natural_images(N, size, seed=1), T).to(device)
    reset_states(model)
    return model.eval(), x


def capture_spiking_layers(model, x):
    """optimize() a copy, then record the input (and residual) of every fused spiking layer."""
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


def layer_params(m: SparseConv2d):
    bn, neuron = m.folded_bn, m.fused_neuron
    spec = find_adapter(neuron).spec(neuron)
    scale, shift = bn_affine(bn) if bn is not None else (None, None)
    return bn, spec, scale, shift


# ------------------------------------------------------------------------------------- dense block
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


_COMPILED = {}


def compiled_block():
    if "f" not in _COMPILED:
        import torch._dynamo.config as dcfg

        # one compiled graph per layer shape: raise the recompile limit so that no layer falls back to eager
        for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(dcfg, knob):
                setattr(dcfg, knob, max(getattr(dcfg, knob), 256))
        _COMPILED["f"] = _dense_block if _DRY[0] else torch.compile(_dense_block, dynamic=False)
    return _COMPILED["f"]


def candidates(x5, m, spec, scale, shift, res, dtype):
    """Every SparseFlow path for one layer (fp16/bf16/fp32 storage), as zero-argument callables."""
    w = m.weight.to(dtype)
    xs = x5.to(dtype)
    rs = res.to(dtype) if res is not None else None
    kw = dict(scale=scale, shift=shift, neuron=spec, residual=rs)
    cands = {}
    # what the module's dispatch measures, plus two configurations kept for the tables
    cfgs = spiking_configs(x5.shape[2], m.out_channels, x5.shape[0])
    cfgs["fused_dense_k16"] = ConvConfig(8, 8, 64, 16, False, 4, 3)
    if m.out_channels > 64:
        cfgs["fused_dense_n128"] = ConvConfig(8, 8, 128, 32, False, 8, 3)
    for name, cfg in cfgs.items():
        wp = pack_weight(w, cfg.block_k, cfg.block_n, dtype)
        cands[name] = (lambda cfg=cfg, wp=wp: spiking_conv2d(xs, w, None, m.stride, m.padding, config=cfg,
                                                              packed_weight=wp, **kw))
    scfg = ConvConfig(8, 8, 64, 16, False, 4, 3)
    swp = pack_weight(w, 16, 64, dtype)
    cands["fused_sparse"] = lambda: spiking_conv2d(xs, w, None, m.stride, m.padding, config=scfg, packed_weight=swp,
                                                   sparse=True, **kw)
    cands["cudnn"] = lambda: spiking_conv2d(xs, w, None, m.stride, m.padding, path="cudnn", **kw)
    return cands


def section_layers(model, x, out_dir, env, model_name="spiking_resnet34"):
    _opt, recs = capture_spiking_layers(model, x)
    rows = []
    block = compiled_block()
    for name, rec in recs.items():
        if left() < 60:
            log("layers: deadline, stopping")
            break
        m = rec["module"]
        x5 = rec["x"]
        if x5.dim() != 5:
            continue
        T, N = x5.shape[:2]
        bn, spec, scale, shift = layer_params(m)
        res = rec["residual"]
        flat = x5.flatten(0, 1)
        row = {"layer": name, "shape": list(x5.shape), "C_out": m.out_channels, "stride": m.stride[0],
               "residual": res is not None, "elem_density": element_density(flat),
               "block_density_8x8_16ch_halo": block_density(flat, 8, 16, 3, m.stride[0], 1),
               "block_density_16x16_16ch_halo": block_density(flat, 16, 16, 3, m.stride[0], 1)}
        # baseline: torch.compile of the dense block, fp16 channels_last, replayed in a CUDA graph
        xh = flat.half().contiguous(memory_format=torch.channels_last)
        args = (xh, m.weight.half().contiguous(memory_format=torch.channels_last),
                bn.running_mean.half(), bn.running_var.half(), bn.weight.half(), bn.bias.half(),
                res.half().contiguous() if res is not None else None, T, N, m.stride[0], m.padding[0],
                spec.decay, spec.v_threshold, spec.v_reset if spec.hard_reset else 0.0, spec.hard_reset, bn.eps)
        base = block(*args)
        row["compile_graph_fp16_ms"] = bench_ms(lambda: block(*args))["median"]
        # the convolution alone on cuDNN (fp16 channels_last, graph): what a fused layer costs at best when its
        # conv runs at cuDNN's speed and its BatchNorm/neuron epilogue is free (the bounds in the summary)
        row["cudnn_conv_fp16_cl_ms"] = bench_ms(lambda: F.conv2d(xh, args[1], None, m.stride, m.padding))["median"]
        # SpikingJelly eager fp32 of the block (the user's code: modules, multi-step)
        neuron = m.fused_neuron

        def eager():
            y = F.conv2d(flat, m.weight, m.bias, m.stride, m.padding)
            z = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
            z = z.view(T, N, *z.shape[1:])
            if res is not None:
                z = z + res
            neuron.reset()
            return type(neuron).forward(neuron, z)

        row["eager_fp32_ms"] = bench_ms(eager, graph=False)["median"]
        times = {}
        cands = candidates(x5, m, spec, scale, shift, res, torch.float16)
        outs = {}
        for cname, fn in cands.items():
            try:
                outs[cname] = fn()
                times[cname] = bench_ms(fn)["median"]
            except Exception as e:
                times[cname] = None
                log(f"{name} {cname}: {type(e).__name__}: {e}"[:300])
        ok = {k: v for k, v in times.items() if v is not None}
        best = min(ok, key=ok.get)
        row["sparseflow_ms"] = ok[best]
        row["path"] = best
        row["candidates_ms"] = times
        row["speedup_vs_compile_graph"] = row["compile_graph_fp16_ms"] / ok[best]
        row["speedup_vs_eager_fp32"] = row["eager_fp32_ms"] / ok[best]
        row["sparse_vs_dense_fused_same_cfg"] = (ok["fused_dense_k16"] / ok["fused_sparse"]
                                                 if "fused_sparse" in ok and "fused_dense_k16" in ok else None)
        # exactness: spikes of the chosen fp16 path and of the fp32 path against a float64 reference
        ref = spiking_conv2d_reference(x5.double(), m.weight.double(), None, m.stride, m.padding,
                                       scale=scale.double(), shift=shift.double(),
                                       residual=res.double() if res is not None else None, spec=spec)[0]
        row["flip_rate_fp16_vs_fp64"] = float((outs[best].double() != ref).float().mean())
        row["flip_rate_compile_fp16_vs_fp64"] = float((base.double() != ref).float().mean())
        s32 = spiking_conv2d(x5, m.weight, None, m.stride, m.padding, scale=scale, shift=shift, neuron=spec,
                             residual=res)
        row["flip_rate_fp32_vs_fp64"] = float((s32.double() != ref).float().mean())
        rows.append(row)
        log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                        if k != "candidates_ms"}))
    base_sum = sum(r["compile_graph_fp16_ms"] for r in rows)
    ours_sum = sum(r["sparseflow_ms"] for r in rows)
    summary = {
        "model": model_name, "T": int(x.shape[0]), "N": int(x.shape[1]), "size": int(x.shape[-1]),
        "layers": len(rows),
        "sum_compile_graph_fp16_ms": base_sum, "sum_sparseflow_ms": ours_sum,
        "sum_eager_fp32_ms": sum(r["eager_fp32_ms"] for r in rows),
        "sum_speedup_vs_compile_graph": base_sum / ours_sum if ours_sum else None,
        "min_layer_speedup_vs_compile_graph": min((r["speedup_vs_compile_graph"] for r in rows), default=None),
        "paths": {p: sum(r["path"] == p for r in rows) for p in {r["path"] for r in rows}},
    }
    conv_sum = sum(r["cudnn_conv_fp16_cl_ms"] for r in rows)
    skip_sum = sum(r["cudnn_conv_fp16_cl_ms"] * r["block_density_8x8_16ch_halo"] for r in rows)
    summary.update({
        "sum_cudnn_conv_fp16_cl_ms": conv_sum,
        # upper bounds of sum_speedup_vs_compile_graph: every layer's conv at cuDNN's speed with a free epilogue,
        # and that with every block without a spike in its receptive field skipped at no cost
        "bound_sum_speedup_conv_at_cudnn": base_sum / conv_sum if conv_sum else None,
        "bound_sum_speedup_perfect_skipping": base_sum / skip_sum if skip_sum else None,
    })
    dump(out_dir, f"fused_{summary['model']}.json", {"env": env, "summary": summary, "rows": rows})
    return recs


def section_sweep(model_224, recs_224, out_dir, env, T, device, model_name="spiking_resnet34", size=224):
    """Skipping inside the fused kernel: sparse vs dense, batch 1-128, 224 and 448 px."""
    # one layer per stage; layer4 (512 channels: 7x7 at 224 px, 14x14 at 448) is the one at <= 50% block density
    pick = ["layer1.1.conv1", "layer2.1.conv1", "layer3.1.conv1", "layer4.1.conv1"]
    sources = {size: recs_224}
    if left() > 200:
        try:
            model448, x448 = prepared_model(model_name, T, 8, 2 * size, device)
            _, sources[2 * size] = capture_spiking_layers(model448, x448)
            del model448, x448
        except Exception as e:
            log(f"sweep 448: {type(e).__name__}: {e}")
    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 1
    for size, recs in sources.items():
        for lname in pick:
            if lname not in recs:
                continue
            rec = recs[lname]
            m = rec["module"]
            _, spec, scale, shift = layer_params(m)
            x8 = rec["x"].half()
            for n in ((1, 2) if device.type == "cpu" else (1, 8, 32, 128)):
                if left() < 40:
                    break
                reps = -(-n // 8)
                xn = x8.repeat(1, reps, 1, 1, 1)[:, :n].contiguous()
                try:
                    cands = candidates(xn, m, spec, scale, shift, None, torch.float16)
                    dense = bench_ms(cands["fused_dense"])["median"]
                    scfg = ConvConfig(8, 8, 64, 16, False, 4, 3)
                    swp = pack_weight(m.weight.half(), 16, 64, torch.float16)
                    dense16 = bench_ms(lambda: spiking_conv2d(xn, m.weight.half(), None, m.stride, m.padding,
                                                              scale=scale, shift=shift, neuron=spec, config=scfg,
                                                              packed_weight=swp))["median"]
                    sparse = bench_ms(cands["fused_sparse"])["median"]
                    occ = prescan(xn.flatten(0, 1), 8, 16)
                    occ_t = bench_ms(lambda: prescan(xn.flatten(0, 1), 8, 16))["median"]
                    sparse_only = bench_ms(lambda: spiking_conv2d(xn, m.weight.half(), None, m.stride, m.padding,
                                                                  scale=scale, shift=shift, neuron=spec,
                                                                  config=scfg, packed_weight=swp,
                                                                  occupancy=occ))["median"]
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    continue
                H = xn.shape[3] // m.stride[0]
                programs = n * (-(-H // 8)) ** 2 * -(-m.out_channels // 64)
                flat = xn.flatten(0, 1)
                row = {"size": size, "layer": lname, "N": n, "T": int(xn.shape[0]), "C": int(xn.shape[2]),
                       "H": int(xn.shape[3]), "work_fraction": block_density(flat, 8, 16, 3, m.stride[0], 1),
                       "elem_density": element_density(flat), "programs": programs, "waves_1_per_sm": programs / sms,
                       "fused_dense_best_cfg_ms": dense, "fused_dense_same_cfg_ms": dense16,
                       "fused_sparse_with_prescan_ms": sparse, "fused_sparse_kernel_only_ms": sparse_only,
                       "prescan_ms": occ_t,
                       "speedup_sparse_vs_dense_same_cfg": dense16 / sparse,
                       "speedup_sparse_vs_dense_best": dense / sparse}
                rows.append(row)
                log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
    dump(out_dir, "fused_batch_sweep.json", {"env": env, "rows": rows})


def section_conv(recs, out_dir, env):
    rows = []
    for name, rec in recs.items():
        if left() < 30:
            break
        m = rec["module"]
        flat = rec["x"].flatten(0, 1)
        xh = flat.half().contiguous(memory_format=torch.channels_last)
        wh = m.weight.half().contiguous(memory_format=torch.channels_last)
        x32 = flat.float().contiguous()
        w32 = m.weight.float()
        row = {"layer": name, "shape": list(flat.shape), "C_out": m.out_channels, "stride": m.stride[0],
               "elem_density": element_density(flat),
               "block_density_8x8_16ch_halo": block_density(flat, 8, 16, 3, m.stride[0], 1),
               "block_density_16x16_16ch_halo": block_density(flat, 16, 16, 3, m.stride[0], 1)}
        row["cudnn_fp16_cl_ms"] = bench_ms(lambda: F.conv2d(xh, wh, None, m.stride, m.padding))["median"]
        row["cudnn_fp32_ms"] = bench_ms(lambda: F.conv2d(x32, w32, None, m.stride, m.padding))["median"]
        bs = 16 if flat.shape[2] >= 56 else 8
        cfg = ConvConfig(bs, bs, 64, 16, False, 8 if bs == 16 else 4, 3)
        wp = pack_weight(wh, 16, 64, torch.float16)
        row["sparse_fp16_ms"] = bench_ms(lambda: sparse_conv2d(xh, wh, None, m.stride, m.padding, config=cfg,
                                                               packed_weight=wp))["median"]
        row["dense_kernel_fp16_ms"] = bench_ms(lambda: sparse_conv2d(xh, wh, None, m.stride, m.padding, config=cfg,
                                                                     packed_weight=wp, dense=True))["median"]
        wp32 = pack_weight(w32, 16, 64, torch.float32)
        x32cl = x32.contiguous(memory_format=torch.channels_last)
        row["sparse_fp32_tf32x3_ms"] = bench_ms(lambda: sparse_conv2d(x32cl, w32, None, m.stride, m.padding,
                                                                      config=cfg, packed_weight=wp32))["median"]
        row["block_size"] = bs
        row["dispatch_fp16_ms"] = min(row["sparse_fp16_ms"], row["cudnn_fp16_cl_ms"])
        rows.append(row)
        log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
    s = lambda k: sum(r[k] for r in rows)
    summary = {"layers": len(rows), "sum_cudnn_fp16_cl_ms": s("cudnn_fp16_cl_ms"), "sum_cudnn_fp32_ms": s("cudnn_fp32_ms"),
               "sum_sparse_fp16_ms": s("sparse_fp16_ms"), "sum_dispatch_fp16_ms": s("dispatch_fp16_ms"),
               "sum_sparse_fp32_ms": s("sparse_fp32_tf32x3_ms")}
    summary["speedup_sparse_vs_cudnn_fp16"] = summary["sum_cudnn_fp16_cl_ms"] / summary["sum_sparse_fp16_ms"]
    summary["speedup_sparse_vs_cudnn_fp32"] = summary["sum_cudnn_fp32_ms"] / summary["sum_sparse_fp16_ms"]
    summary["speedup_dispatch_vs_cudnn_fp16"] = summary["sum_cudnn_fp16_cl_ms"] / summary["sum_dispatch_fp16_ms"]
    dump(out_dir, "sparse_conv_spiking_resnet34.json" if not _DRY[0] else "sparse_conv_dry.json",
         {"env": env, "summary": summary, "rows": rows})


# -------------------------------------------------------------------------------------------- e2e
def last_spiking_output(model):
    """Hook storing the spikes the classifier head pools: the input of ``avgpool`` (CNNs), else nothing."""
    store = {}
    pool = getattr(model, "avgpool", None)
    if pool is None:
        return store, []
    h = pool.register_forward_pre_hook(lambda mod, a: store.__setitem__("s", a[0].detach().clone()))
    return store, [h]


def section_e2e(models, T, N, size, device, out_dir, env, compile_modes=("reduce-overhead",)):
    energy = Energy()
    results = {}
    path = os.path.join(out_dir, "e2e.json")
    for name in models:
        if left() < (60 if os.environ.get("E2E_COMPILE_ONLY") else 90):
            log(f"e2e: deadline before {name}")
            break
        r = {"device": env["device"], "T": T, "N": N, "size": size}
        try:
            model, x = prepared_model(name, T, N, size, device)
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
                    st, hs = last_spiking_output(mcl)
                    reset_states(mcl)
                    lcl = mcl(x.contiguous()).float()
                    r["dense_fp32_reordered_logits_rel_err"] = float((lcl - ref_logits).norm() / ref_logits.norm())
                    if st.get("s") is not None and ref_spk is not None:
                        r["dense_fp32_reordered_last_spike_flip_rate"] = float(
                            (st["s"].float() != ref_spk.float()).float().mean())
                    for h in hs:
                        h.remove()
                    del mcl
                except Exception as e:
                    r["dense_fp32_reordered_error"] = f"{type(e).__name__}: {e}"[:200]
                # SparseFlow fp32 (exactness) and fp16 (speed)
                # (fp32_faithful: numerics="faithful", the dense model's fp32 arithmetic bit for bit)
                for tag, dt, num in (() if os.environ.get("E2E_COMPILE_ONLY") else
                                     (("fp16", torch.float16, "fast"), ("fp32", torch.float32, "fast"),
                                      ("fp32_faithful", torch.float32, "faithful"))):
                  try:
                    opt, rep = optimize(copy.deepcopy(model), x.to(dt), dtype=dt if dt != torch.float32 else None,
                                        numerics=num, return_report=True)
                    xs = x.to(dt)
                    reset_states(opt)
                    opt(xs)
                    reset_states(opt)
                    opt(xs)
                    st, hs = last_spiking_output(opt)
                    reset_states(opt)
                    logits = opt(xs).float()
                    spk = st.get("s")
                    for h in hs:
                        h.remove()
                    r[f"logits_rel_err_{tag}"] = float((logits - ref_logits).norm() / ref_logits.norm())
                    if spk is not None and ref_spk is not None:
                        r[f"last_spike_flip_rate_{tag}"] = float((spk.float() != ref_spk.float()).float().mean())
                    r[f"replaced_{tag}"] = {"fused": len(rep.by_action("fused")), "sparse": len(rep.by_action("sparse")),
                                            "neuron_kernel": len(rep.by_action("neuron-kernel")),
                                            "left": len(rep.by_action("left"))}
                    gopt = CudaGraphModel(opt)
                    for _ in range(3):
                        gopt(xs)
                    r[f"sparseflow_{tag}_ms"] = bench_ms(lambda: gopt(xs), graph=False)["median"]
                    r[f"energy_sparseflow_{tag}_J"] = energy.joules_per_call(lambda: gopt(xs))
                    rep.refresh(opt)
                    r[f"paths_{tag}"] = {}
                    for e in rep.layers:
                        if e.path:
                            r[f"paths_{tag}"][e.path] = r[f"paths_{tag}"].get(e.path, 0) + 1
                    torch.cuda.empty_cache()
                  except Exception as e:
                    r[f"sparseflow_{tag}_error"] = f"{type(e).__name__}: {e}"[:400]
                    traceback.print_exc()
                torch.backends.cudnn.allow_tf32 = True
                r["sparseflow_ms"] = r.get("sparseflow_fp16_ms")
                # torch.compile of the dense fp16 model
                m16 = copy.deepcopy(model).half().to(memory_format=torch.channels_last)
                x16 = x.half()
                try:  # how far plain fp16 inference drifts from fp32 (the same measure as SparseFlow's fp16)
                    st, hs = last_spiking_output(m16)
                    reset_states(m16)
                    l16 = m16(x16).float()
                    r["dense_fp16_logits_rel_err"] = float((l16 - ref_logits).norm() / ref_logits.norm())
                    if st.get("s") is not None and ref_spk is not None:
                        r["dense_fp16_last_spike_flip_rate"] = float((st["s"].float() != ref_spk.float()).float().mean())
                    for h in hs:
                        h.remove()
                except Exception as e:
                    r["dense_fp16_error"] = f"{type(e).__name__}: {e}"[:200]
                best = None
                for mode in compile_modes:
                    if left() < (45 if os.environ.get("E2E_COMPILE_ONLY") else 120):
                        break
                    try:
                        t0 = time.time()
                        cm = torch.compile(m16, mode=mode)

                        def run_c(cm=cm):
                            reset_states(m16)
                            return cm(x16)

                        for _ in range(3):
                            run_c()
                        r[f"compile_fp16_{mode}_compile_s"] = time.time() - t0
                        ms = bench_ms(run_c, graph=False)["median"]
                        r[f"compile_fp16_{mode}_ms"] = ms
                        if best is None or ms < best[0]:
                            best = (ms, mode, run_c)
                    except Exception as e:
                        r[f"compile_fp16_{mode}_error"] = f"{type(e).__name__}: {e}"[:300]
                if best:
                    r["compile_fp16_ms"], r["compile_fp16_mode"] = best[0], best[1]
                    r["energy_compile_fp16_J"] = energy.joules_per_call(best[2])
                    if r["sparseflow_ms"]:
                        r["speedup_vs_compile_fp16"] = best[0] / r["sparseflow_ms"]
                if r["sparseflow_ms"]:
                    r["speedup_vs_eager_fp32"] = r["eager_fp32_ms"] / r["sparseflow_ms"]
            torch.cuda.empty_cache()
        except Exception as e:
            r["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        results[name] = r
        log(json.dumps(r, default=str))
        with open(path, "w") as f:
            json.dump({**results, "_env": env}, f, indent=1, default=str)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("SPARSEFLOW_RESULTS_DIR"),
                   help="results folder (default: benchmarks/results/<device>, see sparseflow_bench.layout)")
    p.add_argument("--sections", default="layers,conv,e2e,sweep")
    p.add_argument("--models", default="spiking_resnet34,sew_resnet34,spikformer_ti")
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--N", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--budget-s", type=float, default=540.0, help="stop starting new work after this")
    p.add_argument("--model", default="spiking_resnet34", help="model of the per-layer sections")
    p.add_argument("--dry", action="store_true", help="CPU smoke run of the code paths (interpreter)")
    a = p.parse_args(argv)
    DEADLINE[0] = time.time() + a.budget_s
    _DRY[0] = a.dry
    if not torch.cuda.is_available() and not a.dry:
        print("sparseflow_bench.gpu_run needs a CUDA GPU; on this machine run `nox -s bench` for the CPU demo.")
        return 2
    if a.out is None:
        from .layout import device_results_dir

        a.out = device_results_dir()  # benchmarks/results/cpu for a --dry run without a GPU (not committed)
    os.makedirs(a.out, exist_ok=True)
    torch.backends.cudnn.benchmark = True
    env = environment()
    log(json.dumps(env))
    sections = a.sections.split(",")
    device = torch.device("cpu" if a.dry else "cuda")
    status = 0
    recs = None
    model = None
    if {"layers", "sweep", "conv"} & set(sections):
        model, x = prepared_model(a.model, a.T, a.N, a.size, device)
    for sec in sections:
        t0 = time.time()
        try:
            if sec == "layers":
                recs = section_layers(model, x, a.out, env, a.model)
            elif sec == "sweep":
                if recs is None:
                    _, recs = capture_spiking_layers(model, x)
                section_sweep(model, recs, a.out, env, a.T, device, a.model, a.size)
            elif sec == "conv":
                if recs is None:
                    _, recs = capture_spiking_layers(model, x)
                section_conv(recs, a.out, env)
            elif sec == "e2e":
                section_e2e(a.models.split(","), a.T, a.N, a.size, device, a.out, env,
                            compile_modes=() if a.dry else ("reduce-overhead",))
            else:
                from .sections import SectionContext, find_section

                run = find_section(sec)
                if run is None:
                    raise ValueError(f"unknown section {sec!r}")
                run(SectionContext(a.out, env, device, a.dry, a.T, a.N, a.size, DEADLINE[0], a.models.split(",")))
        except Exception:
            traceback.print_exc()
            status = 1
        log(f"section {sec}: {time.time() - t0:.1f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
