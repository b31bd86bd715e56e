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
