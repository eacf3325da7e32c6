"""An ImageFolder tree decoded with PIL in DataLoader workers.

    root/<class name>/**/<image>    one class per sub-folder, labels in sorted name order
    root/<image>                    no class sub-folders: the whole folder is one class

Images are resized and center-cropped as ADM does, flipped as the resumable order says (a function
of (seed, epoch, sample index), so a resumed run sees the same flips), and shipped to the device as
uint8 (4x less host-to-device traffic than float), where they become [-1, 1] floats.

A file PIL cannot decode never stops a run: the sample is replaced by the next readable file in
dataset order (deterministic, so resume stays exact); the file is warned about once and counted
in `loader.num_skipped`.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import torch
from PIL import Image

from archirf.config import Config
from archirf.data import DataError
from archirf.data.order import ResumableOrder

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_PIL_MODES = {1: "L", 3: "RGB"}


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _images_under(folder: str) -> list[str]:
    paths = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        paths += [os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f)]
    return paths


def find_images(root: str) -> tuple[list[tuple[str, int]], list[str]]:
    """([(path, label)], class names) of an ImageFolder tree; DataError if there is nothing to train on."""
    if not os.path.exists(root):
        raise DataError(f"data.root={root} does not exist; point data.root at a folder of images "
                        f"(root/<class>/<image>.png, or images directly in root for one class)")
    if not os.path.isdir(root):
        raise DataError(f"data.root={root} is a file, not a folder; point data.root at the folder "
                        f"that holds the class sub-folders (or the images)")
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    classes, samples = [], []
    for entry in entries:
        if entry.is_dir() and not entry.name.startswith("."):
            paths = _images_under(entry.path)
            if paths:  # an empty sub-folder is not a class
                samples += [(p, len(classes)) for p in paths]
                classes.append(entry.name)
    loose = [e.path for e in entries if e.is_file() and _is_image(e.name)]
    if classes and loose:
        warnings.warn(f"data.root={root}: {len(loose)} images directly in the root are ignored because "
                      f"it has class sub-folders ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})",
                      stacklevel=2)
    if not classes:
        if not loose:
            raise DataError(f"data.root={root} contains no images ({' '.join(IMAGE_EXTENSIONS)}) in it or in "
                            f"its sub-folders; put images there or fix data.root")
        classes = [os.path.basename(os.path.normpath(root))]
        samples = [(p, 0) for p in loose]
    return samples, classes


def to_chw(arr: np.ndarray) -> torch.Tensor:
    """A decoded (H, W) or (H, W, C) uint8 array as a contiguous (C, H, W) tensor."""
    image = torch.from_numpy(np.ascontiguousarray(arr))
    return (image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1)).contiguous()


def image_source(ref):
    """What PIL opens for a sample reference: a file path as it is, a tar member (shards.py) as its bytes."""
    from archirf.data.shards import Member, read_member

    return io.BytesIO(read_member(ref)) if isinstance(ref, Member) else ref


def read_bytes(ref) -> bytes:
    """The encoded bytes of a sample reference (a file path or a tar member)."""
    from archirf.data.shards import Member, read_member

    if isinstance(ref, Member):
        return read_member(ref)
    with open(ref, "rb") as f:
        return f.read()


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM's resize (guided-diffusion image_datasets.py): box-halve while the short side is >= 2x size
    (cheap anti-aliasing), bicubic to short side = size, then center crop. (H, W[, C]) uint8."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.array(image)  # a writable copy: torch.from_numpy warns on read-only arrays
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


class FolderDataset(torch.utils.data.Dataset):
    """Item (sample index, flip) -> (image (C, R, R) uint8, label, [(unreadable file, reason)]).

    A sample is (file path or tar member, label): the folder and shards sources share it."""

    def __init__(self, samples: list[tuple[str, int]], resolution: int, channels: int):
        self.samples, self.resolution, self.mode = samples, resolution, _PIL_MODES[channels]
        self._unreadable: dict[int, str] = {}   # per process: files already known to be bad

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, index: int) -> np.ndarray:
        with Image.open(image_source(self.samples[index][0])) as image:
            return center_crop_arr(image.convert(self.mode), self.resolution)

    def __getitem__(self, item: tuple[int, bool]) -> tuple[torch.Tensor, int, list[tuple[str, str]]]:
        index, flip = item
        unreadable = []
        for offset in range(len(self.samples)):
            # The replacement is the next readable file in dataset order, whichever worker looks.
            candidate = (index + offset) % len(self.samples)
            if candidate in self._unreadable:
                unreadable.append((str(self.samples[candidate][0]), self._unreadable[candidate]))
                continue
            try:
                arr = self._decode(candidate)
            except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, ... on bad files
                self._unreadable[candidate] = f"{type(err).__name__}: {err}"
                unreadable.append((str(self.samples[candidate][0]), self._unreadable[candidate]))
                continue
            if flip:
                arr = arr[:, ::-1]
            return to_chw(arr), self.samples[candidate][1], unreadable           # (C, R, R) uint8
        path, reason = unreadable[0]
        raise DataError(f"none of the {len(self.samples)} images could be decoded (first: {path}: {reason}); "
                        f"check the files under data.root")

    def first_readable(self, root: str) -> int:
        """Index of the first file PIL decodes; DataError, naming the first file and why, if none does."""
        for index in range(len(self.samples)):
            try:
                self._decode(index)
                return index
            except Exception as err:
                self._unreadable[index] = f"{type(err).__name__}: {err}"
        path, reason = self.samples[0][0], self._unreadable[0]
        raise DataError(f"none of the {len(self.samples)} images under data.root={root} could be decoded "
                        f"(first: {path}: {reason}); replace the files or point data.root elsewhere")


def _collate(items):
    images, labels, unreadable = zip(*items)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), [u for us in unreadable for u in us]


class _BatchPlan:
    """DataLoader batch sampler: the batches from the loader's position at the time iter() is called.

    It advances a copy, so workers may prefetch ahead while the loader's own position counts only
    the batches actually handed out (that position is what state_dict saves). It holds the order,
    not the loader: a reference cycle would leave the workers to the garbage collector, whose
    shutdown waits out a 5 s timeout per worker."""

    def __init__(self, order: ResumableOrder, batch_size: int, random_flip: bool):
        self.order, self.batch_size, self.random_flip = order, batch_size, random_flip

    def __iter__(self):
        order = self.order.copy()
        while True:
            yield [(index, self.random_flip and flip) for index, flip in order.take_items(self.batch_size)]


class FolderLoader:
    """Yields (x (B, C, R, R) float32 in [-1, 1], y (B,) long) on `device` forever; resumable."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], num_classes: int, batch_size: int,
                 device: torch.device, *, root: str, resolution: int, channels: int, seed: int, rank: int = 0,
                 world_size: int = 1, random_flip: bool = False, num_workers: int = 2):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        self.classes, self.num_classes, self.batch_size = classes, num_classes, batch_size
        self.num_samples = len(samples)
        self.device = torch.device(device)
        self.random_flip = random_flip
        self.skipped_files: dict[str, str] = {}  # unreadable path -> reason
        self._order = ResumableOrder(self.num_samples, seed, rank, world_size)
        dataset = FolderDataset(samples, resolution, channels)
        # Here, before any worker starts: a folder of only unreadable files would otherwise fail in one.
        dataset.first_readable(root)
        self._dataloader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=_BatchPlan(self._order, batch_size, random_flip),
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0,
            # Its own generator: creating the worker iterator must not draw from the global RNG,
            # whose state the trainer checkpoints for the noise and time samples.
            generator=torch.Generator(),
        )
        self._batches = None  # DataLoader iterator; None = (re)start from self._order on next()

    @property
    def num_skipped(self) -> int:
        """How many distinct files were found unreadable and skipped so far."""
        return len(self.skipped_files)

    def __iter__(self) -> "FolderLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._batches is None:
            self._batches = iter(self._dataloader)  # persistent workers are reused, prefetch restarts
        images, labels, unreadable = next(self._batches)
        self._order.take(self.batch_size)  # the batch just received is the one at our position
        for path, reason in unreadable:
            if path not in self.skipped_files:
                self.skipped_files[path] = reason
                warnings.warn(f"skipping unreadable image {path} ({reason}); it is replaced by the next "
                              f"readable file ({self.num_skipped} skipped so far)", stacklevel=2)
        x = images.to(self.device, non_blocking=True).float().div_(127.5).sub_(1)   # (B, C, R, R) in [-1, 1]
        y = labels.to(self.device, non_blocking=True)                              # (B,)
        return x, y

    def state_dict(self) -> dict:
        return self._order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._order.load_state_dict(state)
        self._batches = None

    def close(self) -> None:
        """Stops the worker processes (they also stop when the loader is garbage-collected)."""
        if self._dataloader._iterator is not None:
            self._dataloader._iterator._shutdown_workers()
            self._dataloader._iterator = None
        self._batches = None


