"""Precomputed latents from a safetensors file: any autoencoder's encodings, trained on as they are.

    data.source=latents data.root=/path/latents.safetensors
    file: "latents" (N, C, H, W) any float dtype; optional "labels" (N,) integer class ids

The loader yields x = (latents - data.latent_shift) * data.latent_scale as float32, not images in
[-1, 1]: latents are unbounded, and the scale is what brings them to about unit variance (SD-VAE:
0.18215), so raw encoder outputs can be stored. Shift and scale are one number each or one per
channel (EDM2: shift = the channel means, scale = 0.5 / the channel standard deviations). Without
"labels" the set is unconditional (data.num_classes must be 0); with data.num_classes=0 any labels are
ignored, as the other sources do.

Horizontal flips (data.random_flip) mirror the latent along its width. For a convolutional
autoencoder that is close to, not exactly, the latent of the mirrored image; for exact flips,
store the encodings of the mirrored images as extra samples and leave random_flip off.

Files written by archirf.encode also hold `channel_mean` and `channel_std` (C,) -- data.latent_shift=auto and
data.latent_scale=auto take the shift and 1 / std from them -- and, for a KL autoencoder, `latents_std`, the
posterior's standard deviation: then each served latent is a fresh draw mean + std * noise (the noise from the
micro batch's seeded generator, so it follows the data as the training noise does), as EDM2 trains on sampled
latents; data.latent_posterior=mode serves the mean instead.

Where the set lives (data.storage): safetensors maps the file into memory and hands out
tensors backed by the mapping (no copy; checked with safetensors 0.8), so reading it costs no
process memory of its own and the ranks of a node share one copy in the page cache.
`device` copies it once to the training device in its stored dtype (a step is then two
index_selects on the device, like the digits source); `host` leaves it mapped and sends each batch
through pinned memory (a gather of B samples on the host and one asynchronous copy per step);
`auto` keeps it on a GPU when it takes at most a quarter of the GPU's memory (ImageNet-256 at
32x32x4 in bf16, 10.5 GB, fits an 80 GB GPU next to DiT-XL/2 training), else on the host.
float16, bfloat16 and float32 are kept as stored (float32 conversion happens per batch); other
float dtypes are converted to float32 once.

Everything is checked before training (shape against data.channels / data.resolution, labels,
finite values) and a problem raises DataError naming the key or file to fix.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from safetensors import safe_open

from archirf.config import Config
from archirf.data import DataError
from archirf.data.tensor_loader import DeviceTensorLoader

_KEPT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DEVICE_FRACTION = 0.25      # auto: on the GPU when the set takes at most this share of its memory
_SCAN_BYTES = 1 << 28        # finite check: 256 MB chunks, so no N-sized temporary
_WRITE_HINT = ('write it with safetensors.torch.save_file({"latents": latents, "labels": labels}, path): '
               "latents (N, C, H, W) float, labels (N,) integer (optional)")


def read_latents(path: Optional[str]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(latents, labels or None) of the file, memory-mapped on the host; DataError if unusable."""
    if not path:
        raise DataError("data.source=latents needs data.root=/path/to/latents.safetensors; " + _WRITE_HINT)
    if not os.path.exists(path):
        raise DataError(f"data.root={path} does not exist; point data.root at the latents file ({_WRITE_HINT})")
    if os.path.isdir(path):
        raise DataError(f"data.root={path} is a folder; data.source=latents reads one .safetensors file: "
                        f"point data.root at it")
    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            if "latents" not in keys:
                raise DataError(f"data.root={path} has no 'latents' tensor (found: {', '.join(keys) or 'none'}); "
                                + _WRITE_HINT)
            latents = f.get_tensor("latents")
            labels = f.get_tensor("labels") if "labels" in keys else None
    except DataError:
        raise
    except Exception as err:  # the safetensors reader raises its own error types on a bad header
        raise DataError(f"data.root={path} is not a readable safetensors file ({type(err).__name__}: {err}); "
                        + _WRITE_HINT) from None
    return latents, labels


