"""Encode a dataset with a trained autoencoder into the latents file `data.source=latents` reads.

    torchrun --nproc_per_node=8 -m archirf.encode runs/ae_seed_64px --out latents.safetensors \
        data.root=/data/imagenet/train [--flips] [--batch 256]

The autoencoder: a run dir (its newest EMA snapshot) or a snapshot file. The images: the autoencoder's own
`data.*` settings (its training set, at its resolution), changed by `key=value` overrides (data.* only), read
once each in order, without flips or augmentation.

The set is cut into chunks of `--chunk` images by global index; rank r encodes chunks r, r + W, ... in batches
of `--batch` from each chunk's start and writes each as RUN.parts/chunk-K.safetensors (atomically); rank 0
joins them into `--out` and removes the parts. The latents depend only on the images and the batch size, not
on the number of ranks (1 and 2 ranks write the same file: bitwise on the CPU in fp32). An interrupted encode
started again with the same arguments keeps the chunks already written.

The file holds `latents` (N, C, h, w) float32 -- the clipped latent, or a KL posterior's mean -- and for a KL
autoencoder `latents_std` (its standard deviation, so a loader can draw a fresh sample each time), `labels` for a
class-conditional set, `channel_mean` and `channel_std` (of the latents as drawn from the posterior: the
variance adds the mean of the posterior variance), and metadata: the autoencoder snapshot (path, sha256, images
seen), the images (source, root, resolution, channels, count), the latent kind, and `flips`. With `--flips` the
mirrored images' encodings follow the originals' (exact flips; samples N .. 2N - 1 are the mirrors of 0 .. N - 1).
On CUDA the encoder is compiled and runs in the autoencoder's precision (bf16 autocast for the recipes; precision=fp32
in the overrides: fp32); on a CPU in fp32 unless precision= is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from .config import Config, ConfigError, load_config


class EncodeError(ValueError):
    """A problem with the command's input, said in one line."""


def load_autoencoder(source: str | Path, overrides: list[str]) -> tuple[torch.nn.Module, Config, Path, dict]:
    """(the EMA autoencoder in eval mode, its config with `overrides`, its snapshot file, the snapshot's metadata)."""
    from .checkpoint import latest_snapshot, load_snapshot
    from .models import build_model

    path = Path(source)
    if path.is_dir():
        snap = latest_snapshot(path)
        if snap is None:
            raise EncodeError(f"{path} holds no snapshot (snapshots/ema-*.safetensors); train the autoencoder until "
                              f"its first checkpoint, or pass a snapshot file")
        path = snap
    elif not path.is_file():
        raise EncodeError(f"{path}: no such autoencoder run dir or snapshot file")
    try:
        tensors, meta = load_snapshot(path)
    except Exception as err:      # not a snapshot, or a truncated file
        raise EncodeError(f"{path} cannot be read as an ArchiRF snapshot ({' '.join(str(err).split())})") from None
    bad = [o for o in overrides if not o.startswith("data.") and not o.startswith(("precision=", "device="))]
    if bad:
        raise EncodeError(f"{', '.join(bad)}: encoding takes data.*, precision and device overrides only (the "
                          f"network is the snapshot's)")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(meta["config"])
    try:
        cfg = load_config(f.name, overrides)
    finally:
        os.unlink(f.name)
    if cfg.model.name != "autoencoder":
        raise EncodeError(f"{path} is a {cfg.model.name} model's snapshot; encode with an autoencoder's "
                          f"(model.name=autoencoder)")
    model = build_model(cfg)
    model.load_state_dict(tensors)
    return model.eval().requires_grad_(False), cfg, path, meta


class _Images:
    """The dataset's images by global index (uint8, (n, C, R, R), the training preprocessing, no flips) and labels."""

    def __init__(self, cfg: Config):
        d = cfg.data
        if d.source == "digits":
            from .data.digits import digits_tensors
            from .eval.sampling import to_uint8

            images, labels = digits_tensors(d.resolution, d.channels)
            self.images, self.labels, self.folder = to_uint8(images), labels, None
        elif d.source == "array":
            from .data.array import check_array, read_array

            self.images, labels, meta = read_array(d.root)
            check_array(cfg, self.images, labels, meta)
            self.folder = None
            self.labels = labels.long() if labels is not None else torch.zeros(len(self.images), dtype=torch.long)
        elif d.source in ("folder", "shards"):
            from .data.folder import FolderDataset, encoded_samples

            samples, _ = encoded_samples(cfg)
            self.folder = FolderDataset(samples, d.resolution, d.channels)
            self.labels = torch.tensor([label for _, label in samples])
        else:
            raise EncodeError(f"data.source={d.source} holds no images to encode; use digits, folder, shards or array "
                              f"(data.root=)")
        self.workers = d.num_workers
        self.conditional = d.num_classes > 0

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, start: int, stop: int, batch: int):
        """uint8 batches of images start .. stop - 1, in order."""
        spans = [list(range(s, min(s + batch, stop))) for s in range(start, stop, batch)]
        if self.folder is None:
            for idx in spans:
                yield self.images[idx[0]:idx[-1] + 1]
            return
        from .eval.reference import _Decoded

        loader = torch.utils.data.DataLoader(_Decoded(self.folder), batch_sampler=spans, num_workers=self.workers,
                                             collate_fn=list)
        for items in loader:                    # a worker reports an unreadable file; it is raised here, in one line
            bad = next(((i, message) for i, _, message in items if message is not None), None)
            if bad is not None:                 # message: "path (error)"
                path = str(self.folder.samples[bad[0]][0])
                raise EncodeError(f"{path} cannot be read {bad[1][len(path):].strip()}; remove or replace it: every "
                                  f"image of the set is encoded")
            yield torch.stack([image for _, image, _ in items])