def encoded_samples(cfg: Config, root: str | None = None) -> tuple[list[tuple], list[str] | None]:
    """([(file path or tar member, label)], class names or None) of a folder or shards source (root: instead of
    data.root), labels checked against data.num_classes (all 0 when it is 0)."""
    d = cfg.data
    root = root or d.root
    if d.source == "shards" and root == d.root:
        from archirf.data.shards import check_labels, find_shard_samples

        samples, names, labelled = find_shard_samples(root)
        check_labels(samples, names, labelled, root, d.num_classes)
        classes = names            # None for shards written by other tools: they carry ids, not names
    else:
        samples, classes = find_images(root)
        if d.num_classes and d.num_classes != len(classes):
            shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
            raise DataError(f"data.root={root} has {len(classes)} classes ({shown}) but data.num_classes="
                            f"{d.num_classes}; set data.num_classes={len(classes)} (or 0 to train unconditionally), "
                            f"or fix the folder layout (one sub-folder per class; empty sub-folders are not classes)")
    if d.num_classes == 0:
        samples = [(ref, 0) for ref, _ in samples]  # unconditional: every label is the null class 0
    return samples, classes


def check_image_settings(cfg: Config) -> None:
    d = cfg.data
    if d.channels not in _PIL_MODES:
        raise DataError(f"data.source={d.source} decodes to 1 (grey) or 3 (RGB) channels; got data.channels={d.channels}")
    if d.resolution < 1:
        raise DataError(f"data.resolution must be >= 1 (got {d.resolution})")
    if d.num_workers < 0:
        raise DataError(f"data.num_workers must be >= 0 (got {d.num_workers}; 0 decodes in the main process)")


