"""Prepare a dataset once for fast loading: a packed uint8 array, or tar shards.

    torchrun --nproc_per_node=8 -m archirf.prepare array --config RECIPE data.root=FOLDER --out images.safetensors
    python -m archirf.prepare shards --config RECIPE data.root=FOLDER --out SHARD_FOLDER [--per-shard 10000]

array: every image of the recipe's folder or shards source decoded, resized and center-cropped as the loader
does (ADM's center_crop_arr, no flips) and written as one (N, C, R, R) uint8 array with its labels
(data.source=array reads it; docs/data.md). The set is cut into chunks of --chunk images; rank r decodes
chunks r, r + W, ... and writes each as OUT.parts/chunk-K.safetensors (atomically); rank 0 then streams the
parts into OUT, a part at a time (the set is never held in memory), and removes them. An interrupted run
started again with the same arguments keeps the chunks already written. Unreadable files are left out,
listed in the metadata and counted in the summary.

shards: the files of an image folder, bytes unchanged, in WebDataset-style tar files of --per-shard images in
a seeded random order (<key>.jpg + <key>.cls), with the index data.source=shards reads (data/shards.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path
from typing import Iterable, Optional

import torch

from .checkpoint import fsync_path
from .config import Config, ConfigError, load_config


class PrepareError(ValueError):
    """A problem with the command's input, said in one line."""


_DTYPES = {torch.uint8: "U8", torch.int64: "I64", torch.float32: "F32"}


def write_safetensors_streaming(path: Path, shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                                pieces: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> None:
    """Writes a safetensors file whose tensors arrive in row pieces, in key order of `shapes` and in row order
    (safetensors' own writer wants every tensor in memory at once). Atomic: written to PATH.tmp, then renamed."""
    header, offset = {}, 0
    for name, (dtype, shape) in shapes.items():
        size = torch.empty((), dtype=dtype).element_size()
        for s in shape:
            size *= s
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)                      # the data start 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    written = 0
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, piece in pieces:
            data = piece.contiguous().view(torch.uint8).reshape(-1).numpy()
            f.write(data)
            written += data.nbytes
        f.flush()
        os.fsync(f.fileno())                             # the rename below must not outrun the data
    if written != offset:
        os.unlink(tmp)
        raise PrepareError(f"{path}: {written} bytes of tensors written, {offset} expected; run the command again")
    os.replace(tmp, path)
    fsync_path(path.resolve().parent)                    # the rename itself, before the parts are removed


def _config(args) -> Config:
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        raise PrepareError(str(err)) from None
    if cfg.data.source not in ("folder", "shards"):
        raise PrepareError(f"data.source={cfg.data.source}: prepare reads image files; set data.source=folder (or "
                           f"shards) and data.root=")
    return cfg


