"""A latent model's samples as images: the autoencoder that `model.autoencoder` names decodes them.

    decoder = LatentDecoder(cfg, device, dtype, record=read_record(run_dir_or_snapshot))
    images = decoder(samples)                        # model space (B, C, h, w) -> images in [-1, 1]

The samples are the model's data space, x = (latents - shift) * scale (data.latent_shift / latent_scale,
`auto` resolved from the latents file's statistics), so the decoder takes z = x / scale + shift.

A model trained on a file archirf.encode wrote keeps a record of it (`latent_record`): the encoding
autoencoder's snapshot and sha256, the shift and scale it trained with (numbers, `auto` resolved) and the
images encoded. Training writes it to RUN_DIR/latents.json with each checkpoint (a resume on latents that give
another record is refused) and into every snapshot's metadata ("latents"), so sampling and FID need neither
the latents file nor its statistics: the decoder uses the record's numbers, takes the recorded snapshot from
an autoencoder run dir while it is there, refuses an autoencoder whose snapshot hash is not the record's, and
FID's reference is the recorded images.
Without a record (a file of other origin) the numbers come from data.* and the file, as in training.
Refused with one line: an autoencoder whose latent is not the model's data shape, or one that did not encode
the model's latents.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

import torch

from .config import Config, ConfigError


class LatentDecoder:
    def __init__(self, cfg: Config, device: torch.device, dtype: Optional[torch.dtype], *, compile: bool = False,
                 record: Optional[dict] = None):
        from .encode import EncodeError, load_autoencoder
        from .eval.detectors import file_sha256

        path = cfg.model.autoencoder
        if record is None:
            record = latent_record(cfg)
        source = path
        if record is not None and Path(path).is_dir():  # an autoencoder run: the snapshot that encoded, if still there
            recorded = Path(path) / "snapshots" / Path(record["autoencoder"] or "").name
            source = recorded if recorded.is_file() else path
        try:
            ae, ae_cfg, snapshot, _ = load_autoencoder(source, [])
        except (EncodeError, ConfigError) as err:
            raise ConfigError(f"model.autoencoder={path}: {err}") from None
        d = cfg.data
        want = (d.channels, d.resolution, d.resolution)
        if tuple(ae.latent_shape) != want:
            raise ConfigError(f"model.autoencoder={path}: its latents are {'x'.join(map(str, ae.latent_shape))} "
                              f"(C x h x w) but this model's data are {'x'.join(map(str, want))}; name the "
                              f"autoencoder that encoded data.root")
        self.sha256 = file_sha256(snapshot)
        if record is not None:
            if record["autoencoder_sha256"] != self.sha256:
                raise ConfigError(f"model.autoencoder={path} is not the autoencoder that encoded this model's latents "
                                  f"({record['autoencoder']}, sha256 {record['autoencoder_sha256'][:16]}...; this "
                                  f"one's is {self.sha256[:16]}...); decode with that snapshot")
            scale, shift = record["latent_scale"], record["latent_shift"]
            images = record["images"]           # FID's reference: the images that were encoded
            self.image_config = dataclasses.replace(ae_cfg, data=dataclasses.replace(
                ae_cfg.data, source=images["source"], root=images["root"], resolution=images["resolution"],
                channels=images["channels"]))
        elif "auto" in (d.latent_scale, d.latent_shift):
            raise ConfigError(f"data.latent_scale / latent_shift=auto: the statistics are read from the latents file "
                              f"data.root={d.root}, which is not there; put it back, or set the numbers (its "
                              f"channel_mean and 1 / channel_std) on the command line")
        else:                                    # a latents file of other origin: data.*'s numbers, the AE's images
            scale, shift = d.latent_scale, d.latent_shift
            self.image_config = ae_cfg
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


def latent_record(cfg: Config) -> Optional[dict]:
    """What a model trained on cfg.data's latents needs to be decoded, when archirf.encode wrote the file: the
    autoencoder (snapshot path and sha256), the shift and scale as numbers, the images encoded and the file."""
    from safetensors import safe_open

    from .data.latents import latent_statistics

    d = cfg.data
    if d.source != "latents" or not d.root or not os.path.isfile(d.root):
        return None
    with safe_open(d.root, framework="pt") as f:
        meta = f.metadata() or {}
    if "autoencoder_sha256" not in meta or "images" not in meta:
        return None
    scale, shift, _ = latent_statistics(cfg)
    return {"autoencoder": meta.get("autoencoder"), "autoencoder_sha256": meta["autoencoder_sha256"],
            "latent_scale": scale, "latent_shift": shift, "images": json.loads(meta["images"]),
            "latents": os.path.abspath(d.root)}


def read_record(source: str | Path) -> Optional[dict]:
    """The latent record of a snapshot file (its metadata), a run dir or one of its checkpoints
    (RUN_DIR/latents.json); None where there is none."""
    path = Path(source)
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get("latents")
        if text is None and path.parent.name == "snapshots":       # a snapshot written without it: its run's
            return read_record(path.parent.parent)
    else:
        run = path.parent.parent if path.parent.name == "checkpoints" else path
        text = (run / "latents.json").read_text() if (run / "latents.json").is_file() else None
    return json.loads(text) if text else None


def with_autoencoder(cfg: Config, path: Optional[str]) -> Config:
    """cfg with model.autoencoder=path (a command's --autoencoder), or cfg itself for None."""
    if path is None:
        return cfg
    if cfg.data.source not in ("latents", "synthetic"):
        raise ConfigError(f"--autoencoder {path}: this model generates images (data.source={cfg.data.source}), not "
                          f"latents; leave --autoencoder out")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, autoencoder=str(path)))
