"""The kernels as PyTorch operators (``torch.ops.sparseflow.*``), registered with ``torch.library.triton_op``.

``torch.compile`` sees through these: their bodies launch the Triton kernels through
``torch.library.wrap_triton`` (``_utils.launch``), so a compiled model keeps them in its graph without graph
breaks, and Inductor can schedule the kernels like its own. Eagerly they run the same Python launchers as the
functional API (``spiking_conv2d``, ``sparse_conv2d``, ``multistep_neuron``, ``max_pool2d``).

The schemas are flat (tensors, ints, floats, bools): a neuron is ``(kind, leak, decay_input, v_threshold,
v_reset, hard_reset)`` (``leak``: :attr:`NeuronSpec.leak`, tau for LIF), a kernel configuration the 9 ints of
:meth:`ConvConfig.key` (an empty list: the default). Skipping inside a compiled graph runs the one-pass prescan
(``sparse=True``); occupancy maps written by a producer are an eager-mode optimization.

===================================  ==========================================================
op                                   equals
===================================  ==========================================================
``sparseflow::spiking_conv2d``       :func:`sparseflow_kernels.spiking_conv2d` (spikes, membrane)
``sparseflow::conv2d``               :func:`sparseflow_kernels.sparse_conv2d`
``sparseflow::multistep_neuron``     :func:`sparseflow_kernels.multistep_neuron` (spikes, membrane)
``sparseflow::max_pool2d``           :func:`sparseflow_kernels.pool.max_pool2d`
``sparseflow::linear``               :func:`sparseflow_kernels.sparse_linear` / :func:`sparse_conv1x1`
``sparseflow::ssa_attention``        :func:`sparseflow_kernels.ssa_attention`
``sparseflow::channel_dot``          :func:`sparseflow_kernels.channel_dot`
``sparseflow::grouped_conv2d``       :func:`sparseflow_kernels.grouped_conv2d`
``sparseflow::conv_transpose2d``     :func:`sparseflow_kernels.sparse_conv_transpose2d`
===================================  ==========================================================
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from .attention import channel_dot, ssa_attention
from .conv_transpose import sparse_conv_transpose2d
from .depthwise import grouped_conv2d
from .linear import sparse_conv1x1, sparse_linear
from .neuron import NeuronSpec, multistep_neuron
from .pool import max_pool2d
from .sparse_conv import sparse_conv2d
from .spiking import spiking_conv2d
from .tiling import ConvConfig, LinearConfig

_KIND_NAMES = ("lif", "if", "plif", "leaky")


def neuron_args(spec: NeuronSpec) -> tuple:
    """The flat neuron arguments of the ops for ``spec``."""
    return (_KIND_NAMES.index(spec.kind), float(spec.leak), bool(spec.decay_input), float(spec.v_threshold),
            0.0 if spec.v_reset is None else float(spec.v_reset), spec.v_reset is not None)


def _spec(kind: int, leak: float, decay_input: bool, v_threshold: float, v_reset: float,
          hard_reset: bool) -> NeuronSpec:
    return NeuronSpec.from_leak(_KIND_NAMES[kind], leak, decay_input, v_threshold, v_reset if hard_reset else None)


def _config(cfg: list[int]) -> ConvConfig | None:
    return ConvConfig(*cfg) if cfg else None


@triton_op("sparseflow::spiking_conv2d", mutates_args={})
def _spiking_conv2d_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int], padding: list[int],
    scale: torch.Tensor | None, shift: torch.Tensor | None, residual: torch.Tensor | None,
    v: torch.Tensor | None, packed_weight: torch.Tensor | None,
    kind: int, leak: float, decay_input: bool, v_threshold: float, v_reset: float, hard_reset: bool,
    config: list[int], cudnn: bool, sparse: bool, v_dtype: torch.dtype, residual_after: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return spiking_conv2d(
        x, weight, bias, stride, padding, scale=scale, shift=shift, residual=residual,
        residual_after=residual_after, v=v, return_v=True,
        v_dtype=v_dtype, neuron=_spec(kind, leak, decay_input, v_threshold, v_reset, hard_reset),
        path="cudnn" if cudnn else "fused", config=_config(config), packed_weight=packed_weight,
        sparse=sparse)


@triton_op("sparseflow::conv2d", mutates_args={})
def _conv2d_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int], padding: list[int],
    dilation: list[int], scale: torch.Tensor | None, shift: torch.Tensor | None,
    packed_weight: torch.Tensor | None, config: list[int], dense: bool,
) -> torch.Tensor:
    return sparse_conv2d(x, weight, bias, stride, padding, dilation, scale=scale, shift=shift,
                         config=_config(config), packed_weight=packed_weight, dense=dense)


@triton_op("sparseflow::multistep_neuron", mutates_args={})
def _multistep_neuron_op(
    x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None, residual: torch.Tensor | None,
    v: torch.Tensor | None, kind: int, leak: float, decay_input: bool, v_threshold: float, v_reset: float,
    hard_reset: bool, v_dtype: torch.dtype, residual_after: bool = False, preserve_layout: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    return multistep_neuron(x, _spec(kind, leak, decay_input, v_threshold, v_reset, hard_reset), scale=scale,
                            shift=shift, residual=residual, v=v, return_v=True, v_dtype=v_dtype,
                            residual_after=residual_after, preserve_layout=preserve_layout)


@triton_op("sparseflow::max_pool2d", mutates_args={})
def _max_pool2d_op(x: torch.Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
                   dilation: list[int], ceil_mode: bool) -> torch.Tensor:
    return max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)


@triton_op("sparseflow::linear", mutates_args={})
def _linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None,
               shift: torch.Tensor | None, packed_weight: torch.Tensor | None, config: list[int], dense: bool,
               conv1x1: bool) -> torch.Tensor:
    """``config``: the 5 ints of :meth:`LinearConfig.key` (empty: the default); ``conv1x1``: ``x`` is
    ``[B, C, L]`` (:func:`sparse_conv1x1`), else rows ``[..., K]`` (:func:`sparse_linear`)."""
    fn = sparse_conv1x1 if conv1x1 else sparse_linear
    return fn(x, weight, bias, config=LinearConfig(*config) if config else None, packed_weight=packed_weight,
              scale=scale, shift=shift, dense=dense)


@triton_op("sparseflow::ssa_attention", mutates_args={})
def _ssa_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dense: bool) -> torch.Tensor:
    return ssa_attention(q, k, v, scale, dense=dense)


@triton_op("sparseflow::channel_dot", mutates_args={})
def _channel_dot_op(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return channel_dot(a, b)


@triton_op("sparseflow::grouped_conv2d", mutates_args={})
def _grouped_conv2d_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int], padding: list[int],
    dilation: list[int], groups: int, scale: torch.Tensor | None, shift: torch.Tensor | None, path: str,
    dense: bool,
) -> torch.Tensor:
    """The prescan runs inside (no occupancy hand-over)."""
    return grouped_conv2d(x, weight, bias, stride, padding, dilation, groups, scale=scale, shift=shift, path=path,
                          dense=dense)


@triton_op("sparseflow::conv_transpose2d", mutates_args={})
def _conv_transpose2d_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int], padding: list[int],
    output_padding: list[int], scale: torch.Tensor | None, shift: torch.Tensor | None, dense: bool,
) -> torch.Tensor:
    """The prescan runs inside (no occupancy hand-over)."""
    return sparse_conv_transpose2d(x, weight, bias, stride, padding, output_padding, scale=scale, shift=shift,
                                   dense=dense)


def compiling() -> bool:
    """True while ``torch.compile`` (Dynamo) traces the caller."""
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # older torch
        return False


def exporting() -> bool:
    """True while ``torch.export`` traces the caller (then :func:`compiling` is True too)."""
    try:
        return torch.compiler.is_exporting()
    except AttributeError:  # older torch
        return False


# ------------------------------------------------------------------------------------------- BatchNorm fold
# The eval-mode BatchNorm folded into a per-channel affine or into the weights before it, as operators
# (``torch.library.custom_op``): under ``torch.compile``, Inductor would regenerate this arithmetic (its rsqrt and
# fused multiply-adds round differently from eager's kernels), and a folded scale one ulp off flips spikes that the
# network then amplifies; as operators they run the same eager kernels in both.
#
# ===================================  ==========================================================
# ``sparseflow::bn_affine``            :func:`bn_fold_affine` (scale, shift)
# ``sparseflow::fold_bn``              :func:`bn_fold_weights` (weight, bias)
# ===================================  ==========================================================


def _bn_affine_math(mean, var, weight, bias, eps: float):
    inv = torch.rsqrt(var.float() + eps)
    w = weight.float() if weight is not None else torch.ones_like(inv)
    b = bias.float() if bias is not None else torch.zeros_like(inv)
    scale = w * inv
    return scale, b - mean.float() * scale


@torch.library.custom_op("sparseflow::bn_affine", mutates_args=())
def _bn_affine_op(mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _bn_affine_math(mean, var, weight, bias, eps)


@_bn_affine_op.register_fake
def _(mean, var, weight, bias, eps):
    return mean.new_empty(mean.shape, dtype=torch.float32), mean.new_empty(mean.shape, dtype=torch.float32)


@torch.library.custom_op("sparseflow::fold_bn", mutates_args=())
def _fold_bn_op(conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, mean: torch.Tensor, var: torch.Tensor,
                weight: torch.Tensor | None, bias: torch.Tensor | None,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    scale, shift = _bn_affine_math(mean, var, weight, bias, eps)
    w = (conv_weight.float() * scale.view(-1, *[1] * (conv_weight.dim() - 1))).to(conv_weight.dtype)
    b = (conv_bias.float() * scale + shift) if conv_bias is not None else shift
    return w, b.to(conv_weight.dtype)


@_fold_bn_op.register_fake
def _(conv_weight, conv_bias, mean, var, weight, bias, eps):
    return torch.empty_like(conv_weight), conv_weight.new_empty(conv_weight.shape[:1])


def bn_fold_affine(mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm (running ``mean`` / ``var``, affine ``weight`` / ``bias``, ``eps``) as
    ``y * scale + shift`` per channel, both fp32 (``sparseflow::bn_affine``)."""
    return torch.ops.sparseflow.bn_affine(mean, var, weight, bias, eps)


def bn_fold_weights(conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, mean: torch.Tensor, var: torch.Tensor,
                    weight: torch.Tensor | None, bias: torch.Tensor | None,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(conv_weight * scale, conv_bias * scale + shift)`` per output channel (dim 0) for the eval-mode BatchNorm
    given as in :func:`bn_fold_affine`, computed in fp32 and returned in ``conv_weight``'s dtype
    (``sparseflow::fold_bn``)."""
    return torch.ops.sparseflow.fold_bn(conv_weight, conv_bias, mean, var, weight, bias, eps)