def prepare_array(cfg: Config, out: str | Path, *, chunk: int = 8192, batch: int = 256, progress: bool = True,
                  keep_parts: bool = False) -> dict:
    """Writes the packed array of cfg's image set (every rank of the process group, or alone); returns its
    metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm import tqdm

    from . import parallel
    from .data import DataError
    from .data.array import FORMAT as ARRAY_FORMAT
    from .data.folder import FolderDataset, check_image_settings, encoded_samples
    from .encode import EncodeError, _check_plan, _chunk_file
    from .eval.reference import _Decoded

    if chunk < 1 or batch < 1:
        raise PrepareError(f"--chunk and --batch must be >= 1 (got {chunk}, {batch})")
    out = Path(out)
    if not out.resolve().parent.is_dir():
        raise PrepareError(f"--out {out}: the folder {out.resolve().parent} does not exist; create it or write elsewhere")
    if out.is_dir():
        raise PrepareError(f"--out {out} is a folder; name the array file to write (e.g. {out}/images.safetensors)")
    d = cfg.data
    try:
        check_image_settings(cfg)
        samples, classes = encoded_samples(cfg)
    except DataError as err:
        raise PrepareError(str(err)) from None
    n = len(samples)
    total = -(-n // chunk)
    parts = out.with_name(out.name + ".parts")
    env_cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, hsdp_replicate=1))
    with parallel.distributed(env_cfg) as env:
        import hashlib

        def name(ref) -> str:       # independent of how data.root is spelled
            return os.path.relpath(ref, d.root) if isinstance(ref, str) else f"{os.path.basename(ref.tar)}:{ref.name}"

        names = hashlib.sha256("\n".join(f"{name(ref)}\t{label}" for ref, label in samples).encode()).hexdigest()
        plan = {"images": n, "files_sha256": names, "chunk": chunk, "source": d.source, "root": os.path.abspath(d.root),
                "resolution": d.resolution, "channels": d.channels, "num_classes": d.num_classes}
        if env.is_main:
            parts.mkdir(exist_ok=True)
            try:
                _check_plan(parts / "plan.json", plan)
            except EncodeError as err:
                raise PrepareError(str(err)) from None
            done = sum(_chunk_file(parts, k).exists() for k in range(total))
            if done:
                print(f"archirf.prepare: continuing: {done} of {total} chunks are in {parts}")
        parallel.barrier(env)
        todo = [k for k in range(env.rank, total, env.world_size) if not _chunk_file(parts, k).exists()]
        mine = sum(min((k + 1) * chunk, n) - k * chunk for k in todo)
        bar = tqdm(total=mine, desc="array (rank 0)", unit="img", dynamic_ncols=True,
                   disable=not (progress and env.is_main))
        dataset = _Decoded(FolderDataset(samples, d.resolution, d.channels))
        start_time = time.perf_counter()
        for k in todo:
            stop = min((k + 1) * chunk, n)
            spans = [list(range(s, min(s + batch, stop))) for s in range(k * chunk, stop, batch)]
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=spans, num_workers=d.num_workers,
                                                 collate_fn=list)
            images, labels, bad = [], [], []
            for items in loader:
                for index, image, message in items:
                    if image is None:
                        bad.append(message)
                    else:
                        images.append(image)
                        labels.append(samples[index][1])
                bar.update(len(items))
            tensors = {"images": torch.stack(images) if images else
                       torch.empty((0, d.channels, d.resolution, d.resolution), dtype=torch.uint8),
                       "labels": torch.tensor(labels, dtype=torch.int64)}
            tmp = _chunk_file(parts, k).with_suffix(".tmp")
            save_file(tensors, str(tmp), metadata={"skipped": json.dumps(bad)})
            fsync_path(tmp)                              # a chunk that exists is complete, also after a crash
            os.replace(tmp, _chunk_file(parts, k))
        bar.close()
        seconds = time.perf_counter() - start_time
        parallel.barrier(env)
        info: dict = {}
        if env.is_main:
            counts, skipped = [], []
            for k in range(total):
                with safe_open(str(_chunk_file(parts, k)), framework="pt") as f:
                    counts.append(f.get_slice("labels").get_shape()[0])
                    skipped += json.loads(f.metadata()["skipped"])
            kept = sum(counts)
            if kept == 0:
                raise PrepareError(f"none of the {n} images under data.root={d.root} could be decoded (first: "
                                   f"{skipped[0] if skipped else '?'}); check the files")
            info = {"format": ARRAY_FORMAT, "classes": json.dumps(classes if d.num_classes else None),
                    "images": json.dumps({"source": d.source, "root": os.path.abspath(d.root),
                                          "resolution": d.resolution, "channels": d.channels, "count": kept,
                                          "preprocessing": "ADM's center_crop_arr (box-halving, bicubic, center "
                                                           "crop); uint8; no flips"}),
                    "skipped": json.dumps(skipped)}
            shapes = {"images": (torch.uint8, (kept, d.channels, d.resolution, d.resolution))}
            if d.num_classes:
                shapes["labels"] = (torch.int64, (kept,))

            def pieces():
                for name in shapes:
                    for k in range(total):
                        with safe_open(str(_chunk_file(parts, k)), framework="pt") as f:
                            yield name, f.get_tensor(name)

            write_safetensors_streaming(out, shapes, pieces(), info)
            if not keep_parts:
                shutil.rmtree(parts)
            rate = mine / max(seconds, 1e-9)
            print(f"archirf.prepare: wrote {out}: {kept:,} images {d.channels}x{d.resolution}x{d.resolution} uint8 "
                  f"({os.path.getsize(out) / 1e9:.2f} GB){f'; skipped {len(skipped)} unreadable' if skipped else ''} "
                  f"({rate * env.world_size:,.0f} img/s on {env.world_size} rank(s))")
        parallel.barrier(env)
    return info


def prepare_shards(cfg: Config, out: str | Path, *, per_shard: int = 10_000, seed: int = 0,
                   progress: bool = True) -> int:
    from .data import DataError
    from .data.folder import find_images
    from .data.shards import write_shards

    if cfg.data.source != "folder":
        raise PrepareError(f"prepare shards reads an image folder; set data.source=folder (got {cfg.data.source})")
    if per_shard < 1:
        raise PrepareError(f"--per-shard must be >= 1 (got {per_shard})")
    try:
        samples, classes = find_images(cfg.data.root)
        count = write_shards(samples, classes, str(out), per_shard=per_shard, seed=seed, progress=progress)
    except DataError as err:
        raise PrepareError(str(err)) from None
    print(f"archirf.prepare: wrote {count:,} images of {len(classes)} classes in {-(-count // per_shard)} shard(s) "
          f"under {out}; train with data.source=shards data.root={out}")
    return count


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m archirf.prepare", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)    # --per would pass the other-command check below
    p.add_argument("what", choices=("array", "shards"), help="array: decode, resize and crop once into a packed "
                                                            "uint8 array (.safetensors); shards: pack an image "
                                                            "folder's files into tar shards")
    p.add_argument("--config", help="the recipe whose data.* settings describe the images")
    p.add_argument("--out", required=True, help="array: the file to write; shards: a new folder")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--chunk", type=int, default=8192, help="array: images per part file (what an interrupted run "
                                                           "keeps)")
    p.add_argument("--batch", type=int, default=256, help="array: images per DataLoader batch")
    p.add_argument("--keep-parts", action="store_true", help="array: keep OUT.parts/ after joining them")
    p.add_argument("--per-shard", type=int, default=10_000, help="shards: images per tar file")
    p.add_argument("--seed", type=int, default=0, help="shards: seed of the order the images are written in")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (data.root=FOLDER, ...)")
    args = p.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    given = {a for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--")}
    other = {"array": ("--per-shard", "--seed"), "shards": ("--chunk", "--batch", "--keep-parts")}[args.what]
    wrong = [o for o in other if any(g == o or g.startswith(o + "=") for g in given)]
    if wrong:
        print(f"archirf.prepare: error: {', '.join(wrong)} applies to the other command, not to "
              f"'{args.what}'; remove it", file=sys.stderr)
        return 2
    try:
        cfg = _config(args)
        if args.what == "array":
            prepare_array(cfg, args.out, chunk=args.chunk, batch=args.batch, progress=not args.no_progress,
                          keep_parts=args.keep_parts)
        else:
            prepare_shards(cfg, args.out, per_shard=args.per_shard, seed=args.seed, progress=not args.no_progress)
    except PrepareError as err:
        print(f"archirf.prepare: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from . import exit_now

    exit_now(main())
