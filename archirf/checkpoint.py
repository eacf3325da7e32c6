"""Training checkpoints through torch.distributed.checkpoint, and safetensors release snapshots.

Layout under the run dir:

    checkpoints/images-000000123456/   one complete checkpoint (DCP shards + .metadata + COMPLETE)
    checkpoints/.tmp-images-.../       being written; never read
    checkpoints/damaged-images-.../    failed its checksums; set aside by resume=auto, never read
    checkpoints/abandoned-images-.../  newer than the checkpoint a resume=PATH continued from; never read
    snapshots/ema-000000123456.safetensors (+ .json)   EMA weights for sampling / release

A checkpoint is written to a temp dir, the COMPLETE marker is written last, then the dir is
renamed into place: a crash at any point leaves either the previous state or a temp dir that
no reader looks at. Only the newest `keep` complete checkpoints are kept. The marker records the
size and checksum (SHA-256 over 32 MiB blocks) of every file written, and a load checks them
first, so a truncated, deleted or bit-flipped file is named instead of loaded (markers of older
versions, without them, load unchecked).

Training state (`save_training_state` / `load_training_state`): the model and optimizer through
torch.distributed.checkpoint.state_dict (sharded DTensors under FSDP2, clean parameter names), the
EMA shards, the loader's global stream position and the images seen. Every rank writes its own
shards; DCP reshards on load, so a checkpoint of W ranks resumes on any number of ranks. No RNG
state is saved: the training noise is a function of the data position (parallel.seed_micro_batch).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

MARKER = "COMPLETE"
_NAME = re.compile(r"^images-(\d{12})$")
_WRITER = re.compile(r"^__(\d+)_")  # DCP's shard files: __<rank>_<n>.distcp


class DamagedCheckpoint(ValueError):
    """A complete checkpoint whose files no longer match what was written."""


class DiskFull(RuntimeError):
    """The file system ran out of space while the run wrote to it."""


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_path(path: str | Path) -> None:
    """Flushes a written file, or a folder's entries (after a rename into it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, text: str) -> None:
    """Replaces `path` whole or not at all (a temp file beside it, fsync, rename): a crash or a full disk
    never leaves a run's config.yaml or stopped.json cut short. An OSError names `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        _fsync_write(tmp, text)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(path)) from None


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every single-process save/load even with no_dist=True; that case is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=images_of)


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


_BLOCK = 32 << 20


def _file_sums(folder: Path, names: list[str]) -> dict[str, str]:
    """Per file: the SHA-256 of the SHA-256s of its 32 MiB blocks. The blocks hash in parallel threads
    (hashlib releases the GIL), so one large shard is not hashed at one core's speed."""
    jobs = [(n, at) for n in names for at in range(0, max((folder / n).stat().st_size, 1), _BLOCK)]

    def block(job: tuple[str, int]) -> bytes:
        with open(folder / job[0], "rb") as f:
            f.seek(job[1])
            return hashlib.sha256(f.read(_BLOCK)).digest()
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(block, jobs))
    files = {n: hashlib.sha256() for n in names}
    for (name, _), digest in zip(jobs, digests):
        files[name].update(digest)
    return {n: h.hexdigest() for n, h in files.items()}


def _from_main(value):
    """Rank 0's `value` on every rank (a directory listing other nodes may see late, a verdict)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _shared_sums(folder: Path, names: list[str]) -> dict[str, str]:
    """SHA-256 of `names` on every rank, each rank hashing a share: the shards DCP's rank r wrote
    (__r_*.distcp) on rank r, the rest by position, so no rank reads the whole checkpoint."""
    if not dist.is_initialized():
        return _file_sums(folder, names)
    rank, world = dist.get_rank(), dist.get_world_size()

    def owner(i: int, name: str) -> int:
        m = _WRITER.match(name)
        return int(m.group(1)) if m and int(m.group(1)) < world else i % world
    parts = [None] * world
    dist.all_gather_object(parts, _file_sums(folder, [n for i, n in enumerate(names) if owner(i, n) == rank]))
    return {name: digest for part in parts for name, digest in part.items()}


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC / EDQUOT anywhere in an exception's chain, including DCP's per-rank failures and the
    message torch's zip writer gives for a short write ('unexpected pos')."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "unexpected pos" in str(e) or "No space left on device" in str(e):
            return True
        todo += [e.__cause__, e.__context__]
        if isinstance(e, CheckpointException):
            todo += _failures(e)
    return False


def save_checkpoint(run_dir: str | Path, images_seen: int, state: dict[str, Any], keep: int) -> Path:
    """Writes `state` (nested dicts of tensors and plain values) as a DCP checkpoint; all ranks call it."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"images-{images_seen:012d}"
    tmp = root / f".tmp-{final.name}"
    if _is_main():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crashed save
    _barrier()
    try:
        with _quiet_single_process():
            dcp.save(state, checkpoint_id=tmp, no_dist=not dist.is_initialized())
        _barrier()
        listing = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()) if _is_main() else None
        names = _from_main(listing)
        sums = _shared_sums(tmp, names)
        if _is_main():
            files = {n: {"bytes": (tmp / n).stat().st_size, "sha256_blocks": sums[n]} for n in names}
            _fsync_write(tmp / MARKER, json.dumps({"images_seen": images_seen, "time": time.time(), "files": files}))
            if final.exists():  # a resume from an older checkpoint saving over the abandoned stretch's copy
                old = root / f".replaced-{final.name}"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old)
            else:
                os.replace(tmp, final)
            for old in complete_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:  # DCP reports a rank's failure as a CheckpointException, a BaseException
        if not is_disk_full(err):
            raise
        if _is_main():
            shutil.rmtree(tmp, ignore_errors=True)  # a partial write: give its space back
        raise disk_full(run_dir, f"checkpoint {tmp}") from None
    _barrier()
    return final


