"""The generative task: a flow or diffusion objective over one network, its EMA (and post-hoc EMAs), sample
grids and trajectory GIF, FID while training.

Per optimizer step the loop calls `set_lr`, `forward_backward` once per micro batch, then `clip`, and
`apply` (or `skip` for a non-finite step); everything else it calls at its boundaries. The order of operations is the
one the loop had when it held all of this itself, so runs and checkpoints are unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from .. import checkpoint as ckpt
from .. import fp8, parallel
from ..config import Config, ConfigError
from ..ema import EMA
from ..objectives import build_objective
from ..optim import build_optimizer
from ..parallel import Env
from ..posthoc_ema import PostHocEMA
from ..sample import autocast_model_fn, generate, sample_classes, trajectory_frames


class GenerativeTask:
    def __init__(self, cfg: Config, env: Env, run_dir: Path, *, dtype: Optional[torch.dtype], compile: bool,
                 cuda_graph: bool = False, compile_eval: Optional[bool] = None):
        self.cfg, self.env, self.run_dir, self.dtype = cfg, env, run_dir, dtype
        device = env.device
        # the training model's blocks compile under `compile`; the evaluation copy and the latent decoder, which no
        # graph captures, under `compile_eval` (compile=auto: on on CUDA, even where a captured step is not compiled)
        compile_eval = compile if compile_eval is None else compile_eval
        self.objective = build_objective(cfg)
        # Sharded training model; rank 0 also gets the full initial copy, which becomes the eval model
        # that samples with the EMA weights.
        self.model, self.eval_model = parallel.build_training_model(cfg, env, param_dtype=dtype, compile=compile)
        if self.eval_model is not None:
            self.eval_model = self.eval_model.to(device).eval().requires_grad_(False)
        self.networks = [self.model]
        self.optimizer = build_optimizer(self.model, cfg.optim, device)
        self.ema = EMA(self.model, half_life_images=cfg.ema.half_life_images, decay=cfg.ema.decay,
                       sigma_rel=cfg.ema.sigma_rel, start_images=cfg.ema.start_images)
        self.posthoc = PostHocEMA(self.model, cfg.ema.posthoc_sigma_rels) if cfg.ema.posthoc_sigma_rels else None
        self.evaluation = None
        from ..decoding import LatentDecoder, latent_record

        record = latent_record(cfg)     # what decoding its samples needs (archirf/decoding.py): saved with checkpoints
        self.latents = json.dumps(record) if record is not None else None
        self.decoder = None             # a latent model's grids and GIF (rank 0) and FID (every rank) decode
        if cfg.model.autoencoder and (env.is_main or cfg.eval.every):
            self.decoder = LatentDecoder(cfg, device, dtype, compile=compile_eval, record=record)
        if cfg.eval.every:  # FID while training: loads the feature networks now, so a missing one fails first
            from ..eval.training import TrainingEval

            self.evaluation = TrainingEval(cfg, env, run_dir, self.objective, dtype=dtype, compile=compile_eval,
                                           eval_model=self.eval_model, decoder=self.decoder)
        self.labels = sample_classes(cfg, cfg.sample.classes, cfg.sample.per_class)
        # A model that weights its loss per time (EDM2's uncertainty / EDM preconditioning) also returns logvar.
        logvar = {"return_logvar": True} if getattr(self.model, "loss_logvar", False) else {}
        # cuda_graph: the forward and backward replay as one CUDA graph (archirf/step_graph.py); autocast's weight
        # cache off, as CUDA graphs need (each weight is cast once per forward either way)
        self.model_fn = autocast_model_fn(self.model, device, dtype, cache=not cuda_graph, **logvar)
        self.post_step = getattr(self.model, "post_optimizer_step", None)  # e.g. EDM2's forced weight normalisation
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.step_graph = None
        if cuda_graph:
            from ..step_graph import StepGraph

            self.step_graph = StepGraph(self._loss_and_backward, self.params, list(self.model.buffers()))
        self.clip_scale = self.ema_maps = None     # optim.fused_update: this step's clipping scale; EMA shadows
        # optim.fused_update: true (checked: CUDA, or Triton's interpreter in tests), null (on where it applies:
        # NVIDIA CUDA with Triton compiling, not its interpreter)
        self.fused_update = cfg.optim.fused_update if cfg.optim.fused_update is not None \
            else _fused_update_applies(device)
        if cfg.optim.fused_update:
            _check_fused_update(device)
        self.flops_per_image = self.eval_model.flops_per_image() if env.is_main else None   # MFU: rank 0

    def describe(self) -> str:
        """Rank 0: the network and the objective, for the run's first line."""
        m = self.eval_model
        plan = getattr(self.model, "fp8_plan", None)     # set by parallelize under precision=fp8-*
        return (f"{type(m).__name__} {m.num_params() / 1e6:.2f}M params, {self.flops_per_image / 1e9:.3f} G MACs/img"
                f" | {self.cfg.objective.name}" + (f" | {fp8.describe(plan, self.cfg.precision)}" if plan else "")
                + (" | AdamW + EMAs in one pass" if self.fused_update else "")
                + (" | step as one CUDA graph" if self.step_graph is not None else ""))

    # -- one optimizer step -------------------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, accum: int) -> torch.Tensor:
        """Loss of one micro batch, its gradient accumulated (scaled by 1 / accum); the detached loss (under
        cuda_graph the graph's output: one micro batch per step, its gradients written afresh by each replay)."""
        if self.step_graph is not None:
            return self.step_graph(x, y)
        return self._loss_and_backward(x, y, accum).detach()

    def clip(self) -> torch.Tensor:
        if not self.fused_update:
            return parallel.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)   # global norm, the same on every rank
        norm = parallel.clip_grad_norm_(self.params, 0.0)      # the norm only: the fused update applies the scale
        max_norm = self.cfg.optim.grad_clip
        self.clip_scale = parallel.clip_coefficient(norm, max_norm) if max_norm > 0 else None
        return norm

    def _loss_and_backward(self, x: torch.Tensor, y: torch.Tensor, accum: int = 1) -> torch.Tensor:
        """The micro batch's loss (with its graph); its gradient, scaled by 1 / accum, accumulated."""
        loss = self.objective.loss(self.model_fn, x, y).mean()
        (loss / accum).backward()
        return loss

    def skip(self) -> None:
        self._zero_grad()

    def _zero_grad(self) -> None:
        """Unsets the gradients, except under cuda_graph: there they are the graph's tensors, which the next replay
        overwrites."""
        if self.step_graph is None:
            self.optimizer.zero_grad(set_to_none=True)

    def apply(self, images_seen: int) -> None:
        """The optimizer step, then the EMAs at `images_seen` (the count after this step): in one pass under
        optim.fused_update where it applies (_fused_apply), else torch's AdamW and one lerp per EMA."""
        if self.fused_update and self._fused_apply(images_seen):
            self._zero_grad()
            return
        if self.clip_scale is not None:        # the fused update declined: scale as clip_grad_norm_ would have
            torch._foreach_mul_([parallel.local_tensor(p.grad) for p in self.params if p.grad is not None],
                                self.clip_scale)
            self.clip_scale = None
        self.optimizer.step()
        if self.post_step is not None:
            self.post_step()
        self._zero_grad()
        self.ema.update(self.model, images_seen, self.cfg.global_batch)
        if self.posthoc is not None:
            self.posthoc.update(self.model, images_seen, self.cfg.global_batch)

    def _fused_apply(self, images_seen: int) -> bool:
        """AdamW and every EMA in one kernel (AdamW.fused_update); False where it does not apply (the first step,
        an EMA still copying the weights), and the caller takes the unfused path."""
        emas = [self.ema] + (list(self.posthoc.emas.values()) if self.posthoc is not None else [])
        rates = [e.rate(images_seen, self.cfg.global_batch) for e in emas]
        if any(r is None for r in rates):
            return False
        if self.ema_maps is None:              # parameter -> shadow, per EMA (the shadows are updated in place)
            names = {p: parallel.clean_fqn(n) for n, p in self.model.named_parameters()}
            self.ema_maps = [{p: e.shadow[names[p]] for p in self.params} for e in emas]
        if not self.optimizer.fused_update(self.clip_scale, self.ema_maps, rates):
            return False
        self.clip_scale = None
        idle = [p for p in self.params if p.grad is None]      # no gradient this step: unchanged, still averaged
        if idle:
            for ema_map, rate in zip(self.ema_maps, rates):
                torch._foreach_lerp_([parallel.local_tensor(ema_map[p]) for p in idle],
                                     [parallel.local_tensor(p).float() for p in idle], rate)
        return True

    # -- state ---------------------------------------------------------------------------------------------
    def load(self, path: Path, loader, verified: bool) -> int:
        if self.latents is not None and (self.run_dir / "latents.json").is_file():     # every rank: one verdict
            _same_latents(json.loads((self.run_dir / "latents.json").read_text()), json.loads(self.latents))
        return ckpt.load_training_state(path, self.model, self.optimizer, self.ema, loader, self.posthoc,
                                        verified=verified, evaluation=self.evaluation)

    def save(self, images: int, loader, config_yaml: str) -> Path:
        path = ckpt.save_training_state(self.run_dir, images, self.model, self.optimizer, self.ema, loader,
                                        keep=self.cfg.keep_checkpoints, posthoc=self.posthoc,
                                        evaluation=self.evaluation)
        weights = self.ema.full_state_dict(keep=self.env.is_main)  # every rank joins the gather
        if self.env.is_main:
            if self.latents is not None:
                ckpt.write_atomic(self.run_dir / "latents.json", self.latents)
            buffers = {parallel.clean_fqn(n): b for n, b in self.model.named_buffers()}
            ckpt.save_snapshot(self.run_dir, images, {**buffers, **weights}, config_yaml,  # EMA parameters + buffers
                               extra={"latents": self.latents} if self.latents else None)
        return path

    def set_aside_after(self, images_seen: int) -> None:
        """Rank 0, on resume: outputs of this task written past the checkpoint resumed from."""
        from ..metrics import set_aside_after

        if moved := set_aside_after(self.run_dir / "eval.jsonl", images_seen):
            print(f"archirf: moved the evaluations of images after {images_seen:,} to {moved}")
        if self.posthoc is not None and (moved := self.posthoc.set_aside_after(self.run_dir, images_seen)):
            print(f"archirf: moved {len(moved)} post-hoc EMA files after {images_seen:,} images to {moved[0].parent}")

    # -- boundaries ----------------------------------------------------------------------------------------
    def posthoc_due(self, crossed, last: bool) -> bool:
        """Whether the post-hoc EMAs are saved now (`crossed(every)`: a boundary was crossed by this step)."""
        return self.posthoc is not None and (crossed(self.cfg.ema.posthoc_every) or last)

    def save_posthoc(self, images_seen: int) -> None:
        if self.posthoc is not None:
            self.posthoc.save(self.run_dir, images_seen, self.env.is_main)

    def evaluation_due(self, crossed, last: bool) -> bool:
        return self.evaluation is not None and (crossed(self.cfg.eval.every) or last)

    def evaluate(self, images_seen: int) -> dict:
        """FID of the EMA weights ({"fid": ..., "eval_seconds": ...}); every rank calls it."""
        return self.evaluation(self.ema, self.model, images_seen)

    def pictures(self, images: int, final: bool) -> None:
        """A sample grid (and at the end the trajectory GIF) of the EMA weights; every rank calls it."""
        from ..visualize import save_gif, save_grid

        cfg, env = self.cfg, self.env
        weights = self.ema.full_state_dict(keep=env.is_main)  # every rank joins the gather; rank 0 samples
        if not env.is_main:
            return
        self.ema.copy_to(self.eval_model, weights)
        # Sampling may draw from the global RNG; training does not mind (each micro batch reseeds it).
        out = generate(self.eval_model, self.objective, cfg, self.labels, device=env.device, dtype=self.dtype,
                       steps=cfg.sample.steps, cfg_scale=cfg.sample.cfg_scale, sampler=cfg.sample.sampler,
                       seed=cfg.seed, return_trajectory=final)
        final_x, traj = out if final else (out, None)
        resolution = cfg.data.resolution
        if self.decoder is not None:
            final_x = self.decoder(final_x)
            traj = [self.decoder(f) for f in trajectory_frames(traj, cfg.sample.gif_frames)] if traj else traj
            resolution = self.decoder.resolution
        upscale = max(1, 64 // resolution)
        (self.run_dir / "samples").mkdir(exist_ok=True)
        save_grid(final_x.cpu(), self.run_dir / "samples" / f"images-{images:012d}.png", nrow=cfg.sample.per_class,
                  upscale=upscale)
        if traj is not None:
            save_grid(final_x.cpu(), self.run_dir / "samples.png", nrow=cfg.sample.per_class, upscale=upscale)
            save_gif([f.cpu() for f in trajectory_frames(traj, cfg.sample.gif_frames)],
                     self.run_dir / "trajectory.gif", nrow=cfg.sample.per_class, upscale=upscale)

    def log_values(self) -> dict:
        return {}

    def done_message(self) -> str:
        return f"samples in {self.run_dir / 'samples.png'}, trajectory {self.run_dir / 'trajectory.gif'}"


def _same_latents(old: dict, new: dict) -> None:
    """A resumed latent run trains on the latents it started on: the same encoding autoencoder and statistics."""
    changed = [k for k in ("autoencoder_sha256", "latent_shift", "latent_scale") if old.get(k) != new.get(k)]
    if changed:
        from ..config import ConfigError

        raise ConfigError(f"data.root={new['latents']} is not the latents this run trained on (its "
                          f"{', '.join(changed)} differ from RUN_DIR/latents.json: re-encoded?); resume with the "
                          f"file it trained on, or start a new run (another run_dir, or resume=none)")


def _fused_update_applies(device: torch.device) -> bool:
    """optim.fused_update=null: the one-pass update where it was measured and checked (NVIDIA GPUs, compiled
    Triton); elsewhere, ROCm or a machine without Triton, torch's fused AdamW and the lerps."""
    import archirf_kernels

    if device.type != "cuda" or torch.version.hip is not None or not archirf_kernels.HAS_TRITON:
        return False
    from archirf_kernels import optim as fused

    return not fused.INTERPRETED


def _check_fused_update(device: torch.device) -> None:
    from archirf_kernels import optim as fused

    if device.type != "cuda" and not fused.INTERPRETED:
        raise ConfigError(f"optim.fused_update runs a Triton kernel on CUDA; this run is on {device.type}: remove it")
