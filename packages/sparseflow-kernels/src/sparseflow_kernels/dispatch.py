"""Choose between implementations by measuring them, once per key, and remember the winner.

``choose(key, candidates)`` times every candidate (a zero-argument callable) on the current inputs and
caches the fastest name under ``key``. Later calls with the same key return the cached name without timing.
On the CPU (interpreter) nothing is timed and the ``fallback`` candidate is returned.

Timing replays each candidate captured in a CUDA graph (median of CUDA-event timed replays after warm-up):
the layers are 10-60 us of GPU work, and timed eagerly a candidate that launches several kernels (cuDNN
conv + neuron kernel) pays the CPU's launch latency that a graph-replayed model never sees (measured on
the H100: eager timing picked the fused Triton path for layers where cuDNN + neuron was 1.3x faster in a
graph). A candidate that cannot be captured is timed eagerly.
"""

from __future__ import annotations

import statistics
import threading

import torch

_CACHE: dict = {}
_TIMINGS: dict = {}
_LOCK = threading.Lock()


def cached(key):
    with _LOCK:
        return _CACHE.get(key)


def choices() -> dict:
    """Every cached choice, {key: candidate name} (a copy): what :func:`set_choice` puts back, e.g. on another
    process that runs the same model, so that both take the same paths."""
    with _LOCK:
        return dict(_CACHE)


def timings(key=None):
    """The measured medians (ms) by candidate name, for one key or all of them."""
    with _LOCK:
        return dict(_TIMINGS.get(key, {})) if key is not None else {k: dict(v) for k, v in _TIMINGS.items()}


def clear_cache() -> None:
    with _LOCK:
        _CACHE.clear()
        _TIMINGS.clear()


def set_choice(key, name: str) -> None:
    with _LOCK:
        _CACHE[key] = name


def time_ms(fn, warmup: int = 2, reps: int = 7) -> float:
    """Median CUDA-event time of ``fn()`` in ms (the caller's stream)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_time_ms(fn, warmup: int = 2, reps: int = 10, inner: int = 5) -> float:
    """Median CUDA-event time (ms) of one ``fn()`` replayed from a CUDA graph of ``inner`` back-to-back calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    del graph
    return statistics.median(times)


def measure(fn) -> float:
    """Graph-replayed time of ``fn`` (eager CUDA-event timing if it cannot be captured)."""
    try:
        return graph_time_ms(fn)
    except Exception:  # not capturable (host sync, unsupported op): eager timing
        torch.cuda.synchronize()
        return time_ms(fn)


def choose(key, candidates: dict, fallback: str, device: torch.device | None = None) -> str:
    """Return the cached choice for ``key``, or time ``candidates`` now (CUDA only) and cache the fastest.

    A candidate that raises is dropped (and its error recorded under its name as ``inf``).
    """
    hit = cached(key)
    if hit is not None:
        return hit
    if device is None or device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return fallback
    results = {}
    for name, fn in candidates.items():
        try:
            results[name] = measure(fn)
        except Exception:  # a config that does not compile or fit is not a candidate
            results[name] = float("inf")
    best = min(results, key=results.get)
    if results[best] == float("inf"):
        best = fallback
    with _LOCK:
        _CACHE[key] = best
        _TIMINGS[key] = results
    return best
