"""The training loop for flow / diffusion objectives: a plain loop, read top to bottom.

Everything is counted in images. Per optimizer step: `accum` micro batches -> objective loss (fp32)
-> backward -> clip -> AdamW -> EMA -> on-device metrics. Only at log / sample / checkpoint
boundaries does anything leave the device.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .config import Config, ConfigError, batch_split, to_yaml
from .data import build_loader
from .ema import EMA
from .metrics import Metrics
from .models import build_model
from .objectives import build_objective
from .optim import build_optimizer, lr_at
from .sample import autocast_model_fn, generate, sample_classes, trajectory_frames


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class Env:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_env(cfg: Config) -> Env:
    """Device + (under torchrun) the process group; world size 1 goes through the same path."""
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size > 1:
        raise ConfigError(f"WORLD_SIZE={world_size}: this version trains on one process; "
                          f"launch with torchrun --nproc_per_node=1")
    if want == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast use TF32
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Env(device, rank, world_size)


class _StopRequest:
    """SIGTERM / SIGINT set a flag; the loop checkpoints at the next step boundary and exits 0."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.signum = signum

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


def _crossed(images: int, batch: int, every: int) -> bool:
    return every > 0 and images // every > (images - batch) // every


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _prepare_run_dir(cfg: Config, env: Env) -> Path:
    """Creates the run dir; resume=none moves an earlier run's outputs aside instead of deleting them."""
    run_dir = Path(cfg.run_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        old = [p for p in (run_dir / "checkpoints", run_dir / "metrics.jsonl", run_dir / "snapshots") if p.exists()]
        if cfg.resume == "none" and old:
            keep = run_dir / time.strftime("previous-%Y%m%d-%H%M%S")
            keep.mkdir()
            for p in old:
                p.rename(keep / p.name)
            print(f"archirf: resume=none; moved the earlier run's outputs to {keep}")
    if dist.is_initialized():
        dist.barrier()
    return run_dir


def _resume_path(cfg: Config, run_dir: Path) -> Optional[Path]:
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        return ckpt.latest_checkpoint(run_dir)
    path = Path(cfg.resume)
    if not ckpt.is_complete(path):
        raise ConfigError(f"resume={cfg.resume}: not a complete checkpoint dir (no COMPLETE marker); "
                          f"use resume=auto, resume=none or a path under {run_dir / 'checkpoints'}")
    return path


def train(cfg: Config) -> Path:
    env = setup_env(cfg)
    device = env.device
    micro, accum = batch_split(cfg, env.world_size)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else None,
             "bf16": torch.bfloat16, "fp32": None}[cfg.precision]
    use_compile = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    run_dir = _prepare_run_dir(cfg, env)
    config_yaml = to_yaml(cfg)
    if env.is_main:
        (run_dir / "config.yaml").write_text(config_yaml)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    objective = build_objective(cfg)
    loader = build_loader(cfg, micro, device, env.rank, env.world_size)
    optimizer = build_optimizer(model, cfg.optim, device)
    ema = EMA(model, half_life_images=cfg.ema.half_life_images, decay=cfg.ema.decay,
              start_images=cfg.ema.start_images)
    eval_model = build_model(cfg).to(device).eval().requires_grad_(False)  # holds EMA weights for samples

    images_seen = 0
    resume = _resume_path(cfg, run_dir)
    if resume is not None:
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(model, optimizer)
        state = ckpt.load_checkpoint(resume, {
            "model": msd, "optimizer": osd, "ema": ema.state_dict(), "loader": loader.state_dict(),
            "rng": _rng_state(device), "images_seen": 0})
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        ema.load_state_dict(state["ema"])
        loader.load_state_dict(state["loader"])
        _set_rng_state(state["rng"], device)
        images_seen = int(state["images_seen"])
        if env.is_main:
            print(f"archirf: resumed from {resume} at {images_seen:,} images")
        if images_seen >= cfg.total_images:
            if env.is_main:
                print(f"archirf: this run is already complete (total_images={cfg.total_images:,}); raise "
                      f"total_images to train on, or sample from it: python -m archirf.sample {run_dir}")
            _close(loader)
            return run_dir

    def save(images: int) -> Path:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, optimizer)
        path = ckpt.save_checkpoint(run_dir, images, {
            "model": msd, "optimizer": osd, "ema": ema.state_dict(), "loader": loader.state_dict(),
            "rng": _rng_state(device), "images_seen": images}, keep=cfg.keep_checkpoints)
        if env.is_main:
            weights = {**eval_model.state_dict(), **ema.state_dict()}  # EMA parameters + the model's buffers
            ckpt.save_snapshot(run_dir, images, weights, config_yaml)
        return path

    labels = sample_classes(cfg, cfg.sample.classes, cfg.sample.per_class)

    def write_samples(images: int, final: bool) -> None:
        from .visualize import save_gif, save_grid

        ema.copy_to(eval_model)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # keep training RNG intact
            out = generate(eval_model, objective, cfg, labels, device=device, dtype=dtype, steps=cfg.sample.steps,
                           cfg_scale=cfg.sample.cfg_scale, sampler=cfg.sample.sampler, seed=cfg.seed,
                           return_trajectory=final)
        final_x, traj = out if final else (out, None)
        upscale = max(1, 64 // cfg.data.resolution)
        (run_dir / "samples").mkdir(exist_ok=True)
        save_grid(final_x.cpu(), run_dir / "samples" / f"images-{images:012d}.png", nrow=cfg.sample.per_class,
                  upscale=upscale)
        if traj is not None:
            save_grid(final_x.cpu(), run_dir / "samples.png", nrow=cfg.sample.per_class, upscale=upscale)
            save_gif([f.cpu() for f in trajectory_frames(traj, cfg.sample.gif_frames)], run_dir / "trajectory.gif",
                     nrow=cfg.sample.per_class, upscale=upscale)

    train_model = torch.compile(model) if use_compile else model
    model_fn = autocast_model_fn(train_model, device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    if env.is_main:
        print(f"archirf: {type(model).__name__} {model.num_params() / 1e6:.2f}M params, "
              f"{model.flops_per_image() / 1e9:.3f} G MACs/img | {cfg.objective.name} | device={device} "
              f"dtype={dtype or torch.float32} compile={use_compile} | global batch {cfg.global_batch} = "
              f"{micro} x {accum} accum x {env.world_size} ranks | run dir {run_dir}")

    metrics = Metrics(run_dir, total_images=cfg.total_images, start_images=images_seen,
                      flops_per_image=model.flops_per_image(), device=device, is_main=env.is_main,
                      progress=cfg.progress and env.is_main, world_size=env.world_size)
    stop = _StopRequest()
    skipped = 0
    try:
        model.train()
        while images_seen < cfg.total_images and stop.signum is None:
            lr = lr_at(cfg.optim, images_seen, cfg.total_images)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            data_wait = 0.0
            for _ in range(accum):
                t0 = time.perf_counter()
                x, y = next(loader)
                data_wait += time.perf_counter() - t0
                loss = objective.loss(model_fn, x, y).mean()
                (loss / accum).backward()
                loss_sum += loss.detach() / accum
            if cfg.optim.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip, foreach=True)
            else:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            if cfg.nan_policy == "skip" and not torch.isfinite(loss_sum + grad_norm):  # note: a CPU-GPU sync point
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                print(f"archirf: non-finite loss at {images_seen:,} images; step skipped ({skipped} so far)")
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            images_seen += cfg.global_batch
            ema.update(model, images_seen, cfg.global_batch)
            metrics.step(loss_sum, grad_norm, cfg.global_batch, data_wait,
                         finite=torch.isfinite(loss_sum) & torch.isfinite(grad_norm))

            last = images_seen >= cfg.total_images
            if _crossed(images_seen, cfg.global_batch, cfg.log_every) or last:
                _check_finite(metrics, cfg, images_seen)
                metrics.log(images_seen, lr, {"skipped_steps": skipped} if skipped else None)
            if _crossed(images_seen, cfg.global_batch, cfg.checkpoint_every) and not last:
                _check_finite(metrics, cfg, images_seen)
                with metrics.paused():  # checkpoint and sample time stay out of img/s and MFU
                    save(images_seen)
            if env.is_main and _crossed(images_seen, cfg.global_batch, cfg.sample_every) and not last:
                with metrics.paused():
                    write_samples(images_seen, final=False)
                model.train()

        # end of training or a stop signal: one complete checkpoint, then the pictures
        _check_finite(metrics, cfg, images_seen)
        path = save(images_seen)
        if env.is_main:
            print(f"archirf: checkpoint {path}")
        if stop.signum is not None:
            if env.is_main:
                print(f"archirf: received signal {stop.signum}; checkpointed at {images_seen:,} images, exiting")
            return run_dir
        if env.is_main:
            from .visualize import plot_loss_curve

            write_samples(images_seen, final=True)
            plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png")
            print(f"archirf: done; samples in {run_dir / 'samples.png'}, trajectory {run_dir / 'trajectory.gif'}")
        return run_dir
    finally:
        stop.restore()
        metrics.close()
        _close(loader)


def _close(loader) -> None:
    """Stops a loader's worker processes (folder source); in-memory sources have nothing to stop."""
    close = getattr(loader, "close", None)
    if close is not None:
        close()


def _check_finite(metrics: Metrics, cfg: Config, images_seen: int) -> None:
    """Stops before anything non-finite reaches a log line or a checkpoint (nan_policy=stop)."""
    bad = metrics.nonfinite_count()  # note: a CPU-GPU sync point (log / checkpoint boundaries only)
    if bad:
        raise NonFiniteLoss(
            f"non-finite loss in {bad} step(s) before {images_seen:,} images; stopped without saving, so the "
            f"newest checkpoint under {Path(cfg.run_dir) / 'checkpoints'} is the last good state. Lower optim.lr, "
            f"keep optim.grad_clip > 0, check the data, or set nan_policy=skip")
