"""``--sections exactness``: whole models in fp32 against the dense model, ``numerics="faithful"``.

For each model of ``--models`` (T, N, size of the run; natural images, BatchNorm recalibrated), with TF32 off:

* the dense fp32 model's logits and last spikes (the input of ``avgpool`` where the model has one) on a first call,
  a second call without ``reset_net`` (membranes carried over) and a call after it;
* the same dense model in channels_last (cuDNN picks other algorithms): how far a mere change of fp32 summation
  order moves these networks' logits;
* ``optimize(model, x, numerics="faithful")`` on the same three calls: logits relative error (the goal is < 1e-3;
  the mode is built to give 0), whether they are bit-identical, the last layer's spike flip rate;
* time per forward (median, CUDA-graph replay for the optimized model, eager for the dense one: what a user gets).

Writes ``exactness.json`` and ``exactness.md``.
"""

from __future__ import annotations

import copy

import torch

from . import SectionContext, reset, strict_fp32

DEFAULT_MODELS = ("spiking_resnet34", "sew_resnet34", "spikformer_ti", "spiking_resnet50", "spiking_vgg11")


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _calls(model, x, store):
    """Logits (and last spikes, when ``store`` is hooked) of three calls: first, second without reset, after reset."""
    out = []
    with torch.no_grad():
        reset(model)
        for i in range(3):
            if i == 2:
                reset(model)
            out.append((model(x).float().clone(), store.get("s")))
    return out


def _hook(model, store):
    pool = getattr(model, "avgpool", None)
    if pool is None:
        return []
    return [pool.register_forward_pre_hook(lambda m, a: store.__setitem__("s", a[0].detach().float().clone()))]


def _times(ctx, model, opt, x, graph_cls) -> dict:
    """Median ms of the dense model's eager forward and of the faithful model replayed in a CUDA graph."""
    def eager():
        reset(model)
        with torch.no_grad():
            return model(x)

    out = {"eager_fp32_ms": ctx.bench(eager, graph=False, rep=50)["median"]}
    g = graph_cls(opt)
    with torch.no_grad():
        for _ in range(3):
            g(x)
        out["faithful_fp32_graph_ms"] = ctx.bench(lambda: g(x), graph=False)["median"]
    out["faithful_speedup_vs_eager_fp32"] = out["eager_fp32_ms"] / out["faithful_fp32_graph_ms"]
    return out


def _ms(r: dict, key: str) -> str:
    return f"{r[key]:.2f} ms" if key in r else "-"


def run(ctx: SectionContext) -> dict:
    from sparseflow_core import get_report, optimize
    from sparseflow_core.cuda_graph import CudaGraphModel

    from ..models import prepared_model

    models = [m for m in (ctx.models or DEFAULT_MODELS) if m]
    T, N, size = (2, 1, 32) if ctx.dry else (ctx.T, ctx.N, ctx.size)
    results = {}
    with strict_fp32():
        for name in models:
            if ctx.left() < 30:
                ctx.log(f"exactness: deadline before {name}")
                break
            r = {"T": T, "N": N, "size": size}
            try:
                model, x = prepared_model(name, T, N, size, ctx.device)
                store = {}
                hs = _hook(model, store)
                ref = _calls(model, x, store)
                for h in hs:
                    h.remove()
                mcl = copy.deepcopy(model).to(memory_format=torch.channels_last)
                lcl = _calls(mcl, x, {})
                r["dense_reordered_logits_rel_err"] = [_rel(a[0], b[0]) for a, b in zip(lcl, ref)]
                del mcl
                opt, rep = optimize(copy.deepcopy(model), x, numerics="faithful", return_report=True)
                store = {}
                hs = _hook(opt, store)
                got = _calls(opt, x, store)
                for h in hs:
                    h.remove()
                r["faithful_logits_rel_err"] = [_rel(a[0], b[0]) for a, b in zip(got, ref)]
                r["faithful_bit_identical"] = [bool(torch.equal(a[0], b[0])) for a, b in zip(got, ref)]
                if ref[0][1] is not None and got[0][1] is not None:
                    r["faithful_last_spike_flip_rate"] = [float((a[1] != b[1]).float().mean())
                                                          for a, b in zip(got, ref)]
                rep = get_report(opt)
                r["replaced"] = {a: len(rep.by_action(a)) for a in ("fused", "sparse", "kernel", "neuron-kernel")}
                r["left_faithful"] = [e.name for e in rep.layers if e.action == "left" and e.reason
                                      and "faithful" in e.reason]
                if not ctx.dry:
                    r.update(_times(ctx, model, opt, x, CudaGraphModel))
                del opt, model
                torch.cuda.empty_cache() if torch.cuda.is_available() else None
            except Exception as e:  # one model's failure is recorded, the others still run
                import traceback

                traceback.print_exc()
                r["error"] = f"{type(e).__name__}: {e}"[:400]
            results[name] = r
            ctx.log(f"exactness {name}: {r}")
            ctx.dump("exactness.json", {"models": results, "dry": ctx.dry})
    ctx.write_text("exactness.md", markdown(results, ctx.env))
    return results


def markdown(results: dict, env: dict) -> str:
    lines = [f"# fp32 exactness, `numerics=\"faithful\"` ({env.get('device', '?')})", "",
             "Logits relative error against the dense fp32 model (TF32 off) on three calls: first / second without "
             "reset / after reset.", "",
             "| model | faithful | bit-identical | dense in channels_last (reordered sums) | last-spike flips | "
             "eager fp32 | faithful fp32 + graph |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:80]} | | | | | |")
            continue
        f = " / ".join(f"{v:.3g}" for v in r["faithful_logits_rel_err"])
        d = " / ".join(f"{v:.3g}" for v in r["dense_reordered_logits_rel_err"])
        flips = " / ".join(f"{v:.2g}" for v in r.get("faithful_last_spike_flip_rate", [])) or "-"
        lines.append(f"| {name} | {f} | {' / '.join('yes' if b else 'no' for b in r['faithful_bit_identical'])} | "
                     f"{d} | {flips} | {_ms(r, 'eager_fp32_ms')} | {_ms(r, 'faithful_fp32_graph_ms')} |")
    return "\n".join(lines) + "\n"
