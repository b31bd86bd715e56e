"""SparseFlow inside SpikingJelly's distributed vision inference (``spikingjelly.activation_based.distributed.vision``).

SpikingJelly builds each rank's model from an inference artifact through the ``ModelBuilder`` its
``ModelConfig`` names, loads the artifact's weights into it, then runs its own loop (``DistributedSampler``
padded to whole batches, ``functional.reset_net`` after each batch, predictions merged on rank 0). SparseFlow
enters at the builder: :class:`SparseFlowBuilderMixin` returns the built model lazily optimized (the layers are
replaced on the first forward, after SpikingJelly has loaded the weights and put the model in eval mode) with
:func:`sparseflow_core.distributed.broadcast_on_first_call`, so that rank 0 measures the kernel paths on the
first batch and every rank takes them (SpikingJelly's padded loader gives every rank the same batches).

The configs below are SpikingJelly's built-in vision configs with that builder. :func:`sparseflow_artifact`
rewrites an exported artifact to use them (same weights). Import this module before SpikingJelly reads the
artifact (its config decoder knows the config classes that are imported).

What does not fit (see docs/distributed.md): tensor and pipeline parallelism (refused here), FSDP2
(``data_parallel="fsdp2"``: sharded parameters), ``execution_mode="compile"`` (the lazy optimize needs one
eager call), autocast precisions (``precision`` other than ``"fp32"``: SparseFlow's kernels compute in the
model's storage dtype, not autocast's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from spikingjelly.activation_based.model.sew_resnet import SEWResNet34Builder, SEWResNet34Config
from spikingjelly.activation_based.model.spikformer import SpikformerBuilder, SpikformerConfig

__all__ = [
    "SparseFlowBuilderMixin",
    "SparseFlowSEWResNet34Builder",
    "SparseFlowSEWResNet34Config",
    "SparseFlowSpikformerBuilder",
    "SparseFlowSpikformerConfig",
    "image_folder",
    "sparseflow_artifact",
    "tensor_file",
]


class SparseFlowBuilderMixin:
    """Put before a SpikingJelly ``ModelBuilder`` in the bases: ``build`` returns the model lazily optimized by
    SparseFlow (``optimize(model, numerics=config.sparseflow_numerics)``, layers replaced on the first call) with
    the kernel paths of rank 0 taken on every rank. Replicated data parallelism only."""

    def build(self, **kwargs):
        import torch.distributed as dist

        from sparseflow_core import optimize
        from sparseflow_core.distributed import broadcast_on_first_call

        group = kwargs.get("process_group")
        if group is not None and dist.get_world_size(group) > 1:
            raise ValueError("SparseFlow runs in replicated data parallelism: tensor_parallel_size must be 1")
        if kwargs.get("pipeline_size", 1) > 1:
            raise ValueError("SparseFlow runs in replicated data parallelism: pipeline_parallel_size must be 1")
        if kwargs.get("memopt_level", 0):
            raise ValueError("SparseFlow is for inference: SpikingJelly memopt (training) is not supported")
        model, roots, in_shape, out_shape = super().build(**kwargs)
        numerics = getattr(self.config, "sparseflow_numerics", "fast")
        model = broadcast_on_first_call(optimize(model, numerics=numerics))
        return model, roots, in_shape, out_shape


def _with_sparseflow(config_cls: type, builder_cls: type, name: str) -> tuple[type, type]:
    """``SparseFlow<name>Config``: ``config_cls`` whose builder, ``SparseFlow<name>Builder`` (``builder_cls`` with
    :class:`SparseFlowBuilderMixin` first), optimizes the model with SparseFlow (``sparseflow_numerics``)."""
    builder = type(f"SparseFlow{name}Builder", (SparseFlowBuilderMixin, builder_cls), {"__module__": __name__})
    ns = {"__module__": __name__, "__qualname__": f"SparseFlow{name}Config",
          "__doc__": f"``{config_cls.__name__}`` whose builder optimizes the model with SparseFlow.",
          "__annotations__": {"builder": ClassVar[str], "sparseflow_numerics": str},
          "builder": f"{__name__}.{builder.__name__}", "sparseflow_numerics": "fast"}
    return dataclass(frozen=True)(type(ns["__qualname__"], (config_cls,), ns)), builder


SparseFlowSEWResNet34Config, SparseFlowSEWResNet34Builder = _with_sparseflow(SEWResNet34Config, SEWResNet34Builder,
                                                                             "SEWResNet34")
SparseFlowSpikformerConfig, SparseFlowSpikformerBuilder = _with_sparseflow(SpikformerConfig, SpikformerBuilder,
                                                                           "Spikformer")


class _Pairs(torch.utils.data.Dataset):
    """(input, label) items, as SpikingJelly's loaders take them, of a ``sparseflow_bench.eval_data`` data set."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        x, label, _ = self.dataset[index]
        return x, label


def image_folder(root: str, size: int = 224, normalize: bool = True) -> torch.utils.data.Dataset:
    """SpikingJelly ``dataset_builder`` (``"sparseflow_bench.sj_vision.image_folder"``): the images of
    ``sparseflow-bench eval``'s folder data sets, as (image, label) pairs in the same order."""
    from .eval_data import ImageFolderDataset

    return _Pairs(ImageFolderDataset(root, size=size, normalize=normalize))


def tensor_file(path: str) -> torch.utils.data.Dataset:
    """SpikingJelly ``dataset_builder`` (``"sparseflow_bench.sj_vision.tensor_file"``): a ``.pt`` data set of
    ``sparseflow-bench eval`` as (input, label) pairs (``input_layout="NTCHW"`` for event frames)."""
    from .eval_data import TensorFileDataset

    return _Pairs(TensorFileDataset(path))


_WITH_SPARSEFLOW = {SEWResNet34Config: SparseFlowSEWResNet34Config, SpikformerConfig: SparseFlowSpikformerConfig}


def sparseflow_artifact(src: str | Path, dst: str | Path, numerics: str = "fast") -> Path:
    """Write a copy of the SpikingJelly inference artifact ``src`` (``export_inference_artifact``) to ``dst``
    whose model config builds the model optimized by SparseFlow; weights and metadata unchanged."""
    import dataclasses

    from spikingjelly.activation_based.distributed.vision import load_inference_artifact

    config, _state, _source = load_inference_artifact(Path(src))
    target = _WITH_SPARSEFLOW.get(type(config))
    if target is None and type(config) not in _WITH_SPARSEFLOW.values():
        raise ValueError(f"no SparseFlow config for {type(config).__name__}: write a config whose builder puts "
                         "SparseFlowBuilderMixin before the model's builder")
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    fields["sparseflow_numerics"] = numerics
    new = (target or type(config))(**fields)
    artifact = torch.load(Path(src), map_location="cpu", weights_only=True)
    artifact["model_config"] = new.as_dict()
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(artifact, dst)
    return dst
