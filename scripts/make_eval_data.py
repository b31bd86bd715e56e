"""A small evaluation data set for ``sparseflow-bench eval`` (nothing is downloaded): natural photographs from
``skimage.data`` (random crops and flips, ImageNet-normalized), written as

* ``OUT/images.pt``  - ``{"inputs": [N, 3, S, S] float32, "labels": [N] int64}`` (static images),
* ``OUT/events.pt``  - ``{"inputs": [N, T, 2, S, S] float32 (0/1 event frames), "labels": [N]}`` (with --events T),
* ``OUT/images/class_<k>/<i>.png`` - the same images as PNG files in an ImageFolder layout.

    python scripts/make_eval_data.py --out /tmp/sf_eval --n 256 --size 224 [--classes 10] [--events 4]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--events", type=int, default=0, help="also write event frames with this many time steps")
    p.add_argument("--no-png", action="store_true")
    a = p.parse_args(argv)
    from PIL import Image

    from sparseflow_bench.data import IMAGENET_MEAN, IMAGENET_STD, natural_images

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    images = natural_images(a.n, size=a.size, seed=0)
    labels = torch.arange(a.n) % a.classes
    torch.save({"inputs": images, "labels": labels}, out / "images.pt")
    if not a.no_png:
        mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
        for i, (x, y) in enumerate(zip(images, labels.tolist())):
            d = out / "images" / f"class_{y:03d}"
            d.mkdir(parents=True, exist_ok=True)
            px = ((x * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            Image.fromarray(px).save(d / f"{i:05d}.png")
    if a.events:
        g = torch.Generator().manual_seed(0)
        rate = torch.sigmoid(images[:, :2])  # two polarity channels, a rate from the image
        frames = (torch.rand(a.n, a.events, 2, a.size, a.size, generator=g) < 0.3 * rate[:, None]).float()
        torch.save({"inputs": frames, "labels": labels}, out / "events.pt")
    print(f"wrote {a.n} samples ({a.size} px, {a.classes} classes) to {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
