"""Synthetic spike tensors, block-sparsity statistics and capture of real conv inputs.

* Generators (:func:`iid_spikes`, :func:`clustered_spikes`, :func:`silent_channel_spikes`) produce
  float tensors whose non-zero elements equal ``value`` (1.0 by default) at a target element
  density, with different spatial/channel structure.
* :func:`spike_stats` measures the quantities that decide how much work a block-skipping kernel can
  save: element density, fraction of silent channel planes, and the fraction of non-zero ``b x b``
  tiles per channel / over all channels / per channel group, with and without a 3x3 "halo" (a 3x3
  convolution's output tile needs its input tile plus a one-pixel border).
* :func:`capture_conv_inputs` / :func:`capture_conv_stats` record the inputs of every convolution of
  a model with forward pre-hooks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "capture_conv_inputs",
    "capture_conv_stats",
    "clustered_spikes",
    "iid_spikes",
    "silent_channel_spikes",
    "spike_stats",
]

Seed = int | torch.Generator


def _generator(seed: Seed) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(int(seed))


def _check(shape: Sequence[int], density: float, min_ndim: int = 2) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) < min_ndim:
        raise ValueError(f"shape needs at least {min_ndim} dims, got {shape}")
    if any(s < 0 for s in shape):
        raise ValueError(f"negative size in shape {shape}")
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    return shape


def iid_spikes(
    shape: Sequence[int],
    density: float,
    seed: Seed = 0,
    value: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """I.i.d. Bernoulli(``density``) spikes of the given shape (e.g. ``(N, C, H, W)`` or ``(T, N, C, H, W)``).

    Args:
        shape: output shape.
        density: probability of each element being non-zero.
        seed: integer seed or a ``torch.Generator`` (CPU) to draw from.
        value: value of the non-zero elements.
        dtype: output dtype.
    """
    shape = _check(shape, density, 1)
    g = _generator(seed)
    mask = torch.rand(shape, generator=g) < density
    return mask.to(dtype) * value


def clustered_spikes(
    shape: Sequence[int],
    density: float,
    blob: int = 8,
    seed: Seed = 0,
    value: float = 1.0,
    fill: float = 0.5,
    dtype: torch.dtype = torch.float32,
    share_channels: bool = False,
) -> torch.Tensor:
    """Spatially clustered spikes: random ``blob x blob`` patches of activity in each ``H x W`` plane.

    Patch positions are uniform over all pixel offsets (not aligned to any tile grid) and may
    overlap; a patch is placed at each pixel of an enlarged ``(H+blob-1) x (W+blob-1)`` canvas with
    probability ``p``, so every pixel is covered with the same probability
    ``coverage = 1 - (1 - p) ** (blob * blob)``. Inside the covered area each element fires with
    probability ``fill``. ``coverage = min(1, density / fill)`` and the fill is raised to
    ``density / coverage`` when needed, so the expected element density is ``density``.

    Args:
        shape: output shape, last two dims are ``H, W`` (e.g. ``(N, C, H, W)``).
        density: expected fraction of non-zero elements.
        blob: side of a square activity patch in pixels.
        seed: integer seed or ``torch.Generator``.
        value: value of the non-zero elements.
        fill: firing probability inside covered patches (``1.0`` gives solid patches).
        dtype: output dtype.
        share_channels: the patches are drawn once per sample and shared by all its channels (dim -3), as the
            active regions of a real feature map follow the objects in the image; each channel still fires
            i.i.d. with ``fill`` inside them. Needs at least 3 dims.
    """
    shape = _check(shape, density, 3 if share_channels else 2)
    if blob < 1:
        raise ValueError(f"blob must be >= 1, got {blob}")
    if not 0.0 < fill <= 1.0:
        raise ValueError(f"fill must be in (0, 1], got {fill}")
    g = _generator(seed)
    *lead, h, w = shape
    n_planes = math.prod(lead)
    coverage = min(1.0, density / fill)
    fill_eff = density / coverage if coverage > 0 else 0.0
    p = 1.0 - (1.0 - coverage) ** (1.0 / (blob * blob)) if coverage < 1.0 else 1.0
    if n_planes * h * w == 0:
        return torch.zeros(shape, dtype=dtype)
    channels = shape[-3] if share_channels else 1
    centres = torch.rand((n_planes // max(channels, 1), 1, h + blob - 1, w + blob - 1), generator=g) < p
    covered = F.max_pool2d(centres.float(), kernel_size=blob, stride=1) > 0  # [planes / channels, 1, h, w]
    covered = covered.repeat_interleave(channels, dim=0)  # [n_planes, 1, h, w]
    active = covered & (torch.rand(covered.shape, generator=g) < fill_eff)
    return active.reshape(shape).to(dtype) * value


def silent_channel_spikes(shape: Sequence[int], density: float, silent_frac: float = 0.4, seed: Seed = 0,
                          value: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Spikes with whole silent ``(sample, channel)`` planes; the other planes are i.i.d.

    Exactly ``round(silent_frac * planes)`` of the ``prod(shape[:-2])`` planes (chosen at random) are
    all zero. The remaining planes fire i.i.d. with probability ``density / (1 - silent_frac_exact)``
    so that ``density`` is the expected element density of the whole tensor.

    Raises:
        ValueError: if ``density`` cannot be reached with that many silent planes.
    """
    shape = _check(shape, density, 3)
    if not 0.0 <= silent_frac <= 1.0:
        raise ValueError(f"silent_frac must be in [0, 1], got {silent_frac}")
    g = _generator(seed)
    *lead, h, w = shape
    n_planes = math.prod(lead)
    n_silent = round(silent_frac * n_planes)
    active_frac = (n_planes - n_silent) / n_planes if n_planes else 1.0
    if density > 0 and active_frac == 0:
        raise ValueError("all planes are silent, density > 0 is impossible")
    p = density / active_frac if density > 0 else 0.0
    if p > 1.0 + 1e-9:
        raise ValueError(f"density {density} impossible with silent_frac {silent_frac} (needs p={p:.3f} > 1)")
    silent = torch.zeros(n_planes, dtype=torch.bool)
    silent[torch.randperm(n_planes, generator=g)[:n_silent]] = True
    mask = torch.rand((n_planes, h, w), generator=g) < p
    mask &= ~silent.view(-1, 1, 1)
    return mask.reshape(shape).to(dtype) * value


