"""Tile sweep of channel_dot (the Spike-driven Transformer's sum over tokens of k * v) on the H100 shape
[32, 384, 14*14] with channels innermost (as the fused convolutions write k and v), against the module's own
``(k * v).sum(-1)``: which BLOCK_C / BLOCK_L / warps keep enough loads in flight.

    python scripts/explore_channel_dot.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton
from triton.testing import do_bench_cudagraph

from sparseflow_kernels.attention import _channel_dot_kernel


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = p.parse_args()
    torch.manual_seed(0)
    B, C, H, W = 32, 384, 14, 14
    rows = []
    for layout in ("channels_innermost", "contiguous"):
        k = (torch.rand(B, H, W, C, device="cuda") < 0.3).half().permute(0, 3, 1, 2)
        v = (torch.rand(B, H, W, C, device="cuda") < 0.1).half().permute(0, 3, 1, 2)
        if layout == "contiguous":
            k, v = k.contiguous(), v.contiguous()
        k3, v3 = k.reshape(B, C, -1), v.reshape(B, C, -1)
        ref = (k3.float() * v3.float()).sum(-1)
        t_mod = do_bench_cudagraph(lambda: (k3 * v3).sum(dim=-1))
        rows.append({"layout": layout, "what": "module (k*v).sum(-1)", "ms": t_mod})
        L = k3.shape[2]
        for bc in (16, 32, 64, 128):
            for bl in (64, 128, 256):
                for nw in (4, 8):
                    y = torch.empty(B, C, dtype=k.dtype, device="cuda")
                    ncb = triton.cdiv(C, bc)

                    def run():
                        _channel_dot_kernel[(B * ncb,)](k3, *k3.stride(), v3, *v3.stride(), y, *y.stride(), C, L, ncb,
                                                        BLOCK_C=bc, BLOCK_L=bl, num_warps=nw)
                    try:
                        run()
                        ok = bool(torch.equal(y.float(), ref))
                        t = do_bench_cudagraph(run)
                    except Exception as e:  # a configuration that does not compile
                        rows.append({"layout": layout, "block_c": bc, "block_l": bl, "warps": nw, "error": str(e)[:100]})
                        continue
                    rows.append({"layout": layout, "block_c": bc, "block_l": bl, "warps": nw, "ms": t, "exact": ok})
        best = min((r for r in rows if r["layout"] == layout and "block_c" in r and "ms" in r), key=lambda r: r["ms"])
        print(layout, "module", round(t_mod * 1e3, 2), "us; best", best, flush=True)
    for r in rows:
        if "block_c" in r and r.get("ms") is not None and (r["block_c"], r["block_l"], r["warps"]) == (64, 128, 4):
            print("current config", r, flush=True)
    with open(os.path.join(a.out, "explore_channel_dot.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
