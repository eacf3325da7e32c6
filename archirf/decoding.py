"""A latent model's samples as images: the autoencoder that `model.autoencoder` names decodes them.

    decoder = LatentDecoder(cfg, device, dtype)      # cfg: the latent model's config
    images = decoder(samples)                        # model space (B, C, h, w) -> images in [-1, 1]

The samples are the model's data space, x = (latents - shift) * scale (data.latent_shift / latent_scale,
`auto` resolved from the latents file's statistics), so the decoder takes z = x / scale + shift. FID's
reference images are the ones archirf.encode recorded in the latents file (else the autoencoder's own data.*).
Refused
with one line: an autoencoder whose latent is not the model's data shape, or a latents file that another
autoencoder encoded (its metadata's snapshot hash).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import torch

from .config import Config, ConfigError


class LatentDecoder:
    def __init__(self, cfg: Config, device: torch.device, dtype: Optional[torch.dtype], *, compile: bool = False):
        from .encode import EncodeError, load_autoencoder
        from .eval.detectors import file_sha256

        path = cfg.model.autoencoder
        try:
            ae, ae_cfg, snapshot, _ = load_autoencoder(path, [])
        except (EncodeError, ConfigError) as err:
            raise ConfigError(f"model.autoencoder={path}: {err}") from None
        d = cfg.data
        want = (d.channels, d.resolution, d.resolution)
        if tuple(ae.latent_shape) != want:
            raise ConfigError(f"model.autoencoder={path}: its latents are {'x'.join(map(str, ae.latent_shape))} "
                              f"(C x h x w) but this model's data are {'x'.join(map(str, want))}; name the "
                              f"autoencoder that encoded data.root")
        self.sha256 = file_sha256(snapshot)
        scale, shift = d.latent_scale, d.latent_shift
        self.image_config = ae_cfg               # the images FID's reference is made of: the autoencoder's ...
        if d.source == "latents" and os.path.isfile(d.root):
            from .data.latents import latent_statistics
            from safetensors import safe_open

            with safe_open(d.root, framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("autoencoder_sha256") not in (None, self.sha256):
                raise ConfigError(f"model.autoencoder={path}: data.root={d.root} was encoded by another autoencoder "
                                  f"({meta.get('autoencoder')}); decode with that one")
            scale, shift, _ = latent_statistics(cfg)
            if "images" in meta:                 # ... or, better, the ones encoded into data.root (archirf.encode)
                images = json.loads(meta["images"])
                self.image_config = dataclasses.replace(ae_cfg, data=dataclasses.replace(
                    ae_cfg.data, source=images["source"], root=images["root"], resolution=images["resolution"],
                    channels=images["channels"]))
        elif "auto" in (scale, shift):
            raise ConfigError(f"data.latent_scale / latent_shift=auto: the statistics are read from the latents file "
                              f"data.root={d.root}, which is not there; put it back, or set the numbers (its "
                              f"channel_mean and 1 / channel_std) on the command line")
        as_tensor = lambda v: torch.tensor(v, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)  # noqa: E731
        self.scale, self.shift = as_tensor(scale), as_tensor(shift)
        self.model = ae.to(device)
        if compile:
            self.model.decoder.compile(dynamic=False)
        self.device, self.dtype = device, dtype
        self.channels, self.resolution = ae_cfg.data.channels, ae_cfg.data.resolution
        self.describe = json.dumps({"autoencoder": str(snapshot), "sha256": self.sha256[:16]})

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
        """(B, C, h, w) samples in the model's space -> (B, channels, R, R) fp32 images in [-1, 1], on x's device."""
        out = []
        for chunk in x.split(batch):
            z = chunk.to(self.device).float() / self.scale + self.shift
            with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                image = self.model.decode(z)
            out.append(image.float().clamp(-1, 1).to(x.device))
        return torch.cat(out)
