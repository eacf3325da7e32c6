"""The PatchGAN discriminator of pix2pix (Isola et al. 2017), as LDM / taming train autoencoders with it.

    Conv(3 -> 64, k4 s2) LReLU | [Conv(k4 s2, no bias) Norm LReLU] x (n_layers - 1) | Conv(k4 s1, no bias) Norm LReLU
    | Conv(-> 1, k4 s1): one logit per overlapping patch (30 x 30 for 256 px, 6 x 6 for 64 px)

Conv weights ~ N(0, 0.02), norm scales ~ N(1, 0.02) and biases 0 (taming's weights_init; conv biases keep
PyTorch's default). n_layers 3, ndf 64:
2,765,633 parameters.

The norm is GroupNorm (32 groups) by default, not the reference's BatchNorm: BatchNorm normalises each
rank's micro batch with that batch's statistics, so the discriminator would compute another function on
2 GPUs than on 1 (or with another micro batch, or under gradient accumulation). GroupNorm normalises each
image by itself: the same logits for any number of GPUs and any batching (tested). norm="batch" gives the
reference's layer, for reproducing it on one GPU.
"""

from __future__ import annotations

import torch
from torch import nn


class PatchDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "group"):
        super().__init__()
        if norm not in ("group", "batch"):
            raise ValueError(f"discriminator norm must be group or batch (got {norm!r})")

        def norm_layer(c: int) -> nn.Module:
            return nn.GroupNorm(32, c) if norm == "group" else nn.BatchNorm2d(c)

        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = ndf
        for n in range(1, n_layers + 1):
            out = ndf * min(2 ** n, 8)
            layers += [nn.Conv2d(width, out, 4, 2 if n < n_layers else 1, 1, bias=False), norm_layer(out),
                       nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):                                    # (conv biases: PyTorch's default)
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)                                                 # (B, 1, h, w) patch logits


def discriminator_loss(real: torch.Tensor, fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """0.5 (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))]) (hinge) or the softplus (vanilla) form; fp32."""
    real, fake = real.float(), fake.float()
    if kind == "hinge":
        return 0.5 * (torch.relu(1.0 - real).mean() + torch.relu(1.0 + fake).mean())
    if kind == "vanilla":
        return 0.5 * (nn.functional.softplus(-real).mean() + nn.functional.softplus(fake).mean())
    raise ValueError(f"discriminator loss must be hinge or vanilla (got {kind!r})")
