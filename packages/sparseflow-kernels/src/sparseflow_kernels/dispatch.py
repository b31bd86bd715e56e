"""Choose between implementations by measuring them, once per key, and remember the winner.

``choose(key, candidates)`` times every candidate (a zero-argument callable) on the current inputs and
caches the fastest name under ``key``. Later calls with the same key return the cached name without timing.
On the CPU (interpreter) nothing is timed and the ``fallback`` candidate is returned.

Timing replays each candidate captured in a CUDA graph (median of CUDA-event timed replays after warm-up; every
candidate captured, hence compiled, before any is timed, then timed in turns: :func:`measure_all`):
the layers are 10-60 us of GPU work, and timed eagerly a candidate that launches several kernels (cuDNN
conv + neuron kernel) pays the CPU's launch latency that a graph-replayed model never sees (measured on
the H100: eager timing picked the fused Triton path for layers where cuDNN + neuron was 1.3x faster in a
graph). A candidate that cannot be captured is timed eagerly.

One cache holds every measured choice, in namespaces: ``"path"`` (the default: a module's implementation, e.g.
``"sparse"`` / ``"dense"`` / ``"torch"`` / ``"fused_dense"``) and ``"block_size"`` (the spatial tile a sparse
convolution skips at, measured by ``sparseflow_core.blocks``). :func:`force_path` overrides the choice of a
path for the code run inside it (scripts, tests, a user ruling a path out).
"""

from __future__ import annotations

import contextlib
import contextvars
import statistics
import threading

import torch

PATH = "path"  # the namespace of the implementation choices
_CACHE: dict = {}  # {(namespace, key): choice}
_TIMINGS: dict = {}  # {(namespace, key): {candidate: ms}}
_LOCK = threading.Lock()
_FORCED: contextvars.ContextVar = contextvars.ContextVar("sparseflow_forced_path", default=())


def cached(key, namespace: str = PATH):
    with _LOCK:
        return _CACHE.get((namespace, key))


def choices(namespace: str = PATH) -> dict:
    """Every cached choice of ``namespace``, {key: choice} (a copy): what :func:`set_choice` puts back, e.g. on
    another process that runs the same model, so that both take the same paths."""
    with _LOCK:
        return {k: v for (ns, k), v in _CACHE.items() if ns == namespace}


def timings(key=None, namespace: str = PATH):
    """The measured medians (ms) by candidate, for one key of ``namespace`` or all of them."""
    with _LOCK:
        if key is not None:
            return dict(_TIMINGS.get((namespace, key), {}))
        return {k: dict(v) for (ns, k), v in _TIMINGS.items() if ns == namespace}


def clear_cache(namespace: str | None = None) -> None:
    """Forget the measured choices and timings of ``namespace`` (None: of every namespace)."""
    with _LOCK:
        for d in (_CACHE, _TIMINGS):
            for k in [k for k in d if namespace is None or k[0] == namespace]:
                del d[k]


def set_choice(key, name, namespace: str = PATH) -> None:
    with _LOCK:
        _CACHE[(namespace, key)] = name


def record(key, name, results: dict, namespace: str = PATH) -> None:
    """Cache ``name`` as the choice for ``key`` with the medians it won by (``{candidate: ms}``)."""
    with _LOCK:
        _CACHE[(namespace, key)] = name
        _TIMINGS[(namespace, key)] = dict(results)


