"""Reconstruction metrics of an autoencoder: rFID, PSNR, SSIM over (original, reconstruction) pairs.

    metrics = ReconstructionMetrics(load_inception(device=device))
    for x in batches:                                  # [-1, 1] floats or uint8, (N, C, H, W)
        metrics.update(x, autoencoder(x))
    metrics.compute()                                  # {"rfid", "psnr", "ssim", "count"}, summed over ranks

rFID is the FID of the reconstructions against the statistics of their own originals (both measured
here, as in the LDM / SD-VAE papers' tables); PSNR and SSIM (Wang et al. 2004: Gaussian window 11,
sigma 1.5) are computed on the uint8 images, per image, and averaged, by torchmetrics.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .detectors import Detector
from .fid import FeatureStats, frechet_distance
from .sampling import to_uint8


class ReconstructionMetrics:
    def __init__(self, inception: Detector):
        self.inception = inception
        self.device = inception.device
        self.originals = FeatureStats(inception.dim, self.device)
        self.reconstructions = FeatureStats(inception.dim, self.device)
        self.sums = torch.zeros(3, dtype=torch.float64, device=self.device)     # PSNR, SSIM, images

    @torch.no_grad()
    def update(self, originals: torch.Tensor, reconstructions: torch.Tensor) -> None:
        from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

        a, b = (t if t.dtype == torch.uint8 else to_uint8(t) for t in (originals, reconstructions))
        a, b = a.to(self.device), b.to(self.device)
        if a.shape != b.shape:
            raise ValueError(f"originals {tuple(a.shape)} and reconstructions {tuple(b.shape)} differ in shape")
        self.originals.add(self.inception(a))
        self.reconstructions.add(self.inception(b))
        fa, fb = a.double(), b.double()
        psnr = peak_signal_noise_ratio(fb, fa, data_range=255.0, reduction="none", dim=(1, 2, 3))
        ssim = structural_similarity_index_measure(fb, fa, data_range=255.0, reduction="none")
        self.sums += torch.stack([psnr.sum(), ssim.sum(), torch.tensor(float(len(a)), device=self.device,
                                                                       dtype=torch.float64)])

    def compute(self) -> dict:
        """Every rank calls it (the statistics are summed over ranks); the running sums stay this rank's own."""
        import copy

        originals, reconstructions = copy.deepcopy(self.originals), copy.deepcopy(self.reconstructions)
        for s in (originals, reconstructions):
            s.all_reduce()
        sums = self.sums.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        psnr, ssim, n = sums.tolist()  # note: a CPU-GPU sync point
        return {"rfid": frechet_distance(*reconstructions.mean_cov(), *originals.mean_cov()),
                "psnr": psnr / n, "ssim": ssim / n, "count": int(n)}
