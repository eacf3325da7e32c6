"""A stand-in image set for GPU checks of the ImageNet-64 recipes where ImageNet is not at hand: random crops of
scikit-image's bundled photographs (scaled, flipped, colour-jittered), one class per photograph, written as an
ImageFolder of PNGs (or JPEGs, quality 90).

    python scripts/photo_folder.py --out DIR [--count 20000] [--size 64]            # 64 x 64 PNGs
    python scripts/photo_folder.py --out DIR --size 500x375 --format jpg            # ImageNet-like JPEGs
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "horse", "hubble_deep_field", "immunohistochemistry",
          "moon", "page", "rocket", "text", "grass", "gravel", "brick", "colorwheel", "logo", "microaneurysms")


def _photos() -> dict[str, np.ndarray]:
    from skimage import data

    out = {}
    for name in PHOTOS:
        try:
            img = np.asarray(getattr(data, name)())
        except Exception:                   # not bundled with this version (a download): left out
            continue
        if img.dtype != np.uint8:
            img = (img.astype(np.float64) / max(img.max(), 1) * 255).astype(np.uint8)
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        out[name] = img[..., :3]
    return out


def _write(job) -> None:
    from PIL import Image

    out, (width, height), fmt, start, stop = job
    photos = _photos()
    names = sorted(photos)
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        name = names[i % len(names)]
        img = photos[name]
        h, w = img.shape[:2]
        side = int(rng.uniform(0.3, 1.0) * min(h, w))       # a crop of the output's aspect ratio
        ch, cw = (side, min(w, side * width // height)) if width >= height else (min(h, side * height // width), side)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = Image.fromarray(img[y:y + ch, x:x + cw]).resize((width, height), Image.BICUBIC)
        a = np.asarray(crop).astype(np.float32)
        if rng.random() < 0.5:
            a = a[:, ::-1]
        a = a * rng.uniform(0.8, 1.2, 3) + rng.uniform(-20, 20)
        Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(f"{out}/{name}/{i:07d}.{fmt}", quality=90)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--count", type=int, default=20_000)
    ap.add_argument("--size", default="64", help="side of square images, or WIDTHxHEIGHT")
    ap.add_argument("--format", default="png", choices=("png", "jpg"))
    args = ap.parse_args(argv)
    size = tuple(int(v) for v in args.size.split("x")) if "x" in args.size else (int(args.size),) * 2
    names = sorted(_photos())
    for name in names:
        Path(args.out, name).mkdir(parents=True, exist_ok=True)
    jobs = [(args.out, size, args.format, s, min(s + 1000, args.count)) for s in range(0, args.count, 1000)]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(_write, jobs))
    print(f"wrote {args.count} {args.format} images of {size[0]}x{size[1]} px in {len(names)} classes to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
