"""Data loaders: an infinite, resumable, rank-sharded stream of (x, y) batches on the device.

    loader = build_loader(cfg, batch_size, device, rank, world_size)
    x, y = next(loader)            # x (B, C, R, R) float32 in [-1, 1] (latents: see below), y (B,) long, on device
    state = loader.state_dict()    # {"epoch": int, "index": int}: global, the same on every rank and any W
    loader.load_state_dict(state)  # continues with exactly the batches (and flips) that would follow

Every loader also has `num_samples` (dataset size), `num_classes` and `batch_size`; the folder and shards
loaders add `classes`, `num_skipped`, `skipped_files` and `close()`. The order is a function of
(cfg.seed, epoch) only; see order.py for how epochs, ranks and epoch ends work.

Sources (cfg.data.source): digits (scikit-learn's bundled 8x8 digits, kept on the device),
folder (ImageFolder tree) and shards (WebDataset-style tar files, shards.py), decoded by PIL in DataLoader
workers or by NVIDIA DALI (data.loader, dali.py), array (a packed uint8 array prepared once, array.py), latents (precomputed latents from a
safetensors file; x = (latents - data.latent_shift) * data.latent_scale, unbounded, not [-1, 1]),
synthetic (random, benchmarks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class DataError(ValueError):
    """A dataset problem a user can fix; the message names the path or key and the remedy."""


def build_loader(cfg, batch_size: int, device: torch.device, rank: int = 0, world_size: int = 1):
    """The loader for cfg.data.source, yielding per-rank batches of `batch_size` on `device`."""
    # Imported here: the submodules import DataError from this module, and only the folder
    # source needs PIL.
    source = cfg.data.source
    if source == "digits":
        from archirf.data.digits import build_digits_loader as build
    elif source in ("folder", "shards"):
        from archirf.data.folder import build_folder_loader as build
    elif source == "array":
        from archirf.data.array import build_array_loader as build
    elif source == "latents":
        from archirf.data.latents import build_latent_loader as build
    elif source == "synthetic":
        from archirf.data.synthetic import build_synthetic_loader as build
    else:
        raise DataError(f"unknown data.source={source}; choose one of digits, folder, shards, array, latents, "
                        f"synthetic")
    return build(cfg, batch_size, torch.device(device), rank, world_size)


def skipped_images(loader) -> dict[str, int]:
    """{"skipped_images": distinct unreadable files met so far, all ranks together} for a source that skips
    them (folder); {} for the others. Every rank calls it: with several ranks it is a collective (a host sync),
    the union of paths because two ranks may both meet a file when each looks for a replacement."""
    files = getattr(loader, "skipped_files", None)
    if files is None:
        return {}
    paths = set(files)
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, paths)
        paths = set().union(*gathered)
    return {"skipped_images": len(paths)}
