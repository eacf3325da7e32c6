"""NVIDIA DALI decoding for the folder and shards sources (data.loader=dali; auto on a GPU when installed).

The order, flips, rank shards and resume are the project's own (order.py), exactly as the PIL loader's:
DALI's readers are not used. An external source, called once per batch in order, reads the batch's encoded
files (or tar members) on the host and hands DALI the bytes, the flips and the labels; DALI decodes (nvJPEG
and the hardware JPEG decoder on a GPU: the `mixed` decoder; its CPU decoder on a CPU), resizes the short
side to data.resolution (antialiased bicubic), center-crops, mirrors and lays the image out as (C, R, R)
uint8 on the training device; the loader turns it into [-1, 1] floats as the PIL loader does. A checkpoint
holds the same small global position as every loader; a resume rebuilds the pipeline at that position, so it
works across world sizes.

Preprocessing differs from the PIL path in one way: ADM's center_crop_arr halves the image with a box filter
while its short side is at least twice the target and then resizes bicubically, where DALI resizes once with
an antialiased bicubic filter. When no halving happens the two agree to rounding; with halving they differ by
a few levels on average (docs/data.md has the measured tolerance).

Unreadable files are skipped and replaced by the next readable file in dataset order, counted and warned about
once, as the PIL loader does, with PIL as the judge: bytes DALI should decode (a JPEG with its end marker, PNG,
WebP, BMP) go to DALI as they are; anything else is decoded by PIL and handed over as a lossless PNG, or skipped
when PIL cannot read it. If DALI still fails on a batch, the batches in flight are checked file by file (PIL,
then DALI's CPU decoder alone), the culprits skipped or fed through PIL, and the pipeline rebuilt at the same
position. EXIF orientation is not applied (PIL's path does not apply it either).
"""

from __future__ import annotations

import collections
import io
import warnings

import numpy as np
import torch

from archirf.data import DataError
from archirf.data.folder import FolderDataset, read_bytes
from archirf.data.order import ResumableOrder

INSTALL_HINT = ("pip install 'archirf[dali]' (NVIDIA DALI for CUDA 13 drivers; for CUDA 12 drivers install "
                "nvidia-dali-cuda120 instead), or set data.loader=torch")
_PREFETCH = 2                      # batches DALI decodes ahead
_BLIND_REROUTES = 3                # DALI failures no single file explains that reroute a whole batch, at most
_MAGIC = ((b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"BM", "bmp"))
_JPEG_END = b"\xff\xd9"
_JPEG_TAIL = 1 << 16               # the end marker is looked for in the last 64 KiB (a few tools pad after it)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401  (only whether it imports)
    except ImportError:
        return False
    return True


def require_dali():
    try:
        import nvidia.dali
    except ImportError:
        raise DataError(f"data.loader=dali needs NVIDIA DALI, which is not installed: {INSTALL_HINT}") from None
    return nvidia.dali


def check_encoded(data: bytes) -> str | None:
    """Why these bytes are no image DALI can decode (None: they look like one). Cheap: no decoding."""
    if not data:
        return "empty file"
    kind = next((kind for magic, kind in _MAGIC if data.startswith(magic)), None)
    if kind is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        kind = "webp"
    if kind is None:
        return "not a JPEG, PNG, WebP or BMP file"
    if kind == "jpeg" and _JPEG_END not in data[-_JPEG_TAIL:]:
        return "truncated JPEG (no end-of-image marker)"
    return None