def check_latents(cfg: Config, latents: torch.Tensor, labels: Optional[torch.Tensor]) -> None:
    """Shape, dtype and labels against cfg.data (not the values: see _nonfinite_samples)."""
    d, path = cfg.data, cfg.data.root
    if latents.ndim != 4:
        raise DataError(f"'latents' in {path} has shape {tuple(latents.shape)}; it must be (N, C, H, W): "
                        f"one (C, H, W) latent per sample")
    n, c, h, w = latents.shape
    if n == 0:
        raise DataError(f"'latents' in {path} holds no samples (shape {tuple(latents.shape)}); write a non-empty set")
    if not latents.dtype.is_floating_point:
        raise DataError(f"'latents' in {path} is {latents.dtype}; store them as float (bfloat16, float16 or "
                        f"float32), dequantised")
    if h != w:
        raise DataError(f"'latents' in {path} are {h}x{w}; models here take square inputs: crop the images "
                        f"(or latents) to a square before writing the file")
    wrong = [f"{key}={value}" for key, value, want in (("data.channels", c, d.channels),
                                                       ("data.resolution", h, d.resolution)) if value != want]
    if wrong:
        raise DataError(f"'latents' in {path} are {c}x{h}x{w} (C x H x W) but data.channels={d.channels} and "
                        f"data.resolution={d.resolution}; set {' '.join(wrong)} (the model is sized from them)")
    if labels is None:
        if d.num_classes > 0:
            raise DataError(f"{path} has no 'labels' but data.num_classes={d.num_classes}; set data.num_classes=0 "
                            f"to train unconditionally, or add 'labels' (N,) class ids to the file")
        return
    if labels.ndim != 1 or labels.shape[0] != n:
        raise DataError(f"'labels' in {path} has shape {tuple(labels.shape)} but there are {n} latents; it must be "
                        f"({n},): one class id per latent")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise DataError(f"'labels' in {path} is {labels.dtype}; store integer class ids (e.g. int64)")
    if d.num_classes > 0:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= d.num_classes:
            raise DataError(f"'labels' in {path} range over [{low}, {high}] but data.num_classes={d.num_classes} "
                            f"allows [0, {d.num_classes - 1}]; set data.num_classes={max(high + 1, d.num_classes)} "
                            f"if that is the number of classes, or fix the labels (ids must be >= 0)")


