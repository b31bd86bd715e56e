"""GPU exploration (device machine): correctness smoke of every kernel path, then a config sweep of the
fused spiking layer and the standalone sparse conv at spiking_resnet34's layer shapes (synthetic clustered
spikes), against cuDNN and torch.compile + CUDA graphs of the same dense block. Writes explore.json."""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench_cudagraph

from sparseflow_kernels import ConvConfig, NeuronSpec, prescan, sparse_conv2d, spiking_conv2d
from sparseflow_kernels.conv import pack_weight
from sparseflow_kernels.naive import spiking_conv2d_reference

OUT = os.environ.get("OUT", "benchmarks/results/explore")  # not a results folder of the report
dev = os.environ.get("DEV", "cuda")
torch.backends.cudnn.benchmark = True
results = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__, "triton": triton.__version__,
           "correct": [], "fused": [], "conv": []}


def clustered(shape, density, blob=6, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    B, C, H, W = shape
    base = (torch.rand(B, C, H // blob + 1, W // blob + 1, generator=g) < density * 3).float()
    m = F.interpolate(base, scale_factor=blob, mode="nearest")[:, :, :H, :W]
    shift = torch.randint(0, blob, (2,), generator=g)
    m = torch.roll(m, (int(shift[0]), int(shift[1])), (2, 3))
    return (m * (torch.rand(shape, generator=g) < 0.33)).to(dev)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def correctness():
    torch.manual_seed(0)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for (N, C, H, W, CO, k, s, p) in [(3, 37, 29, 31, 45, 3, 1, 1), (2, 64, 56, 56, 64, 3, 2, 1),
                                          (4, 128, 14, 14, 256, 1, 2, 0), (2, 20, 9, 9, 33, 5, 1, 2)]:
            x = (torch.rand(N, C, H, W, device=dev) < 0.2).float() * torch.randint(0, 3, (N, C, H, W), device=dev)
            x = x.to(dt).contiguous(memory_format=torch.channels_last)
            w = torch.randn(CO, C, k, k, device=dev).to(dt)
            b = torch.randn(CO, device=dev).to(dt)
            ref = F.conv2d(x.double(), w.double(), b.double(), s, p)
            y = torch.full_like(ref, float("nan"), dtype=dt)
            y = sparse_conv2d(x, w, b, s, p)
            yd = sparse_conv2d(x, w, b, s, p, dense=True)
            results["correct"].append({"op": "sparse_conv2d", "dtype": str(dt), "shape": [N, C, H, W, CO, k, s, p],
                                       "rel_sparse": rel(y, ref), "rel_dense": rel(yd, ref),
                                       "nan": bool(torch.isnan(y).any())})
    T, N, C, H, W, CO = 4, 2, 64, 28, 28, 64
    x = clustered((T * N, C, H, W), 0.05).view(T, N, C, H, W)
    w = torch.randn(CO, C, 3, 3, device=dev) * 0.15
    sc = torch.rand(CO, device=dev) + 0.5
    sh = torch.randn(CO, device=dev) * 0.3
    spec = NeuronSpec.make("lif")
    rs, _rh, rv = spiking_conv2d_reference(x.double(), w.double(), None, 1, 1, scale=sc.double(), shift=sh.double(),
                                          spec=spec)
    occ = prescan(x.flatten(0, 1), 8, 16)
    for name, kw in [("fused", {}), ("sparse", {"sparse": True}), ("occ", {"occupancy": occ}),
                     ("tm", {"config": ConvConfig(4, 4, 64, 16, t_in_m=True)}), ("cudnn", {"path": "cudnn"})]:
        for dt in (torch.float32, torch.float16):
            s, v = spiking_conv2d(x.to(dt), w.to(dt), None, 1, 1, scale=sc, shift=sh, return_v=True, **kw)
            flips = float((s.double() != rs).float().mean())
            results["correct"].append({"op": "spiking_conv2d", "path": name, "dtype": str(dt), "flip_rate": flips,
                                       "v_maxerr": float((v.double() - rv).abs().max())})
    for r in results["correct"]:
        print(r)


def dense_block(w, rm, rv, g, b, T, N, stride, pad):
    def block(x):
        y = F.conv2d(x, w, None, stride, pad)
        y = F.batch_norm(y, rm, rv, g, b, False, 0.0, 1e-5)
        y = y.view(T, N, *y.shape[1:])
        v = torch.zeros_like(y[0])
        out = []
        for t in range(T):
            h = v + (y[t] - v) / 2.0
            s = (h >= 1.0).to(y.dtype)
            v = h * (1.0 - s)
            out.append(s)
        return torch.stack(out)
    return block


def bench(fn):
    return do_bench_cudagraph(fn, rep=40, return_mode="median")


def fused_sweep(layers, N=8, T=4):
    for (C, CO, H, stride) in layers:
        x = clustered((T * N, C, H, H), 0.05, seed=C).half().contiguous(memory_format=torch.channels_last)
        x5 = x.view(T, N, C, H, H)
        w = (torch.randn(CO, C, 3, 3, device=dev) * (2.0 / (9 * C)) ** 0.5).half()
        rm, rv = torch.zeros(CO, device=dev).half(), torch.ones(CO, device=dev).half() * 0.02
        g, b = torch.ones(CO, device=dev).half(), torch.full((CO,), 0.1, device=dev).half()
        inv = (rv.float() + 1e-5).rsqrt()
        sc, sh = g.float() * inv, b.float() - rm.float() * g.float() * inv
        blk = dense_block(w, rm, rv, g, b, T, N, stride, 1)
        comp = torch.compile(blk)
        comp(x)
        comp(x)
        row = {"C": C, "CO": CO, "H": H, "stride": stride, "N": N, "T": T}
        row["cudnn_fp16_cl_conv"] = bench(lambda: F.conv2d(x, w, None, stride, 1))
        row["eager_block_fp16"] = bench(lambda: blk(x))
        row["compile_graph_fp16"] = bench(lambda: comp(x))
        occ = prescan(x, 8, 16)
        row["prescan"] = bench(lambda: prescan(x, 8, 16))
        row["block_density_occ"] = occ.block_density()
        ref = comp(x)
        cands = {}
        grid = [((8, 8), False, bn, bk, nw) for bn in (64, 128) for bk in (16, 32) for nw in (4, 8)]
        grid += [((4, 4), True, bn, bk, 4) for bn in (64, 128, 32) for bk in (16, 32)]
        grid += [((8, 4), True, 64, 16, 8), ((8, 8), True, 64, 16, 8), ((16, 8), False, 64, 16, 8)]
        for (tile, tm, bn, bk, nw) in grid:
            if bn <= max(32, CO):
                cands[(tile, tm, bn, bk, nw)] = ConvConfig(tile[0], tile[1], bn, bk, tm, nw, 3)
        best = {}
        t0 = time.time()
        for key, cfg in cands.items():
            if time.time() - t0 > float(os.environ.get('SWEEP_S', 40)):
                break
            wp = pack_weight(w, cfg.block_k, cfg.block_n, torch.float16)
            for mode in ("dense", "occ", "occw"):
                if mode != "dense" and cfg.block_k != 16:
                    continue
                kw = {}
                if mode in ("occ", "occw"):
                    kw["occupancy"] = prescan(x, (cfg.tile_h, cfg.tile_w), 16)
                if mode == "occw":
                    kw["write_occupancy"] = True
                f = lambda: spiking_conv2d(x5, w, None, stride, 1, scale=sc, shift=sh, config=cfg,
                                           packed_weight=wp, **kw)
                try:
                    out = f()
                    out = out[0] if isinstance(out, tuple) else out
                    flips = float((out != ref).float().mean())
                    t = bench(f)
                except Exception as e:  # record and go on
                    print("fail", key, mode, repr(e)[:200])
                    continue
                name = f"{mode}"
                if name not in best or t < best[name][0]:
                    best[name] = (t, str(key), flips)
        row["cudnn_path"] = bench(lambda: spiking_conv2d(x5, w, None, stride, 1, scale=sc, shift=sh, path="cudnn"))
        row["best"] = best
        results["fused"].append(row)
        print(json.dumps(row))


def conv_sweep(layers, N=32):
    for (C, CO, H, stride) in layers:
        for dens in (0.02, 0.05, 0.2):
            x = clustered((N, C, H, H), dens, seed=1).half().contiguous(memory_format=torch.channels_last)
            w = torch.randn(CO, C, 3, 3, device=dev).half()
            row = {"C": C, "CO": CO, "H": H, "stride": stride, "N": N, "density": dens}
            row["elem"] = float((x != 0).float().mean())
            row["cudnn_fp16_cl"] = bench(lambda: F.conv2d(x, w, None, stride, 1))
            x32, w32 = x.float().contiguous(), w.float()
            row["cudnn_fp32"] = bench(lambda: F.conv2d(x32, w32, None, stride, 1))
            for bs in (8, 16):
                cfg = ConvConfig(bs, bs, 64, 16, False, 4 if bs == 8 else 8, 3)
                wp = pack_weight(w, 16, 64, torch.float16)
                row[f"sparse_b{bs}"] = bench(lambda: sparse_conv2d(x, w, None, stride, 1, config=cfg, packed_weight=wp))
                row[f"dense_kernel_b{bs}"] = bench(lambda: sparse_conv2d(x, w, None, stride, 1, config=cfg,
                                                                        packed_weight=wp, dense=True))
                row[f"block_density_b{bs}"] = prescan(x, bs, 16).block_density()
            results["conv"].append(row)
            print(json.dumps(row))


if __name__ == "__main__":
    print(results["device"], results["torch"], results["triton"])
    t0 = time.time()
    correctness()
    print("correctness s", time.time() - t0)
    layers = [(64, 64, 56, 1), (128, 128, 28, 1), (256, 256, 14, 1), (512, 512, 7, 1), (64, 128, 56, 2)]
    fused_sweep(layers)
    print("fused s", time.time() - t0)
    conv_sweep(layers[:3])
    print("total s", time.time() - t0)
    with open(os.path.join(OUT, "explore.json"), "w") as f:
        json.dump(results, f, indent=1)
    sys.exit(0)