def _encode(model, x: torch.Tensor, dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(latent or posterior mean, posterior std or None) in fp32, of images in [-1, 1]."""
    with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model.encode(x)
    if isinstance(out, tuple):
        mean, logvar = out
        return mean.float(), torch.exp(0.5 * logvar.float())
    return out.float(), None


def encode_chunk(model, images: _Images, start: int, stop: int, batch: int, device, dtype, flips: bool,
                 bar=None) -> dict[str, torch.Tensor]:
    parts: dict[str, list[torch.Tensor]] = {}
    for u8 in images.batches(start, stop, batch):
        x = u8.to(device).float() / 127.5 - 1
        views = {"": x, "flipped_": x.flip(-1)} if flips else {"": x}
        for prefix, v in views.items():
            mean, std = _encode(model, v, dtype)
            parts.setdefault(prefix + "latents", []).append(mean.cpu())
            if std is not None:
                parts.setdefault(prefix + "latents_std", []).append(std.cpu())
        if bar is not None:
            bar.update(len(u8) * len(views))
    return {k: torch.cat(v) for k, v in parts.items()}


def _channel_moments(t: torch.Tensor, square: bool = False, rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) variance of (N, C, h, w) in float64, `rows` samples at a time (no
    float64 copy of the set); with square, of t**2."""
    n, total, total_sq = 0, 0.0, 0.0
    for chunk in t.split(rows):
        c = chunk.double().square() if square else chunk.double()
        total = total + c.sum(dim=(0, 2, 3))
        total_sq = total_sq + c.square().sum(dim=(0, 2, 3))
        n += c.shape[0] * c.shape[2] * c.shape[3]
    mean = total / n
    return mean, (total_sq / n - mean.square()).clamp_min(0)


def _check_plan(path: Path, plan: dict) -> None:
    """An interrupted encode continues only with what made its parts: the same snapshot, images, chunk and
    batch size, flips and precision."""
    if path.exists():
        old = json.loads(path.read_text())
        changed = sorted(k for k in plan if old.get(k) != plan[k])
        if changed:
            raise EncodeError(f"{path.parent} holds the parts of an encode with other {', '.join(changed)}; run it "
                              f"again with the same arguments to continue it, or delete {path.parent} to start over")
    else:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(plan, indent=1))
        os.replace(tmp, path)


_ENCODED_DATA = ("source", "root", "resolution", "channels", "num_classes")    # the data.* that change the file


def _chunk_file(parts: Path, k: int) -> Path:
    return parts / f"chunk-{k:06d}.safetensors"


