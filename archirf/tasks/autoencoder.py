"""The autoencoder task: an autoencoder (models/autoencoder.py) trained with LDM's loss (losses/autoencoder.py):
L1 + LPIPS, the KL or the clipped latent's variance term, and a PatchGAN with the adaptive weight once
`loss.disc_start` images are seen. Two optimizers (the autoencoder's AdamW with optim.*, the discriminator's
with loss.disc_lr), an EMA of the autoencoder, reconstruction grids and the loss terms' curves.

Per micro batch: the autoencoder's forward and the generator loss with the discriminator frozen (so the GAN
term's gradient reaches the autoencoder only, as Lightning's optimizer toggling does in LDM), its backward;
then, once the GAN is on, the discriminator's loss on the same reconstruction, detached, and its backward.
Both optimizers step once per optimizer step.

Both optimizers step every step (the discriminator's with zero gradients before disc_start, as LDM's). Metrics
of a skipped (non-finite) step are dropped; each is averaged over the steps that had it.

Scale-out as the generative task's: the autoencoder is compiled per unit (levels and middles) and sharded by
FSDP2 over several ranks; the discriminator and LPIPS are small, whole on every rank (the discriminator's
gradients averaged by one all-reduce a step), compiled whole. The adaptive weight is computed from activations
(losses/autoencoder.py), so it needs no gathered weight. With a fixed micro batch the steps do not depend on
the number of ranks (each rank's adaptive weight and variance term are its micro batch's, as in LDM's
data-parallel training), and a checkpoint resumes on any number of ranks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch

from .. import checkpoint as ckpt
from .. import parallel
from ..config import Config, ConfigError
from ..ema import EMA
from ..losses.autoencoder import AutoencoderLoss, LossWeights
from ..losses.discriminator import PatchDiscriminator
from ..optim import build_optimizer
from ..parallel import Env

_PICTURES = 8          # originals and reconstructions in each grid
_CURVES = [            # losses.png's panels: (title, keys on the left axis, keys on the right axis)
    ("reconstruction", ("l1", "lpips"), ("psnr",)),
    ("GAN", ("g_loss", "d_loss", "logits_real", "logits_fake"), ("adaptive_weight",)),
    ("latent", ("kl", "var_loss"), ("clip_fraction", "gain")),
]


class AutoencoderTask:
    def __init__(self, cfg: Config, env: Env, run_dir: Path, *, dtype: Optional[torch.dtype], compile: bool,
                 cuda_graph: bool = False):
        self.cfg, self.env, self.run_dir, self.dtype = cfg, env, run_dir, dtype
        device, loss = env.device, cfg.loss
        if loss.disc_norm == "batch" and env.world_size > 1:
            raise ConfigError(f"loss.disc_norm=batch on {env.world_size} ranks: BatchNorm's statistics are each "
                              f"rank's own, so the discriminator's replicas would drift apart; use loss.disc_norm=group")
        # The autoencoder as the generative models train: per-unit compile, FSDP2 over several ranks (bf16
        # gathers), rank 0's full initial copy as the EMA's eval model.
        self.model, self.eval_model = parallel.build_training_model(cfg, env, param_dtype=dtype, compile=compile)
        if self.eval_model is not None:
            self.eval_model = self.eval_model.to(device).eval().requires_grad_(False)
        # The discriminator is small (2.8M parameters at the default): a full copy on every rank, its gradients
        # averaged by one all-reduce a step (clip). The same initialisation on every rank.
        torch.manual_seed(cfg.seed + 1)
        self.discriminator = PatchDiscriminator(cfg.data.channels, loss.disc_channels, loss.disc_layers,
                                                loss.disc_norm).to(device)
        lpips = None
        if loss.perceptual_weight > 0:
            from ..losses.lpips import LPIPS, LPIPSError

            try:
                lpips = LPIPS(loss.lpips, loss.lpips_weights).to(device)
            except LPIPSError as err:
                raise ConfigError(f"loss.perceptual_weight={loss.perceptual_weight}: {err}") from None
        # MFU: the step's multiply-adds per image in forward units (the loop counts 6 FLOPs per forward multiply-add)
        self.flops_per_image = (step_macs(self.eval_model, lpips, self.discriminator, cfg.data.resolution,
                                          cfg.data.channels)["step"] // 3 if env.is_main else None)
        if compile:   # the frozen LPIPS network and the discriminator compile whole (their inputs' shapes are fixed)
            self.discriminator.compile(fullgraph=True)
            if lpips is not None:
                lpips.compile(fullgraph=True)
        weights = LossWeights(**{f.name: getattr(loss, f.name) for f in dataclasses.fields(LossWeights)})
        self.loss = AutoencoderLoss(weights, _RGB(lpips) if lpips is not None else None, self.discriminator)
        self.networks = [self.model, self.discriminator]
        self.optimizer = build_optimizer(self.model, cfg.optim, device)
        self.disc_optimizer = build_optimizer(self.discriminator, cfg.optim, device)
        self.disc_lr_ratio = (loss.disc_lr / cfg.optim.lr) if loss.disc_lr is not None else 1.0
        self.ema = EMA(self.model, half_life_images=cfg.ema.half_life_images, decay=cfg.ema.decay,
                       sigma_rel=cfg.ema.sigma_rel, start_images=cfg.ema.start_images)
        self.evaluation = None
        if cfg.eval.every:     # rFID, PSNR and SSIM of the EMA autoencoder while training (eval.ref: held-out images)
            from ..eval.training import ReconstructionEval

            self.evaluation = ReconstructionEval(cfg, env, run_dir, dtype=dtype, eval_model=self.eval_model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.images_seen = 0
        self.disc_stepped = False                  # whether this optimizer step gave the discriminator gradients
        self._step_sums: dict[str, torch.Tensor] = {}      # this optimizer step's metrics (dropped if skipped)
        self._sums: dict[str, tuple[torch.Tensor, int]] = {}  # since the last log line: (sum, steps that had it)
        self.pictures_x = _first_images(cfg, device) if env.is_main else None
        # cuda_graph: the micro batch's passes (everything forward_backward runs) as one CUDA graph per phase, before
        # and after disc_start (archirf/step_graph.py); the gradients stay the graphs' tensors, never unset
        self.step_graphs: Optional[dict[bool, object]] = {} if cuda_graph else None

    def describe(self) -> str:
        """Rank 0: the three networks, for the run's first line."""
        m = self.eval_model
        macs = m.flops_per_image()
        d = sum(p.numel() for p in self.discriminator.parameters())
        return (f"{type(m).__name__} {m.num_params() / 1e6:.2f}M params, {macs['encoder'] / 1e9:.3f} + "
                f"{macs['decoder'] / 1e9:.3f} G MACs/img (encoder + decoder), latent {m.latent_shape} | PatchGAN "
                f"{d / 1e6:.2f}M | LPIPS {self.cfg.loss.lpips if self.loss.lpips is not None else 'off'}")

    # -- one optimizer step -------------------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for group in self.disc_optimizer.param_groups:
            group["lr"] = lr * self.disc_lr_ratio

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, accum: int) -> torch.Tensor:
        gan = self.loss.gan_factor(self.images_seen) > 0
        if self.step_graphs is None:
            loss, metrics = self._passes(x, self.images_seen, accum)
        else:           # one micro batch per step (the trainer's rule): accum is 1
            if gan not in self.step_graphs:
                from ..step_graph import StepGraph

                self.step_graphs.clear()        # the phase before disc_start never comes back: free its graph
                self.step_graphs[gan] = StepGraph(
                    lambda x_, n=self.images_seen: self._passes(x_, n, 1),
                    self.params + list(self.discriminator.parameters()),
                    list(self.model.buffers()) + list(self.discriminator.buffers()))
            loss, metrics = self.step_graphs[gan](x)
        self.disc_stepped = self.disc_stepped or gan
        for key, value in metrics.items():                                        # this step's, until apply()
            value = value.detach().float() / accum
            self._step_sums[key] = self._step_sums[key] + value if key in self._step_sums else value
        return loss.detach().float()

    def _passes(self, x: torch.Tensor, images_seen: int, accum: int) -> tuple[torch.Tensor, dict]:
        """The autoencoder's forward, the generator loss's backward (the discriminator frozen), the discriminator's
        loss and backward once the GAN is on: (L_G, metrics), the gradients accumulated (scaled by 1 / accum)."""
        device = x.device
        with torch.autocast(device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None,
                            cache_enabled=self.step_graphs is None):
            self.discriminator.requires_grad_(False)
            out = self.model(x)
            loss, metrics = self.loss.generator_backward(x, out, self.last_layer, images_seen, 1.0 / accum)
            self.discriminator.requires_grad_(True)
            d = self.loss.discriminator_step(x, out["reconstruction"], images_seen)
            if d is not None:
                (d[0] / accum).backward()
                metrics.update(d[1])
        z = out["z"].detach().float()
        metrics.update(psnr=_psnr(x, out["reconstruction"]), latent_mean=z.mean(dim=(0, 2, 3)),
                       latent_std=z.std(dim=(0, 2, 3)))                           # per latent channel
        if "clip_fraction" in out:
            metrics.update(clip_fraction=out["clip_fraction"].detach(), gain=out["gain"])
        return loss.detach(), metrics

    @property
    def last_layer(self) -> torch.nn.Conv2d:
        return self.model.decoder.conv_out

    def clip(self) -> torch.Tensor:
        norm = parallel.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        if self.disc_stepped:
            parallel.all_reduce_mean_([p.grad for p in self.discriminator.parameters()])   # the replicas' average
            d = parallel.clip_grad_norm_(list(self.discriminator.parameters()), self.cfg.optim.grad_clip)
            norm = norm + 0 * d                          # a non-finite discriminator step skips the step too
        return norm

    def skip(self) -> None:
        if self.step_graphs is None:     # (under cuda_graph the gradients are the graph's: the next replay rewrites them)
            self.optimizer.zero_grad(set_to_none=True)
            self.disc_optimizer.zero_grad(set_to_none=True)
        self.disc_stepped = False
        self._step_sums = {}

    def apply(self, images_seen: int) -> None:
        """Both optimizers step. Before disc_start the discriminator's takes zero gradients, as LDM's does (its
        loss is 0 x the hinge there): Adam's state and step count then match the reference's, and exist from
        the first step, so a checkpoint taken before disc_start resumes exactly."""
        self.optimizer.step()
        if not self.disc_stepped:
            for p in self.discriminator.parameters():
                p.grad = torch.zeros_like(p)
        self.disc_optimizer.step()
        for key, value in self._step_sums.items():
            total, steps = self._sums.get(key, (0, 0))
            self._sums[key] = (total + value, steps + 1)
        self.skip()
        self.ema.update(self.model, images_seen, self.cfg.global_batch)
        self.images_seen = images_seen

    def log_values(self) -> dict:
        """The loss terms and latent statistics averaged over the steps since the last log line (a host sync)."""
        if not self._sums:
            return {}
        keys = sorted(self._sums)
        means = [self._sums[k][0] / self._sums[k][1] for k in keys]                # each over the steps it was in
        flat = torch.cat([m.reshape(-1) for m in means])
        flat = (parallel.all_reduce_sum(flat) / self.env.world_size).tolist()       # note: a CPU-GPU sync point
        out, at = {}, 0
        for key, m in zip(keys, means):                                             # per-channel values stay lists
            out[key] = flat[at] if m.dim() == 0 else flat[at:at + m.numel()]
            at += m.numel()
        self._sums = {}
        return out

    # -- state ---------------------------------------------------------------------------------------------
    def _state(self, loader, images_seen: int) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.model, self.optimizer)
        disc, disc_optim = get_state_dict(self.discriminator, self.disc_optimizer)
        state = {"model": model, "optimizer": optim, "discriminator": disc, "disc_optimizer": disc_optim,
                 "ema": self.ema.state_dict(), "loader": loader.state_dict(), "images_seen": images_seen}
        if self.evaluation is not None:
            state["eval"] = self.evaluation.state_dict()
        return state

    def load(self, path: Path, loader, verified: bool) -> int:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.state_dict import set_state_dict

        if not verified:
            ckpt.check_intact(path)
        expected = self._state(loader, 0)
        saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        for group in ("model", "discriminator"):      # DCP loads only what is asked for: compare both ways
            held = {k[len(group) + 1:] for k in saved if k.startswith(f"{group}.")}
            extra, missing = sorted(held - set(expected[group])), sorted(set(expected[group]) - held)
            if extra or missing:
                raise ValueError(f"checkpoint {path} does not fit this config: its {group} "
                                 f"{'has ' + extra[0] if extra else 'lacks ' + missing[0]} that the configured one "
                                 f"{'lacks' if extra else 'has'}; resume with the settings that wrote it (the run "
                                 f"dir's config.yaml, loss.disc_* included), or start over with resume=none")
        if "eval" in expected and not any(k.startswith("eval.") for k in saved):
            del expected["eval"]                      # evaluation switched on at this resume: no history yet
        state = ckpt.load_checkpoint(path, expected, verified=True)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        set_state_dict(self.discriminator, self.disc_optimizer, model_state_dict=state["discriminator"],
                       optim_state_dict=state["disc_optimizer"])
        self.ema.load_state_dict(state["ema"])
        loader.load_state_dict(state["loader"])
        if "eval" in state:
            self.evaluation.load_state_dict(state["eval"])
        self.images_seen = int(state["images_seen"])
        return self.images_seen

    def save(self, images: int, loader, config_yaml: str) -> Path:
        path = ckpt.save_checkpoint(self.run_dir, images, self._state(loader, images), self.cfg.keep_checkpoints)
        weights = self.ema.full_state_dict(keep=self.env.is_main)  # every rank joins the gather
        if self.env.is_main:
            buffers = {parallel.clean_fqn(n): b for n, b in self.model.named_buffers()}
            ckpt.save_snapshot(self.run_dir, images, {**buffers, **weights}, config_yaml)   # EMA autoencoder
        return path

    def set_aside_after(self, images_seen: int) -> None:
        """Rank 0, on resume: evaluations written past the checkpoint resumed from."""
        from ..metrics import set_aside_after

        if moved := set_aside_after(self.run_dir / "eval.jsonl", images_seen):
            print(f"archirf: moved the evaluations of images after {images_seen:,} to {moved}")

    # -- boundaries ----------------------------------------------------------------------------------------
    def posthoc_due(self, crossed, last: bool) -> bool:
        return False

    def save_posthoc(self, images_seen: int) -> None:
        pass

    def evaluation_due(self, crossed, last: bool) -> bool:
        return self.evaluation is not None and (crossed(self.cfg.eval.every) or last)

    def evaluate(self, images_seen: int) -> dict:
        """rFID, PSNR and SSIM of the EMA weights; every rank calls it."""
        return self.evaluation(self.ema, images_seen)

    def pictures(self, images: int, final: bool) -> None:
        """Originals (top row) above the EMA autoencoder's reconstructions, and the loss terms' curves so far
        (losses.png); every rank calls it."""
        from ..visualize import plot_metric_panels, save_grid

        weights = self.ema.full_state_dict(keep=self.env.is_main)  # every rank joins the gather; rank 0 draws
        if not self.env.is_main:
            return
        self.ema.copy_to(self.eval_model, weights)
        with torch.no_grad(), torch.autocast(self.env.device.type, dtype=self.dtype or torch.float32,
                                             enabled=self.dtype is not None):
            recon = self.eval_model(self.pictures_x, sample=False)["reconstruction"].float().clamp(-1, 1)
        grid = torch.cat([self.pictures_x, recon]).cpu()
        upscale = max(1, 64 // self.cfg.data.resolution)
        (self.run_dir / "samples").mkdir(exist_ok=True)
        save_grid(grid, self.run_dir / "samples" / f"images-{images:012d}.png", nrow=len(self.pictures_x),
                  upscale=upscale)
        if final:
            save_grid(grid, self.run_dir / "reconstructions.png", nrow=len(self.pictures_x), upscale=upscale)
        if (self.run_dir / "metrics.jsonl").exists():       # (none before the first log line)
            plot_metric_panels(self.run_dir / "metrics.jsonl", self.run_dir / "losses.png", _CURVES)

    def done_message(self) -> str:
        return (f"reconstructions in {self.run_dir / 'reconstructions.png'} (originals above), loss terms in "
                f"{self.run_dir / 'losses.png'}")


def step_macs(model, lpips, discriminator, resolution: int, channels: int) -> dict[str, int]:
    """Multiply-adds per image of one forward of each network, and of a training step with the GAN on:
    the autoencoder's forward and backward (3 forwards), LPIPS on x and x_hat and its backward to x_hat
    (3 one-image forwards), the discriminator's forward and backward to x_hat in the generator step and its
    forward on both and full backward in its own step (2 + 2 x 3 = 8 forwards). Before disc_start a step
    does less; MFU counts the step with the GAN on."""
    import copy

    from ..models.autoencoder import _count_macs

    macs = model.flops_per_image()
    ae = macs["encoder"] + macs["decoder"]
    d = _count_macs(copy.deepcopy(discriminator).to("meta"), (1, channels, resolution, resolution))
    p = 0
    if lpips is not None:
        net = copy.deepcopy(lpips).to("meta")
        p = _count_macs(_Features(net), (1, 3, resolution, resolution))
    return {"autoencoder": ae, "lpips": p, "discriminator": d, "step": 3 * ae + 3 * p + 8 * d}


class _Features(torch.nn.Module):
    def __init__(self, lpips):
        super().__init__()
        self.lpips = lpips

    def forward(self, x):
        return self.lpips.features(x)


class _RGB(torch.nn.Module):
    """LPIPS on grey images: the channel repeated to RGB."""

    def __init__(self, lpips):
        super().__init__()
        self.lpips = lpips

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        return self.lpips(x, y)


def _psnr(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean PSNR (dB) of the batch on the [-1, 1] scale (peak-to-peak 2)."""
    mse = (x.float() - x_hat.detach().float().clamp(-1, 1)).square().mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return (10 * torch.log10(4.0 / mse)).mean()


def _first_images(cfg: Config, device: torch.device) -> torch.Tensor:
    """The dataset's first images (unflipped, the training preprocessing): the same pictures in every grid."""
    from ..eval.reference import dataset_images

    _, batches = dataset_images(cfg, _PICTURES, 0, 1)
    _, images = next(iter(batches))
    return (images.float() / 127.5 - 1).to(device)
