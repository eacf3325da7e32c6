"""Sampling: a library function the trainer uses, and the command line.

    python -m archirf.sample RUN_DIR_OR_SNAPSHOT --classes 0,1,2 --steps 50 --cfg 2.0 --out x.png [--gif]

A run dir samples from its newest complete checkpoint (EMA weights unless --weights raw), a
checkpoint dir (RUN_DIR/checkpoints/images-N) from that one, a .safetensors snapshot from the weights
it holds. The command says which weights it used; a source it cannot use is one line, exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .config import Config, ConfigError, from_yaml_text, validate
from .objectives.rectified_flow import SAMPLING_GRIDS


class SampleError(ValueError):
    """A sampling request that cannot be met; the message names the path or option and the remedy."""


def autocast_model_fn(model: nn.Module, device: torch.device, dtype: Optional[torch.dtype], cache: bool = True,
                      **kwargs) -> Callable:
    """model_fn for the objectives: network in `dtype` autocast (None = fp32), output(s) in fp32; kwargs go
    to the model (return_logvar=True: (pred, logvar), for the loss). cache=False: autocast keeps no cast weights
    (as a CUDA graph capture needs)."""
    def model_fn(x, t, y):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None,
                            cache_enabled=cache):
            out = model(x, t, y, **kwargs)
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()
    return model_fn


def sample_classes(cfg: Config, classes: Optional[list[int]], per_class: int) -> torch.Tensor:
    """Labels for a grid: each requested class `per_class` times (one row per class)."""
    n = cfg.data.num_classes
    if n == 0:
        return torch.zeros(per_class, dtype=torch.long)
    classes = list(range(min(n, 10))) if classes is None else classes
    bad = [c for c in classes if not 0 <= c < n]
    if bad:
        raise ValueError(f"classes {bad} out of range: this model has {n} classes (0..{n - 1})")
    return torch.tensor(classes, dtype=torch.long).repeat_interleave(per_class)


@torch.no_grad()
def generate(model: nn.Module, objective, cfg: Config, labels: torch.Tensor, *, device: torch.device,
             dtype: Optional[torch.dtype], steps: int, cfg_scale: float, sampler: str = "auto",
             seed: int = 0, return_trajectory: bool = False, grid: Optional[str] = None):
    """Samples one image per label, in [-1, 1], with fixed noise from `seed`."""
    model.eval()
    c, r = cfg.data.channels, cfg.data.resolution
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(labels), c, r, r, generator=gen).to(device)
    null = cfg.data.num_classes if cfg.data.num_classes > 0 else None
    return objective.sample(autocast_model_fn(model, device, dtype), noise, labels.to(device), steps=steps,
                            sampler=sampler, cfg_scale=cfg_scale if null is not None else 1.0,
                            null_class=null, ddim_eta=cfg.sample.ddim_eta,
                            return_trajectory=return_trajectory, grid=grid or cfg.sample.grid)


def trajectory_frames(trajectory: list[torch.Tensor], frames: int) -> list[torch.Tensor]:
    """At most `frames` evenly spaced states of a trajectory, always including the last one."""
    if len(trajectory) <= frames:
        return list(trajectory)
    idx = torch.linspace(0, len(trajectory) - 1, frames).round().long().tolist()
    return [trajectory[i] for i in idx]


def load_for_sampling(path: str | Path, weights: str = "ema") -> tuple[nn.Module, Config, str]:
    """(model with weights loaded, its config, a sentence saying which weights) from a run dir (its newest
    complete checkpoint), one checkpoint dir of a run, or a snapshot."""
    from torch.distributed.checkpoint import CheckpointException

    from .checkpoint import (complete_checkpoints, damage, is_complete, latest_checkpoint, load_checkpoint,
                             load_snapshot)
    from .models import build_model

    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise SampleError(f"{path} is not a .safetensors snapshot; pass a run dir or a file from its "
                              f"snapshots/ folder")
        try:
            tensors, meta = load_snapshot(path)
        except ValueError as err:                      # a safetensors file of something else
            raise SampleError(str(err)) from None
        except Exception as err:                       # safetensors raises its own error type for bad files
            raise SampleError(f"{path} cannot be read as a snapshot ({_reason(err)}); it may be truncated: "
                              f"take another file from the run's snapshots/ folder, or pass the run dir") from None
        cfg = _saved_config(meta["config"], f"the config inside {path}")
        try:
            model = build_model(cfg, saved=tensors)
            model.load_state_dict(tensors)
        except (ValueError, RuntimeError) as err:      # weights of another network than its config describes
            raise SampleError(f"{path}: its weights do not fit the network its config describes ({_reason(err)}); "
                              f"take another file from the run's snapshots/ folder, or pass the run dir") from None
        return model, cfg, f"{meta.get('weights', '?')} weights from snapshot {path} (images seen {meta.get('images_seen')})"
    if not path.is_dir():
        raise SampleError(f"{path}: no such run dir or snapshot file")
    if is_complete(path):                  # one checkpoint of a run: RUN_DIR/checkpoints/images-N
        ckpt, path = path, path.parent.parent
    elif (ckpt := latest_checkpoint(path)) is None:
        raise SampleError(f"{path} holds no complete checkpoint (checkpoints/images-*/COMPLETE); "
                          f"train longer or pass a snapshot .safetensors file")
    if not (path / "config.yaml").is_file():
        raise SampleError(f"{path / 'config.yaml'} is missing: the run dir needs the config it was trained "
                          f"with; pass a snapshot file from {path / 'snapshots'} instead (it carries its config)")
    cfg = _saved_config((path / "config.yaml").read_text(), str(path / "config.yaml"))
    earlier = [c for c in complete_checkpoints(path) if c.name < ckpt.name]
    also = f", or the checkpoint before it: {earlier[-1]}" if earlier else ""
    if problem := damage(ckpt):
        raise SampleError(f"checkpoint {ckpt} is damaged ({problem}); sample a snapshot file from "
                          f"{path / 'snapshots'}{also}")
    # DCP raises many types for a damaged checkpoint (some not even Exceptions): each becomes one line.
    try:
        model = build_model(cfg, saved=_saved_buffers(ckpt))
        key = "ema" if weights == "ema" else "model"
        sd = {n: p.detach().clone().float() for n, p in model.named_parameters()} if key == "ema" else model.state_dict()
        state = {key: sd}
        if key == "ema":  # the EMA holds parameters; buffers come from the trained model's state
            state["model"] = {n: b.detach().clone() for n, b in model.named_buffers()}
        state = load_checkpoint(ckpt, state, verified=True)
        model.load_state_dict({**state.get("model", {}), **state[key]}, strict=key == "model")
    except (Exception, CheckpointException) as err:
        raise SampleError(f"checkpoint {ckpt} cannot be read ({_reason(err)}); sample a snapshot file from "
                          f"{path / 'snapshots'}{also}") from None
    return model, cfg, f"{'EMA' if key == 'ema' else 'raw (non-EMA)'} weights from checkpoint {ckpt}"


def _reason(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else 'no details'}"


def _saved_config(text: str, source: str) -> Config:
    try:
        cfg = from_yaml_text(text)
    except ConfigError as err:
        raise SampleError(f"{source} does not fit this version of ArchiRF: {err}") from None
    if cfg.model.name == "autoencoder":
        raise SampleError(f"{source} is an autoencoder's: it reconstructs images, it does not sample them; sample "
                          f"or evaluate a generative model (its reconstructions are in the run's reconstructions.png)")
    return cfg


def _saved_buffers(ckpt: Path) -> dict[str, torch.Tensor]:
    """Placeholders shaped like the buffers a checkpoint's model state holds (from its metadata, no data
    read), for models whose construction would otherwise read a file named in the config."""
    from torch.distributed.checkpoint import FileSystemReader

    entries = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    table = entries.get("model.y_embedder.table")
    return {"y_embedder.table": torch.zeros(tuple(table.size))} if table is not None else {}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="archirf.sample", description="Sample images from an ArchiRF run or snapshot.")
    ap.add_argument("source", help="run dir (newest checkpoint), one of its checkpoints/images-N dirs, or a "
                                   ".safetensors snapshot")
    ap.add_argument("--classes", default=None, help="comma-separated class ids, e.g. 0,1,2 (default: first 10)")
    ap.add_argument("--per-class", type=int, default=8, help="samples per class (one grid row each)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's sample.steps)")
    ap.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (1 = off)")
    ap.add_argument("--sampler", default=None, help="euler|heun (RF), ancestral|ddim (DDPM); default: the run's")
    ap.add_argument("--grid", default=None, choices=SAMPLING_GRIDS,
                    help="RF time grid: uniform (with the run's time_shift) or edm (EDM's sigma schedule); "
                         "default: the run's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", choices=["ema", "raw"], default="ema", help="run dir only: EMA or raw weights")
    ap.add_argument("--out", default="samples.png", help="output PNG grid")
    ap.add_argument("--gif", default=None, nargs="?", const="", help="also write the trajectory as a GIF (path)")
    ap.add_argument("--device", default="auto", help="auto|cpu|cuda")
    ap.add_argument("--autoencoder", default=None,
                    help="a latent model: decode with this autoencoder (run dir or snapshot) instead of "
                         "model.autoencoder; it must be the one that encoded the model's latents")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return _sample(args)
    except SampleError as err:
        print(f"archirf.sample: error: {err}", file=sys.stderr)
        return 2


def _parse_classes(text: Optional[str], num_classes: int) -> Optional[list[int]]:
    if text is None:
        return None
    if num_classes == 0:
        raise SampleError(f"--classes {text}: this model is unconditional (data.num_classes=0); leave --classes out")
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        words = [c.strip() for c in text.split(",") if c.strip() and not c.strip().lstrip("-").isdigit()]
        raise SampleError(f"--classes {text}: {words[0]!r} is not a class id; give comma-separated integers, "
                          f"e.g. --classes 0,1,2") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if not classes or bad:
        raise SampleError(f"--classes {text}: {bad or 'no class'} out of range; this model has {num_classes} "
                          f"classes (0..{num_classes - 1})")
    return classes


def _sample(args) -> int:
    from .objectives import build_objective
    from .visualize import save_gif, save_grid

    for name, value in (("--per-class", args.per_class), ("--steps", args.steps)):
        if value is not None and value < 1:
            raise SampleError(f"{name} must be >= 1 (got {value})")
    if not Path(args.out).resolve().parent.is_dir():
        raise SampleError(f"--out {args.out}: the folder {Path(args.out).resolve().parent} does not exist; create "
                          f"it or write elsewhere")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SampleError("--device cuda: no CUDA device is visible; use --device cpu (or auto)")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    model, cfg, which = load_for_sampling(args.source, args.weights)
    from .decoding import with_autoencoder

    try:
        cfg = with_autoencoder(cfg, args.autoencoder)
    except ConfigError as err:
        raise SampleError(str(err)) from None
    if args.grid == "edm" and cfg.objective.name != "rectified_flow":
        raise SampleError(f"--grid edm is a rectified-flow time grid; this model was trained with "
                          f"{cfg.objective.name}")
    if args.sampler is not None:
        try:
            validate(dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, sampler=args.sampler)))
        except ConfigError as err:
            raise SampleError(f"--sampler {args.sampler}: {err}") from None
    classes = _parse_classes(args.classes, cfg.data.num_classes)
    print(f"archirf.sample: using {which}")
    model.to(device)
    labels = sample_classes(cfg, classes, args.per_class)
    from .parallel import autocast_dtype

    dtype = autocast_dtype("auto", device)
    decoder = None
    if cfg.model.autoencoder:                         # loaded first: a wrong autoencoder stops before sampling
        from .decoding import LatentDecoder, read_record

        try:
            decoder = LatentDecoder(cfg, device, dtype, record=read_record(args.source))
        except (ConfigError, ValueError) as err:
            raise SampleError(f"{' '.join(str(err).split())}") from None
    out = generate(model, build_objective(cfg), cfg, labels, device=device, dtype=dtype,
                   steps=args.steps or cfg.sample.steps,
                   cfg_scale=cfg.sample.cfg_scale if args.cfg is None else args.cfg,
                   sampler=args.sampler or cfg.sample.sampler, seed=args.seed, grid=args.grid,
                   return_trajectory=args.gif is not None)
    final, traj = out if args.gif is not None else (out, None)
    resolution = cfg.data.resolution
    if decoder is not None:                           # a latent model: its samples decoded by its autoencoder
        final = decoder(final)
        traj = [decoder(f) for f in trajectory_frames(traj, cfg.sample.gif_frames)] if traj is not None else None
        resolution = decoder.resolution
        print(f"archirf.sample: decoded by {cfg.model.autoencoder}")
    upscale = max(1, 64 // resolution)
    save_grid(final.cpu(), args.out, nrow=args.per_class, upscale=upscale)
    print(f"archirf.sample: wrote {args.out}")
    if traj is not None:
        gif = args.gif or str(Path(args.out).with_suffix(".gif"))
        save_gif([f.cpu() for f in trajectory_frames(traj, cfg.sample.gif_frames)], gif,
                 nrow=args.per_class, upscale=upscale)
        print(f"archirf.sample: wrote {gif}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
