"""Spiking model zoo for the benchmarks (spikingjelly 2.0 ``activation_based.model``).

All models are built with multi-step LIF neurons (``neuron.LIFNode``: ``tau=2.0``, hard reset to
``v_reset=0.0``, ``surrogate.ATan()``, ``detach_reset=True``, ``v_threshold=1.0``), accept
``[T, N, 3, H, W]`` inputs and are returned in eval mode with randomly initialised weights. As there
are no trained weights, :func:`recalibrate_bn` re-estimates the BatchNorm running statistics on
natural images so that the spike statistics are in a realistic range (neither silent nor saturated).

Registered names (see :data:`MODELS`):

* ``spiking_resnet18/34/50`` -- ``spiking_resnet.spiking_resnetXX``.
* ``sew_resnet18/34/50`` -- ``sew_resnet.sew_resnetXX`` (``cnf`` keyword, default ``"ADD"``).
* ``spiking_vgg11`` -- alias of ``spiking_vgg11_bn``: spikingjelly's plain ``spiking_vgg11`` has
  no BatchNorm, so with random weights its activity cannot be calibrated; the BN variant is used.
* ``spiking_vgg11_bn`` -- ``spiking_vgg.spiking_vgg11_bn``.
* ``sew_resnet18_iand``, ``sew_resnet18_and``, ``sew_resnet34_iand`` -- SEW ResNets with ``cnf="IAND"`` /
  ``"AND"`` (binary block outputs; ``"ADD"`` gives 0/1/2 sums).
* ``ms_resnet18/34`` -- ``ms_resnet.ms_resnetXX`` (MS-ResNet, membrane shortcut: the residual adds are in
  membrane space, the convolutions consume the spikes of a LIF placed before them; paper-default neurons with
  the LIF keyword arguments above merged in, as for the transformers). Returns ``[N, num_classes]``.
* ``spikformer_ti`` -- ``spikformer.spikformer_ti`` (Spikformer-Ti: ``embed_dims=256,
  num_heads=8, depths=4, mlp_ratio=4, patch_size=16``), ``img_size_h``/``img_size_w`` default 224.
  The spatial size must be divisible by 16.
* ``sdt_8_384`` -- ``spike_driven_transformer.sdt_8_384`` (``embed_dims=384, num_heads=8,
  depths=8, mlp_ratio=4, pooling_stat="1111"``). The spatial size must be divisible by 16.
* ``qkformer_10_384`` -- ``qkformer.qkformer_10_384`` (QKFormer, 10 blocks, 384 wide; neurons as for the
  transformers). The spatial size must be divisible by 16.
* ``dvs_gesture_plif`` -- ``parametric_lif_net.DVSGestureNet`` (128 channels, ``neuron.ParametricLIFNode`` with
  ``init_tau=2.0``, hard reset to 0, ATan, detached reset): the DVS128 Gesture network. Its input is event frames,
  ``[T, N, 2, 128, 128]`` at T=16 (:data:`MODEL_INPUTS`, :func:`sparseflow_bench.data.event_frames`); 11 classes.

For the two transformers the neuron is given as ``spiking_neuron=None`` plus the LIF keyword
arguments above: spikingjelly then builds ``neuron.LIFNode`` everywhere and merges our arguments
over its per-position paper defaults, which keeps the ``v_threshold=0.5`` of the attention LIFs
(a custom ``spiking_neuron`` class would apply one set of arguments uniformly and drop it).

Output shapes follow spikingjelly: ResNets, VGG and Spikformer return ``[T, N, num_classes]``;
SDT returns ``[N, num_classes]`` (it averages over time itself).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .data import event_frames, model_input, repeat_time

__all__ = [
    "MODELS",
    "available_models",
    "batchnorm_layers",
    "build_model",
    "lif_kwargs",
    "model_input",
    "recalibrate_bn",
]


def lif_kwargs() -> dict[str, Any]:
    """Fresh keyword arguments of the benchmark LIF neuron (a new ``ATan`` surrogate instance each call)."""
    from spikingjelly.activation_based import surrogate

    return {
        "tau": 2.0,
        "v_reset": 0.0,
        "surrogate_function": surrogate.ATan(),
        "detach_reset": True,
    }


def _finish(model: nn.Module) -> nn.Module:
    from spikingjelly.activation_based import functional

    functional.set_step_mode(model, "m")
    functional.reset_net(model)
    return model.eval()


def _cnn_builder(module: str, fn: str, **fixed: Any) -> Callable[..., nn.Module]:
    """Builder for the torchvision-style CNNs (the neuron class and its kwargs go to the constructor)."""

    def build(T: int, num_classes: int, **kw: Any) -> nn.Module:
        import importlib

        from spikingjelly.activation_based import neuron

        ctor = getattr(importlib.import_module(f"spikingjelly.activation_based.model.{module}"), fn)
        args: dict[str, Any] = {**fixed, **lif_kwargs(), **kw}
        return ctor(pretrained=False, spiking_neuron=neuron.LIFNode, num_classes=num_classes, **args)

    build.__doc__ = f"spikingjelly.activation_based.model.{module}.{fn}"
    return build


def _transformer_builder(module: str, fn: str) -> Callable[..., nn.Module]:
    """Builder for the spiking transformers (paper-default neuron positions + our LIF kwargs)."""

    def build(T: int, num_classes: int, **kw: Any) -> nn.Module:
        import importlib

        ctor = getattr(importlib.import_module(f"spikingjelly.activation_based.model.{module}"), fn)
        args: dict[str, Any] = {**lif_kwargs(), **kw}
        return ctor(T=T, num_classes=num_classes, spiking_neuron=None, **args)

    build.__doc__ = f"spikingjelly.activation_based.model.{module}.{fn}"
    return build


#: name -> builder ``(T, num_classes, **kw) -> nn.Module`` (unfinished: use :func:`build_model`).
MODELS: dict[str, Callable[..., nn.Module]] = {
    "spiking_resnet18": _cnn_builder("spiking_resnet", "spiking_resnet18"),
    "spiking_resnet34": _cnn_builder("spiking_resnet", "spiking_resnet34"),
    "spiking_resnet50": _cnn_builder("spiking_resnet", "spiking_resnet50"),
    "sew_resnet18": _cnn_builder("sew_resnet", "sew_resnet18", cnf="ADD"),
    "sew_resnet34": _cnn_builder("sew_resnet", "sew_resnet34", cnf="ADD"),
    "sew_resnet50": _cnn_builder("sew_resnet", "sew_resnet50", cnf="ADD"),
    "sew_resnet18_iand": _cnn_builder("sew_resnet", "sew_resnet18", cnf="IAND"),
    "sew_resnet18_and": _cnn_builder("sew_resnet", "sew_resnet18", cnf="AND"),
    "sew_resnet34_iand": _cnn_builder("sew_resnet", "sew_resnet34", cnf="IAND"),
    "spiking_vgg11": _cnn_builder("spiking_vgg", "spiking_vgg11_bn"),
    "spiking_vgg11_bn": _cnn_builder("spiking_vgg", "spiking_vgg11_bn"),
    "ms_resnet18": _transformer_builder("ms_resnet", "ms_resnet18"),
    "ms_resnet34": _transformer_builder("ms_resnet", "ms_resnet34"),
    "spikformer_ti": _transformer_builder("spikformer", "spikformer_ti"),
    "sdt_8_384": _transformer_builder("spike_driven_transformer", "sdt_8_384"),
}
def _dvs_gesture(T: int, num_classes: int, **kw: Any) -> nn.Module:
    """spikingjelly.activation_based.model.parametric_lif_net.DVSGestureNet (PLIF neurons; 11 classes, whatever
    ``num_classes``)."""
    from spikingjelly.activation_based import neuron, surrogate
    from spikingjelly.activation_based.model.parametric_lif_net import DVSGestureNet

    args: dict[str, Any] = {"init_tau": 2.0, "v_reset": 0.0, "surrogate_function": surrogate.ATan(),
                            "detach_reset": True, **kw}
    channels = args.pop("channels", 128)
    return DVSGestureNet(channels=channels, spiking_neuron=neuron.ParametricLIFNode, **args)


MODELS["qkformer_10_384"] = _transformer_builder("qkformer", "qkformer_10_384")
MODELS["dvs_gesture_plif"] = _dvs_gesture

#: models whose input is not natural images repeated over time: name -> (kind, T, size)
MODEL_INPUTS: dict[str, tuple[str, int, int]] = {"dvs_gesture_plif": ("events", 16, 128)}


def model_input_spec(name: str, T: int, size: int) -> tuple[str, int, int]:
    """``(kind, T, size)`` of ``name``'s benchmark input: ``("events", 16, 128)`` for the DVS network (event
    frames at its sensor's size and time steps), else ``("images", T, size)`` (natural images repeated over T)."""
    return MODEL_INPUTS.get(name, ("images", T, size))


