"""``sparseflow-bench eval``: a data set through a SparseFlow-optimized model, on one process or many (torchrun).

    torchrun --nproc_per_node=8 -m sparseflow_bench.cli eval --model spiking_resnet18 --data DIR_OR_PT \\
        --T 4 --batch-size 32 --dtype float16 --cuda-graph --out results/eval

Each rank (``cuda:LOCAL_RANK``; ``nccl`` on CUDA, ``gloo`` on the CPU; world size 1 without torchrun):

1. builds the model (the same weights on every rank: rank 0's are broadcast) and ``optimize()``-s its replica
   on its own device;
2. warms up on the job's batch shapes (``--dispatch broadcast``, the default: rank 0 measures the kernel paths
   and ``sparseflow_core.distributed.broadcast_dispatch`` gives every rank its choices; ``per-rank``: each rank
   measures its own); CUDA graphs are captured per rank, on its device;
3. runs its shard of the data set (:class:`~sparseflow_bench.eval_data.ShardSampler`, a ``DistributedSampler``
   that does not pad: every sample exactly once) in data-set order, a progress bar on rank 0;
4. gathers the predictions, the throughput (``all_reduce``) and the optimize reports on rank 0, which writes
   ``predictions.csv`` (index, label, prediction, source), ``predictions.pt`` (index, label, prediction, logits
   in data-set order), ``summary.json`` and ``reports.json`` into ``--out`` and prints the throughput.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparseflow-bench eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a zoo model name (sparseflow_bench.models, random weights "
                   "unless --weights) or 'file.py:function' / 'package.module:function' returning the model")
    p.add_argument("--data", required=True, help="a folder of images (one sub-folder per class, or flat) or a .pt "
                   "file: [N, C, H, W] images, [N, T, C, H, W] event frames, or {'inputs': ..., 'labels': ...}")
    p.add_argument("--weights", default=None, help="a state_dict (.pt) loaded into the model before optimize()")
    p.add_argument("--T", type=int, default=4, help="time steps (static images are repeated T times)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier width (zoo default 1000)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per batch on each rank")
    p.add_argument("--size", type=int, default=224, help="image folders: resize and center-crop to this size")
    p.add_argument("--no-normalize", action="store_true", help="image folders: keep pixels in [0, 1]")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="optimize(dtype=...)")
    p.add_argument("--numerics", default="fast", choices=("fast", "faithful"), help="optimize(numerics=...)")
    p.add_argument("--block-size", default=None, help="optimize(block_size=...): an integer, 'dense' or 'auto'")
    p.add_argument("--cuda-graph", action="store_true", help="optimize(cuda_graph=True) (CUDA only)")
    p.add_argument("--no-optimize", action="store_true", help="the dense model through the same pipeline (the "
                   "baseline of the throughput and of the predictions; --cuda-graph then captures the dense model)")
    p.add_argument("--dispatch", default="broadcast", choices=("broadcast", "per-rank"),
                   help="broadcast: rank 0 measures the kernel paths, every rank takes its choices (default); "
                   "per-rank: each rank measures its own")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per batch shape before timing "
                   "(default 1; 3 with --cuda-graph: two eager calls, then the capture)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes per rank")
    p.add_argument("--device", default=None, help="override the device (default cuda:LOCAL_RANK, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model's random initialisation")
    p.add_argument("--out", default=None, help="folder for predictions.csv/.pt, summary.json, reports.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _block_size(v):
    if v is None or v in ("dense", "auto"):
        return v
    try:
        return int(v)
    except ValueError:
        raise SystemExit(
            f"sparseflow-bench eval: --block-size must be an integer, 'dense' or 'auto', got {v!r}") from None


def _sync_error(error: BaseException | None, info, what: str) -> None:
    """Raise on every rank when any rank failed (the others would wait in the next collective forever)."""
    import torch.distributed as dist

    from sparseflow_core.distributed import is_distributed

    if not is_distributed():
        if error is not None:
            raise error
        return
    flag = torch.tensor([int(error is not None)], device=info.device if info.backend == "nccl" else "cpu")
    dist.all_reduce(flag)
    if error is not None:
        raise error
    if int(flag.item()):
        raise RuntimeError(f"another rank failed while {what}")


def _batch(dataset, indices, T, device, dtype):
    from torch.utils.data import default_collate

    from .eval_data import model_input

    x, labels, idx = default_collate([dataset[i] for i in indices])
    return model_input(x, T).to(device=device, dtype=dtype, non_blocking=True), labels, idx


def _forward(model, x):
    from sparseflow_core import reset_states

    from .eval_data import logits_of

    with torch.inference_mode():
        out = logits_of(model(x)).float()
        out = out.clone()  # a CUDA graph's output buffer is overwritten by the next replay
    reset_states(model)  # the next batch starts from reset neurons (a CUDA graph wrapper's model included)
    return out


def _build(a, info):
    """This rank's model on its device (the zoo's random weights are seeded; rank 0's are broadcast after)."""
    from .eval_data import load_model

    torch.manual_seed(a.seed)
    model = load_model(a.model, a.T, a.num_classes)
    if a.weights:
        model.load_state_dict(torch.load(a.weights, map_location="cpu", weights_only=True))
    return model.to(info.device).eval()


