"""``--sections neuron_pool``: the multi-step neuron and the max pool after it, each way SparseFlow runs them, on
the maps of the networks that pool their spikes:

* a ResNet stem's 3 / 2 / 1 pool after the neuron on 64 channels at 112 x 112, T=4, one static frame per sample
  repeated over the steps by stride 0 (the convolution of a static image runs once), N = 1, 8 and 32;
* the DVS Gesture network's 2 / 2 pools on 128 channels, T=16, N=8, 128 down to 8 px;
* a spiking VGG's 2 / 2 pools on 128 channels at 56 and 28 px, T=4, N=8.

Per map, :func:`sparseflow_kernels.neuron_pool.multistep_neuron_pool` in each ``order`` (``bits``: the neuron once
per pixel, its spikes as one bit per step, then the pool of the bits; ``steps``: one kernel, every window position
at once) against the neuron kernel followed by the max pool kernel (``pair``, what the layer runs otherwise), fp16
currents, the membrane handed in and returned in fp16; ``bit_equal``: every order's pooled spikes and membrane equal
the pair's. Times in us.

-> ``neuron_pool.json`` (``neuron_pool_dry.json`` under ``ctx.dry``; ``markdown``: ``neuron_pool.md``).
"""

from __future__ import annotations

import json

import torch

from ..figures import env_line

#: (case, T, N, channels, map side, (kernel, stride, padding), static input)
CASES = ([("stem", 4, n, 64, 112, (3, 2, 1), True) for n in (1, 8, 32)]
         + [("dvs", 16, 8, 128, s, (2, 2, 0), False) for s in (128, 64, 32, 16, 8)]
         + [("vgg", 4, 8, 128, s, (2, 2, 0), False) for s in (56, 28)])


def _row(ctx, case, gen) -> dict:
    from sparseflow_kernels import NeuronSpec, multistep_neuron
    from sparseflow_kernels.neuron_pool import ORDERS, multistep_neuron_pool
    from sparseflow_kernels.spiking import pool_steps

    name, T, N, C, S, pool, static = case
    spec = NeuronSpec.make("lif", tau=2.0)
    dev = ctx.device
    x = (torch.randn(1 if static else T, N, S, S, C, generator=gen, device=dev) * 0.8 + 0.3).half()
    x = x.permute(0, 1, 4, 2, 3)  # channels innermost, as the convolutions before it write them
    if static:
        x = x.expand(T, *x.shape[1:])
    scale = torch.rand(C, generator=gen, device=dev) + 0.5
    shift = torch.randn(C, generator=gen, device=dev) * 0.2
    v0 = (torch.randn(N, S, S, C, generator=gen, device=dev) * 0.3).half().permute(0, 3, 1, 2)
    kw = dict(scale=scale, shift=shift, v=v0, return_v=True, v_dtype=torch.float16, out_dtype=torch.float16)

    def one(order):
        return lambda: multistep_neuron_pool(x, spec, kernel_size=pool[0], stride=pool[1], padding=pool[2],
                                             order=order, **kw)

    def pair():
        s, v = multistep_neuron(x, spec, **kw)
        return pool_steps(s, pool), v

    fns = {**{order: one(order) for order in ORDERS}, "pair": pair}
    res = {k: f() for k, f in fns.items()}
    same = all(torch.equal(res[k][0], res["pair"][0]) and torch.equal(res[k][1], res["pair"][1]) for k in ORDERS)
    row = {"case": name, "T": T, "N": N, "C": C, "S": S, "pool": list(pool), "static": static, "bit_equal": same,
           "spike_rate": float(res["pair"][0].float().mean())}
    for k, f in fns.items():
        row[k + "_us"] = round(ctx.bench(f)["median"] * 1e3, 2) if not ctx.dry else None
    return row


def run(ctx) -> dict:
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    cases = [(n, t, 1, 8, 8, p, st) for n, t, _, _, _, p, st in (CASES[0], CASES[3])] if ctx.dry else CASES
    rows = []
    for case in cases:
        if ctx.left() < 20:
            break
        rows.append(_row(ctx, case, gen))
        ctx.log(json.dumps(rows[-1]))
    out = {"env": ctx.env, "rows": rows}
    ctx.dump("neuron_pool_dry.json" if ctx.dry else "neuron_pool.json", out, env_key="env")
    return out


def rows(obj, source):
    from sparseflow_kernels.neuron_pool import ORDERS

    from ..records import Row, Timing

    for r in obj["rows"]:
        ts = [Timing("neuron_then_pool", (r.get("pair_us") or 0) / 1e3, "baseline")]
        ts += [Timing(f"neuron_pool_{o}", (r.get(f"{o}_us") or 0) / 1e3, "sparseflow" if o == "bits" else "reference")
               for o in ORDERS]
        yield Row("neuron_pool", f"multistep_neuron_pool_{r['case']}", ts, shape=[r["T"], r["N"], r["C"], r["S"],
                  r["S"]], dtype="float16", baseline="neuron_then_pool")


def markdown(r: dict, d: str) -> str:
    def us(v):
        return f"{v:.1f}" if isinstance(v, (int, float)) else "—"

    lines = ["# The neuron and the max pool of its spikes", "",
             f"Device: {env_line(r['env'])}. LIF (tau 2) over T, fp16 currents channels innermost, the membrane in and "
             "out in fp16; `bits` and `steps`: `multistep_neuron_pool`'s orders; pair: the neuron kernel, then the "
             "max pool kernel. Times in us (`do_bench` medians in a CUDA graph).", "",
             "| map | T | N | channels | side | pool | static input | bits | steps | pair | bit-equal |",
             "|---" * 11 + "|"]
    for row in r["rows"]:
        pool = "/".join(str(v) for v in row["pool"])
        lines.append(f"| {row['case']} | {row['T']} | {row['N']} | {row['C']} | {row['S']} | {pool} | "
                     f"{'yes' if row['static'] else 'no'} | {us(row['bits_us'])} | {us(row['steps_us'])} | "
                     f"{us(row['pair_us'])} | {'yes' if row['bit_equal'] else 'NO'} |")
    return "\n".join(lines) + "\n"