# the spiking MobileNetV2 and U-Net (imported here, after lif_kwargs, which they use)
MODELS.update(importlib.import_module("sparseflow_bench.models_mobilenet_unet").MOBILENET_UNET_MODELS)


def build_model(name: str, T: int = 4, num_classes: int = 1000, **kw: Any) -> nn.Module:
    """Build the registered spiking model ``name`` in multi-step mode and eval mode.

    Args:
        name: a key of :data:`MODELS`.
        T: number of time steps (used by the transformers for 4-D inputs; the CNNs take any ``T``).
        num_classes: classifier width.
        **kw: forwarded to the spikingjelly constructor, e.g. ``cnf="IAND"`` for SEW ResNets,
            ``img_size_h=64, img_size_w=64`` for Spikformer, or a neuron argument such as
            ``v_threshold=0.5`` overriding :func:`lif_kwargs`.

    Returns:
        The model (``[T, N, 3, H, W]`` input), neurons reset, in eval mode.

    Raises:
        KeyError: ``name`` is not registered.
        RuntimeError: the constructor failed; the message names the model and the cause.
    """
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(MODELS))}")
    try:
        model = MODELS[name](T=T, num_classes=num_classes, **kw)
        return _finish(model)
    except Exception as exc:
        raise RuntimeError(f"failed to build model {name!r}: {type(exc).__name__}: {exc}") from exc


