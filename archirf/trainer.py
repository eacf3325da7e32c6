"""The training loop: a plain loop, read top to bottom.

Everything is counted in images. Per optimizer step: `accum` micro batches -> the task's loss (fp32)
-> backward -> clip -> the task's optimizer step (and EMA) -> on-device metrics. Only at log / sample /
checkpoint boundaries does anything leave the device.

A task (archirf/tasks/) owns the networks, optimizers, loss, EMA, evaluation and pictures of what is
trained, and what its checkpoints and snapshots hold; this loop owns the data, the schedule, when to
checkpoint, metrics and signals. Every rank runs this same loop
(torchrun; one process is a world of 1). parallel.py owns the process group, the FSDP2 model and what
keeps a run independent of the world size; checkpoint.py owns the training state. Only rank 0 prints,
plots and writes samples, snapshots and metrics.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from . import fp8, parallel
from .config import (Config, ConfigError, batch_split, config_changes, from_yaml_text, preset_departures,
                     to_yaml)
from .data import build_loader, skipped_images
from .metrics import Metrics, set_aside_after
from .optim import lr_at
from .parallel import Env
from .tasks import TASK_OUTPUTS, build_task


class NonFiniteLoss(RuntimeError):
    pass


def _crossed(images: int, batch: int, every: int) -> bool:
    return every > 0 and images // every > (images - batch) // every


def _prepare_run_dir(cfg: Config, env: Env) -> Path:
    """Creates the run dir; resume=none moves an earlier run's outputs aside instead of deleting them."""
    run_dir = Path(cfg.run_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        outputs = ("checkpoints", "metrics.jsonl", "snapshots", *TASK_OUTPUTS)
        old = [run_dir / name for name in outputs if (run_dir / name).exists()]
        if cfg.resume == "none" and old:
            keep = run_dir / time.strftime("previous-%Y%m%d-%H%M%S")
            keep.mkdir()
            for p in old:
                p.rename(keep / p.name)
            print(f"archirf: resume=none; moved the earlier run's outputs to {keep}")
    if dist.is_initialized():
        dist.barrier()
    return run_dir


STOPPED = "stopped.json"  # written when a stop signal ended the run at a checkpoint; read by scripts/slurm.sbatch


def _resume_path(cfg: Config, run_dir: Path) -> tuple[Optional[Path], list[tuple[Path, str]]]:
    """(the checkpoint to resume from, the newer damaged ones resume=auto passed over with what is wrong)."""
    if cfg.resume == "none":
        return None, []
    if cfg.resume == "auto":
        path, damaged = ckpt.newest_intact(run_dir)
        if path is None and damaged:
            raise ConfigError(f"no intact checkpoint in {run_dir / 'checkpoints'} ("
                              + "; ".join(f"{p.name}: {why}" for p, why in damaged) + "); name one to try with "
                              "resume=PATH, or start over with resume=none (the run's outputs are moved aside)")
        return path, damaged
    path = Path(cfg.resume)
    if not ckpt.is_complete(path):
        raise ConfigError(f"resume={cfg.resume}: not a complete checkpoint dir (no COMPLETE marker); "
                          f"use resume=auto, resume=none or a path under {run_dir / 'checkpoints'}")
    return path, []


def _claim_run_dir(run_dir: Path, config_yaml: str, images_seen: int, resume: Optional[Path],
                   damaged: list[tuple[Path, str]], task) -> None:
    """Rank 0, once the resume has succeeded (or a fresh start): the first changes to the run dir. A resume
    that fails (a config that does not fit the checkpoint) leaves it as it was."""
    for path, why in damaged:
        aside = ckpt.set_aside(path, "damaged")
        print(f"archirf: checkpoint {path} is damaged ({why}); moved it to {aside} and resumed from {resume} "
              f"instead (resume=PATH picks a checkpoint explicitly)")
    for path in [p for p in ckpt.complete_checkpoints(run_dir) if ckpt.images_of(p) > images_seen]:
        # a stretch this run does not continue (resume=PATH of an older one): resume=auto must not pick it up later
        print(f"archirf: moved checkpoint {path}, newer than the one resumed from, to "
              f"{ckpt.set_aside(path, 'abandoned')}")
    _record_config(run_dir, config_yaml)
    (run_dir / STOPPED).unlink(missing_ok=True)
    if moved := set_aside_after(run_dir / "metrics.jsonl", images_seen):
        print(f"archirf: moved the metric lines logged after {images_seen:,} images to {moved}")
    task.set_aside_after(images_seen)


# model.* keys a resumed run may change: how the same network runs or is regularised, not which network it is
_RESUMABLE_MODEL_KEYS = {"preset", "attn_impl", "attn_backend", "kernels", "class_dropout_prob", "dropout",
                         "class_embeddings", "autoencoder"}      # (the decoder of a latent model's pictures)


def _refuse_another_network(cfg: Config, resume: Path) -> None:
    """ConfigError when the config describes another network than the one the checkpoint's run trained, even
    with every tensor shape the same (model.num_heads, model.sigma_data ...): it would load and train on."""
    saved = resume.parent.parent / "config.yaml"
    try:
        old = from_yaml_text(saved.read_text()).model
    except (OSError, ConfigError):
        return                       # no readable config beside it: the shapes are still checked at load
    changed = [f"model.{f.name}: {getattr(old, f.name)!r} -> {getattr(cfg.model, f.name)!r}"
               for f in dataclasses.fields(old)
               if f.name not in _RESUMABLE_MODEL_KEYS and getattr(old, f.name) != getattr(cfg.model, f.name)]
    if changed:
        raise ConfigError(f"checkpoint {resume} was trained as another network ({'; '.join(changed)}, per {saved}); "
                          f"resume with the network that wrote it, or start over with resume=none")


def _record_config(run_dir: Path, config_yaml: str) -> None:
    """Writes the run dir's config.yaml. A run dir that already has a different one (a resume with changed
    keys) keeps it as config.N.yaml, and the changed keys are printed: e.g. a new EMA kind then averages
    the resumed shadow under its own rule, which nothing else would show."""
    path = run_dir / "config.yaml"
    if path.exists() and (old := path.read_text()) != config_yaml:
        n = 1
        while (run_dir / f"config.{n}.yaml").exists():
            n += 1
        ckpt.write_atomic(run_dir / f"config.{n}.yaml", old)
        changes = config_changes(old, config_yaml)
        print(f"archirf: the config differs from {path} ({'; '.join(changes[:12])}"
              f"{f'; {len(changes) - 12} more' if len(changes) > 12 else ''}); the previous one is kept as "
              f"config.{n}.yaml")
    ckpt.write_atomic(path, config_yaml)


def train(cfg: Config) -> Path:
    with parallel.distributed(cfg) as env:
        try:
            return _train(cfg, env)
        except ckpt.DiskFull:
            raise
        except Exception as err:
            if not ckpt.is_disk_full(err):
                raise
            raise ckpt.disk_full(cfg.run_dir, getattr(err, "filename", None) or f"under {cfg.run_dir}") from None


# cuda_graph=auto captures a step whose forward is at most this many multiply-adds (the network's per image times
# the micro-batch): under a millisecond of an H100's bf16 arithmetic for forward and backward, where a step's time is
# its kernel launches, not its work (docs/training.md#cuda-graphs-for-small-models)
SMALL_STEP_MACS = 5e10


def _plan_compile(cfg: Config, env: Env) -> tuple[bool, bool, bool]:
    """-> (compile the blocks, the compiled blocks replay as CUDA graphs (compile_mode=reduce-overhead), the whole
    step's forward and backward replay as one CUDA graph (cuda_graph)); a setting this run cannot use is an error.

    compile=auto: on on CUDA, except for a small step captured as one graph (compiling would save less than it
    costs). cuda_graph=auto: on for a small step on one NVIDIA GPU where nothing stands in the way."""
    device, mode = env.device, cfg.compile_mode
    obstacle = _graph_obstacle(cfg, env)
    step_obstacle = obstacle or _step_graph_obstacle(cfg)
    if cfg.cuda_graph == "on" and step_obstacle is not None:
        raise ConfigError(f"cuda_graph=on replays the step as a CUDA graph, and {_fix(step_obstacle, 'set cuda_graph=off')}")
    if cfg.cuda_graph == "on" and mode in parallel.CUDAGRAPH_MODES:
        raise ConfigError(f"cuda_graph=on and compile_mode={mode} both replay CUDA graphs (the whole step, or each "
                          f"block): choose one (cuda_graph=off, or compile_mode=default)")
    small = step_obstacle is None and cfg.cuda_graph != "off" and _small_step(cfg, env)
    step_graph = cfg.cuda_graph == "on" or (
        cfg.cuda_graph == "auto" and small and mode == "default" and torch.version.hip is None
        and not fp8.recipe(cfg.precision))
    use_compile = _compile_default(cfg, device) and not (
        cfg.compile == "auto" and step_graph and small and mode == "default")
    if mode == "default":
        return use_compile, False, step_graph
    if not use_compile:
        raise ConfigError(f"compile_mode={mode} sets how blocks compile, and this run compiles nothing (compile="
                          f"{cfg.compile} on {device.type}): set compile=on, or remove compile_mode")
    if mode not in parallel.CUDAGRAPH_MODES:
        return use_compile, False, step_graph
    if obstacle is None and cfg.model.name == "autoencoder":
        raise ConfigError(f"compile_mode={mode} replays each compiled block as a CUDA graph, which is for "
                          f"generative runs; an autoencoder's step runs its networks in several passes: use "
                          f"compile_mode=default")
    if obstacle is not None:
        raise ConfigError(f"compile_mode={mode} replays CUDA graphs, and {_fix(obstacle, 'use compile_mode=default')}")
    return use_compile, True, step_graph


def _compile_default(cfg: Config, device: torch.device) -> bool:
    """compile=on, or auto on CUDA: what the evaluation copy follows, and the training blocks unless captured small."""
    return cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")


def _fix(obstacle: tuple[str, Optional[str]], off: str) -> str:
    why, fix = obstacle
    return f"{why}: {fix}, or {off}" if fix else f"{why}: {off}"


def _graph_obstacle(cfg: Config, env: Env) -> Optional[tuple[str, Optional[str]]]:
    """(why, fix or None) where this run cannot replay its step in CUDA graphs, else None."""
    if env.device.type != "cuda":
        return f"this run is on {env.device.type}", "run on a GPU"
    if parallel.uses_fsdp(cfg, env):
        if env.world_size == 1:
            return ("those run on one rank without FSDP2, and parallel.shard_single_rank=true shards the model "
                    "on this one", "set parallel.shard_single_rank=false")
        return (f"those run on one rank without FSDP2; this run shards the model over {env.world_size} ranks",
                None)
    _, accum = batch_split(cfg, env.world_size)
    if accum > 1:   # the first micro-batch's gradients would live in graph memory that the next one overwrites
        return (f"those need one micro-batch per step; this run accumulates {accum} (micro_batch={cfg.micro_batch}, "
                f"global_batch={cfg.global_batch})", f"set micro_batch={cfg.global_batch}")
    return None


def _step_graph_obstacle(cfg: Config) -> Optional[tuple[str, Optional[str]]]:
    """(why, fix) where the whole step cannot be one captured graph though per-block graphs could."""
    if cfg.model.name == "autoencoder":     # tasks/autoencoder.py has the graphs; tests/test_step_graph.py checks them
        return ("an autoencoder's captured step has not matched its eager step on a GPU yet (its GPU test differed "
                "from it by 0.17% in the gradient norm within 10 steps, and by more than 2% later)", None)
    if cfg.parallel.activation_checkpointing != "none":
        return (f"parallel.activation_checkpointing={cfg.parallel.activation_checkpointing} saves and restores the "
                f"random state in the forward, which a capture cannot", "set parallel.activation_checkpointing=none")
    return None


def _plain_ops(cfg: Config, env: Env, step_graph: bool, use_compile: bool) -> tuple[Config, list[str]]:
    """(the config the networks are built from, the keys it resolved differently). An eager captured small step
    (cuda_graph, nothing compiled, at most SMALL_STEP_MACS) resolves the fused ops' auto choices to plain PyTorch:
    model.kernels=auto -> reference and model.attn_impl=auto -> sdpa, whose launch savings are moot inside the
    graph, and optim.fused_update=null -> false, which runs after the replay and at this size saves less than its
    compilation costs. Each Triton kernel compiles at the run's start; on an empty cache that cost the digits job
    seconds (docs/training.md#cuda-graphs-for-small-models). model.kernels=triton, model.attn_impl=triton and
    optim.fused_update=true keep a fused op; attn_impl=auto stays where model.attn_backend is sdpa or fused. A
    larger step captured with compile=off keeps the fused ops: there they save memory traffic too."""
    if not step_graph or use_compile or not _small_step(cfg, env):
        return cfg, []
    model, optim = cfg.model, cfg.optim
    model_changes = {}
    if model.kernels == "auto":
        model_changes["kernels"] = "reference"
    if model.attn_impl == "auto" and model.attn_backend in (None, "auto"):
        model_changes.update(attn_impl="sdpa", attn_backend=None)    # (the backend is the Triton op's)
    keys = [f"model.{k}" for k in model_changes if k != "attn_backend"]
    if optim.fused_update is None:
        keys.append("optim.fused_update")
        optim = dataclasses.replace(optim, fused_update=False)
    if not keys:
        return cfg, []
    return dataclasses.replace(cfg, model=dataclasses.replace(model, **model_changes), optim=optim), keys


_KEEP_FUSED = {"model.kernels": "model.kernels=triton", "model.attn_impl": "model.attn_impl=triton",
               "optim.fused_update": "optim.fused_update=true"}


def _small_step(cfg: Config, env: Env) -> bool:
    """A generative step of at most SMALL_STEP_MACS forward multiply-adds: what cuda_graph=auto captures and
    _plain_ops builds plain (an autoencoder's step counts its three networks otherwise: tasks/autoencoder.py's
    step_macs)."""
    return cfg.model.name != "autoencoder" and _step_macs(cfg, env) <= SMALL_STEP_MACS


def _step_macs(cfg: Config, env: Env) -> float:
    """Forward multiply-adds of one micro-batch (the network built on the meta device: no memory, no init)."""
    from .models import build_model

    micro, _ = batch_split(cfg, env.world_size)
    with torch.device("meta"):
        return build_model(cfg).flops_per_image() * micro


def _train(cfg: Config, env: Env) -> Path:
    device = env.device
    micro, accum = batch_split(cfg, env.world_size)
    dtype = parallel.autocast_dtype(cfg.precision, device)
    fp8.check(cfg.precision, cfg.model.name, device, cfg)    # before anything is written: no fp8 GPU is a config error
    use_compile, graphs, step_graph = _plan_compile(cfg, env)
    run_dir = _prepare_run_dir(cfg, env)
    config_yaml = to_yaml(cfg)

    loader = build_loader(cfg, micro, device, env.rank, env.world_size)  # first: a missing dataset fails fast
    built, plain = _plain_ops(cfg, env, step_graph, use_compile)
    task = build_task(built, env, run_dir, dtype=dtype, compile=use_compile, cuda_graph=step_graph,
                      compile_eval=_compile_default(cfg, device))

    images_seen = 0
    resume, damaged = _resume_path(cfg, run_dir)
    if resume is not None:
        _refuse_another_network(cfg, resume)
        try:
            images_seen = task.load(resume, loader, verified=cfg.resume == "auto")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if env.is_main:
            print(f"archirf: resumed from {resume} at {images_seen:,} images")
    if env.is_main:
        _claim_run_dir(run_dir, config_yaml, images_seen, resume, damaged, task)
    if resume is not None:
        if images_seen >= cfg.total_images:
            if env.is_main:
                print(f"archirf: this run is already complete (total_images={cfg.total_images:,}); raise "
                      f"total_images to train on, or sample from it: python -m archirf.sample {run_dir}")
            _close(loader)
            return run_dir

    if env.is_main:
        print(f"archirf: {task.describe()} | device={device} dtype={dtype or torch.float32} compile={use_compile}"
              + (f" ({cfg.compile_mode})" if use_compile and cfg.compile_mode != "default" else "") + " "
              f"checkpointing={cfg.parallel.activation_checkpointing} | "
              + (f"FSDP2 mesh {dict(zip(env.mesh.mesh_dim_names, env.mesh.shape))}" if parallel.uses_fsdp(cfg, env)
                 else "one rank, no FSDP2") + f" | global batch {cfg.global_batch} = "
              f"{micro} x {accum} accum x {env.world_size} ranks | run dir {run_dir}")
        if departures := preset_departures(cfg.model):  # explicit keys win over the preset: say which
            print(f"archirf: model.preset={cfg.model.preset} with {', '.join(departures)}")
        if plain:
            print(f"archirf: the step is one small CUDA graph, so {', '.join(plain)} resolve"
                  f"{'s' if len(plain) == 1 else ''} to plain PyTorch, not Triton kernels that would compile at the "
                  f"start (set {' / '.join(_KEEP_FUSED[k] for k in plain)} to keep a fused op)")

    metrics = Metrics(run_dir, total_images=cfg.total_images, start_images=images_seen,
                      flops_per_image=task.flops_per_image, device=device, is_main=env.is_main,
                      progress=cfg.progress and env.is_main, world_size=env.world_size,
                      reduce=parallel.all_reduce_sum, reference_img_per_s=cfg.parallel.reference_img_per_s)
    stop = parallel.StopRequest(env, cfg.parallel.stop_check_steps)
    skipped = consecutive_skips = 0
    saved_at = images_seen if resume is not None else None  # the images count of the newest checkpoint written

    def log_line(scores: Optional[dict] = None) -> None:  # every rank calls it (skipped_images: a collective)
        metrics.log(images_seen, lr, {**({"skipped_steps": skipped} if skipped else {}), **skipped_images(loader),
                                      **task.log_values(), **(scores or {})})

    def crossed(every: int) -> bool:  # did this step cross a multiple of `every` images?
        return _crossed(images_seen, cfg.global_batch, every)

    step = 0  # optimizer steps taken by this process (skipped ones too): the same count on every rank
    try:
        for network in task.networks:
            network.train()
        while images_seen < cfg.total_images and not stop.agreed(step):
            step += 1
            lr = lr_at(cfg.optim, images_seen, cfg.total_images)
            task.set_lr(lr)
            loss_sum = torch.zeros((), device=device)
            data_wait = 0.0
            for k in range(accum):
                for network in task.networks:
                    parallel.set_gradient_sync(network, k == accum - 1)  # one gradient reduce-scatter per step
                parallel.seed_micro_batch(cfg.seed, loader, env.rank, micro)  # noise follows the data
                t0 = time.perf_counter()
                x, y = next(loader)
                data_wait += time.perf_counter() - t0
                if graphs:      # a new iteration (one micro-batch per step): the graphs may reuse the last one's memory
                    torch.compiler.cudagraph_mark_step_begin()
                loss_sum += task.forward_backward(x, y, accum) / accum
            grad_norm = task.clip()
            if cfg.nan_policy == "skip" and not torch.isfinite(grad_norm):  # note: a CPU-GPU sync point
                task.skip()
                skipped += 1
                consecutive_skips += 1
                if consecutive_skips >= cfg.nan_skip_limit:
                    raise _nonfinite(f"{consecutive_skips} consecutive steps (nan_skip_limit) at", cfg, images_seen)
                if env.is_main:
                    print(f"archirf: non-finite loss at {images_seen:,} images; step skipped ({skipped} so far)")
                continue
            consecutive_skips = 0
            images_seen += cfg.global_batch
            task.apply(images_seen)
            metrics.step(loss_sum, grad_norm, cfg.global_batch, data_wait,
                         finite=torch.isfinite(loss_sum) & torch.isfinite(grad_norm))

            last = images_seen >= cfg.total_images
            scores = None
            if task.evaluation_due(crossed, last):
                _check_finite(metrics, cfg, images_seen)
                with metrics.paused():  # evaluation time stays out of img/s and MFU
                    scores = task.evaluate(images_seen)
            if crossed(cfg.log_every) or last or scores:
                _check_finite(metrics, cfg, images_seen)
                log_line(scores)
            if task.posthoc_due(crossed, last):
                _check_finite(metrics, cfg, images_seen)
                with metrics.paused():
                    task.save_posthoc(images_seen)
            if crossed(cfg.checkpoint_every) and not last:
                _check_finite(metrics, cfg, images_seen)
                with metrics.paused():  # checkpoint and sample time stay out of img/s and MFU
                    task.save(images_seen, loader, config_yaml)
                saved_at = images_seen
            if crossed(cfg.sample_every) and not last:
                with metrics.paused():
                    task.pictures(images_seen, final=False)

        # end of training or a stop signal (agreed by all ranks): one complete checkpoint, then the pictures
        stopped = stop.agreed(step, force=True)
        _check_finite(metrics, cfg, images_seen)
        if metrics.pending_steps:  # a stop between log boundaries: the steps since the last line
            log_line()
        if stopped and 0 < images_seen < cfg.total_images:   # (the end: saved above)
            task.save_posthoc(images_seen)
        path = (task.save(images_seen, loader, config_yaml) if saved_at != images_seen
                else ckpt.latest_checkpoint(run_dir))
        skipped_files = skipped_images(loader).get("skipped_images")
        if env.is_main:
            print(f"archirf: checkpoint {path}")
            if skipped_files:
                print(f"archirf: skipped {skipped_files} unreadable image(s) under data.root={cfg.data.root}, each "
                      f"replaced by the next readable file (the warnings above name them)")
        if stopped:
            if env.is_main:
                ckpt.write_atomic(run_dir / STOPPED, json.dumps({"images_seen": images_seen, "checkpoint": str(path),
                                                                 "signal": stop.agreed_signum}))
                print(f"archirf: received signal {stop.agreed_signum}; checkpointed at {images_seen:,} images, "
                      f"exiting")
            # every rank waits for stopped.json: a node whose ranks exited first ends its torchrun, and srun's
            # --kill-on-bad-exit would then kill rank 0 before the scheduler script can read the file
            parallel.barrier(env)
            return run_dir
        task.pictures(images_seen, final=True)
        if env.is_main:
            from .visualize import plot_loss_curve

            plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png")
            print(f"archirf: done; {task.done_message()}")
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
        raise _nonfinite(f"{bad} step(s) before", cfg, images_seen)


def _nonfinite(where: str, cfg: Config, images_seen: int) -> NonFiniteLoss:
    last = ckpt.latest_checkpoint(cfg.run_dir)
    return NonFiniteLoss(
        f"non-finite loss in {where} {images_seen:,} images; stopped without saving, so "
        + (f"the newest checkpoint {last} is the last good state" if last else "no checkpoint was written (none was "
           "due yet)") + ". Lower optim.lr, keep optim.grad_clip > 0, check the data"
        + (", or set nan_policy=skip" if cfg.nan_policy == "stop" else ""))
