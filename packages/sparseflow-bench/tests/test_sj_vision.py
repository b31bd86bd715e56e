"""SparseFlow inside SpikingJelly's distributed vision inference: the builder mixin and the artifact rewrite.

SpikingJelly's inference loop itself needs CUDA and NCCL (``_run_classification`` refuses the CPU); here its
builder path (``build_for_inference``: build, then load the artifact's weights) and its per-batch execution
(``_forward_classification`` + ``functional.reset_net``) run a SparseFlow model on the CPU against the dense one.
tests/gpu/test_sj_distributed_gpu.py runs ``evaluate_classification`` itself on the GPU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from spikingjelly.activation_based import functional, layer, neuron
from spikingjelly.activation_based.distributed.vision import ModelBuilder, ModelConfig, load_inference_artifact
from spikingjelly.activation_based.distributed.vision.execution import _forward_classification
from torch import nn

import sparseflow_core
from sparseflow_bench.sj_vision import (
    SparseFlowBuilderMixin,
    SparseFlowSEWResNet34Builder,
    SparseFlowSEWResNet34Config,
    sparseflow_artifact,
)


@dataclass(frozen=True)
class TinyConfig(ModelConfig):
    builder: ClassVar[str] = "test_sj_vision.TinyBuilder"
    time_steps: int = 2
    num_classes: int = 5


class TinyBuilder(ModelBuilder):
    def _build_canonical_model(self):
        net = nn.Sequential(
            layer.Conv2d(3, 4, 3, padding=1, bias=False), layer.BatchNorm2d(4), neuron.LIFNode(tau=2.0),
            layer.Conv2d(4, 4, 3, padding=1, bias=False), layer.BatchNorm2d(4), neuron.LIFNode(tau=2.0),
            layer.Flatten(), layer.Linear(4 * 8 * 8, self.config.num_classes))
        functional.set_step_mode(net, self.config.step_mode)
        return net

    def _pipeline_stage(self, model, rank, size):
        return model

    def build(self, *, device, **kwargs):
        return self._build_canonical_model().to(device), (), None, None


class SparseFlowTinyBuilder(SparseFlowBuilderMixin, TinyBuilder):
    pass


def _weights(config) -> dict:
    ref = TinyBuilder(config)._build_canonical_model()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(4.0)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return ref.state_dict()


def _inference_model(builder_cls, config, state):
    model = builder_cls(config).build_for_inference(state, process_group=None, pipeline_rank=0, pipeline_size=1,
                                                    pipeline_microbatches=1, device=torch.device("cpu"),
                                                    micro_batch_size=2)[0]
    return model.eval()  # as SpikingJelly's loop does after building


def test_builder_mixin_runs_in_spikingjelly_execution() -> None:
    """The artifact's weights are loaded after build and the model is optimized on the first call; over two
    batches (reset_net between, as SpikingJelly's loop does) the logits are the dense model's."""
    config = TinyConfig()
    state = _weights(config)
    dense = _inference_model(TinyBuilder, config, state)
    sf = _inference_model(SparseFlowTinyBuilder, config, state)
    assert not any(isinstance(m, sparseflow_core.CudaGraphModel) for m in sf.modules())
    with torch.inference_mode():
        for _ in range(2):
            images = torch.randn(2, 3, 8, 8) * 2
            want = _forward_classification(dense, images, config.time_steps, "m", "NCHW")
            got = _forward_classification(sf, images, config.time_steps, "m", "NCHW")
            functional.reset_net(dense)
            functional.reset_net(sf)
            assert want.std() > 0.01
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    rep = sparseflow_core.get_report(sf)
    assert len(rep.by_action("fused")) == 2  # the loaded weights are the ones folded: results above match
    assert not sf._forward_pre_hooks


def test_builder_mixin_refuses_model_parallelism() -> None:
    b = SparseFlowTinyBuilder(TinyConfig())
    with pytest.raises(ValueError, match="pipeline_parallel_size must be 1"):
        b.build(process_group=None, pipeline_size=2, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="memopt"):
        b.build(process_group=None, pipeline_size=1, memopt_level=1, device=torch.device("cpu"))


def test_sparseflow_artifact_rewrites_the_config(tmp_path) -> None:
    from spikingjelly.activation_based.model.sew_resnet import SEWResNet34Builder, SEWResNet34Config

    cfg = SEWResNet34Config(time_steps=2, num_classes=10, image_size=32)
    state = SEWResNet34Builder(cfg)._build_canonical_model().state_dict()
    torch.save({"schema_version": 2, "model_config": cfg.as_dict(), "state_dict": state,
                "source": {"checkpoint": "ckpt", "pipeline_parallel_size": 1, "tensor_parallel_size": 1}},
               tmp_path / "a.pt")
    sparseflow_artifact(tmp_path / "a.pt", tmp_path / "b.pt", numerics="faithful")
    new_cfg, new_state, source = load_inference_artifact(tmp_path / "b.pt")
    assert type(new_cfg) is SparseFlowSEWResNet34Config
    assert new_cfg.get_builder_cls() is SparseFlowSEWResNet34Builder
    assert (new_cfg.time_steps, new_cfg.num_classes, new_cfg.image_size, new_cfg.sparseflow_numerics) == (
        2, 10, 32, "faithful")
    assert set(new_state) == set(state) and all(torch.equal(new_state[k], state[k]) for k in state)
    assert source["checkpoint"] == "ckpt"
    with pytest.raises(ValueError, match="no SparseFlow config for TinyConfig"):
        torch.save({"schema_version": 2, "model_config": TinyConfig().as_dict(), "state_dict": _weights(TinyConfig()),
                    "source": {}}, tmp_path / "t.pt")
        sparseflow_artifact(tmp_path / "t.pt", tmp_path / "u.pt")
