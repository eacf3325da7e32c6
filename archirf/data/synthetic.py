"""Random images and labels for benchmarks: no decode, no host work, same loader protocol.

`data.synthetic_size` distinct samples are drawn once on the device from a generator seeded by
cfg.seed (so they are fixed per seed and device type) and then served like any dataset.
"""

from __future__ import annotations

import torch

from archirf.config import Config
from archirf.data import DataError
from archirf.data.order import stream_seed
from archirf.data.tensor_loader import DeviceTensorLoader

_SYNTHETIC_STREAM = 2  # a stream no order/flip generator uses


def build_synthetic_loader(cfg: Config, batch_size: int, device: torch.device, rank: int = 0,
                           world_size: int = 1) -> DeviceTensorLoader:
    d = cfg.data
    if d.synthetic_size < 1:
        raise DataError(f"data.synthetic_size must be >= 1 (got {d.synthetic_size})")
    if d.resolution < 1 or d.channels < 1:
        raise DataError(f"data.resolution ({d.resolution}) and data.channels ({d.channels}) must be >= 1")
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(stream_seed(cfg.seed, 0, _SYNTHETIC_STREAM))
    shape = (d.synthetic_size, d.channels, d.resolution, d.resolution)
    images = torch.rand(shape, generator=gen, device=device).mul_(2).sub_(1)              # (N, C, R, R) in [-1, 1)
    if d.num_classes > 0:
        labels = torch.randint(d.num_classes, (d.synthetic_size,), generator=gen, device=device)  # (N,)
    else:
        labels = torch.zeros(d.synthetic_size, dtype=torch.long, device=device)
    return DeviceTensorLoader(images, labels, d.num_classes, batch_size, seed=cfg.seed, rank=rank,
                              world_size=world_size, random_flip=d.random_flip)
