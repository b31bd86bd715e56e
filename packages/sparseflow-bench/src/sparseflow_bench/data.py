"""Offline natural-image inputs for SNN benchmarks.

There are no trained weights and no data set downloads in the benchmark environment, so realistic
inputs are produced from the sample photographs that ship with :mod:`skimage.data`. Images are
decoded once, cached in a module-level dict, and turned into ``[n, 3, size, size]`` batches with
deterministic random crops / flips, resized with antialiased bilinear interpolation and normalised
with the ImageNet mean and standard deviation.

Spiking models take a leading time dimension; :func:`repeat_time` implements the usual "direct
input encoding" (the same analog frame at every time step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SOURCE_NAMES",
    "available_sources",
    "model_input",
    "natural_images",
    "repeat_time",
]

#: ImageNet channel means (RGB) used for normalisation.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
#: ImageNet channel standard deviations (RGB) used for normalisation.
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Candidate ``skimage.data`` photographs, colour ones first. Only natural photographs are used
#: (synthetic images such as ``checkerboard``/``colorwheel``/``logo`` are excluded, and ``cat`` is
#: skipped because it is the same picture as ``chelsea``). Images whose loading needs a network
#: download (``pooch``) are skipped at load time.
SOURCE_NAMES: tuple[str, ...] = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
    "coins",
    "moon",
    "grass",
    "gravel",
    "brick",
    "clock",
    "page",
    "text",
)

# name -> float32 [3, H, W] tensor with values in [0, 1]; None marks a source that failed to load.
_SOURCE_CACHE: dict[str, torch.Tensor | None] = {}


def _to_chw01(img: object) -> torch.Tensor:
    """Convert an ``skimage.data`` array (grey, RGB or RGBA; uint8/bool/float) to float32 [3, H, W]."""
    import numpy as np

    arr = np.asarray(img)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.float32)
    elif np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.float32) / float(np.iinfo(arr.dtype).max)
    else:
        arr = arr.astype(np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            arr = (arr - lo) / max(hi - lo, 1e-12)
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.ndim == 2:
        t = t.unsqueeze(0).expand(3, -1, -1)
    elif t.ndim == 3:
        t = t.permute(2, 0, 1)
        if t.shape[0] == 4:  # drop alpha
            t = t[:3]
        elif t.shape[0] == 1:
            t = t.expand(3, -1, -1)
        elif t.shape[0] != 3:
            raise ValueError(f"unsupported channel count {t.shape[0]}")
    else:
        raise ValueError(f"unsupported image rank {t.ndim}")
    return t.contiguous().clamp_(0.0, 1.0)


def _load_source(name: str) -> torch.Tensor | None:
    """Decode one ``skimage.data`` image (cached); ``None`` when it is unavailable offline."""
    if name not in _SOURCE_CACHE:
        try:
            import skimage.data

            _SOURCE_CACHE[name] = _to_chw01(getattr(skimage.data, name)())
        except Exception:  # missing attribute, needs pooch/network, decode failure, ...
            _SOURCE_CACHE[name] = None
    return _SOURCE_CACHE[name]


def available_sources() -> list[str]:
    """Names from :data:`SOURCE_NAMES` that load offline on this machine (in cycling order)."""
    return [name for name in SOURCE_NAMES if _load_source(name) is not None]


def natural_images(n: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """Return ``n`` ImageNet-normalised natural images as a float32 ``[n, 3, size, size]`` tensor.

    Image ``i`` is taken from source ``available_sources()[i % len(sources)]`` with a random square
    crop whose side is ``U(0.4, 1.0)`` times the shorter image side at a random position, flipped
    horizontally with probability 0.5, resized to ``size x size`` with
    ``F.interpolate(mode="bilinear", antialias=True)`` and normalised with :data:`IMAGENET_MEAN` /
    :data:`IMAGENET_STD`. Grey images are replicated to three channels. The result is a deterministic
    function of ``(n, size, seed)`` (a private ``torch.Generator`` is used; global RNG state is
    untouched).

    Args:
        n: number of images (``>= 0``).
        size: output height and width in pixels.
        seed: seed of the crop/flip generator.

    Raises:
        ValueError: for negative ``n`` or non-positive ``size``.
        RuntimeError: when no source image can be loaded offline.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if size <= 0:
        raise ValueError(f"size must be > 0, got {size}")
    names = available_sources()
    if not names:
        raise RuntimeError("no skimage.data sample image could be loaded offline")
    gen = torch.Generator().manual_seed(int(seed))
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    out = torch.empty((n, 3, size, size), dtype=torch.float32)
    for i in range(n):
        src = _SOURCE_CACHE[names[i % len(names)]]
        assert src is not None
        _, h, w = src.shape
        short = min(h, w)
        scale = 0.4 + 0.6 * float(torch.rand((), generator=gen))
        side = max(1, min(short, round(scale * short)))
        top = int(torch.randint(0, h - side + 1, (), generator=gen))
        left = int(torch.randint(0, w - side + 1, (), generator=gen))
        flip = bool(torch.rand((), generator=gen) < 0.5)
        crop = src[:, top : top + side, left : left + side]
        if flip:
            crop = crop.flip(-1)
        resized = F.interpolate(
            crop.unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )[0]
        out[i] = (resized.clamp(0.0, 1.0) - mean) / std
    return out


