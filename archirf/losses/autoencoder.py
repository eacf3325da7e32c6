"""The autoencoder loss of LDM (`LPIPSWithDiscriminator`), with the clipped autoencoder's variance term.

Generator (autoencoder) step, per image, then averaged over the batch:

    rec  = |x - x_hat| + w_p LPIPS(x, x_hat)                 # LPIPS broadcast over the pixels
    nll  = rec / e^logvar + logvar                           # logvar = 0 and frozen, as LDM trains it
    nll  = sum over (C, H, W) (reduction="sum", LDM)  or  mean (reduction="mean", the seed)
    L_G  = nll + w_kl KL(q(z|x) || N(0, I))                  # KL autoencoder (LDM: w_kl = 1e-6 with the sum)
         | nll + w_var |std(z) - 1|                          # clipped autoencoder (seed: w_var = 0.01 with the mean)
         + lambda f g,   g = -E[D(x_hat)]
    lambda = clamp(||dnll/dW|| / (||dg/dW|| + 1e-4), 0, 1e4) * disc_weight,   W = the decoder's last conv weight
    f    = disc_factor once disc_start images are seen, else 0

Discriminator step: f * (hinge or vanilla loss of D(x) and D(x_hat.detach())).

Two changes that cost nothing in the result: the reconstruction is computed once and reused (detached) by the
discriminator step, where the reference ran the autoencoder forward twice; and before disc_start (f = 0)
neither g, the adaptive weight nor the discriminator's loss is computed, where the reference computed them and
multiplied by 0 (the task still steps the discriminator's optimizer with zero gradients, as the reference
does). The adaptive weight's gradient norms are taken in fp32 over the whole weight (a DTensor gradient is
gathered; the autoencoder task does not run sharded yet, so that path is untested).
The KL and variance weights depend on the reduction: with "mean" the reconstruction term is 3 H W times
smaller, so w_kl = 1e-6 of the sum becomes ~1e-6 * 3 H W relative to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..models.autoencoder import AutoencoderKL, ClippedAutoencoder
from .discriminator import PatchDiscriminator, discriminator_loss


@dataclass
class LossWeights:
    perceptual_weight: float = 1.0
    reduction: str = "sum"                    # sum (LDM) | mean (per-pixel, the seed)
    kl_weight: float = 1e-6                   # KL autoencoder
    var_weight: float = 0.01                  # clipped autoencoder
    disc_start: int = 50_000                  # images before the GAN terms switch on
    disc_factor: float = 1.0
    disc_weight: float = 0.5
    disc_loss: str = "hinge"                  # hinge | vanilla


def adaptive_weight(nll: torch.Tensor, g: torch.Tensor, last_layer: torch.Tensor, disc_weight: float) -> torch.Tensor:
    """||dnll/dW|| / (||dg/dW|| + 1e-4), clamped to [0, 1e4], times disc_weight, detached (LDM Eq. in
    calculate_adaptive_weight), in fp32 over the whole weight."""
    grads = [torch.autograd.grad(t, last_layer, retain_graph=True)[0] for t in (nll, g)]
    n_nll, n_g = (_full(t).float().norm() for t in grads)
    return (n_nll / (n_g + 1e-4)).clamp(0.0, 1e4).detach() * disc_weight


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


class AutoencoderLoss(nn.Module):
    """The generator and discriminator losses of one step; owns LPIPS (frozen) and the discriminator."""

    def __init__(self, weights: LossWeights, lpips: Optional[nn.Module], discriminator: PatchDiscriminator):
        super().__init__()
        if weights.reduction not in ("sum", "mean"):
            raise ValueError(f"loss reduction must be sum or mean (got {weights.reduction!r})")
        self.w, self.lpips, self.discriminator = weights, lpips, discriminator

    def gan_factor(self, images_seen: int) -> float:
        return self.w.disc_factor if images_seen >= self.w.disc_start else 0.0

    def generator(self, x: torch.Tensor, out: dict[str, torch.Tensor], last_layer: torch.Tensor,
                  images_seen: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(L_G, metrics) for the autoencoder's output `out` on images x; metrics stay on the device."""
        w = self.w
        x_hat = out["reconstruction"]
        l1 = (x.float() - x_hat.float()).abs()                                      # (B, C, H, W)
        rec = l1
        metrics = {"l1": l1.mean().detach()}
        if self.lpips is not None and w.perceptual_weight > 0:
            p = self.lpips(x, x_hat)                                                 # (B,)
            rec = rec + w.perceptual_weight * p.reshape(-1, 1, 1, 1)
            metrics["lpips"] = p.mean().detach()
        per_image = rec.sum(dim=(1, 2, 3)) if w.reduction == "sum" else rec.mean(dim=(1, 2, 3))
        nll = per_image.mean()                                                       # logvar = 0 (frozen, LDM)
        loss = nll
        if "logvar" in out:
            kl = AutoencoderKL.kl(out["mean"], out["logvar"]).mean()
            loss = loss + w.kl_weight * kl
            metrics["kl"] = kl.detach()
        else:
            var = ClippedAutoencoder.variance_loss(out["z"])
            loss = loss + w.var_weight * var
            metrics["var_loss"] = var.detach()
        factor = self.gan_factor(images_seen)
        if factor > 0:
            logits = self.discriminator(x_hat)
            g = -logits.float().mean()
            lam = adaptive_weight(nll, g, last_layer, w.disc_weight)
            loss = loss + lam * factor * g
            metrics.update(g_loss=g.detach(), adaptive_weight=lam)
        metrics["nll"] = nll.detach()
        return loss, metrics

    def discriminator_step(self, x: torch.Tensor, x_hat: torch.Tensor,
                           images_seen: int) -> Optional[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """(L_D, metrics), x_hat being the generator step's reconstruction (detached here); None before
        disc_start, where the reference's loss is 0 times the hinge: nothing to compute or step."""
        factor = self.gan_factor(images_seen)
        if factor == 0:
            return None
        real, fake = self.discriminator(x), self.discriminator(x_hat.detach())
        loss = factor * discriminator_loss(real, fake, self.w.disc_loss)
        return loss, {"d_loss": loss.detach(), "logits_real": real.float().mean().detach(),
                      "logits_fake": fake.float().mean().detach()}