def _dali_decodes(data: bytes, channels: int, device: torch.device) -> bool:
    """Whether DALI's decoder for `device` (mixed on a GPU, CPU otherwise) decodes these bytes alone: a one-sample
    pipeline, built only after a failure."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device.type == "cuda"

    @pipeline_def(batch_size=1, num_threads=1, device_id=device.index if gpu else None, prefetch_queue_depth=1)
    def one():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8)
        return fn.decoders.image(encoded, device="mixed" if gpu else "cpu", adjust_orientation=False,
                                 output_type=types.RGB if channels == 3 else types.GRAY)

    try:
        pipe = one()
        pipe.build()
        pipe.feed_input("encoded", [np.frombuffer(data, dtype=np.uint8)])
        pipe.run()
        return True
    except Exception:  # DALI raises RuntimeError with its own multi-line report
        return False


class DaliLoader:
    """Yields (x (B, C, R, R) float32 in [-1, 1], y (B,) long) on `device` forever; resumable (FolderLoader's
    interface: num_samples, classes, skipped_files, state_dict, close)."""

    def __init__(self, samples: list[tuple], classes: list[str], num_classes: int, batch_size: int,
                 device: torch.device, *, root: str, resolution: int, channels: int, seed: int, rank: int = 0,
                 world_size: int = 1, random_flip: bool = False, num_workers: int = 2):
        require_dali()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        self.samples, self.classes, self.num_classes, self.batch_size = samples, classes, num_classes, batch_size
        self.num_samples = len(samples)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.resolution, self.channels, self.random_flip = resolution, channels, random_flip
        self.num_threads = max(1, num_workers)
        self.skipped_files: dict[str, str] = {}   # unreadable file -> reason (reported)
        self._unreadable: dict[int, str] = {}     # sample index -> reason (known, maybe not yet reported)
        self._via_pil: set[int] = set()           # readable by PIL, not by DALI: fed as PNGs of PIL's decoding
        self._blind_reroutes = 0                  # failures no single file explained (see _recover)
        self._order = ResumableOrder(self.num_samples, seed, rank, world_size)
        # PIL judges the files the cheap check lets through but DALI cannot decode; and, as the PIL loader does,
        # a set with no readable file at all fails here, before training.
        self._pil = FolderDataset(samples, resolution, channels)
        self._pil.first_readable(root)
        self._pipe = None
        self._feed_order: ResumableOrder | None = None
        self._in_flight: collections.deque = collections.deque()   # per fed batch: ([sample index], [(file, why)])
        self._feed_error: BaseException | None = None
        self._build()             # now: a DALI that cannot run on this machine fails before training

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_files)

    # -- the external source: the next batch of the project's order, as encoded bytes --------------------------

    def _readable(self, index: int, unreadable: list) -> tuple[int, bytes]:
        """(index, bytes for DALI) of the first readable file from `index` on in dataset order. PIL has the last
        word, as on the PIL path: a file the cheap check rejects, or one DALI failed on, is fed as a lossless PNG
        of PIL's decoding when PIL reads it, and skipped when it does not."""
        for offset in range(self.num_samples):
            candidate = (index + offset) % self.num_samples
            ref = self.samples[candidate][0]
            if candidate not in self._unreadable:
                try:
                    data = read_bytes(ref)
                    why = check_encoded(data)
                except OSError as err:
                    data, why = None, f"{type(err).__name__}: {err}"
                if why is None and candidate not in self._via_pil:
                    return candidate, data
                try:
                    png = self._pil_png(candidate)
                    self._via_pil.add(candidate)          # from now on without reading the raw bytes first
                    return candidate, png
                except Exception as err:  # PIL raises many types on bad files
                    self._unreadable[candidate] = f"{why + '; ' if why else ''}{type(err).__name__}: {err}"
            unreadable.append((str(ref), self._unreadable[candidate]))
        raise DataError(f"none of the {self.num_samples} images could be decoded; check the files under data.root")

    def _pil_png(self, index: int) -> bytes:
        """The file decoded by PIL (no resizing, no EXIF rotation: as the PIL path reads it), as PNG bytes."""
        from PIL import Image

        from archirf.data.folder import image_source

        with Image.open(image_source(self.samples[index][0])) as image:
            out = io.BytesIO()
            image.convert(self._pil.mode).save(out, format="PNG", compress_level=1)
        return out.getvalue()

    def _feed(self, info):
        try:
            indices, data, unreadable = [], [], []
            items = self._feed_order.take_items(self.batch_size)
            for index, _ in items:
                index, blob = self._readable(index, unreadable)
                indices.append(index)
                data.append(np.frombuffer(blob, dtype=np.uint8))
            flips = [np.array(self.random_flip and flip, dtype=np.int32) for _, flip in items]
            labels = [np.array(self.samples[i][1], dtype=np.int64) for i in indices]
            self._in_flight.append((indices, unreadable))
            return data, flips, labels
        except BaseException as err:   # DALI would wrap it: kept, and raised as it is by __next__
            self._feed_error = err
            raise

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device.type == "cuda"
        size = self.resolution
        colour = types.RGB if self.channels == 3 else types.GRAY

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads,
                      device_id=self.device.index if gpu else None, prefetch_queue_depth=_PREFETCH, seed=0)
        def pipeline():
            encoded, flip, label = fn.external_source(source=self._feed, batch=True, batch_info=True, num_outputs=3,
                                                      dtype=[types.UINT8, types.INT32, types.INT64])
            decoder = dict(device="mixed", hw_decoder_load=0.65, device_memory_padding=211025920,
                           host_memory_padding=140544512) if gpu else dict(device="cpu")
            # adjust_orientation=False: PIL's path (ADM's center_crop_arr) does not apply EXIF rotations either
            image = fn.decoders.image(encoded, output_type=colour, adjust_orientation=False, **decoder)
            # ADM's rounding: the short side becomes `size`, the long one round(long * size / short) (no
            # sub-pixel scale), and the crop starts at floor((long - size) / 2) (DALI rounds half up: 0.5 - 1e-5)
            image = fn.resize(image, resize_shorter=size, interp_type=types.INTERP_CUBIC, antialias=True,
                              subpixel_scale=False)
            image = fn.crop_mirror_normalize(image, crop=(size, size), crop_pos_x=0.5 - 1e-5, crop_pos_y=0.5 - 1e-5,
                                             mirror=flip, dtype=types.UINT8, output_layout="CHW")
            return image, label

        self._feed_order = self._order.copy()
        self._in_flight.clear()
        self._feed_error = None
        if gpu:
            torch.cuda.set_device(self.device)    # else DALI makes a context on GPU 0 in every process
        pipe = pipeline()
        pipe.build()
        self._pipe = pipe

    # -- recovery: a file the cheap check let through made DALI fail -------------------------------------------

    def _recover(self, err: BaseException) -> None:
        """After DALI failed on a batch in flight: the files PIL cannot decode are marked unreadable; if there
        are none, the files DALI's own decoder cannot decode alone are fed as PNGs of PIL's decoding; if there are
        none either, the oldest batch in flight not yet fed that way is (a few times at most: then it raises)."""
        batches = [indices for indices, _ in self._in_flight]
        suspects = {i for indices in batches for i in indices} - set(self._unreadable) - self._via_pil
        found = 0
        for index in suspects:
            try:
                self._pil._decode(index)
            except Exception as bad:  # PIL raises many types on bad files
                self._unreadable[index] = f"DALI and PIL cannot decode it ({type(bad).__name__}: {bad})"
                found += 1
        rerouted = []
        if not found:
            rerouted = [i for i in suspects if not _dali_decodes(read_bytes(self.samples[i][0]), self.channels,
                                                                 self.device)]
        if not found and not rerouted:
            pending = next((b for b in batches if not set(b) <= self._via_pil), None)
            self._blind_reroutes += 1
            if pending is not None and self._blind_reroutes <= _BLIND_REROUTES:
                rerouted = [i for i in pending if i not in self._via_pil]
        self._via_pil.update(rerouted)
        for index in rerouted:
            warnings.warn(f"DALI cannot decode {self.samples[index][0]}, PIL can: it is fed as PIL's decoding "
                          f"({len(self._via_pil)} such files so far)", stacklevel=3)
        self.close()
        if not found and not rerouted:
            summary = " ".join(str(err).split())[:300]
            raise DataError(f"DALI fails on batches whose files PIL reads, even fed as PNGs ({summary}); train with "
                            f"data.loader=torch") from None

    def __iter__(self) -> "DaliLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        while True:
            if self._pipe is None:
                self._build()
            try:
                images, labels = self._pipe.run()
                break
            except Exception as err:
                if self._feed_error is not None:
                    raise self._feed_error from None
                self._recover(err)        # the pipeline is rebuilt at the same position on the next pass
        indices, unreadable = self._in_flight.popleft()
        self._order.take(self.batch_size)
        for path, reason in unreadable:
            if path not in self.skipped_files:
                self.skipped_files[path] = reason
                warnings.warn(f"skipping unreadable image {path} ({reason}); it is replaced by the next readable "
                              f"file ({self.num_skipped} skipped so far)", stacklevel=2)
        y = torch.from_numpy(np.asarray(labels.as_tensor()).reshape(-1).copy()).to(self.device, non_blocking=True)
        images = images.as_tensor()
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            u8 = torch.empty(images.shape(), dtype=torch.uint8, device=self.device)
            feed_ndarray(images, u8, cuda_stream=torch.cuda.current_stream(self.device))   # DALI's buffer is reused
        else:
            u8 = torch.from_numpy(np.array(images))       # a copy: DALI owns its buffer until the next run
        return u8.float().div_(127.5).sub_(1), y          # (B, C, R, R) in [-1, 1], as the PIL loader computes

    def state_dict(self) -> dict:
        return self._order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._order.load_state_dict(state)
        self.close()

    def close(self) -> None:
        """Drops the pipeline (and its decoder's memory); the next batch builds a new one at the position."""
        self._pipe = None
        self._in_flight.clear()
