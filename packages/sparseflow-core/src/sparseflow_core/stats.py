"""Sparsity statistics of feature maps, in plain torch (used by the analyzer, the report and the profiler).

``block_density`` counts what the sparse kernels skip: blocks of (sample, ``tile`` x ``tile`` output
tile, ``group`` input channels) that hold any non-zero in the tile's receptive field (its halo).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def element_density(x: torch.Tensor) -> float:
    return float((x != 0).float().mean()) if x.numel() else 0.0


def is_integer_valued(x: torch.Tensor) -> bool:
    """All values finite integers (spikes, or sums of spikes as in SEW-ResNet)."""
    if not x.is_floating_point():
        return True
    return bool(torch.isfinite(x).all() and (x == torch.round(x)).all())


def block_mask(x: torch.Tensor, tile: int = 8, group: int = 16, kernel: int = 3, stride: int = 1,
               padding: int | None = None) -> torch.Tensor:
    """Bool ``[B, groups, tiles_h, tiles_w]``: which (sample, channel group, output tile) blocks have a
    non-zero input anywhere in the receptive field of the tile (``x``: ``[B, C, H, W]``)."""
    if padding is None:
        padding = kernel // 2
    B, C, H, W = x.shape
    nz = (x != 0).float()
    G = -(-C // group)
    if G * group != C:
        nz = F.pad(nz, (0, 0, 0, 0, 0, G * group - C))
    nz = nz.view(B, G, group, H, W).amax(dim=2)
    # receptive field of each output pixel (max over the kernel window), then any over each output tile
    rf = F.max_pool2d(nz, kernel, stride, padding) if kernel > 1 or stride > 1 else nz
    return F.max_pool2d(rf, tile, tile, ceil_mode=True) > 0


def block_density(x: torch.Tensor, tile: int = 8, group: int = 16, kernel: int = 3, stride: int = 1,
                  padding: int | None = None) -> float:
    if x.numel() == 0:
        return 0.0
    return float(block_mask(x, tile, group, kernel, stride, padding).float().mean())


def silent_planes(x: torch.Tensor) -> float:
    """Fraction of (sample, channel) planes of ``[B, C, H, W]`` with no non-zero."""
    return float(((x != 0).flatten(2).any(-1) == 0).float().mean()) if x.numel() else 0.0
