"""SparseFlow in a data-parallel job of ``torch.distributed`` (``torchrun``): one optimized replica per rank.

SparseFlow brings no launcher: the job is PyTorch's own (``torchrun``, ``init_process_group``, a
``DistributedSampler``). Each rank optimizes its own copy of the model on its own device (``cuda:LOCAL_RANK``)
and captures its own CUDA graphs (a graph belongs to one device). What these helpers add:

* :func:`init_distributed` - the rank, world size and device from torchrun's environment (``nccl`` on CUDA,
  ``gloo`` on the CPU); without torchrun, one process of world size 1 and no process group.
* :func:`export_dispatch` / :func:`import_dispatch` / :func:`broadcast_dispatch` - the measured path choices
  (the kernels' dispatch cache, ``sparseflow_kernels.dispatch``, and ``block_size="auto"``'s cache,
  :mod:`sparseflow_core.blocks`). Their keys are layer geometry, input shape, strides and dtype, never the
  device, so a choice measured on rank 0 applies on every rank. Rank 0 measures (runs the model on the batch
  shapes of the job), :func:`broadcast_dispatch` sends its choices, and the other ranks take the same paths
  before their first call: every rank runs the same kernels, and a sample's logits do not depend on the
  rank that computed them (paths differ in their order of fp32 sums). :func:`broadcast_on_first_call` does the
  same inside a loop that is not SparseFlow's (e.g. SpikingJelly's distributed inference): on the model's
  first call rank 0 runs the batch once to measure, then every rank takes its choices.
* :func:`gather_reports` - every rank's ``OptimizeReport`` (with the path each layer took) on rank 0, and
  :func:`path_disagreements` - the layers whose paths differ between ranks (none when the choices were
  broadcast).
* :func:`gather_throughput` - samples and seconds of every rank, summed with ``all_reduce``.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import blocks

__all__ = [
    "DistInfo",
    "broadcast_dispatch",
    "broadcast_on_first_call",
    "export_dispatch",
    "gather_reports",
    "gather_throughput",
    "import_dispatch",
    "init_distributed",
    "is_distributed",
    "path_disagreements",
    "shutdown",
]


@dataclass
class DistInfo:
    """Where this process stands in the job: ``rank`` of ``world_size``, ``local_rank`` on its machine, its
    ``device``, the process group's ``backend`` (None without one) and whether :func:`init_distributed` created
    the group (then :func:`shutdown` destroys it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    """A ``torch.distributed`` process group is initialized."""
    return dist.is_available() and dist.is_initialized()


def init_distributed(device: str | torch.device | None = None, backend: str | None = None) -> DistInfo:
    """Join the job torchrun started (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` in the
    environment), or use the group the caller already initialized, or run alone (world size 1, no group).

    ``device``: None for ``cuda:LOCAL_RANK`` when CUDA is available (made the current device), else the CPU.
    ``backend``: None for ``nccl`` on CUDA and ``gloo`` on the CPU.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    initialized_here = False
    if not is_distributed() and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
        initialized_here = True
    if not is_distributed():
        return DistInfo(device=device)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device,
                    backend=dist.get_backend(), initialized_here=initialized_here)


def shutdown(info: DistInfo) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if info.initialized_here and is_distributed():
        dist.destroy_process_group()


def export_dispatch() -> dict:
    """This process's measured choices: ``{"kernels": {key: path}, "block_sizes": {key: size}}`` (picklable)."""
    from sparseflow_kernels import dispatch

    return {"kernels": dispatch.choices(), "block_sizes": blocks.auto_choices()}


def import_dispatch(state: dict) -> int:
    """Put choices exported by :func:`export_dispatch` (e.g. on another rank) into this process's caches, over
    any choice already cached for the same key; returns how many were put. The model must be the same
    (same layers, shapes and dtype) for the choices to mean the same paths."""
    from sparseflow_kernels import dispatch

    if not isinstance(state, dict) or not {"kernels", "block_sizes"} <= set(state):
        raise ValueError("import_dispatch expects the dict of export_dispatch(): keys 'kernels' and 'block_sizes'")
    for key, name in state["kernels"].items():
        dispatch.set_choice(key, name)
    blocks.set_auto_choices(state["block_sizes"])
    return len(state["kernels"]) + len(state["block_sizes"])


def broadcast_dispatch(src: int = 0, group=None) -> int:
    """Send rank ``src``'s measured choices to every rank of ``group`` (all ranks call it; a collective).

    Call it after ``src`` has run the model on every batch shape of the job and before the other ranks' first
    call: they then take ``src``'s paths instead of measuring their own. Returns the number of choices in the
    broadcast (this process's own count without a process group)."""
    if not is_distributed():
        state = export_dispatch()
        return len(state["kernels"]) + len(state["block_sizes"])
    payload = [export_dispatch() if dist.get_rank() == src else None]
    dist.broadcast_object_list(payload, src=src, group=group)
    if dist.get_rank() != src:
        return import_dispatch(payload[0])
    return len(payload[0]["kernels"]) + len(payload[0]["block_sizes"])


class _BroadcastOnFirstCall:
    """Forward pre-hook of :func:`broadcast_on_first_call` (removes itself on the first call)."""

    def __init__(self, model, src, group):
        self.target = weakref.ref(model)  # a deep copy of the model (optimize's analysis) carries an inert copy
        self.src, self.group, self.hook_id = src, group, None

    def __call__(self, module, args, kwargs):
        if module is not self.target():
            return None
        module._forward_pre_hooks.pop(self.hook_id, None)
        getattr(module, "_forward_pre_hooks_with_kwargs", {}).pop(self.hook_id, None)
        if is_distributed() and dist.get_rank() == self.src:
            from .cuda_graph import reset_states

            with torch.no_grad():
                module(*args, **kwargs)  # measures every layer's paths on this batch
            reset_states(module)  # the real call starts from reset neurons, as it would have
        broadcast_dispatch(self.src, self.group)
        return None


def broadcast_on_first_call(model, src: int = 0, group=None):
    """Make the ranks take rank ``src``'s kernel paths in a loop that is not SparseFlow's: on ``model``'s first
    call, rank ``src`` runs the batch once (measuring the paths; its neurons are reset after) and
    :func:`broadcast_dispatch` gives every rank its choices before the call proceeds. Every rank must make its
    first call at the same time (a collective), as in a data-parallel loop whose ranks get the same number of
    batches. Install it after ``optimize()`` (a lazy ``optimize()`` then runs first). Returns ``model``."""
    hook = _BroadcastOnFirstCall(model, src, group)
    hook.hook_id = model.register_forward_pre_hook(hook, with_kwargs=True).id
    return model


def _report_dict(model_or_report) -> dict:
    from .cuda_graph import CudaGraphModel
    from .report import REPORT_ATTR, OptimizeReport

    if isinstance(model_or_report, OptimizeReport):
        return model_or_report.to_dict()
    rep = model_or_report.__dict__.get(REPORT_ATTR)
    inner = model_or_report.model if isinstance(model_or_report, CudaGraphModel) else model_or_report
    if rep is None:
        rep = inner.__dict__.get(REPORT_ATTR)
    if rep is None:
        raise ValueError(f"{type(model_or_report).__name__} has no SparseFlow report: optimize() it first")
    return rep.refresh(inner).to_dict()  # the paths each layer took on its last call


def gather_reports(model_or_report, dst: int = 0, group=None) -> list[dict] | None:
    """Every rank's optimize report (``OptimizeReport.to_dict()`` plus ``rank`` and ``device``), on rank ``dst``
    in rank order; None on the other ranks. All ranks call it (a collective). Without a process group: a list
    of this process's report."""
    d = _report_dict(model_or_report)
    d["rank"] = dist.get_rank() if is_distributed() else 0
    params = next(iter(getattr(model_or_report, "parameters", lambda: iter(()))()), None)
    d["device"] = str(params.device) if params is not None else None
    if not is_distributed():
        return [d]
    out = [None] * dist.get_world_size(group) if dist.get_rank() == dst else None
    dist.gather_object(d, out, dst=dst, group=group)
    return out


def path_disagreements(reports: list[dict]) -> dict[str, list]:
    """{layer: [path on rank 0, rank 1, ...]} for every layer whose kernel path differs between ``reports``
    (as :func:`gather_reports` returns them); empty when all ranks ran the same paths."""
    paths: dict[str, list] = {}
    for i, rep in enumerate(reports):
        for e in rep["layers"]:
            paths.setdefault(e["name"], [None] * len(reports))[i] = e.get("path")
    return {name: p for name, p in paths.items() if len(set(p)) > 1}


def gather_throughput(samples: int, seconds: float, device: torch.device | None = None, group=None) -> dict:
    """Every rank's samples and seconds (summed over ranks with ``all_reduce``): ``{"per_rank": [{"rank",
    "samples", "seconds", "samples_per_s"}...], "samples", "seconds" (the slowest rank's), "samples_per_s"
    (all samples over the slowest rank's seconds)}``, on every rank (all ranks call it)."""
    world = dist.get_world_size(group) if is_distributed() else 1
    rank = dist.get_rank(group) if is_distributed() else 0
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if (
            is_distributed() and dist.get_backend(group) == "nccl") else torch.device("cpu")
    table = torch.zeros(world, 2, dtype=torch.float64, device=device)
    table[rank, 0], table[rank, 1] = float(samples), float(seconds)
    if is_distributed():
        dist.all_reduce(table, group=group)
    table = table.cpu()
    per_rank = [{"rank": r, "samples": int(table[r, 0]), "seconds": float(table[r, 1]),
                 "samples_per_s": float(table[r, 0] / table[r, 1]) if table[r, 1] > 0 else float("nan")}
                for r in range(world)]
    total, slowest = int(table[:, 0].sum()), float(table[:, 1].max())
    return {"per_rank": per_rank, "samples": total, "seconds": slowest,
            "samples_per_s": total / slowest if slowest > 0 else float("nan")}