def repeat_time(x: torch.Tensor, T: int) -> torch.Tensor:
    """Direct input encoding: repeat ``x`` ``[N, ...]`` along a new leading time axis -> ``[T, N, ...]``.

    The result is a contiguous copy (not an expanded view), as multi-step spikingjelly layers
    reshape ``[T, N, ...]`` to ``[T*N, ...]``.
    """
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    return x.unsqueeze(0).expand(T, *x.shape).contiguous()


def model_input(images: torch.Tensor, T: int) -> torch.Tensor:
    """Multi-step model input ``[T, N, 3, H, W]`` for ``images`` ``[N, 3, H, W]`` (= :func:`repeat_time`)."""
    return repeat_time(images, T)


def event_frames(n: int, T: int, size: int = 128, seed: int = 0, density: float = 0.13) -> torch.Tensor:
    """``n`` event-camera recordings as multi-step input ``[T, n, 2, size, size]`` (channel 0: ON events, 1: OFF).

    What a DVS records while it pans across a natural image: the log intensity of a grey natural image (from
    :func:`natural_images`, un-normalised) is seen through a ``size`` px window that moves one pixel right per
    step and one down every other step; a pixel fires an ON event where its log intensity rose since the previous
    step by more than a threshold, an OFF event where it fell by more. The threshold is the one quantile of the
    changes that makes ``density`` of the output elements events (both channels counted). Deterministic in
    ``(n, T, size, seed, density)``.
    """
    if T < 1 or n < 0 or size <= 0 or not 0.0 < density < 0.5:
        raise ValueError(f"event_frames: need T >= 1, n >= 0, size > 0 and 0 < density < 0.5, got T={T}, n={n}, "
                         f"size={size}, density={density}")
    if n == 0:
        return torch.zeros(T, 0, 2, size, size)
    margin = T + 1
    imgs = natural_images(n, size + margin, seed=seed)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    log_i = torch.log((imgs * std + mean).clamp(0.0, 1.0).mean(1) + 0.05)  # [n, H+m, W+m]
    views = torch.stack([log_i[:, t // 2: t // 2 + size, t: t + size] for t in range(T + 1)])
    change = views[1:] - views[:-1]  # [T, n, size, size]
    out = torch.zeros(T, n, 2, size, size)
    mag = change.abs().flatten()
    k = max(1, min(mag.numel(), round(mag.numel() * (1.0 - 2.0 * density))))
    threshold = mag.kthvalue(k).values
    out[:, :, 0] = (change > threshold).float()
    out[:, :, 1] = (change < -threshold).float()
    return out
