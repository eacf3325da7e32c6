"""Training checkpoints through torch.distributed.checkpoint, and safetensors release snapshots.

Layout under the run dir:

    checkpoints/images-000000123456/   one complete checkpoint (DCP shards + .metadata + COMPLETE)
    checkpoints/.tmp-images-.../       being written; never read
    snapshots/ema-000000123456.safetensors (+ .json)   EMA weights for sampling / release

A checkpoint is written to a temp dir, the COMPLETE marker is written last, then the dir is
renamed into place: a crash at any point leaves either the previous state or a temp dir that
no reader looks at. Only the newest `keep` complete checkpoints are kept.

Training state (`save_training_state` / `load_training_state`): the model and optimizer through
torch.distributed.checkpoint.state_dict (sharded DTensors under FSDP2, clean parameter names), the
EMA shards, the loader's global stream position and the images seen. Every rank writes its own
shards; DCP reshards on load, so a checkpoint of W ranks resumes on any number of ranks. No RNG
state is saved: the training noise is a function of the data position (parallel.seed_micro_batch).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

MARKER = "COMPLETE"
_NAME = re.compile(r"^images-(\d{12})$")


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
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def save_checkpoint(run_dir: str | Path, images_seen: int, state: dict[str, Any], keep: int) -> Path:
    """Writes `state` (nested dicts of tensors and plain values) as a DCP checkpoint; all ranks call it."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"images-{images_seen:012d}"
    tmp = root / f".tmp-{final.name}"
    if _is_main():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crashed save
    _barrier()
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=tmp, no_dist=not dist.is_initialized())
    _barrier()
    if _is_main():
        _fsync_write(tmp / MARKER, json.dumps({"images_seen": images_seen, "time": time.time()}))
        if final.exists():  # same images count saved twice (e.g. a signal right after a cadence save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: str | Path, state: dict[str, Any]) -> dict[str, Any]:
    """Loads in place into `state` (tensors are filled, plain values replaced); returns `state`."""
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker); "
                                f"pick one listed by `ls {path.parent}` or use resume=auto")
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    return state


def _training_state(model, optimizer, ema, loader, images_seen: int, posthoc=None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state, "ema": ema.state_dict(),
             "loader": loader.state_dict(), "images_seen": images_seen}
    if posthoc is not None:                      # the post-hoc EMAs (posthoc_ema.PostHocEMA), when tracked
        state["posthoc"] = posthoc.state_dict()
    return state


def save_training_state(run_dir: str | Path, images_seen: int, model, optimizer, ema, loader, keep: int,
                        posthoc=None) -> Path:
    """One complete training checkpoint; every rank calls it."""
    return save_checkpoint(run_dir, images_seen, _training_state(model, optimizer, ema, loader, images_seen,
                                                                 posthoc), keep)


def load_training_state(path: str | Path, model, optimizer, ema, loader, posthoc=None) -> int:
    """Restores model, optimizer, EMA(s) and loader in place from `path` (any world size); returns images seen."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    if posthoc is not None:
        keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        lacking = [w for w in posthoc.emas if not any(k.startswith(f"posthoc.{w}.") for k in keys)]
        if lacking:
            raise ValueError(f"{path} holds no post-hoc EMA of sigma_rel {', '.join(lacking)}: they average from "
                             f"image 0, so they cannot start in a resumed run; resume with the widths the run "
                             f"started with (or none), or train a new run")
    state = load_checkpoint(path, _training_state(model, optimizer, ema, loader, 0, posthoc))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    ema.load_state_dict(state["ema"])
    if posthoc is not None:
        posthoc.load_state_dict(state["posthoc"])
    loader.load_state_dict(state["loader"])
    return int(state["images_seen"])


def save_snapshot(run_dir: str | Path, images_seen: int, weights: dict[str, torch.Tensor],
                  config_yaml: str, kind: str = "ema") -> Path:
    """Release/sampling snapshot: safetensors of full (unsharded) weights + a JSON sidecar.

    The resolved config travels inside the safetensors metadata too, so the file alone suffices.
    """
    from safetensors.torch import save_file

    out = Path(run_dir) / "snapshots"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{kind}-{images_seen:012d}.safetensors"
    info = {"weights": kind, "images_seen": str(images_seen), "config": config_yaml}
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