def disk_full(run_dir: str | Path, what: str) -> DiskFull:
    """The one-line error for a write that ran out of space: what, where, and what is still intact."""
    try:
        free = f"{shutil.disk_usage(run_dir).free / 2**20:,.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    return DiskFull(f"the disk is full: writing {what} failed ({free}); the newest complete checkpoint "
                    f"({latest_checkpoint(run_dir) or 'none yet'}) is intact: free space on that file system (older "
                    f"checkpoints/images-* dirs can go: keep_checkpoints prunes only after a save succeeds) and "
                    f"relaunch the same command to resume from it")


def _listed_damage(path: Path) -> tuple[Optional[str], dict]:
    """(what is wrong with the marker or the files' presence and sizes, the files the marker lists)."""
    try:
        files = json.loads((path / MARKER).read_text()).get("files")
    except (OSError, ValueError, AttributeError) as err:
        return f"its {MARKER} marker is unreadable ({err})", {}
    for name, want in (files or {}).items():
        if not (path / name).is_file():
            return f"{name} is missing", {}
        if (size := (path / name).stat().st_size) != want["bytes"]:
            return f"{name} is {size} bytes, {want['bytes']} were written", {}
    return None, files or {}


def damage(path: str | Path) -> Optional[str]:
    """What is wrong with a complete checkpoint's files, the same on every rank (all ranks call it); None
    when they match its marker, or the marker, written before checksums were recorded, lists none."""
    path = Path(path)
    problem, files = _from_main(_listed_damage(path) if _is_main() else None)
    if problem is None and files:
        sums = _shared_sums(path, sorted(files))
        changed = sorted(n for n, digest in sums.items() if digest != files[n]["sha256_blocks"])
        if changed:
            problem = f"{changed[0]} no longer matches its checksum (its bytes changed on disk)"
    return problem


def newest_intact(run_dir: str | Path) -> tuple[Optional[Path], list[tuple[Path, str]]]:
    """(the newest complete checkpoint whose files are intact, the newer damaged ones with what is wrong)."""
    damaged = []
    for path in reversed(complete_checkpoints(run_dir)):
        problem = damage(path)
        if problem is None:
            return path, damaged
        damaged.append((path, problem))
    return None, damaged


def set_aside(path: Path, why: str) -> Path:
    """Renames a checkpoint to <why>-<name>[-N] beside it, where no reader looks; never deletes."""
    n, new = 1, path.with_name(f"{why}-{path.name}")
    while new.exists():
        n += 1
        new = path.with_name(f"{why}-{path.name}-{n}")
    path.rename(new)
    return new


def images_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def check_intact(path: str | Path) -> None:
    """DamagedCheckpoint naming what is wrong when a checkpoint's files do not match its marker (all ranks)."""
    path = Path(path)
    if problem := damage(path):
        raise DamagedCheckpoint(f"checkpoint {path} is damaged: {problem}; pick an intact one listed by "
                                f"`ls {path.parent}` (resume=PATH), or resume=auto to take the newest intact one")


def load_checkpoint(path: str | Path, state: dict[str, Any], verified: bool = False) -> dict[str, Any]:
    """Loads in place into `state` (tensors are filled, plain values replaced); returns `state`.
    The files are checked against the marker first unless the caller has just done so (`verified`)."""
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker); "
                                f"pick one listed by `ls {path.parent}` or use resume=auto")
    if not verified:
        check_intact(path)
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    except CheckpointException as err:  # one per failing rank; the first says enough
        cause = next(iter(_failures(err)), err)
        text = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        if isinstance(cause, (ValueError, KeyError)):  # the planner: a shape or a key that is not there
            raise ValueError(f"checkpoint {path} does not fit this config ({text}): resume with the settings that "
                             f"wrote it (the run dir's config.yaml), or start over with resume=none") from None
        raise DamagedCheckpoint(f"checkpoint {path} could not be read ({type(cause).__name__}: {text}); pick "
                                f"another listed by `ls {path.parent}` (resume=PATH)") from None
    return state