def _tile_any(mask: torch.Tensor, b: int) -> torch.Tensor:
    """``[B, C, H, W]`` float 0/1 mask -> ``[B, C, ceil(H/b), ceil(W/b)]`` (1 where the tile has a 1)."""
    return F.max_pool2d(mask, kernel_size=b, stride=b, ceil_mode=True)


def spike_stats(
    x: torch.Tensor,
    tiles: Sequence[int] = (8, 16),
    groups: Sequence[int] = (16, 32, 64),
) -> dict[str, Any]:
    """Element and block sparsity statistics of an activation tensor ``x`` ``[B, C, H, W]``.

    Leading dims beyond four (e.g. ``[T, N, C, H, W]``) are flattened into ``B``. A "tile" is a
    ``b x b`` spatial block of one ``(sample, channel)`` plane starting at multiples of ``b``;
    partial tiles at the right/bottom edges count as tiles. The "halo" variants first dilate the
    non-zero mask with a 3x3 max-pool (stride 1, padding 1), i.e. a tile counts as non-zero if any
    non-zero lies in the tile or its one-pixel border (what a 3x3 conv output tile reads).

    Returns a dict with (all fractions in [0, 1], as Python floats):

    * ``elem``: fraction of non-zero elements; ``binary``: all values are 0 or 1;
      ``integer``: all values are integers; ``max_value``: maximum value;
    * ``chan_silent``: fraction of ``(sample, channel)`` planes without any non-zero;
    * per ``b`` in ``tiles``: ``tile{b}_chan`` (non-zero per-channel tiles), ``tile{b}_chan_halo``
      (same after 3x3 dilation), ``tile{b}_any`` (tiles non-zero in any channel of the sample,
      without dilation), and per ``g`` in ``groups``: ``tile{b}_g{g}_halo`` (fraction of
      ``(sample, tile, group of g consecutive channels)`` that are non-zero after dilation; a final
      partial channel group counts as a group);
    * ``shape``: the ``(B, C, H, W)`` analysed.
    """
    if x.ndim < 4:
        raise ValueError(f"spike_stats needs a [B, C, H, W] tensor, got shape {tuple(x.shape)}")
    if x.ndim > 4:
        x = x.reshape(-1, *x.shape[-3:])
    bsz, c, h, w = x.shape
    nz = x != 0
    numel = x.numel()
    out: dict[str, Any] = {"shape": (bsz, c, h, w)}
    if numel == 0:
        raise ValueError(f"spike_stats got an empty tensor of shape {tuple(x.shape)}")
    out["elem"] = nz.sum().item() / numel
    out["binary"] = bool(((x == 0) | (x == 1)).all())
    out["integer"] = bool((torch.isfinite(x) & (x == torch.round(x))).all())
    out["max_value"] = x.max().item()
    mask = nz.to(torch.float32)
    plane_any = nz.flatten(2).any(dim=2)
    out["chan_silent"] = 1.0 - plane_any.float().mean().item()
    halo = F.max_pool2d(mask, kernel_size=3, stride=1, padding=1)
    for b in tiles:
        t = _tile_any(mask, b)
        th = _tile_any(halo, b)
        out[f"tile{b}_chan"] = t.mean().item()
        out[f"tile{b}_chan_halo"] = th.mean().item()
        out[f"tile{b}_any"] = t.amax(dim=1).mean().item()
        for gsz in groups:
            n_groups = -(-c // gsz)
            pad = n_groups * gsz - c
            tg = F.pad(th, (0, 0, 0, 0, 0, pad)) if pad else th
            tg = tg.view(bsz, n_groups, gsz, *th.shape[-2:]).amax(dim=2)
            out[f"tile{b}_g{gsz}_halo"] = tg.mean().item()
    return out


def _as_conv_nchw(x: torch.Tensor) -> torch.Tensor:
    """Conv input -> ``[B, C, H, W]``: flatten a leading ``T`` (5-D) or lift a 1-D conv input (3-D)."""
    if x.ndim == 5:
        return x.flatten(0, 1)
    if x.ndim == 3:
        return x.unsqueeze(2)
    return x


def _conv_info(mod: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    info: dict[str, Any] = {"type": type(mod).__name__, "input_shape": tuple(x.shape)}
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation"):
        if hasattr(mod, attr):
            info[attr] = getattr(mod, attr)
    if hasattr(mod, "groups"):
        info["conv_groups"] = mod.groups
    if x.ndim == 5:
        info["T"], info["N"] = x.shape[0], x.shape[1]
    info["in_h"] = x.shape[-2] if x.ndim >= 4 else 1
    info["in_w"] = x.shape[-1]
    return info


def _run_with_pre_hooks(model: nn.Module, x: torch.Tensor, types: tuple[type, ...], hook_fn: Any) -> None:
    from spikingjelly.activation_based import functional

    handles = []
    try:
        for name, mod in model.named_modules():
            if isinstance(mod, types):

                def hook(m: nn.Module, args: tuple[Any, ...], _name: str = name) -> None:
                    hook_fn(_name, m, args[0])

                handles.append(mod.register_forward_pre_hook(hook))
        with torch.no_grad():
            model(x)
    finally:
        for hd in handles:
            hd.remove()
        functional.reset_net(model)


def capture_conv_inputs(
    model: nn.Module, x: torch.Tensor, types: tuple[type, ...] = (nn.Conv2d,)
) -> dict[str, torch.Tensor]:
    """Run ``model(x)`` under ``no_grad`` and return the input of every module of ``types``.

    Keys are qualified module names (``model.named_modules()``), values the detached inputs exactly
    as the module received them: ``[T, N, C, H, W]`` for multi-step spikingjelly ``layer.Conv2d``,
    ``[T*N, C, H, W]`` for a plain ``nn.Conv2d`` inside a ``SeqToANNContainer``. A module called
    several times in one forward gets its inputs stacked along a new leading dim (or a list if the
    shapes differ). Hooks are removed and ``functional.reset_net(model)`` is called afterwards, also
    on error. The model's train/eval mode is not changed.
    """
    seen: dict[str, list[torch.Tensor]] = {}

    def record(name: str, mod: nn.Module, inp: torch.Tensor) -> None:
        seen.setdefault(name, []).append(inp.detach())

    _run_with_pre_hooks(model, x, tuple(types), record)
    out: dict[str, Any] = {}
    for name, vals in seen.items():
        if len(vals) == 1:
            out[name] = vals[0]
        elif all(v.shape == vals[0].shape for v in vals):
            out[name] = torch.stack(vals)
        else:
            out[name] = vals
    return out


def capture_conv_stats(
    model: nn.Module,
    x: torch.Tensor,
    types: tuple[type, ...] = (nn.Conv2d,),
    tiles: Sequence[int] = (8, 16),
    groups: Sequence[int] = (16, 32, 64),
) -> dict[str, dict[str, Any]]:
    """Like :func:`capture_conv_inputs` but compute :func:`spike_stats` in the hooks (memory-light).

    A leading ``T`` of 5-D inputs is flattened into the batch and 1-D conv inputs ``[B, C, L]`` are
    treated as ``[B, C, 1, L]``. Each per-layer dict holds the statistics plus the layer description:
    ``type``, ``input_shape``, ``in_channels``, ``out_channels``, ``kernel_size``, ``stride``,
    ``padding``, ``dilation``, ``conv_groups``, ``in_h``, ``in_w`` (and ``T``, ``N`` for 5-D inputs).
    For a module called several times only the first call is kept and ``calls`` counts the calls.
    """
    out: dict[str, dict[str, Any]] = {}

    def record(name: str, mod: nn.Module, inp: torch.Tensor) -> None:
        if name in out:
            out[name]["calls"] += 1
            return
        entry = _conv_info(mod, inp)
        entry.update(spike_stats(_as_conv_nchw(inp.detach()), tiles=tiles, groups=groups))
        entry["calls"] = 1
        out[name] = entry

    _run_with_pre_hooks(model, x, tuple(types), record)
    return out