@contextlib.contextmanager
def force_path(path):
    """Inside the ``with`` block, :func:`choose` returns a forced candidate instead of its cached or measured one.

    ``path``: a candidate name (``"torch"``, ``"dense"``, ``"sparse"``, ``"fused_dense"``, ...) forced for every
    choice that offers it, or a dict ``{kind: name}`` forcing ``name`` only where a choice's key starts with
    ``kind`` (the op kind the modules key their choices by: ``"conv"``, ``"spiking"``, ``"linear"``,
    ``"batchnorm"``, ...; a tuple prefix of the key also works). A choice that does not offer the forced name
    is made as usual. Nothing forced is cached, and nothing is measured. Blocks nest (the innermost rule that
    applies wins) and are undone on exit, also on an exception; the setting belongs to the current thread (and
    asyncio task): other threads keep choosing as before.
    """
    if isinstance(path, str):
        rules = (((), path),)
    elif isinstance(path, dict) and path and all(isinstance(v, str) for v in path.values()):
        rules = tuple((k if isinstance(k, tuple) else (k,), v) for k, v in path.items())
    else:
        raise TypeError(f"force_path expects a candidate name or a non-empty {{kind: name}} dict, got {path!r}")
    token = _FORCED.set(_FORCED.get() + rules)
    try:
        yield
    finally:
        _FORCED.reset(token)


def forced(key, candidates) -> str | None:
    """The name :func:`force_path` forces for ``key`` among ``candidates`` here, or None."""
    for prefix, name in reversed(_FORCED.get()):
        if name in candidates and (not prefix or (isinstance(key, tuple) and key[:len(prefix)] == prefix)):
            return name
    return None


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


def _capture(fn, warmup: int = 2, inner: int = 5):
    """A CUDA graph of ``inner`` back-to-back calls of ``fn``, after ``warmup`` eager calls on a side stream (the
    first compiles a Triton kernel, runs cuDNN's algorithm search), replayed once."""
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
    return graph


def _replay_ms(graph, inner: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / inner


#: replays of every candidate's graph before any is timed, and timed rounds (one replay of each candidate per round)
WARM_ROUNDS, ROUNDS = 20, 15


def measure_all(candidates: dict, inner: int = 5) -> dict:
    """{name: median ms} of every candidate, compared on equal terms: all are captured first (each graph holds
    ``inner`` calls; a candidate that cannot be captured runs eagerly, one that raises gets ``inf``), replayed
    :data:`WARM_ROUNDS` times, then timed in :data:`ROUNDS` rounds of one replay each, in turn: no candidate is timed
    right after the seconds of another's compile, nor in a different state of the GPU's clocks than the others. On
    the H200 the medians of spiking_resnet34's layers agree within 2 us with those of candidates timed one
    after the other, each right after its own capture."""
    graphs, eager, results = {}, {}, {}
    for name, fn in candidates.items():
        try:
            graphs[name] = _capture(fn, inner=inner)
        except Exception:  # not capturable (host sync, unsupported op): timed eagerly, or not a candidate
            torch.cuda.synchronize()
            try:
                fn()
                eager[name] = fn
            except Exception:  # a config that does not compile or fit
                results[name] = float("inf")
    for _ in range(WARM_ROUNDS):
        for g in graphs.values():
            g.replay()
    torch.cuda.synchronize()
    times = {name: [] for name in (*graphs, *eager)}
    for _ in range(ROUNDS):
        for name, g in graphs.items():
            times[name].append(_replay_ms(g, inner))
        for name, fn in eager.items():
            times[name].append(time_ms(fn, warmup=0, reps=1))
    graphs.clear()
    results.update({name: statistics.median(t) for name, t in times.items()})
    return {name: results[name] for name in candidates}


def choose(key, candidates: dict, fallback: str, device: torch.device | None = None) -> str:
    """Return the cached choice for ``key``, or time ``candidates`` now (CUDA only) and cache the fastest.

    A candidate that raises is dropped (and its error recorded under its name as ``inf``). Inside
    :func:`force_path`, a forced candidate is returned without timing.
    """
    name = forced(key, candidates)
    if name is not None:
        return name
    hit = cached(key)
    if hit is not None:
        return hit
    if device is None or device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return fallback
    results = measure_all(candidates)
    best = min(results, key=results.get)
    if results[best] == float("inf"):
        best = fallback
    record(key, best, results)
    return best
