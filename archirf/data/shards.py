"""WebDataset-style tar shards: images and class ids in plain .tar files, read by our own index.

    data.source=shards data.root=/data/imagenet-shards     # a folder of *.tar files (read in sorted name order)

A sample is the tar members that share a key (the member path up to the first dot of its file name):
`<key>.jpg` (or .jpeg / .png / .webp / .bmp) holds the encoded image and `<key>.cls` its class id as decimal
text. Without .cls members the set is unconditional (data.num_classes=0). `python -m archirf.prepare shards`
writes such shards from an ImageFolder tree; shards written by other WebDataset tools are read too.

The index -- for every sample its shard, the byte offset and size of the image member, its name and its class
-- is built by reading the tar headers once and kept beside the shards in `archirf-index.npz` (when the folder
is writable; otherwise rebuilt at each start). It records each shard's size and modification time and is
rebuilt when a shard changes. A sample is then one seek and one read: the loaders take samples in the
project's own global order (order.py), not the shards' order, so neither a shuffle buffer nor pre-shuffled
shards are needed, and resume and world-size independence are those of every other source. (Random reads
want local disks or a page cache that holds the set; streaming a tar front to back is what remote object
stores are good at, and is not what this source does.)
"""

from __future__ import annotations

import json
import os
import tarfile
from typing import NamedTuple

import numpy as np

from archirf.data import DataError

INDEX_NAME = "archirf-index.npz"
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp")
_INDEX_VERSION = 1


class Member(NamedTuple):
    """One image inside a tar file: where its bytes are, and a name for messages."""
    tar: str
    offset: int
    size: int
    name: str

    def __str__(self) -> str:
        return f"{self.tar}:{self.name}"


def read_member(member: Member) -> bytes:
    with open(member.tar, "rb") as f:
        f.seek(member.offset)
        data = f.read(member.size)
    if len(data) != member.size:
        raise OSError(f"{member.tar} ends inside {member.name} (the shard is truncated)")
    return data


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name; the rest is the suffix."""
    folder, base = os.path.split(name)
    stem, dot, suffix = base.partition(".")
    return os.path.join(folder, stem), suffix.lower() if dot else ""


def _scan(path: str) -> tuple[list[tuple[int, int, str]], list[int]]:
    """[(offset, size, member name)] of the images of one tar, and their class ids (-1: no .cls), in tar order."""
    images: dict[str, tuple[int, int, str]] = {}
    labels: dict[str, int] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, suffix = _split_key(info.name)
                if suffix in IMAGE_SUFFIXES:
                    if key not in images:
                        order.append(key)
                    images[key] = (info.offset_data, info.size, info.name)
                elif suffix == "cls":
                    text = tar.extractfile(info).read().decode("utf-8", "replace").strip()
                    try:
                        labels[key] = int(text)
                    except ValueError:
                        raise DataError(f"{path}:{info.name} holds {text[:40]!r}, not a class id; a .cls member is "
                                        f"the class as decimal text (e.g. 7)") from None
    except (tarfile.TarError, OSError) as err:
        raise DataError(f"data.root: {path} is not a readable tar file ({err}); remove it or write the shards "
                        f"again (python -m archirf.prepare shards)") from None
    return [images[k] for k in order], [labels.get(k, -1) for k in order]


def _fingerprint(paths: list[str]) -> list[list]:
    return [[os.path.basename(p), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in paths]


def shard_files(root: str) -> list[str]:
    if not root or not os.path.exists(root):
        raise DataError(f"data.root={root} does not exist; point it at a folder of .tar shards (python -m "
                        f"archirf.prepare shards writes them from an image folder)")
    if not os.path.isdir(root):
        raise DataError(f"data.root={root} is a file; data.source=shards reads a folder of .tar shards: point "
                        f"data.root at the folder")
    paths = sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".tar") and not f.startswith("."))
    if not paths:
        raise DataError(f"data.root={root} holds no .tar shards; write them with python -m archirf.prepare shards "
                        f"--config RECIPE data.root=IMAGE_FOLDER --out {root}")
    return paths


def build_index(root: str, classes: list[str] | None = None, paths: list[str] | None = None) -> dict:
    """The index of every shard under root (`paths`: shard_files(root), when the caller has it), as numpy arrays."""
    paths = paths or shard_files(root)
    shard, offset, size, names, labels = [], [], [], [], []
    for k, path in enumerate(paths):
        members, ids = _scan(path)
        shard += [k] * len(members)
        offset += [m[0] for m in members]
        size += [m[1] for m in members]
        names += [m[2] for m in members]
        labels += ids
    if not names:
        raise DataError(f"the shards under data.root={root} hold no images ({', '.join(IMAGE_SUFFIXES)} members); "
                        f"write them again with python -m archirf.prepare shards")
    meta = {"version": _INDEX_VERSION, "shards": _fingerprint(paths), "classes": classes}
    return {"shard": np.asarray(shard, np.int32), "offset": np.asarray(offset, np.int64),
            "size": np.asarray(size, np.int64), "label": np.asarray(labels, np.int64),
            "name": np.asarray(names, dtype=np.bytes_), "meta": np.asarray(json.dumps(meta))}


def write_index(root: str, index: dict) -> None:
    tmp = os.path.join(root, f".{INDEX_NAME}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **index)
    os.replace(tmp, os.path.join(root, INDEX_NAME))


def load_index(root: str) -> tuple[dict, list[str]]:
    """(the cached index when it matches the shards, else a fresh one (cached when root is writable), the shard
    files)."""
    paths = shard_files(root)
    cached = os.path.join(root, INDEX_NAME)
    classes = None
    if os.path.exists(cached):
        try:
            with np.load(cached, allow_pickle=False) as f:
                index = {k: f[k] for k in f.files}
            meta = json.loads(str(index["meta"]))
            classes = meta.get("classes")
            if meta.get("version") == _INDEX_VERSION and meta.get("shards") == _fingerprint(paths):
                return index, paths
        except Exception:  # noqa: BLE001  truncated (BadZipFile, EOFError), unreadable or foreign: rebuilt below
            pass
    index = build_index(root, classes, paths)
    if os.access(root, os.W_OK):
        try:
            write_index(root, index)
        except OSError:
            pass                                  # another rank wrote it first, or a read-only mount
    return index, paths


def find_shard_samples(root: str) -> tuple[list[tuple[Member, int]], list[str] | None, bool]:
    """([(member, label)], class names or None, whether every sample has a class id) of a shard folder."""
    index, paths = load_index(root)
    names = [n.decode("utf-8", "replace") for n in index["name"].tolist()]
    labels = index["label"].tolist()
    samples = [(Member(paths[s], o, z, n), max(label, 0)) for s, o, z, n, label in
               zip(index["shard"].tolist(), index["offset"].tolist(), index["size"].tolist(), names, labels)]
    return samples, json.loads(str(index["meta"])).get("classes"), bool(min(labels) >= 0)


def check_labels(samples: list, classes: list[str] | None, labelled: bool, root: str, num_classes: int) -> None:
    """DataError unless data.num_classes fits the shards' class ids."""
    if num_classes == 0:
        return
    if not labelled:
        raise DataError(f"the shards under data.root={root} have images without a .cls class id but "
                        f"data.num_classes={num_classes}; set data.num_classes=0 to train unconditionally, or "
                        f"write the shards with class ids")
    high = max(label for _, label in samples)
    want = len(classes) if classes else None
    if want is not None and want != num_classes:
        raise DataError(f"the shards under data.root={root} hold {want} classes but data.num_classes={num_classes}; "
                        f"set data.num_classes={want} (or 0 to train unconditionally)")
    if high >= num_classes:
        raise DataError(f"the shards under data.root={root} have class ids up to {high} but data.num_classes="
                        f"{num_classes}; set data.num_classes={high + 1} (or 0 to train unconditionally)")


