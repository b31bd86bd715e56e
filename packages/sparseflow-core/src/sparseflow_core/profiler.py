"""``profile(model, inputs)``: per-layer latency and sparsity of any model, optimized or not.

For every convolution, linear layer and spiking neuron (leaf modules) it records, over ``reps`` forwards:
the latency of its calls (CUDA events on a GPU, wall clock on the CPU), the element density of its input,
for convolutions the block density at ``tile`` x ``tile`` x 16 channels with the receptive-field halo (the
fraction of work a sparse kernel must still do; skipped = 1 - that), and for SparseFlow modules the kernel
path they took. On a GPU it also reads NVML's energy counter around the timed forwards.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .cuda_graph import reset_states
from .registry import is_spiking_module
from .stats import block_density, element_density


@dataclass
class LayerProfile:
    name: str
    type: str
    calls: int = 0
    ms: float = 0.0
    elem_density: float | None = None
    block_density: float | None = None
    path: str | None = None

    @property
    def skipped(self) -> float | None:
        return None if self.block_density is None else 1.0 - self.block_density


@dataclass
class ProfileReport:
    layers: list[LayerProfile] = field(default_factory=list)
    forward_ms: float = 0.0
    throughput_per_s: float = 0.0
    energy_j_per_forward: float | None = None
    device: str = "cpu"

    def to_dict(self) -> dict:
        return {"device": self.device, "forward_ms": self.forward_ms, "throughput_per_s": self.throughput_per_s,
                "energy_j_per_forward": self.energy_j_per_forward,
                "layers": [dict(asdict(e), skipped=e.skipped) for e in self.layers]}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["layer", "type", "calls", "ms", "elem_density", "block_density", "skipped", "path"])
        for e in self.layers:
            w.writerow([e.name, e.type, e.calls, f"{e.ms:.6f}", e.elem_density, e.block_density, e.skipped, e.path])
        return buf.getvalue()

    def table(self) -> str:
        head = f"{'layer':<28} {'type':<14} {'calls':>5} {'ms':>9} {'elem':>6} {'blocks':>6} {'skip':>6}  path"
        out = [head, "-" * len(head)]
        fmt = lambda v: "" if v is None else f"{v:.3f}"
        for e in self.layers:
            out.append(f"{e.name[:28]:<28} {e.type[:14]:<14} {e.calls:>5} {e.ms:>9.4f} {fmt(e.elem_density):>6} "
                       f"{fmt(e.block_density):>6} {fmt(e.skipped):>6}  {e.path or ''}")
        en = "" if self.energy_j_per_forward is None else f", {self.energy_j_per_forward:.3f} J/forward"
        out.append(f"forward {self.forward_ms:.3f} ms ({self.throughput_per_s:.1f} forwards/s) on {self.device}{en}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def _timed_modules(model):
    for name, m in model.named_modules():
        if name and (isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear, nn.ConvTranspose2d)) or is_spiking_module(m)):
            yield name, m


def profile(model: nn.Module, inputs, *, reps: int = 5, tile: int = 8, reset: bool = True) -> ProfileReport:
    """Profile ``reps`` forwards of ``model`` on ``inputs`` (a tensor or a tuple of arguments)."""
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    cuda = first is not None and first.is_cuda
    rows: dict[str, LayerProfile] = {}
    starts: dict[str, list] = {}
    handles = []
    measuring = [False]

    def pre(name, m):
        def hook(mod, inp):
            if not measuring[0]:
                return
            row = rows.setdefault(name, LayerProfile(name, type(mod).__name__))
            x = next((t for t in inp if isinstance(t, torch.Tensor)), None)
            if x is not None and row.elem_density is None:
                row.elem_density = element_density(x)
                if isinstance(mod, nn.Conv2d) and x.dim() in (4, 5):
                    flat = x.flatten(0, 1) if x.dim() == 5 else x
                    k, s = mod.kernel_size[0], mod.stride[0]
                    pad = mod.padding[0] if isinstance(mod.padding, tuple) else 0
                    row.block_density = block_density(flat, tile, 16, k, s, min(pad, k // 2))
            if cuda:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                starts.setdefault(name, []).append(ev)
            else:
                starts.setdefault(name, []).append(time.perf_counter())

        return hook

    def post(name, m):
        def hook(mod, inp, out):
            if not measuring[0]:
                return
            row = rows[name]
            st = starts[name].pop()
            if cuda:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                ev.synchronize()
                row.ms += st.elapsed_time(ev)
            else:
                row.ms += (time.perf_counter() - st) * 1e3
            row.calls += 1
            row.path = getattr(mod, "last_path", None)

        return hook

    for name, m in _timed_modules(model):
        handles.append(m.register_forward_pre_hook(pre(name, m)))
        handles.append(m.register_forward_hook(post(name, m)))
    rep = ProfileReport(device=torch.cuda.get_device_name() if cuda else "cpu")
    try:
        with torch.no_grad():
            if reset:
                reset_states(model)
            model(*args)  # warm-up (compiles kernels, lets layers pick their paths)
            measuring[0] = True
            for _ in range(reps):
                if reset:
                    reset_states(model)
                model(*args)
            measuring[0] = False
            # whole-forward time and energy without the per-layer synchronisation
            if cuda:
                torch.cuda.synchronize()
            energy = _nvml_energy() if cuda else None
            e0 = energy() if energy else None
            t0 = time.perf_counter()
            for _ in range(reps):
                if reset:
                    reset_states(model)
                model(*args)
            if cuda:
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / reps
            if energy:
                rep.energy_j_per_forward = (energy() - e0) / 1e3 / reps
    finally:
        for h in handles:
            h.remove()
    for row in rows.values():
        row.ms /= max(1, reps)
        row.calls //= max(1, reps)
    rep.layers = list(rows.values())
    rep.forward_ms = dt * 1e3
    rep.throughput_per_s = 1.0 / dt if dt > 0 else 0.0
    return rep


def _nvml_energy():
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
        return lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
    except Exception:
        return None
