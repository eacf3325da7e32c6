"""Reference statistics of a dataset: every image once, after the training preprocessing, no flips, sharded
over ranks by the same batch rule as the sample set (batch k to rank k mod W)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Iterator, Optional

import torch

from .sampling import batches_of_rank, to_uint8


CACHED_FEATURES = 10_000    # features a computed-once reference keeps for precision/recall (ADM's reference: 10k)


class EvalError(ValueError):
    """An evaluation request that cannot be met; the message names the problem and the remedy."""


_PREPROCESSING = {
    "digits": "scikit-learn digits (8x8, 0..16) scaled to [-1, 1], bilinear (antialiased) to data.resolution, "
              "rounded to uint8",
    "folder": "ADM's center_crop_arr: box-halving, bicubic to the short side, center crop to data.resolution; uint8",
    "shards": "ADM's center_crop_arr: box-halving, bicubic to the short side, center crop to data.resolution; uint8",
    "array": "as prepared (archirf.prepare array: ADM's center_crop_arr); uint8",
}


def check_images(cfg, what: str) -> None:
    """EvalError unless the config's data are images the feature networks can read."""
    if cfg.data.source not in _PREPROCESSING:
        why = ("it holds latents, and FID measures images; the latents' autoencoder decodes them"
               if cfg.data.source == "latents" else "it holds random tensors, not images")
        raise EvalError(f"{what}: data.source={cfg.data.source} cannot be measured ({why}); evaluate a model "
                        f"trained on data.source=digits, folder, shards or array")
    if cfg.data.channels not in (1, 3):
        raise EvalError(f"{what}: data.channels={cfg.data.channels}; the feature networks read grey (1) or RGB (3)")


def data_key(cfg) -> dict:
    """What identifies a dataset's reference images: recorded in the file and hashed into cache names."""
    d = cfg.data
    return {"source": d.source, "root": str(Path(d.root).resolve()) if d.root else None,
            "resolution": d.resolution, "channels": d.channels, "preprocessing": _PREPROCESSING[d.source]}


def cache_name(cfg, networks: dict[str, str]) -> str:
    text = json.dumps({**data_key(cfg), "networks": networks}, sort_keys=True)
    return f"ref-{cfg.data.source}-{cfg.data.resolution}px-{hashlib.sha256(text.encode()).hexdigest()[:12]}.npz"


def dataset_images(cfg, batch: int, rank: int, world_size: int, *, limit: Optional[int] = None,
                   root: Optional[str] = None) -> tuple[int, Iterator[tuple[list[int], torch.Tensor]]]:
    """(number of images, iterator of (indices, uint8 images (n, C, R, R) on CPU) for this rank's share) of the
    dataset's first `limit` images (all: None), from data.root or from the image folder `root`.
    A folder's unreadable files are left out (and warned about), not replaced."""
    check_images(cfg, "reference statistics")
    d = cfg.data
    if d.source == "digits" and root is None:
        from ..data.digits import digits_tensors

        images = to_uint8(digits_tensors(d.resolution, d.channels)[0])
        n = min(len(images), limit or len(images))
        chunks = batches_of_rank(n, batch, rank, world_size)
        return n, ((idx, images[idx[0]:idx[-1] + 1]) for idx in chunks)
    if d.source == "array" and root is None:
        from ..data.array import check_array, read_array

        images, labels, meta = read_array(d.root)
        check_array(cfg, images, labels, meta)
        n = min(len(images), limit or len(images))
        chunks = batches_of_rank(n, batch, rank, world_size)
        return n, ((idx, images[idx[0]:idx[-1] + 1].clone()) for idx in chunks)
    from ..data.folder import FolderDataset, encoded_samples, find_images

    samples = find_images(root)[0] if root is not None else encoded_samples(cfg)[0]
    n = min(len(samples), limit or len(samples))
    dataset = _Decoded(FolderDataset(samples, d.resolution, d.channels))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches_of_rank(n, batch, rank, world_size),
                                         num_workers=d.num_workers, collate_fn=_collate)
    return n, iter(loader)


class _Decoded(torch.utils.data.Dataset):
    """(index, uint8 (C, R, R) image or None, None or 'path (error)') of a FolderDataset, for DataLoader workers:
    an unreadable file is reported to the main process, not raised in the worker (its traceback would come
    along). Also archirf.encode's."""

    def __init__(self, folder):
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int):
        try:
            arr = self.folder._decode(index)
        except Exception as err:        # PIL raises many types on bad files
            return index, None, f"{self.folder.samples[index][0]} ({type(err).__name__}: {err})"
        from ..data.folder import to_chw

        return index, to_chw(arr), None


def _collate(items):
    import warnings

    for _, _, bad in items:
        if bad:
            warnings.warn(f"reference statistics: skipping unreadable image {bad}", stacklevel=2)
    good = [(i, x) for i, x, _ in items if x is not None]
    return [i for i, _ in good], torch.stack([x for _, x in good]) if good else torch.empty(0, dtype=torch.uint8)


def compute_reference(cfg, evaluator, out: str | Path, *, batch: int, rank: int, world_size: int,
                      keep_features: int = 0, progress: bool = True) -> dict:
    """Statistics of the config's dataset with `evaluator`'s networks, written to `out` by rank 0 (every rank
    calls it). keep_features=N also stores the Inception features of N evenly spaced images (for
    precision/recall). Returns the info the file records."""
    total, batches = dataset_images(cfg, batch, rank, world_size)
    keep = None
    if keep_features:
        n = min(keep_features, total)
        keep = {i for i in range(total) if (i * n) // total != ((i + 1) * n) // total}
    start = time.perf_counter()
    result = evaluator.measure(batches, num=total, keep=keep, progress=progress, desc="reference")
    info = {**data_key(cfg), "networks": evaluator.networks, "images": total, "seconds": time.perf_counter() - start,
            "skipped_images": total - result["count"], "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    if rank == 0:
        from .fid import save_statistics

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        save_statistics(out, result["stats"], info, features=result.get("features"))
    return info


def ensure_reference(cfg, evaluator, path: Optional[str], folder: Path, *, batch: int, rank: int, world_size: int,
                     progress: bool) -> Path:
    """`path` when given; else the statistics of the config's own dataset, computed once into `folder`."""
    import torch.distributed as dist

    if path is not None:
        if not Path(path).is_file():
            raise EvalError(f"reference statistics {path}: no such file; compute them with: torchrun -m archirf.eval "
                            f"ref --config RECIPE --out {path}")
        return Path(path)
    check_images(cfg, "FID against the training data")
    cached = folder / cache_name(cfg, evaluator.networks)
    if not cached.is_file():
        if rank == 0:
            print(f"archirf.eval: computing reference statistics of the training data ({cfg.data.source}"
                  f"{' ' + cfg.data.root if cfg.data.root else ''}, {cfg.data.resolution} px) once, into {cached}")
        compute_reference(cfg, evaluator, cached, batch=batch, rank=rank, world_size=world_size,
                          keep_features=CACHED_FEATURES, progress=progress)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
    return cached
