"""Timing and environment helpers: ``do_bench`` medians (CUDA-graph replay where asked), NVML energy."""

from __future__ import annotations

import datetime
import platform
import time

import torch


def environment() -> dict:
    import triton

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["sm_count"] = torch.cuda.get_device_properties(0).multi_processor_count
        try:
            import pynvml

            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(0)
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
            env["sm_clock_mhz_max"] = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM)
        except Exception:
            pass
    return env


def bench_ms(fn, graph: bool = True, rep: int = 50, quantiles=(0.2, 0.5, 0.8)) -> dict:
    """Median (and p20/p80) ms of ``fn()``: ``triton.testing.do_bench_cudagraph`` (launches captured in a
    CUDA graph, warm-up excluded) or ``do_bench`` for code that cannot be captured. CPU: one wall-clock run."""
    if not torch.cuda.is_available():
        t = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t) * 1e3
        return {"median": ms, "p20": ms, "p80": ms}
    from triton.testing import do_bench, do_bench_cudagraph

    if graph:
        q = do_bench_cudagraph(fn, rep=rep, quantiles=list(quantiles))
    else:
        q = do_bench(fn, warmup=25, rep=rep, quantiles=list(quantiles))
    return {"p20": q[0], "median": q[1], "p80": q[2]}


def graph_of(fn, x):
    """``fn(x)`` captured in one CUDA graph on a static copy of ``x`` (everything ``fn`` launches, a model's reset
    included): (replay callable, static output), or None where it cannot be captured."""
    try:
        static = x.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn(static)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fn(static)
        return g.replay, out
    except Exception:
        return None


def kernels_per_call(fn) -> int | None:
    """How many GPU kernels one ``fn()`` launches (``torch.profiler``; memory copies and sets not counted), or
    None where the profiler sees none (no GPU, or the launches hidden in a CUDA graph replay)."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    n = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
            and not e.name.lower().startswith(("memcpy", "memset")))
    return n or None


class Energy:
    """Joules from NVML's total energy counter (mJ resolution) between start() and stop()."""

    def __init__(self):
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._read = lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self._read()
        except Exception:
            self.handle = None

    @property
    def available(self) -> bool:
        return self.handle is not None

    def joules_per_call(self, fn, seconds: float = 1.0) -> float | None:
        if not self.available:
            return None
        fn()
        torch.cuda.synchronize()
        n, e0, t0 = 0, self._read(), time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(10):
                fn()
            n += 10
            torch.cuda.synchronize()
        e1 = self._read()
        return (e1 - e0) / 1e3 / n