def _prepare(a, info, dataset):
    """Build, synchronize and optimize this rank's replica; warm it up on the job's batch shapes. Every step
    that can fail is followed by a check that all ranks got through it."""
    import torch.distributed as dist

    import sparseflow_core
    from sparseflow_core.distributed import broadcast_dispatch, is_distributed

    from .eval_data import batch_sizes

    def step(what, fn):
        error = result = None
        try:
            result = fn()
        except Exception as e:
            error = e
        _sync_error(error, info, what)
        return result

    dtype = DTYPES[a.dtype]
    model = step("building the model", lambda: _build(a, info))
    if is_distributed() and info.world_size > 1:  # identical replicas, whatever each rank's random state
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)
    sizes = batch_sizes(len(dataset), info.world_size, a.batch_size)
    cuda_graph = a.cuda_graph and info.device.type == "cuda"

    def opt():
        if a.no_optimize:
            model.to(dtype)
            return sparseflow_core.cuda_graph(model) if cuda_graph else model
        example = _batch(dataset, range(sizes[0]), a.T, info.device, dtype)[0]
        return sparseflow_core.optimize(model, example, dtype=dtype, numerics=a.numerics,
                                        block_size=_block_size(a.block_size), cuda_graph=cuda_graph)

    model = step("optimizing the model", opt)
    calls = a.warmup if a.warmup is not None else (3 if cuda_graph else 1)

    def warm():  # the first samples of the data set, at every batch size the ranks will see
        for s in sizes:
            x = _batch(dataset, range(s), a.T, info.device, dtype)[0]
            for _ in range(calls):
                _forward(model, x)

    n_choices = None
    if a.dispatch == "broadcast":
        step("measuring the kernel paths on rank 0", warm if info.rank == 0 else (lambda: None))
        n_choices = broadcast_dispatch(src=0)
        step("warming up", warm if info.rank != 0 else (lambda: None))
    else:
        step("warming up", warm)
    if info.device.type == "cuda":
        torch.cuda.synchronize(info.device)
    return model, n_choices, sizes


def _run_shard(a, info, dataset, model):
    """This rank's samples, in order: (indices, labels, logits, seconds)."""
    from torch.utils.data import DataLoader

    from .eval_data import ShardSampler, model_input

    sampler = ShardSampler(dataset, num_replicas=info.world_size, rank=info.rank)
    loader = DataLoader(dataset, batch_size=a.batch_size, sampler=sampler, num_workers=a.workers,
                        pin_memory=info.device.type == "cuda")
    bar = None
    if info.rank == 0 and not a.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(sampler), unit="sample", dynamic_ncols=True, file=sys.stderr,
                   desc=f"rank 0 of {info.world_size}")
    dtype = DTYPES[a.dtype]
    indices, labels, logits = [], [], []
    if info.device.type == "cuda":
        torch.cuda.synchronize(info.device)
    t0 = time.perf_counter()
    for x, y, idx in loader:
        x = model_input(x, a.T).to(device=info.device, dtype=dtype, non_blocking=True)
        logits.append(_forward(model, x).cpu())
        indices.append(idx)
        labels.append(y)
        if bar is not None:
            bar.update(len(idx))
    if info.device.type == "cuda":
        torch.cuda.synchronize(info.device)
    seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    cat = (lambda ts, **kw: torch.cat(ts) if ts else torch.empty(0, **kw))
    return cat(indices, dtype=torch.long), cat(labels, dtype=torch.long), cat(logits), seconds