def write_shards(samples: list[tuple[str, int]], classes: list[str], out: str, *, per_shard: int,
                 seed: int = 0, progress: bool = True) -> int:
    """Writes `samples` (path, label) as shards of `per_shard` images in a seeded random order, with
    <key>.<suffix> = the file's bytes as they are and <key>.cls = the label; then the index. Returns the count.
    Everything is written into OUT.partial/ and synced, and that folder becomes OUT last: a crash never leaves
    a shard folder that looks complete."""
    import io
    import shutil

    import torch
    from tqdm import tqdm

    from archirf.checkpoint import fsync_path as _fsync    # here: DataLoader workers import this module

    out = os.path.normpath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise DataError(f"--out {out} exists and is not an empty folder; choose a new folder (nothing is overwritten)")
    partial = out + ".partial"
    shutil.rmtree(partial, ignore_errors=True)           # an earlier interrupted run's: never trained on
    os.makedirs(partial)
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    count = -(-len(samples) // per_shard)
    bar = tqdm(total=len(samples), desc="shards", unit="img", disable=not progress, dynamic_ncols=True)
    for k in range(count):
        path_k = os.path.join(partial, f"shard-{k:06d}.tar")
        with tarfile.open(path_k, "w", format=tarfile.USTAR_FORMAT) as tar:
            for position in order[k * per_shard:(k + 1) * per_shard]:
                path, label = samples[position]
                suffix = os.path.splitext(path)[1].lower().lstrip(".")
                key = f"{position:09d}"
                try:
                    with open(path, "rb") as f:
                        data = f.read()
                except OSError as err:
                    raise DataError(f"cannot read {path} ({err.strerror or err}); fix its permissions or remove it, "
                                    f"then run the command again") from None
                for name, payload in ((f"{key}.{suffix}", data), (f"{key}.cls", str(label).encode())):
                    info = tarfile.TarInfo(name)
                    info.size, info.mode, info.mtime = len(payload), 0o644, 0
                    tar.addfile(info, io.BytesIO(payload))
                bar.update(1)
        _fsync(path_k)
    bar.close()
    write_index(partial, build_index(partial, classes))
    _fsync(os.path.join(partial, INDEX_NAME))
    _fsync(partial)                                     # its entries, before the folder is renamed
    if os.path.isdir(out):
        os.rmdir(out)                                   # empty (checked above)
    os.replace(partial, out)
    _fsync(os.path.dirname(os.path.abspath(out)))
    return len(samples)