def _join(parts: Path, total: int, n: int, flips: bool) -> dict[str, torch.Tensor]:
    """The part files' tensors in one set (mirrors after the originals), copied a part at a time into tensors
    allocated once: the join holds the set once, not the parts beside their concatenation."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    start = 0
    for k in range(total):
        with safe_open(str(_chunk_file(parts, k)), framework="pt") as f:
            rows = 0
            for key in f.keys():
                t = f.get_tensor(key)
                name, offset = (key[len("flipped_"):], n) if key.startswith("flipped_") else (key, 0)
                if name not in out:
                    out[name] = torch.empty((n * (2 if flips else 1), *t.shape[1:]), dtype=t.dtype)
                out[name][offset + start:offset + start + len(t)] = t
                rows = len(t)
        start += rows
    if start != n:
        raise EncodeError(f"{parts} holds {start} encoded images, the set {n}; delete {parts} and encode again")
    return out


def encode(source: str | Path, out: str | Path, overrides: list[str], *, batch: int = 64, chunk: int = 8192,
           flips: bool = False, progress: bool = True, keep_parts: bool = False) -> dict:
    """Encodes the set on every rank of the process group (torchrun) or alone; returns the file's metadata."""
    from safetensors.torch import save_file

    from . import parallel
    from .eval.detectors import file_sha256

    if batch < 1 or chunk < 1:
        raise EncodeError(f"--batch and --chunk must be >= 1 (got {batch}, {chunk})")
    out = Path(out)
    if not out.resolve().parent.is_dir():
        raise EncodeError(f"--out {out}: the folder {out.resolve().parent} does not exist; create it or write elsewhere")
    model, cfg, snapshot, meta = load_autoencoder(source, overrides)
    images = _Images(cfg)
    n = len(images)
    env_cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, hsdp_replicate=1))
    parts = out.with_name(out.name + ".parts")
    with parallel.distributed(env_cfg) as env:
        device = env.device
        explicit = any(o.startswith("precision=") for o in overrides)    # else bf16 recipes encode in fp32 on a CPU
        dtype = parallel.autocast_dtype(cfg.precision, device) if device.type == "cuda" or explicit else None
        model = model.to(device)
        if device.type == "cuda":
            model.encoder.compile(dynamic=False)
        total = -(-n // chunk)
        sha256 = file_sha256(snapshot)
        plan = {"autoencoder_sha256": sha256, "images": n, "chunk": chunk, "batch": batch, "flips": flips,
                "data": {k: getattr(cfg.data, k) for k in _ENCODED_DATA},
                "precision": str(dtype)}
        if env.is_main:
            parts.mkdir(exist_ok=True)
            _check_plan(parts / "plan.json", plan)
            done = sum(_chunk_file(parts, k).exists() for k in range(total))
            if done:
                print(f"archirf.encode: continuing: {done} of {total} chunks are in {parts}")
        parallel.barrier(env)
        todo = [k for k in range(env.rank, total, env.world_size) if not _chunk_file(parts, k).exists()]
        mine = sum(min((k + 1) * chunk, n) - k * chunk for k in todo)
        from tqdm import tqdm

        bar = tqdm(total=mine * (2 if flips else 1), desc="encode (rank 0)", unit="img", dynamic_ncols=True,
                   disable=not (progress and env.is_main))
        start_time = time.perf_counter()
        for k in todo:
            tensors = encode_chunk(model, images, k * chunk, min((k + 1) * chunk, n), batch, device, dtype, flips,
                                   bar if env.is_main else None)
            tmp = _chunk_file(parts, k).with_suffix(".tmp")
            save_file(tensors, str(tmp))
            os.replace(tmp, _chunk_file(parts, k))
        bar.close()
        seconds = time.perf_counter() - start_time
        parallel.barrier(env)
        info = {}
        if env.is_main:
            tensors = _join(parts, total, n, flips)
            kl = "latents_std" in tensors
            if images.conditional:
                tensors["labels"] = images.labels.repeat(2 if flips else 1)
            z = tensors["latents"]
            mean, var = _channel_moments(z)
            if kl:
                var = var + _channel_moments(tensors["latents_std"], square=True)[0]
            tensors["channel_mean"], tensors["channel_std"] = mean.float(), var.sqrt().float()
            d = cfg.data
            info = {"autoencoder": str(snapshot), "autoencoder_sha256": sha256,
                    "autoencoder_images_seen": meta.get("images_seen", "?"), "latent": cfg.model.latent,
                    "images": json.dumps({"source": d.source, "root": os.path.abspath(d.root) if d.root else None,
                                          "resolution": d.resolution,
                                          "channels": d.channels, "count": n}),
                    "flips": json.dumps(flips), "format": "archirf.encode/1"}
            tmp = out.with_name(out.name + ".tmp")
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=info)
            os.replace(tmp, out)
            if not keep_parts:
                shutil.rmtree(parts)
            rate = mine / max(seconds, 1e-9)
            print(f"archirf.encode: wrote {out}: {len(tensors['latents']):,} latents {tuple(z.shape[1:])} of "
                  f"{n:,} images{' and their mirrors' if flips else ''} ({cfg.model.latent} latent; "
                  f"{rate * env.world_size:,.0f} img/s on {env.world_size} rank(s))")
        parallel.barrier(env)
    return info


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m archirf.encode", description=__doc__.split("\n\n")[0])
    p.add_argument("autoencoder", help="an autoencoder's run dir (its newest EMA snapshot) or snapshot file")
    p.add_argument("--out", required=True, help="the latents file to write (.safetensors)")
    p.add_argument("--flips", action="store_true", help="also store the mirrored images' encodings")
    p.add_argument("--batch", type=int, default=64, help="images per encoder call (the latents depend on it only "
                                                         "through floating-point rounding)")
    p.add_argument("--chunk", type=int, default=8192, help="images per part file (the unit an interrupted encode "
                                                           "keeps)")
    p.add_argument("--keep-parts", action="store_true", help="keep OUT.parts/ after joining them")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="data.* (and precision, device) key=value overrides")
    args = p.parse_intermixed_args(sys.argv[1:] if argv is None else argv)     # overrides anywhere
    try:
        encode(args.autoencoder, args.out, args.overrides, batch=args.batch, chunk=args.chunk, flips=args.flips,
               progress=not args.no_progress, keep_parts=args.keep_parts)
    except (EncodeError, ConfigError) as err:
        print(f"archirf.encode: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from . import exit_now

    exit_now(main())
