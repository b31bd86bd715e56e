"""SparseFlow inside SpikingJelly's distributed vision inference, on the GPU (SpikingJelly's loop needs CUDA/NCCL):

    torchrun --standalone --nproc_per_node=K scripts/sj_distributed_gpu.py --data /tmp/sf_eval/images --out DIR

Rank 0 writes SpikingJelly inference artifacts of a SEW-ResNet34 (random weights, BatchNorm statistics
re-estimated on natural images so that it spikes): the plain one and two rewritten by
``sparseflow_bench.sj_vision.sparseflow_artifact`` (numerics "faithful" and "fast"). Each artifact then goes
through SpikingJelly's own ``predict_classification`` (logits by sample index, HDF5) and
``evaluate_classification`` (images/s) on every rank, precision fp32, eager; with one rank also
``execution_mode="cuda_graph"``. Rank 0 compares the logits with the plain model's (faithful: bit for bit; fast:
largest difference and top-1 agreement) and writes DIR/sj_summary.json. Exit status 1 if faithful differs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def _artifacts(out: Path, size: int, T: int, classes: int) -> dict:
    from spikingjelly.activation_based.model.sew_resnet import SEWResNet34Builder, SEWResNet34Config

    from sparseflow_bench.data import natural_images
    from sparseflow_bench.models import recalibrate_bn
    from sparseflow_bench.sj_vision import sparseflow_artifact

    torch.manual_seed(0)
    cfg = SEWResNet34Config(time_steps=T, num_classes=classes, image_size=size)
    model = SEWResNet34Builder(cfg)._build_canonical_model().cuda().eval()
    recalibrate_bn(model, natural_images(16, size=size, seed=1).cuda(), T)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    plain = out / "dense.pt"
    torch.save({"schema_version": 2, "model_config": cfg.as_dict(), "state_dict": state,
                "source": {"checkpoint": "random weights, BatchNorm re-estimated", "pipeline_parallel_size": 1,
                           "tensor_parallel_size": 1}}, plain)
    return {"dense": plain,
            "sparseflow_faithful": sparseflow_artifact(plain, out / "sparseflow_faithful.pt", numerics="faithful"),
            "sparseflow_fast": sparseflow_artifact(plain, out / "sparseflow_fast.pt", numerics="fast")}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True, help="an image folder (scripts/make_eval_data.py writes one)")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    a = p.parse_args()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # bit-for-bit comparison
    from spikingjelly.activation_based.distributed.vision import (
        EvaluationConfig,
        PredictionConfig,
        evaluate_classification,
        predict_classification,
    )
    from spikingjelly.activation_based.precision import PrecisionConfig

    import sparseflow_bench.sj_vision  # noqa: F401 - SpikingJelly decodes only the config classes imported

    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))  # SpikingJelly uses this group
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [_artifacts(out, a.size, a.T, a.classes) if rank == 0 else None]
    dist.broadcast_object_list(paths, src=0)
    paths = paths[0]
    common = dict(dataset_builder="sparseflow_bench.sj_vision.image_folder",
                  dataset_kwargs={"root": str(a.data), "size": a.size}, batch_size=a.batch_size, workers=2,
                  precision=PrecisionConfig(mode="fp32"))
    runs = [(name, path, "eager") for name, path in paths.items()]
    if world == 1:
        runs += [("dense", paths["dense"], "cuda_graph"), ("sparseflow_fast", paths["sparseflow_fast"], "cuda_graph")]
    results = {}
    for name, artifact, mode in runs:
        key = f"{name}/{mode}"
        h5 = out / f"{name}_{mode}.h5"
        if rank == 0 and h5.exists():
            h5.unlink()
        dist.barrier()
        try:
            t0 = time.time()
            predict_classification(PredictionConfig(artifact=artifact, execution_mode=mode, **common), h5)
            metrics = evaluate_classification(EvaluationConfig(artifact=artifact, execution_mode=mode,
                                                               timing_warmup_batches=1, **common))
            results[key] = {"images_per_second": metrics["images_per_second"], "accuracy": metrics["accuracy"],
                            "wall_s": time.time() - t0, "h5": str(h5)}
        except Exception as e:
            results[key] = {"error": f"{type(e).__name__}: {e}"}
        if rank == 0:
            print(key, json.dumps(results[key]), flush=True)
    status = 0
    if rank == 0:
        import h5py

        def logits(key):
            with h5py.File(results[key]["h5"], "r") as f:
                return torch.from_numpy(f["logits"][:]), torch.from_numpy(f["index"][:])

        ref, idx = logits("dense/eager")
        summary = {"world_size": world, "samples": len(idx), "runs": results, "vs_dense": {}}
        for key, r in results.items():
            if key == "dense/eager" or "error" in r:
                continue
            got, gidx = logits(key)
            summary["vs_dense"][key] = {
                "same_indices": bool(torch.equal(gidx, idx)), "bit_for_bit": bool(torch.equal(got, ref)),
                "max_abs_diff": float((got - ref).abs().max()), "logit_scale": float(ref.abs().max()),
                "top1_agreement": float((got.argmax(1) == ref.argmax(1)).float().mean())}
        summary["logits_std_over_samples"] = float(ref.std(0).max())
        (out / "sj_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary, indent=2), flush=True)
        faithful = summary["vs_dense"].get("sparseflow_faithful/eager")
        if faithful is None or not faithful["bit_for_bit"] or not faithful["same_indices"]:
            print("FAIL: SparseFlow (numerics='faithful') in SpikingJelly's inference differs from the dense model",
                  flush=True)
            status = 1
    dist.barrier()
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
