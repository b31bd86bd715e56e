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
