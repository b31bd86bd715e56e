"""Data sets, the sampler and the model loader of ``sparseflow-bench eval`` (:mod:`sparseflow_bench.evaluate`).

* :class:`ImageFolderDataset` - a folder of images, ImageFolder layout (one sub-folder per class, labels by
  sorted class name) or flat (no labels); files in sorted order, resized and center-cropped to ``size``.
* :class:`TensorFileDataset` - a ``.pt`` file: a tensor ``[N, C, H, W]`` (static images, repeated over T),
  ``[N, T, C, H, W]`` (event frames per sample), or a dict with ``"inputs"`` and optional ``"labels"``.
* :class:`ShardSampler` - a ``DistributedSampler`` that does not pad: rank r takes samples r, r + K, r + 2K...
  so that every sample is evaluated exactly once.
* :func:`load_model` - a zoo model by name (:mod:`sparseflow_bench.models`) or ``file.py:function`` /
  ``package.module:function``.

Every item is ``(input, label, index)``; the label is -1 when the data set has none.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from .data import IMAGENET_MEAN, IMAGENET_STD

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


class ShardSampler(DistributedSampler):
    """``DistributedSampler`` without padding and without shuffling: rank ``r`` of ``K`` takes the indices
    ``r, r + K, r + 2K, ...`` (the unpadded order of ``DistributedSampler(shuffle=False)``). Ranks differ by at
    most one sample; no sample is repeated or dropped."""

    def __init__(self, dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self):
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


def batch_sizes(n: int, world_size: int, batch_size: int) -> list[int]:
    """The distinct batch sizes that the ranks of a job see (full batches and each rank's last one)."""
    sizes = set()
    for r in range(world_size):
        m = len(range(r, n, world_size))
        if m >= batch_size:
            sizes.add(batch_size)
        if m % batch_size:
            sizes.add(m % batch_size)
    return sorted(sizes, reverse=True)


class ImageFolderDataset(Dataset):
    """Images under ``root``: ``root/<class>/<image>`` (labels = index of the sorted class names) or
    ``root/<image>`` (label -1). Each image: RGB, resized (shorter side to ``size``), center-cropped to
    ``size x size``, in [0, 1], normalized with the ImageNet mean and std when ``normalize``."""

    def __init__(self, root: str | os.PathLike, size: int = 224, normalize: bool = True):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"data folder {root} does not exist")
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        if classes:
            self.classes = classes
            self.samples = [(str(p), c) for c, name in enumerate(classes)
                            for p in sorted((root / name).rglob("*")) if p.suffix.lower() in IMAGE_EXTS]
        else:
            self.classes = []
            self.samples = [(str(p), -1) for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_EXTS]
        if not self.samples:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) in {root} or its class folders")
        self.size, self.normalize = size, normalize

    def __len__(self) -> int:
        return len(self.samples)

    def source(self, index: int) -> str:
        return self.samples[index][0]

    def __getitem__(self, index: int):
        from PIL import Image
        from torchvision.transforms import functional as TF

        path, label = self.samples[index]
        with Image.open(path) as im:
            img = im.convert("RGB")
        img = TF.center_crop(TF.resize(img, self.size, antialias=True), [self.size, self.size])
        x = TF.to_tensor(img)
        if self.normalize:
            x = TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)
        return x, label, index