def use_dali(cfg: Config, device: torch.device) -> bool:
    """data.loader=dali, or auto on a CUDA device with DALI installed."""
    if cfg.data.loader == "dali":
        return True
    if cfg.data.loader == "auto" and torch.device(device).type == "cuda":
        from archirf.data.dali import dali_available

        return dali_available()
    return False


def build_folder_loader(cfg: Config, batch_size: int, device: torch.device, rank: int = 0, world_size: int = 1):
    """The loader of a folder or shards source: PIL in DataLoader workers, or DALI (data.loader)."""
    d = cfg.data
    check_image_settings(cfg)
    samples, classes = encoded_samples(cfg)
    kwargs = dict(root=d.root, resolution=d.resolution, channels=d.channels, seed=cfg.seed, rank=rank,
                  world_size=world_size, random_flip=d.random_flip, num_workers=d.num_workers)
    loader = None
    if use_dali(cfg, device):
        from archirf.data.dali import INSTALL_HINT, DaliLoader

        try:
            loader = DaliLoader(samples, classes, d.num_classes, batch_size, device, **kwargs)  # builds its pipeline
        except DataError:
            raise
        except Exception as err:  # DALI reports a driver or library problem as RuntimeError, over many lines
            why = " ".join(str(err).split())[:200]
            if d.loader == "dali":
                raise DataError(f"data.loader=dali: DALI cannot run here ({why}); {INSTALL_HINT}") from None
            warnings.warn(f"data.loader=auto: DALI cannot run here ({why}); decoding with PIL instead", stacklevel=2)
    if loader is None:
        loader = FolderLoader(samples, classes, d.num_classes, batch_size, device, **kwargs)
    if rank == 0:   # which preprocessing a run gets (docs/data.md): said once, at the start
        how = "NVIDIA DALI" if type(loader).__name__ == "DaliLoader" else f"PIL in {d.num_workers} worker(s)"
        print(f"archirf: data.source={d.source}: {len(samples):,} images decoded by {how}", flush=True)
    return loader
