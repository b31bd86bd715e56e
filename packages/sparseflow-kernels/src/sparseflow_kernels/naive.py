"""Plain torch references of every kernel, written for clarity: one per op, the one its tests compare against
(in float64: :func:`as_float64`). Each computes in its inputs' dtype.

* :func:`~.occupancy.prescan`: :func:`prescan_reference`;
* :func:`~.sparse_conv.sparse_conv2d`, :func:`~.depthwise.grouped_conv2d`: :func:`conv2d_reference`;
* :func:`~.conv_transpose.sparse_conv_transpose2d`: :func:`conv_transpose2d_reference`;
* :func:`~.spiking.spiking_conv2d`: :func:`spiking_conv2d_reference`;
* :func:`~.neuron.multistep_neuron`: :func:`neuron_reference`; with ``return_sum``: :func:`neuron_sum_reference`;
* :func:`~.linear.sparse_linear`: :func:`linear_reference`; :func:`~.linear.sparse_conv1x1`: :func:`conv1x1_reference`;
* :func:`~.batchnorm.sparse_batch_norm2d`: :func:`batch_norm2d_reference`;
* :func:`~.attention.ssa_attention`: :func:`ssa_reference`; :func:`~.attention.channel_dot`:
  :func:`channel_dot_reference`; the Spike-driven Transformer's attention: :func:`sdt_attention_reference`;
* :func:`~.pool.max_pool2d`: :func:`max_pool2d_reference`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .neuron import NeuronSpec
from .occupancy import CODE_ANY, CODE_BL, CODE_BOTTOM, CODE_BR, CODE_LEFT, CODE_RIGHT, CODE_TL, CODE_TOP, CODE_TR


def as_float64(*tensors):
    """The tensors in float64 (None stays None): the exact values a kernel sees, for a reference to work on."""
    return tuple(None if t is None else t.double() for t in tensors)


def prescan_reference(x: torch.Tensor, tile, group: int) -> torch.Tensor:
    """Edge codes of ``x`` ``[B, C, H, W]``: int16 ``[B, tiles_h, tiles_w, groups]`` (NaN counts as non-zero)."""
    th, tw = (tile, tile) if isinstance(tile, int) else tile
    B, C, H, W = x.shape
    TH, TW, G = -(-H // th), -(-W // tw), -(-C // group)
    nz = torch.zeros(B, G * group, TH * th, TW * tw, dtype=torch.bool, device=x.device)
    nz[:, :C, :H, :W] = x != 0  # NaN != 0
    g = nz.view(B, G, group, TH, th, TW, tw).any(2)  # [B, G, TH, th, TW, tw]
    bits = [
        (g.any(5).any(3), CODE_ANY),
        (g[:, :, :, 0].any(-1), CODE_TOP),
        (g[:, :, :, th - 1].any(-1), CODE_BOTTOM),
        (g[..., 0].any(3), CODE_LEFT),
        (g[..., tw - 1].any(3), CODE_RIGHT),
        (g[:, :, :, 0, :, 0], CODE_TL),
        (g[:, :, :, 0, :, tw - 1], CODE_TR),
        (g[:, :, :, th - 1, :, 0], CODE_BL),
        (g[:, :, :, th - 1, :, tw - 1], CODE_BR),
    ]
    code = sum(b.to(torch.int32) * v for b, v in bits)
    return code.permute(0, 2, 3, 1).to(torch.int16)


def affine_reference(y, scale=None, shift=None, dim: int = 1):
    """``y * scale + shift`` with the ``[C]`` vectors along ``dim`` (the kernels' folded-BatchNorm epilogue)."""
    if scale is None and shift is None:
        return y
    shape = [1] * y.dim()
    shape[dim] = -1
    if scale is not None:
        y = y * scale.view(shape)
    if shift is not None:
        y = y + shift.view(shape)
    return y


def conv2d_reference(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, scale=None, shift=None):
    """``F.conv2d`` (then the per-channel affine): the reference of :func:`sparse_conv2d` and (``groups > 1``)
    :func:`grouped_conv2d`."""
    return affine_reference(F.conv2d(x, weight, bias, stride, padding, dilation, groups), scale, shift)


def conv_transpose2d_reference(x, weight, bias=None, stride=1, padding=0, output_padding=0, *, scale=None,
                               shift=None):
    """``F.conv_transpose2d`` (groups 1, dilation 1; then the per-channel affine): the reference of
    :func:`sparse_conv_transpose2d`."""
    return affine_reference(F.conv_transpose2d(x, weight, bias, stride, padding, output_padding), scale, shift)


def conv1x1_reference(x, weight, bias=None, scale=None, shift=None):
    """``F.conv1d`` with a kernel of size 1 over ``[B, C, L]`` (then the per-channel affine): the reference of
    :func:`sparse_conv1x1`."""
    w = weight if weight.dim() == 3 else weight[:, :, None]
    return affine_reference(F.conv1d(x, w, bias), scale, shift, dim=-2)


def channel_dot_reference(a, b):
    """``(a * b)`` summed over every dim after the second: the reference of :func:`channel_dot`."""
    return (a * b).reshape(a.shape[0], a.shape[1], -1).sum(-1)


def max_pool2d_reference(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """``F.max_pool2d``: the reference of :func:`~.pool.max_pool2d`."""
    return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)


def batch_norm2d_reference(x, running_mean, running_var, weight=None, bias=None, eps=1e-5):
    """Eval-mode ``F.batch_norm`` over ``[N, C, H, W]``, its formula written out: the reference of
    :func:`sparse_batch_norm2d` (torch releases differ on ``eps == 0``, which the kernel takes)."""
    inv = 1.0 / torch.sqrt(running_var + eps)
    scale = inv * weight if weight is not None else inv
    return affine_reference(x - running_mean.view(1, -1, 1, 1), scale, bias)


def neuron_reference(z: torch.Tensor, spec: NeuronSpec, v: torch.Tensor | None = None):
    """Neuron over ``z`` ``[T, ...]`` in ``z``'s dtype. Returns (spikes, h per step, final v).

    ``h`` is the charged membrane each step fires from (what a spike's closeness to a tie is judged by).
    """
    if v is None:
        v = torch.full_like(z[0], spec.v_init)
    reset = 0.0 if spec.v_reset is None else spec.v_reset
    spikes, hs = [], []
    for zt in z:
        if spec.kind == "leaky":
            was = (v > spec.v_threshold).to(z.dtype)
            if spec.hard_reset:
                h = spec.decay * ((1 - was) * v) + zt
            else:
                h = spec.decay * v + zt - was * spec.v_threshold
            s = (h > spec.v_threshold).to(z.dtype)
            v = h
        else:
            if spec.kind == "if":
                h = v + zt
            elif spec.kind == "lif":  # divided by tau, as SpikingJelly computes it
                h = v + (zt - (v - reset)) / spec.tau if spec.decay_input else v - (v - reset) / spec.tau + zt
            elif spec.decay_input:
                h = v + (zt - (v - reset)) * spec.decay
            else:
                h = v - (v - reset) * spec.decay + zt
            s = (h >= spec.v_threshold).to(z.dtype)
            v = s * reset + (1 - s) * h if spec.hard_reset else h - s * spec.v_threshold
        spikes.append(s)
        hs.append(h)
    return torch.stack(spikes), torch.stack(hs), v


def neuron_sum_reference(x: torch.Tensor, spec: NeuronSpec, *, scale=None, shift=None, residual=None, v=None,
                         sum_dtype: torch.dtype | None = None, dim: int = 2):
    """``z = x * scale + shift + residual`` (the ``[C]`` vectors along ``dim``) computed in ``x``'s dtype, rounded
    to ``sum_dtype`` (the sum's dtype: ``x``'s when None), then the neuron over ``z``; all in ``x``'s dtype.
    Returns (z in ``sum_dtype``, spikes, h per step, final v)."""
    z = affine_reference(x, scale, shift, dim=dim)
    if residual is not None:
        z = z + residual.to(z.dtype)
    zq = z.to(sum_dtype or x.dtype)
    spikes, h, v = neuron_reference(zq.to(x.dtype), spec, v)
    return zq, spikes, h, v


def spiking_conv2d_reference(x, weight, bias=None, stride=1, padding=0, *, scale=None, shift=None,
                             residual=None, spec: NeuronSpec, v=None):
    """conv2d per step, affine, residual, neuron; all in ``x``'s dtype. Returns (spikes, h, final v)."""
    T, N = x.shape[:2]
    y = conv2d_reference(x.flatten(0, 1), weight, bias, stride, padding, scale=scale, shift=shift)
    y = y.view(T, N, *y.shape[1:])
    if residual is not None:
        y = y + residual
    return neuron_reference(y, spec, v)


def linear_reference(x, weight, bias=None, scale=None, shift=None):
    """F.linear, then the optional per-feature affine; in ``x``'s dtype."""
    return affine_reference(F.linear(x, weight, bias), scale, shift, dim=-1)


def ssa_reference(q, k, v, scale):
    """Spikformer SSA product over ``[..., D, L]``: ``(v @ k^T) @ q * scale`` (SpikingJelly's order)."""
    return ((v @ k.transpose(-2, -1)) @ q) * scale


def sdt_attention_reference(q, k, v, num_heads, attn):
    """Spike-driven Transformer attention over ``[T, N, C, H, W]`` maps, with ``attn`` the callable applied
    to the per-head token sums (its ``attn_lif``), in the module's own head layout."""
    T, N, C, H, W = q.shape
    hd = C // num_heads

    def split(t):
        return t.flatten(3).transpose(-1, -2).reshape(T, N, H * W, num_heads, hd).permute(0, 1, 3, 2, 4)

    qs, ks, vs = split(q), split(k), split(v)
    kv = attn((ks * vs).sum(dim=-2, keepdim=True))
    return (qs * kv).transpose(3, 4).reshape(T, N, C, H, W)


def qk_token_attention_reference(qk, num_heads, spec: NeuronSpec, v=None):
    """QKFormer's token attention over ``qk`` ``[T, N, 2C, L]`` in ``qk``'s dtype, in SpikingJelly's order: the
    head sums of ``q`` (``[T, N, heads, 1, L]``), the neuron over them (:func:`neuron_reference`), ``attn * k``.
    Returns (output ``[T, N, C, L]``, the neuron's (spikes, h per step, final v))."""
    T, N, C2, L = qk.shape
    C = C2 // 2
    q = qk[:, :, :C].reshape(T, N, num_heads, C // num_heads, L)
    k = qk[:, :, C:].reshape(T, N, num_heads, C // num_heads, L)
    attn, h, v = neuron_reference(q.sum(dim=3, keepdim=True), spec, v)
    return (attn * k).reshape(T, N, C, L), (attn, h, v)
