"""The autoencoder task: an autoencoder (models/autoencoder.py) trained with LDM's loss (losses/autoencoder.py):
L1 + LPIPS, the KL or the clipped latent's variance term, and a PatchGAN with the adaptive weight once
`loss.disc_start` images are seen. Two optimizers (the autoencoder's AdamW with optim.*, the discriminator's
with loss.disc_lr), an EMA of the autoencoder, reconstruction grids.

Per micro batch: the autoencoder's forward and the generator loss with the discriminator frozen (so the GAN
term's gradient reaches the autoencoder only, as Lightning's optimizer toggling does in LDM), its backward;
then, once the GAN is on, the discriminator's loss on the same reconstruction, detached, and its backward.
Both optimizers step once per optimizer step.

Both optimizers step every step (the discriminator's with zero gradients before disc_start, as LDM's). Metrics
of a skipped (non-finite) step are dropped; each is averaged over the steps that had it.

One rank for now: several ranks (FSDP2 of the autoencoder, the adaptive weight over a sharded last layer)
are refused with a clear error until they are built and tested.
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


class AutoencoderTask:
    def __init__(self, cfg: Config, env: Env, run_dir: Path, *, dtype: Optional[torch.dtype], compile: bool):
        from ..models import build_model

        if cfg.compile == "on":
            raise ConfigError("compile=on: the autoencoder task runs eagerly for now (compiling it is not built "
                              "yet); set compile=auto or off")
        if env.world_size > 1 or cfg.parallel.shard_single_rank:
            raise ConfigError("model.name=autoencoder trains on one rank for now (FSDP2 of the autoencoder is not "
                              "built yet); launch one process (torchrun --nproc_per_node=1)")
        self.cfg, self.env, self.run_dir, self.dtype = cfg, env, run_dir, dtype
        device, loss = env.device, cfg.loss
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg).to(device)
        self.eval_model = build_model(cfg).to(device).eval().requires_grad_(False)      # EMA weights for pictures
        self.discriminator = PatchDiscriminator(cfg.data.channels, loss.disc_channels, loss.disc_layers,
                                                loss.disc_norm).to(device)
        lpips = None
        if loss.perceptual_weight > 0:
            from ..losses.lpips import LPIPS, LPIPSError

            try:
                lpips = LPIPS(loss.lpips, loss.lpips_weights).to(device)
            except LPIPSError as err:
                raise ConfigError(f"loss.perceptual_weight={loss.perceptual_weight}: {err}") from None
        weights = LossWeights(**{f.name: getattr(loss, f.name) for f in dataclasses.fields(LossWeights)})
        self.loss = AutoencoderLoss(weights, _RGB(lpips) if lpips is not None else None, self.discriminator)
        self.networks = [self.model, self.discriminator]
        self.optimizer = build_optimizer(self.model, cfg.optim, device)
        self.disc_optimizer = build_optimizer(self.discriminator, cfg.optim, device)
        self.disc_lr_ratio = (loss.disc_lr / cfg.optim.lr) if loss.disc_lr is not None else 1.0
        self.ema = EMA(self.model, half_life_images=cfg.ema.half_life_images, decay=cfg.ema.decay,
                       sigma_rel=cfg.ema.sigma_rel, start_images=cfg.ema.start_images)
        self.images_seen = 0
        self.disc_stepped = False                  # whether this optimizer step gave the discriminator gradients
        self._step_sums: dict[str, torch.Tensor] = {}      # this optimizer step's metrics (dropped if skipped)
        self._sums: dict[str, tuple[torch.Tensor, int]] = {}  # since the last log line: (sum, steps that had it)
        self.flops_per_image = None                # MFU: the 6 x forward rule does not hold for three networks
        self.pictures_x = _first_images(cfg, device)

    def describe(self) -> str:
        m = self.model
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
        device = x.device
        with torch.autocast(device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            self.discriminator.requires_grad_(False)
            out = self.model(x)
            loss, metrics = self.loss.generator(x, out, self.model.decoder.last_layer, self.images_seen)
            (loss / accum).backward()
            self.discriminator.requires_grad_(True)
            d = self.loss.discriminator_step(x, out["reconstruction"], self.images_seen)
            if d is not None:
                (d[0] / accum).backward()
                metrics.update(d[1])
                self.disc_stepped = True
        z = out["z"].detach().float()
        metrics.update(psnr=_psnr(x, out["reconstruction"]), latent_mean=z.mean(dim=(0, 2, 3)),
                       latent_std=z.std(dim=(0, 2, 3)))                           # per latent channel
        if "clip_fraction" in out:
            metrics.update(clip_fraction=out["clip_fraction"].detach(), gain=self.model.scale.detach())
        for key, value in metrics.items():                                        # this step's, until apply()
            value = value.detach().float() / accum
            self._step_sums[key] = self._step_sums[key] + value if key in self._step_sums else value
        return loss.detach().float()

    def clip(self) -> torch.Tensor:
        norm = parallel.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None],
                                        self.cfg.optim.grad_clip)
        if self.disc_stepped:
            d = parallel.clip_grad_norm_(list(self.discriminator.parameters()), self.cfg.optim.grad_clip)
            norm = norm + 0 * d                          # a non-finite discriminator step skips the step too
        return norm

    def skip(self) -> None:
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
        flat = torch.cat([m.reshape(-1) for m in means]).tolist()                   # note: a CPU-GPU sync point
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
        return {"model": model, "optimizer": optim, "discriminator": disc, "disc_optimizer": disc_optim,
                "ema": self.ema.state_dict(), "loader": loader.state_dict(), "images_seen": images_seen}

    def load(self, path: Path, loader, verified: bool) -> int:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        from torch.distributed.checkpoint import FileSystemReader

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
        state = ckpt.load_checkpoint(path, expected, verified=True)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        set_state_dict(self.discriminator, self.disc_optimizer, model_state_dict=state["discriminator"],
                       optim_state_dict=state["disc_optimizer"])
        self.ema.load_state_dict(state["ema"])
        loader.load_state_dict(state["loader"])
        self.images_seen = int(state["images_seen"])
        return self.images_seen

    def save(self, images: int, loader, config_yaml: str) -> Path:
        path = ckpt.save_checkpoint(self.run_dir, images, self._state(loader, images), self.cfg.keep_checkpoints)
        weights = self.ema.full_state_dict(keep=True)
        buffers = {parallel.clean_fqn(n): b for n, b in self.model.named_buffers()}
        ckpt.save_snapshot(self.run_dir, images, {**buffers, **weights}, config_yaml)   # EMA autoencoder
        return path

    def set_aside_after(self, images_seen: int) -> None:
        pass

    # -- boundaries ----------------------------------------------------------------------------------------
    def posthoc_due(self, crossed, last: bool) -> bool:
        return False

    def save_posthoc(self, images_seen: int) -> None:
        pass

    def evaluation_due(self, crossed, last: bool) -> bool:
        return False

    def pictures(self, images: int, final: bool) -> None:
        """Originals (top row) above the EMA autoencoder's reconstructions."""
        from ..visualize import save_grid

        self.ema.copy_to(self.eval_model)
        with torch.no_grad():
            recon = self.eval_model(self.pictures_x, sample=False)["reconstruction"].float().clamp(-1, 1)
        grid = torch.cat([self.pictures_x, recon]).cpu()
        upscale = max(1, 64 // self.cfg.data.resolution)
        (self.run_dir / "samples").mkdir(exist_ok=True)
        save_grid(grid, self.run_dir / "samples" / f"images-{images:012d}.png", nrow=len(self.pictures_x),
                  upscale=upscale)
        if final:
            save_grid(grid, self.run_dir / "reconstructions.png", nrow=len(self.pictures_x), upscale=upscale)

    def done_message(self) -> str:
        return f"reconstructions in {self.run_dir / 'reconstructions.png'} (originals above)"


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
