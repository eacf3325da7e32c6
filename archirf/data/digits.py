"""scikit-learn's bundled handwritten digits: 1,797 grey 8x8 images of 10 classes, no download.

The whole set is resized once to the training resolution and kept on the device.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from archirf.config import Config
from archirf.data import DataError
from archirf.data.tensor_loader import DeviceTensorLoader

NUM_CLASSES = 10
_MAX_VALUE = 16.0  # load_digits pixels are counts in 0..16


def digits_tensors(resolution: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (1797, channels, resolution, resolution) float32 in [-1, 1], labels (1797,) long), on CPU."""
    pixels, labels = _digits_arrays()
    pixels = torch.as_tensor(pixels, dtype=torch.float32)                    # (N, 8, 8) in [0, 16]
    images = (pixels / _MAX_VALUE * 2 - 1).unsqueeze(1)                      # (N, 1, 8, 8) in [-1, 1]
    if resolution != images.shape[-1]:
        # Bilinear weights are convex, so values stay in [-1, 1]; the clamp only absorbs rounding.
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear",
                               align_corners=False, antialias=True).clamp_(-1, 1)
    images = images.repeat(1, channels, 1, 1).contiguous()                   # (N, C, R, R)
    return images, torch.as_tensor(labels, dtype=torch.long)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(pixels (1797, 8, 8), labels (1797,)) as sklearn.datasets.load_digits returns them, read from the file it
    reads (sklearn/datasets/data/digits.csv.gz: 64 pixels and the label per row) without importing scikit-learn,
    whose import (scipy's statistics with it) would lengthen every run's start."""
    spec = importlib.util.find_spec("sklearn")            # locates the package; imports nothing
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.source=digits reads scikit-learn's bundled digits, and scikit-learn is not installed: "
                        "pip install scikit-learn")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():                                # a scikit-learn that keeps it elsewhere
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images, digits.target
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


def build_digits_loader(cfg: Config, batch_size: int, device: torch.device, rank: int = 0,
                        world_size: int = 1) -> DeviceTensorLoader:
    d = cfg.data
    if d.num_classes not in (0, NUM_CLASSES):
        raise DataError(f"data.source=digits has {NUM_CLASSES} classes but data.num_classes={d.num_classes}; "
                        f"set data.num_classes={NUM_CLASSES} (or 0 to train unconditionally)")
    if d.resolution < 1 or d.channels < 1:
        raise DataError(f"data.resolution ({d.resolution}) and data.channels ({d.channels}) must be >= 1")
    images, labels = digits_tensors(d.resolution, d.channels)
    if d.num_classes == 0:
        labels = torch.zeros_like(labels)  # unconditional: every label is the null class 0
    return DeviceTensorLoader(images.to(device), labels.to(device), d.num_classes, batch_size,
                              seed=cfg.seed, rank=rank, world_size=world_size, random_flip=d.random_flip)