def _failures(err: CheckpointException) -> list[BaseException]:
    return [f[0] if isinstance(f, tuple) else f for f in err.failures.values()]


def _training_state(model, optimizer, ema, loader, images_seen: int, posthoc=None, evaluation=None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state, "ema": ema.state_dict(),
             "loader": loader.state_dict(), "images_seen": images_seen}
    if posthoc is not None:                      # the post-hoc EMAs (posthoc_ema.PostHocEMA), when tracked
        state["posthoc"] = posthoc.state_dict()
    if evaluation is not None:                   # FID history (eval/training.py), when evaluating while training
        state["eval"] = evaluation.state_dict()
    return state


def save_training_state(run_dir: str | Path, images_seen: int, model, optimizer, ema, loader, keep: int,
                        posthoc=None, evaluation=None) -> Path:
    """One complete training checkpoint; every rank calls it."""
    return save_checkpoint(run_dir, images_seen, _training_state(model, optimizer, ema, loader, images_seen,
                                                                 posthoc, evaluation), keep)


def load_training_state(path: str | Path, model, optimizer, ema, loader, posthoc=None, verified: bool = False,
                        evaluation=None) -> int:
    """Restores model, optimizer, EMA(s) and loader in place from `path` (any world size); returns images seen."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    if not verified:
        check_intact(path)                       # before any read of its metadata
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    if posthoc is not None:
        lacking = [w for w in posthoc.emas if not any(k.startswith(f"posthoc.{w}.") for k in saved)]
        if lacking:
            raise ValueError(f"{path} holds no post-hoc EMA of sigma_rel {', '.join(lacking)}: they average from "
                             f"image 0, so they cannot start in a resumed run; resume with the widths the run "
                             f"started with (or none), or train a new run")
    # A checkpoint of a run that did not evaluate holds no history: the resumed run's starts empty.
    evaluation = evaluation if any(k.startswith("eval.") for k in saved) else None
    state = _training_state(model, optimizer, ema, loader, 0, posthoc, evaluation)
    held = {k[len("model."):] for k in saved if k.startswith("model.")}
    extra, missing = sorted(held - set(state["model"])), sorted(set(state["model"]) - held)
    if extra or missing:  # DCP loads only what is asked for: a smaller network would drop the rest silently
        what = (f"{len(extra)} model tensors the configured network lacks (e.g. {extra[0]})" if extra else
                f"none of {len(missing)} tensors the configured network has (e.g. {missing[0]})")
        raise ValueError(f"checkpoint {path} does not fit this config: it holds {what}; resume with the settings "
                         f"that wrote it (the run dir's config.yaml), or start over with resume=none")
    state = load_checkpoint(path, state, verified=True)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    ema.load_state_dict(state["ema"])
    if posthoc is not None:
        posthoc.load_state_dict(state["posthoc"])
    if evaluation is not None:
        evaluation.load_state_dict(state["eval"])
    loader.load_state_dict(state["loader"])
    return int(state["images_seen"])


def save_snapshot(run_dir: str | Path, images_seen: int, weights: dict[str, torch.Tensor],
                  config_yaml: str, kind: str = "ema", extra: Optional[dict[str, str]] = None) -> Path:
    """Release/sampling snapshot: safetensors of full (unsharded) weights + a JSON sidecar.

    The resolved config travels inside the safetensors metadata too, so the file alone suffices; `extra`
    adds metadata (a latent model's "latents" record, archirf/decoding.py).
    """
    from safetensors.torch import save_file

    out = Path(run_dir) / "snapshots"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{kind}-{images_seen:012d}.safetensors"
    info = {"weights": kind, "images_seen": str(images_seen), "config": config_yaml, **(extra or {})}
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=info)
    os.replace(tmp, path)
    _fsync_write(path.with_suffix(".json"), json.dumps(info, indent=1))
    return path


def load_snapshot(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{path} is not an ArchiRF snapshot (no config in its metadata)")
    return load_file(str(path)), meta


def latest_snapshot(run_dir: str | Path, kind: str = "ema") -> Optional[Path]:
    found = sorted((Path(run_dir) / "snapshots").glob(f"{kind}-*.safetensors"))
    return found[-1] if found else None
