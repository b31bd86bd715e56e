"""Choose between implementations by measuring them, once per key, and remember the winner.

``choose(key, candidates)`` times every candidate (a zero-argument callable) on the current inputs with
CUDA events (median of a few runs after a warm-up) and caches the fastest name under ``key``. Later calls
with the same key return the cached name without timing. On the CPU (interpreter) nothing is timed and
the ``fallback`` candidate is returned.
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
            results[name] = time_ms(fn)
        except Exception:  # a config that does not compile or fit is not a candidate
            results[name] = float("inf")
    best = min(results, key=results.get)
    if results[best] == float("inf"):
        best = fallback
    with _LOCK:
        _CACHE[key] = best
        _TIMINGS[key] = results
    return best
