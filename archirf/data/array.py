"""Packed image arrays: a set decoded, resized and cropped once, read as uint8 without decoding again.

    python -m archirf.prepare array --config RECIPE data.root=FOLDER --out images.safetensors   # writes it
    data.source=array data.root=images.safetensors                                             # trains on it

The file is safetensors: `images` (N, C, R, R) uint8 after the training preprocessing (ADM's center crop,
no flips), `labels` (N,) int64 for a class-conditional set, and metadata (`archirf.prepare/array`: the source
folder or shards, resolution, channels, count, skipped files, class names). The loader is the latents
source's (latents.py): the file is memory-mapped, kept on the GPU when it takes at most a quarter of its
memory (data.storage=auto; ImageNet-64 is 15.7 GB) or on the host with each batch gathered there and copied
through pinned memory; flips are applied on the training device; the order, resume and rank shards are every
loader's. x = uint8 / 127.5 - 1, computed as the folder loader does, so both give the same batches.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open

from archirf.config import Config
from archirf.data import DataError
from archirf.data.latents import LatentLoader, storage_device

FORMAT = "archirf.prepare/array/1"
_HINT = "write it with python -m archirf.prepare array --config RECIPE data.root=IMAGE_FOLDER --out FILE"


def read_array(path: str) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """(images (N, C, R, R) uint8, memory-mapped; labels or None; metadata) of a packed array file."""
    if not os.path.exists(path):
        raise DataError(f"data.root={path} does not exist; {_HINT}")
    if os.path.isdir(path):
        raise DataError(f"data.root={path} is a folder; data.source=array reads one .safetensors file ({_HINT}); "
                        f"for a folder of images use data.source=folder")
    try:
        with safe_open(path, framework="pt") as f:
            keys, meta = set(f.keys()), f.metadata() or {}
            if "images" not in keys:
                raise DataError(f"data.root={path} holds no 'images' array (found: {', '.join(sorted(keys)) or 'none'}); "
                                f"{_HINT}")
            images = f.get_tensor("images")
            labels = f.get_tensor("labels") if "labels" in keys else None
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"data.root={path} is not a readable safetensors file ({type(err).__name__}: {err}); "
                        f"{_HINT}") from None
    return images, labels, meta


def check_array(cfg: Config, images: torch.Tensor, labels: torch.Tensor | None, meta: dict | None = None) -> None:
    d, path = cfg.data, cfg.data.root
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[0] == 0:
        raise DataError(f"'images' in {path} is {images.dtype} {tuple(images.shape)}; a packed array is (N, C, R, R) "
                        f"uint8 with N >= 1; {_HINT}")
    n, c, h, w = images.shape
    if (c, h, w) != (d.channels, d.resolution, d.resolution):
        raise DataError(f"'images' in {path} are {c}x{h}x{w} (C x H x W) but data.channels={d.channels} and "
                        f"data.resolution={d.resolution}; set data.channels={c} data.resolution={h}, or prepare the "
                        f"array again at the resolution you train at")
    if d.num_classes == 0:
        return
    if labels is None:
        raise DataError(f"{path} has no 'labels' but data.num_classes={d.num_classes}; set data.num_classes=0 to "
                        f"train unconditionally, or prepare it from a class-conditional set")
    if labels.shape != (n,) or labels.dtype.is_floating_point:
        raise DataError(f"'labels' in {path} are {labels.dtype} {tuple(labels.shape)}; they must be ({n},) integers")
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise DataError(f"'labels' in {path} hold {low}; class ids are >= 0: prepare the array again")
    classes = array_classes(meta or {})
    if classes is not None and len(classes) != d.num_classes:
        raise DataError(f"{path} holds {len(classes)} classes but data.num_classes={d.num_classes}; set "
                        f"data.num_classes={len(classes)} (or 0 to train unconditionally)")
    if high >= d.num_classes:
        raise DataError(f"'labels' in {path} go up to {high} but data.num_classes={d.num_classes}; set "
                        f"data.num_classes={high + 1}")


class ArrayLoader(LatentLoader):
    """Yields (x (B, C, R, R) float32 in [-1, 1], y (B,) long) on `device` forever; resumable."""

    def _values(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return parts[0].float().div_(127.5).sub_(1)   # the folder loader's arithmetic: the same floats


def array_classes(meta: dict) -> list[str] | None:
    return json.loads(meta["classes"]) if meta.get("classes") else None


def build_array_loader(cfg: Config, batch_size: int, device: torch.device, rank: int = 0,
                       world_size: int = 1) -> ArrayLoader:
    d = cfg.data
    images, labels, meta = read_array(d.root)
    check_array(cfg, images, labels, meta)
    if d.num_classes == 0 or labels is None:
        labels = torch.zeros(len(images), dtype=torch.long)
    storage = storage_device(d.storage, images, torch.device(device))
    loader = ArrayLoader(images.to(storage), labels.to(storage, torch.long), d.num_classes, batch_size, device,
                         seed=cfg.seed, rank=rank, world_size=world_size, random_flip=d.random_flip)
    loader.classes = array_classes(meta)
    return loader