class TensorFileDataset(Dataset):
    """Samples from a ``.pt`` file: ``inputs`` ``[N, C, H, W]`` (static) or ``[N, T, C, H, W]`` (event
    frames), given as the tensor itself or as ``{"inputs": tensor, "labels": [N] integer tensor}``."""

    def __init__(self, path: str | os.PathLike):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        labels = None
        if isinstance(obj, dict):
            if "inputs" not in obj:
                raise ValueError(f"{path}: a dict data set needs the key 'inputs' (and optionally 'labels'), "
                                 f"it has {sorted(obj)}")
            inputs, labels = obj["inputs"], obj.get("labels")
        else:
            inputs = obj
        if not isinstance(inputs, torch.Tensor) or inputs.dim() not in (4, 5) or not inputs.is_floating_point():
            raise ValueError(f"{path}: inputs must be a floating-point tensor [N, C, H, W] (static images) or "
                             f"[N, T, C, H, W] (event frames), got "
                             f"{tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__}")
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.shape != (inputs.shape[0],) or labels.is_floating_point():
                raise ValueError(f"{path}: labels must be an integer tensor [N={inputs.shape[0]}], got "
                                 f"{labels.dtype} {tuple(labels.shape)}")
        if inputs.shape[0] == 0:
            raise ValueError(f"{path}: the data set is empty")
        self.inputs, self.labels = inputs, labels
        self.classes = []

    @property
    def event_frames(self) -> bool:
        return self.inputs.dim() == 5

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def source(self, index: int) -> str:
        return ""

    def __getitem__(self, index: int):
        label = int(self.labels[index]) if self.labels is not None else -1
        return self.inputs[index], label, index


def open_dataset(path: str | os.PathLike, size: int = 224, normalize: bool = True) -> Dataset:
    """A :class:`TensorFileDataset` for a ``.pt`` file, an :class:`ImageFolderDataset` for a folder."""
    p = Path(path)
    if p.is_dir():
        return ImageFolderDataset(p, size=size, normalize=normalize)
    if p.suffix == ".pt" and p.is_file():
        return TensorFileDataset(p)
    raise FileNotFoundError(f"data {path}: expected a folder of images or a .pt file")


def model_input(x: torch.Tensor, T: int) -> torch.Tensor:
    """The multi-step input ``[T, N, ...]`` of a batch: static images ``[N, C, H, W]`` repeated over ``T``,
    event frames ``[N, T, C, H, W]`` put time first (their T must be the model's)."""
    if x.dim() == 4:
        return x.unsqueeze(0).expand(T, *x.shape).contiguous()
    if x.dim() == 5:
        if x.shape[1] != T:
            raise ValueError(f"event frames have T={x.shape[1]} time steps, the model was asked for T={T}")
        return x.transpose(0, 1).contiguous()
    raise ValueError(f"a batch must be [N, C, H, W] or [N, T, C, H, W], got {tuple(x.shape)}")


def logits_of(out) -> torch.Tensor:
    """A classifier's logits ``[N, classes]``: ``[T, N, classes]`` outputs are averaged over T."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() not in (2, 3):
        raise ValueError("the model must return logits [N, classes] or [T, N, classes], got "
                         f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    return out.mean(0) if out.dim() == 3 else out


def _import_entry(spec: str):
    target, _, fn = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise FileNotFoundError(f"model file {target} does not exist")
        mod_spec = importlib.util.spec_from_file_location(f"sparseflow_eval_model_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    if not hasattr(module, fn):
        raise AttributeError(f"model entry {spec!r}: {target} has no {fn!r}")
    return getattr(module, fn)


def load_model(spec: str, T: int, num_classes: int | None = None, **kwargs) -> torch.nn.Module:
    """The model ``spec`` names, in eval mode: a :data:`sparseflow_bench.models.MODELS` name (random weights,
    ``num_classes`` default 1000), or ``path/to/file.py:function`` / ``package.module:function``, called with
    ``kwargs`` plus ``T`` and ``num_classes`` where its signature takes them."""
    from .models import MODELS, build_model

    if ":" not in spec:
        if spec not in MODELS:
            raise KeyError(f"unknown model {spec!r}: give a zoo name ({', '.join(sorted(MODELS))}) or "
                           "'file.py:function' / 'module:function'")
        return build_model(spec, T=T, num_classes=num_classes or 1000, **kwargs)
    fn = _import_entry(spec)
    params = inspect.signature(fn).parameters
    if "T" in params:
        kwargs.setdefault("T", T)
    if "num_classes" in params and num_classes is not None:
        kwargs.setdefault("num_classes", num_classes)
    model = fn(**kwargs)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model entry {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model.eval()
