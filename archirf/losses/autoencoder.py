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

Departures from the reference (LDM's, which the seed copies):
- the reconstruction is computed once and reused (detached) by the discriminator step, where the reference
  ran the autoencoder forward again after the autoencoder's optimizer step: the discriminator trains on the
  reconstruction from before that step (one step older) and, for the KL latent, of the same posterior sample;
- LPIPS's convolutions run in the ambient precision (bf16 under precision=bf16; losses/lpips.py), the
  distances and the adaptive weight in fp32.
Changes that cost nothing in the result:
- before disc_start (f = 0) neither g, the adaptive weight nor the discriminator's loss is computed, where the
  reference computed them and multiplied by 0 (the task still steps the discriminator's optimizer with zero
  gradients, as the reference does);
- the adaptive weight's two gradients of the last layer's weight are computed from the layer's input and the
  gradients at its output in fp32 (`weight_from_output_grads`), never from the parameter itself, so they are
  the whole weight's gradient whatever FSDP2 holds on this rank;
- `generator_backward` backpropagates through LPIPS and the discriminator once each (for those two output
  gradients, which it then reuses for the autoencoder's backward), where the reference's two autograd.grad
  calls and its backward went through both twice. Tested equal to `generator(...).backward()` in float64.
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


def adaptive_weight(nll: torch.Tensor, g: torch.Tensor, x_hat: torch.Tensor, last_input: torch.Tensor,
                    last_layer: nn.Conv2d, disc_weight: float) -> torch.Tensor:
    """||dnll/dW|| / (||dg/dW|| + 1e-4), clamped to [0, 1e4], times disc_weight, detached (LDM's
    calculate_adaptive_weight), W = the weight of `last_layer`, the convolution that maps `last_input` to the
    reconstruction `x_hat`. See `weight_from_output_grads`."""
    dnll, dg = (torch.autograd.grad(t, x_hat, retain_graph=True)[0] for t in (nll, g))
    return weight_from_output_grads(dnll, dg, last_input, last_layer, disc_weight)


def weight_from_output_grads(dnll: torch.Tensor, dg: torch.Tensor, last_input: torch.Tensor, last_layer: nn.Conv2d,
                             disc_weight: float) -> torch.Tensor:
    """The adaptive weight from the two losses' gradients with respect to the reconstruction (the last layer's
    output): each is carried to W by the convolution's weight gradient, in fp32 -- the gradient autograd would
    give W, but computed from activations, so the weight may be sharded (FSDP2), compiled or wrapped. Each rank
    measures its own micro batch's gradients, as each GPU does in LDM's data-parallel training."""
    acc = torch.promote_types(last_input.dtype, torch.float32)          # fp32 at least (bf16 activations)
    h = last_input.detach().to(acc)
    out, inp, k = last_layer.out_channels, last_layer.in_channels // last_layer.groups, last_layer.kernel_size
    conv = dict(stride=last_layer.stride, padding=last_layer.padding, dilation=last_layer.dilation)
    if last_layer.groups == 1:      # both gradients in one weight-gradient convolution, stacked as output channels
        dw = torch.nn.grad.conv2d_weight(h, (2 * out, inp, *k), torch.cat([dnll, dg], dim=1).to(acc), **conv)
        norms = [dw[:out].norm(), dw[out:].norm()]
    else:
        norms = [torch.nn.grad.conv2d_weight(h, (out, inp, *k), dy.to(acc), groups=last_layer.groups, **conv).norm()
                 for dy in (dnll, dg)]
    return (norms[0] / (norms[1] + 1e-4)).clamp(0.0, 1e4).detach() * disc_weight


class AutoencoderLoss(nn.Module):
    """The generator and discriminator losses of one step; owns LPIPS (frozen) and the discriminator."""

    def __init__(self, weights: LossWeights, lpips: Optional[nn.Module], discriminator: PatchDiscriminator):
        super().__init__()
        if weights.reduction not in ("sum", "mean"):
            raise ValueError(f"loss reduction must be sum or mean (got {weights.reduction!r})")
        self.w, self.lpips, self.discriminator = weights, lpips, discriminator

    def gan_factor(self, images_seen: int) -> float:
        return self.w.disc_factor if images_seen >= self.w.disc_start else 0.0

    def _terms(self, x: torch.Tensor, out: dict[str, torch.Tensor], images_seen: int):
        """(nll, the weighted KL or variance term, g or None, metrics)."""
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
        if "logvar" in out:
            kl = AutoencoderKL.kl(out["mean"], out["logvar"]).mean()
            reg = w.kl_weight * kl
            metrics["kl"] = kl.detach()
        else:
            var = ClippedAutoencoder.variance_loss(out["z"])
            reg = w.var_weight * var
            metrics["var_loss"] = var.detach()
        metrics["nll"] = nll.detach()
        g = None
        if self.gan_factor(images_seen) > 0:
            logits = self.discriminator(x_hat)
            g = -logits.to(torch.promote_types(logits.dtype, torch.float32)).mean()        # fp32 at least
        if g is not None:
            metrics["g_loss"] = g.detach()
        return nll, reg, g, metrics

    def generator(self, x: torch.Tensor, out: dict[str, torch.Tensor], last_layer: nn.Conv2d,
                  images_seen: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(L_G, metrics) for the autoencoder's output `out` on images x, differentiable: the loss's definition
        (generator_backward computes its gradient with less work); metrics stay on the device."""
        x_hat = out["reconstruction"]
        x_hat = x_hat.to(torch.promote_types(x_hat.dtype, torch.float32))   # the adaptive weight's gradients in fp32
        nll, reg, g, metrics = self._terms(x, {**out, "reconstruction": x_hat}, images_seen)
        loss = nll + reg
        if g is not None:
            lam = adaptive_weight(nll, g, x_hat, out["last_input"], last_layer, self.w.disc_weight)
            loss = loss + lam * self.gan_factor(images_seen) * g
            metrics["adaptive_weight"] = lam
        return loss, metrics

    def generator_backward(self, x: torch.Tensor, out: dict[str, torch.Tensor], last_layer: nn.Conv2d,
                           images_seen: int, scale: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Accumulates the gradient of scale * L_G into the autoencoder; (L_G detached, metrics).

        With the GAN on, the adaptive weight needs dnll/dx_hat and dg/dx_hat (x_hat the reconstruction). Those
        two backward passes, through LPIPS and through the discriminator, are the only ones through them: the
        autoencoder's backward then starts from x_hat with dnll + lambda f dg (and from the KL or variance
        term), where LDM's autograd.grad calls on the weight and its loss.backward() go through LPIPS and the
        discriminator twice. Before disc_start: an ordinary backward.

        The two output gradients are taken at a detached fp32 copy of x_hat, so those two passes never reach the
        autoencoder's graph: under FSDP2 they would fire its backward hooks (a gather of the root, its end-of-
        backward callback) and leave the real backward without prefetching."""
        if self.gan_factor(images_seen) == 0:
            nll, reg, _, metrics = self._terms(x, out, images_seen)
            loss = nll + reg
            (loss * scale).backward()
            return loss.detach(), metrics
        x_hat = out["reconstruction"]
        acc = torch.promote_types(x_hat.dtype, torch.float32)
        leaf = x_hat.detach().to(acc).requires_grad_()        # fp32 at least: so are dnll and dg (bf16 x_hat)
        nll, reg, g, metrics = self._terms(x, {**out, "reconstruction": leaf}, images_seen)
        dnll, = torch.autograd.grad(nll, leaf)                # frees the graph behind it (L1, LPIPS) ...
        dg, = torch.autograd.grad(g, leaf)                    # ... and the discriminator's
        lam = weight_from_output_grads(dnll, dg, out["last_input"], last_layer, self.w.disc_weight)
        factor = self.gan_factor(images_seen)
        dx_hat = (dnll + (lam * factor) * dg) * scale
        torch.autograd.backward([x_hat, reg], [dx_hat.to(x_hat.dtype), torch.full_like(reg, scale)])
        metrics["adaptive_weight"] = lam
        return (nll + reg + lam * factor * g).detach(), metrics

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