_AVAILABLE: list[str] | None = None


def available_models() -> list[str]:
    """Names in :data:`MODELS` that build on this machine (tested once with ``num_classes=10``, cached)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        ok = []
        for name in MODELS:
            try:
                build_model(name, T=2, num_classes=10)
            except Exception:
                continue
            ok.append(name)
        _AVAILABLE = ok
    return list(_AVAILABLE)


def batchnorm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """All ``(qualified name, module)`` pairs of torch ``_BatchNorm`` subclasses in ``model``.

    This covers ``nn.BatchNorm1d/2d/3d``, spikingjelly's ``layer.BatchNorm1d/2d`` (subclasses of
    the torch classes) and BN modules wrapped in ``layer.SeqToANNContainer``.
    """
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


def recalibrate_bn(
    model: nn.Module,
    images: torch.Tensor,
    T: int,
    batches: int = 2,
    batch_size: int | None = None,
) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on ``images`` (AdaBN-style calibration).

    The benchmark models have random weights, so the default running statistics (mean 0, var 1)
    leave most neurons either silent or saturated. This function:

    1. puts the model in eval mode and every BatchNorm (any torch ``_BatchNorm`` subclass, including
       spikingjelly ``layer.BatchNorm1d/2d`` and ``SeqToANNContainer``-wrapped ones) with
       ``track_running_stats`` in train mode with ``momentum=None`` (cumulative moving average),
       after ``reset_running_stats()``; dropout etc. stay in eval mode;
    2. runs ``batches`` forward passes under ``torch.no_grad()`` on ``repeat_time(chunk, T)``,
       calling ``functional.reset_net(model)`` before each; chunk ``i`` is images
       ``[i*batch_size, (i+1)*batch_size)`` taken cyclically from ``images``
       (``batch_size`` defaults to ``ceil(len(images) / batches)``);
    3. restores the original momenta, resets the neurons and returns the model in eval mode.

    During the passes each BN normalises with its batch statistics (train mode), so downstream
    layers are calibrated against batch-normalised upstream activity; with a few images per batch
    this is very close to what they see in eval mode afterwards. In multi-step mode the statistics
    are taken over ``T * N`` samples.

    Args:
        model: a spiking model taking ``[T, N, 3, H, W]``.
        images: ``[M, 3, H, W]`` normalised images (see :func:`sparseflow_bench.data.natural_images`),
            repeated over ``T``; or a recording ``[T, M, C, H, W]`` (event frames), taken as it is.
        T: number of time steps.
        batches: number of forward passes.
        batch_size: images per pass.

    Returns:
        ``model`` (modified in place), in eval mode.
    """
    from spikingjelly.activation_based import functional

    seq = images.ndim == 5  # [T, M, C, H, W]: a recording, taken as it is (no repeat over time)
    if images.ndim not in (4, 5) or images.shape[int(seq)] == 0:
        raise ValueError(f"images must be a non-empty [M, C, H, W] tensor (or a [T, M, C, H, W] recording), got "
                         f"{tuple(images.shape)}")
    if batches < 1:
        raise ValueError(f"batches must be >= 1, got {batches}")
    m = images.shape[int(seq)]
    bs = batch_size if batch_size is not None else max(1, math.ceil(m / batches))
    if bs < 1:
        raise ValueError(f"batch_size must be >= 1, got {bs}")

    bns = [bn for _, bn in batchnorm_layers(model) if bn.track_running_stats]
    momenta = [bn.momentum for bn in bns]
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else images.device
    dtype = param.dtype if param is not None and param.is_floating_point() else images.dtype
    model.eval()
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        with torch.no_grad():
            for i in range(batches):
                idx = torch.arange(i * bs, (i + 1) * bs) % m
                chunk = images[:, idx] if seq else repeat_time(images[idx], T)
                x = chunk.to(device=device, dtype=dtype)
                functional.reset_net(model)
                model(x)
    finally:
        for bn, mom in zip(bns, momenta):
            bn.momentum = mom
        functional.reset_net(model)
        model.eval()
    return model


def prepared_model(name: str, T: int, N: int, size: int, device, calib_images: int = 16, **kw: Any):
    """``build_model(name, T=T, **kw)`` on ``device`` with its BatchNorm recalibrated on ``calib_images`` natural
    images, in eval mode with reset neurons, and its input: ``N`` other natural images of ``size`` px repeated
    over ``T`` steps. A model of :data:`MODEL_INPUTS` takes its own kind of input (event frames: calibrated on
    ``calib_images`` recordings, and ``N`` others), at the ``T`` and ``size`` given (see
    :func:`model_input_spec`)."""
    from sparseflow_core import reset_states

    from .data import natural_images

    model = build_model(name, T=T, **kw).to(device)
    if model_input_spec(name, T, size)[0] == "events":
        recalibrate_bn(model, event_frames(calib_images, T, size, seed=0).to(device), T=T, batches=2)
        x = event_frames(N, T, size, seed=1).to(device)
    else:
        recalibrate_bn(model, natural_images(calib_images, size, seed=0).to(device), T=T, batches=2)
        x = repeat_time(natural_images(N, size, seed=1), T).to(device)
    reset_states(model)
    return model.eval(), x