def _gather_predictions(info, indices, labels, logits, n):
    """All ranks' (index, label, logits) on rank 0, in data-set order; checks every sample came exactly once."""
    import torch.distributed as dist

    from sparseflow_core.distributed import is_distributed

    parts = [(indices, labels, logits)]
    if is_distributed():
        gathered = [None] * info.world_size if info.rank == 0 else None
        dist.gather_object((indices, labels, logits), gathered, dst=0)
        parts = gathered
    if info.rank != 0:
        return None
    idx = torch.cat([p[0] for p in parts])
    order = torch.argsort(idx)
    idx = idx[order]
    if idx.numel() != n or not torch.equal(idx, torch.arange(n)):
        counts = torch.bincount(idx, minlength=n)
        raise RuntimeError(f"the ranks' predictions do not cover the data set once: {int((counts == 0).sum())} "
                           f"samples missing, {int((counts > 1).sum())} repeated")
    return idx, torch.cat([p[1] for p in parts])[order], torch.cat([p[2] for p in parts])[order]


def _write(out, dataset, idx, labels, logits, summary, reports) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pred = logits.argmax(1)
    torch.save({"index": idx, "label": labels, "prediction": pred, "logits": logits}, out / "predictions.pt")
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "label", "prediction", "source"])
        for i, y, p in zip(idx.tolist(), labels.tolist(), pred.tolist()):
            w.writerow([i, y, p, dataset.source(i)])
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out / "reports.json").write_text(json.dumps(reports, indent=1, default=str) + "\n")


def evaluate(argv=None) -> dict | None:
    """Run ``sparseflow-bench eval`` with ``argv``; returns the summary on rank 0 (None on the other ranks)."""
    from sparseflow_core.distributed import (
        gather_reports,
        gather_throughput,
        init_distributed,
        path_disagreements,
        shutdown,
    )

    from .eval_data import open_dataset

    a = _parser().parse_args(argv)
    if a.T < 1 or a.batch_size < 1 or a.size < 1:
        raise SystemExit("sparseflow-bench eval: --T, --batch-size and --size must be >= 1")
    info = init_distributed(a.device)
    try:
        error, dataset = None, None
        try:
            dataset = open_dataset(a.data, size=a.size, normalize=not a.no_normalize)
        except Exception as e:
            error = e
        _sync_error(error, info, "opening the data set")
        model, n_choices, sizes = _prepare(a, info, dataset)
        shard = None
        try:
            shard = _run_shard(a, info, dataset, model)
        except Exception as e:
            error = e
        _sync_error(error, info, "running its shard of the data set")
        indices, labels, logits, seconds = shard
        thr = gather_throughput(len(indices), seconds, info.device if info.backend == "nccl" else None)
        reports = [] if a.no_optimize else gather_reports(model)
        result = _gather_predictions(info, indices, labels, logits, len(dataset))
        if info.rank != 0:
            return None
        idx, labels, logits = result
        summary = {
            "model": a.model, "optimized": not a.no_optimize, "data": str(a.data), "samples": len(dataset),
            "world_size": info.world_size, "backend": info.backend, "device": str(info.device), "T": a.T,
            "batch_size": a.batch_size, "batch_sizes": sizes, "dtype": a.dtype, "numerics": a.numerics,
            "cuda_graph": a.cuda_graph, "dispatch": a.dispatch, "dispatch_choices_broadcast": n_choices,
            "throughput": thr, "path_disagreements": path_disagreements(reports),
        }
        if bool((labels >= 0).all()):
            summary["accuracy"] = float((logits.argmax(1) == labels).float().mean())
        if a.out:
            _write(a.out, dataset, idx, labels, logits, summary, reports)
        per_rank = ", ".join(f"rank {r['rank']}: {r['samples']} in {r['seconds']:.3f} s = "
                             f"{r['samples_per_s']:.1f}/s" for r in thr["per_rank"])
        print(f"sparseflow-bench eval: {thr['samples']} samples on {info.world_size} rank(s), "
              f"{thr['samples_per_s']:.1f} samples/s in total ({per_rank})", flush=True)
        if "accuracy" in summary:
            print(f"accuracy: {summary['accuracy']:.4f}", flush=True)
        if summary["path_disagreements"]:
            print(f"kernel paths differ between ranks on {len(summary['path_disagreements'])} layers",
                  flush=True)
        if a.out:
            print(f"wrote {a.out}/predictions.csv, predictions.pt, summary.json, reports.json", flush=True)
        return summary
    finally:
        shutdown(info)


def main(argv=None) -> int:
    evaluate(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