def _nonfinite_samples(latents: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Indices (on the host) of the samples holding a NaN or an inf, scanned in chunks on `device`."""
    rows = max(1, _SCAN_BYTES // max(1, latents[0].nbytes))
    bad = [~torch.isfinite(latents[i:i + rows].to(device)).flatten(1).all(1) for i in range(0, len(latents), rows)]
    return torch.cat(bad).nonzero().flatten().cpu()  # note: a host sync, once before training


def storage_device(setting: str, latents: torch.Tensor, device: torch.device, extra_bytes: int = 0) -> torch.device:
    """Where the set lives: `device`, or the host (cpu) for data.storage=host or a large set under auto."""
    if setting == "host":
        return torch.device("cpu")
    if setting == "device" or device.type != "cuda":
        return device
    total = torch.cuda.get_device_properties(device).total_memory
    return device if latents.nbytes + extra_bytes <= _DEVICE_FRACTION * total else torch.device("cpu")


class LatentLoader(DeviceTensorLoader):
    """Yields (x (B, C, R, R) float32 = (latents - shift) * scale, y (B,) long) on `device` forever; resumable.

    The order, rank shards, flips and state are DeviceTensorLoader's; the set may live on the host,
    in which case each batch is gathered there and copied over."""

    def __init__(self, latents: torch.Tensor, labels: torch.Tensor, num_classes: int, batch_size: int,
                 device: torch.device, *, scale: float | list[float] = 1.0, shift: float | list[float] = 0.0,
                 std: Optional[torch.Tensor] = None, **order):
        super().__init__(latents, labels, num_classes, batch_size, **order)
        self.std = std                                # a KL posterior's std, stored like the latents (or None)
        self.device = torch.device(device)
        self.identity = scale == 1 and shift == 0
        # (1, C, 1, 1) fp32 on the device: one number or one per channel, broadcast over the batch
        as_tensor = lambda v: torch.tensor(v, dtype=torch.float32, device=self.device).reshape(1, -1, 1, 1)
        self.scale, self.shift = as_tensor(scale), as_tensor(shift)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        index, flip = self._take()                    # the same samples and flips for the latents and their std
        parts = [t.index_select(0, index) for t in (self.images, self.std) if t is not None]
        y = self.labels.index_select(0, index)        # (B, C, R, R) stored dtype, (B,): where the set lives
        if y.is_cpu and self.device.type != "cpu":    # host storage: one asynchronous copy from pinned memory
            if self.device.type == "cuda":          # (compare types: cuda and cuda:0 are the same device)
                parts, y = [t.pin_memory() for t in parts], y.pin_memory()
            parts, y = [t.to(self.device, non_blocking=True) for t in parts], y.to(self.device, non_blocking=True)
            flip = flip.to(self.device, non_blocking=True) if flip is not None else None
        if flip is not None:                          # on the training device, after the copy
            parts = [torch.where(flip[:, None, None, None], t.flip(-1), t) for t in parts]
        return self._values(parts), y

    def _values(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The float32 batch of the gathered (latents[, posterior std]) in their stored dtype."""
        x = parts[0].float()
        if self.std is not None:                      # a fresh draw from each sample's posterior
            x = x + parts[1].float() * torch.randn(x.shape, device=x.device)
        if not self.identity:
            x = (x - self.shift) * self.scale         # a fresh tensor: never writes into the stored set
        return x


def latent_statistics(cfg: Config) -> tuple[float | list[float], float | list[float], Optional[torch.Tensor]]:
    """(scale, shift, posterior std or None) of cfg.data's latents file, `auto` resolved from its statistics."""
    d, path = cfg.data, cfg.data.root
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        stats = {k: f.get_tensor(k).float() for k in ("channel_mean", "channel_std") if k in keys}
        std = f.get_tensor("latents_std") if "latents_std" in keys else None
    auto = [f"data.{k}=auto" for k in ("latent_scale", "latent_shift") if getattr(d, k) == "auto"]
    if auto and len(stats) < 2:
        raise DataError(f"{', '.join(auto)}: {path} holds no channel_mean / channel_std (archirf.encode writes "
                        f"them); set the numbers instead")
    scale = (1.0 / stats["channel_std"]).tolist() if d.latent_scale == "auto" else d.latent_scale
    shift = stats["channel_mean"].tolist() if d.latent_shift == "auto" else d.latent_shift
    if d.latent_posterior is not None and std is None:
        raise DataError(f"data.latent_posterior={d.latent_posterior}: {path} holds no 'latents_std' (a KL "
                        f"autoencoder's posterior, written by archirf.encode); remove the setting")
    return scale, shift, (std if d.latent_posterior != "mode" else None)


def build_latent_loader(cfg: Config, batch_size: int, device: torch.device, rank: int = 0,
                        world_size: int = 1) -> LatentLoader:
    d = cfg.data
    latents, labels = read_latents(d.root)
    check_latents(cfg, latents, labels)
    scale, shift, std = latent_statistics(cfg)
    if std is not None and std.shape != latents.shape:
        raise DataError(f"'latents_std' in {d.root} has shape {tuple(std.shape)}, the latents "
                        f"{tuple(latents.shape)}; re-encode the set")
    if d.num_classes == 0 or labels is None:
        labels = torch.zeros(len(latents), dtype=torch.long)   # unconditional: every label is the null class 0
    storage = storage_device(d.storage, latents, torch.device(device),
                             extra_bytes=std.nbytes if std is not None else 0)
    dtype = latents.dtype if latents.dtype in _KEPT_DTYPES else torch.float32
    latents = latents.to(storage, dtype)   # device: the one copy this rank keeps; host: the mapped file itself
    if std is not None:
        std = std.to(storage, std.dtype if std.dtype in _KEPT_DTYPES else torch.float32)
    bad = _nonfinite_samples(latents, torch.device(device))
    if len(bad):
        raise DataError(f"'latents' in {d.root} hold NaN or inf in {len(bad)} samples (first: sample "
                        f"{bad[0].item()}); re-encode those images or drop them from the file")
    return LatentLoader(latents, labels.to(storage, torch.long), d.num_classes, batch_size, device,
                        scale=scale, shift=shift, std=std, seed=cfg.seed, rank=rank,
                        world_size=world_size, random_flip=d.random_flip)
