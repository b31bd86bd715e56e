"""Plain torch references of every kernel, written for clarity (tests run them in float64)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .neuron import NeuronSpec


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


def spiking_conv2d_reference(x, weight, bias=None, stride=1, padding=0, *, scale=None, shift=None,
                             residual=None, spec: NeuronSpec, v=None):
    """conv2d per step, affine, residual, neuron; all in ``x``'s dtype. Returns (spikes, h, final v)."""
    T, N = x.shape[:2]
    y = F.conv2d(x.flatten(0, 1), weight, bias, stride, padding)
    y = y.view(T, N, *y.shape[1:])
    if scale is not None:
        y = y * scale.view(1, 1, -1, 1, 1)
    if shift is not None:
        y = y + shift.view(1, 1, -1, 1, 1)
    if residual is not None:
        y = y + residual
    return neuron_reference(y, spec, v)


def linear_reference(x, weight, bias=None, scale=None, shift=None):
    """F.linear, then the optional per-feature affine; in ``x``'s dtype."""
    y = F.linear(x, weight, bias)
    if scale is not None:
        y = y * scale
    if shift is not None:
        y = y + shift
    return y


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
