"""Running feature statistics and the Fréchet distance between two Gaussians."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist


class FeatureStats:
    """Σx, Σxxᵀ and the count of (N, D) feature batches, in float64 on the features' device.

    Each rank accumulates its own samples; `all_reduce()` sums the ranks' parts, after which every rank
    holds the statistics of the whole set, whatever the number of ranks or how it was chunked."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.dim = dim
        self.count = 0
        self.total = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def add(self, features: torch.Tensor) -> None:
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be (N, {self.dim}), got {tuple(features.shape)}")
        x = features.to(self.total.device, torch.float64)
        self.count += x.shape[0]
        self.total += x.sum(dim=0)
        self.outer += x.T @ x

    def all_reduce(self) -> None:
        """Sums every rank's part in place (a collective: every rank calls it)."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.total.device)
            for t in (count, self.total, self.outer):
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
            self.count = int(count.item())

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (D,), sigma (D, D)): the mean and the unbiased covariance, float64."""
        if self.count < 2:
            raise ValueError(f"feature statistics need at least 2 samples, got {self.count}")
        n = self.count
        mu = self.total / n
        sigma = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


# The statistics file (.npz): `mu`, `sigma` of the FID network (the names pytorch-fid and ADM use, so their
# files load too), optionally `dinov2_mu`, `dinov2_sigma`, and `features` (Inception features of an evenly
# spaced subset, for precision/recall); `count`; `info`, json saying what made it (networks, data, count).
_PREFIX = {"inception": "", "dinov2": "dinov2_"}


def save_statistics(path: str | Path, stats: dict[str, FeatureStats], info: dict,
                    features: Optional[torch.Tensor] = None) -> None:
    """Writes `stats` ({"inception": ..., "dinov2": ...}) and `info` to an .npz, whole or not at all."""
    arrays = {}
    for kind, s in stats.items():
        mu, sigma = s.mean_cov()
        arrays[f"{_PREFIX[kind]}mu"], arrays[f"{_PREFIX[kind]}sigma"] = mu, sigma
    if features is not None:
        arrays["features"] = features.float().cpu().numpy()
    count = next(iter(stats.values())).count
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, count=np.int64(count), info=json.dumps({**info, "count": count}, sort_keys=True), **arrays)
    tmp.replace(path)


def read_info(path: str | Path) -> dict:
    """The `info` a statistics file records ({} for files of other tools)."""
    with np.load(path, allow_pickle=False) as f:
        return json.loads(str(f["info"])) if "info" in f else {}


def load_statistics(path: str | Path, dim: Optional[int] = None, network: Optional[str] = None,
                    kind: str = "inception") -> tuple[np.ndarray, np.ndarray, dict]:
    """(mu, sigma, info) of a statistics file: ours, or any .npz with `mu` and `sigma` (pytorch-fid, ADM).
    ValueError naming both sides where the feature width or, when the file records it, the network differs."""
    mu_key, sigma_key = f"{_PREFIX[kind]}mu", f"{_PREFIX[kind]}sigma"
    try:
        with np.load(path, allow_pickle=False) as f:
            if mu_key not in f or sigma_key not in f:
                what = (f"no {kind} statistics ({mu_key}, {sigma_key}); compute them with archirf.eval ref "
                        f"--{kind} PATH" if kind != "inception" else "reference statistics need 'mu' and 'sigma'")
                raise ValueError(f"{path} holds {', '.join(f.files)}; {what}")
            mu, sigma = f[mu_key].astype(np.float64), f[sigma_key].astype(np.float64)
            info = json.loads(str(f["info"])) if "info" in f else {}
    except (OSError, EOFError) as err:
        raise ValueError(f"cannot read reference statistics {path}: {err}") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not a (D,) mean and a (D, D) covariance")
    if dim is not None and mu.shape[0] != dim:
        raise ValueError(f"{path} holds {mu.shape[0]}-d features, the feature network gives {dim}-d: the "
                         f"statistics come from another network")
    recorded = info.get("networks", {}).get(kind, info.get("network") if kind == "inception" else None)
    if network is not None and recorded not in (None, network):
        raise ValueError(f"{path} was computed with network {recorded}, this evaluation uses {network}: compute "
                         f"the reference with the same network (archirf.eval ref)")
    return mu, sigma, info


def load_features(path: str | Path) -> torch.Tensor:
    """The reference features a statistics file keeps for precision/recall; ValueError if it keeps none."""
    with np.load(path, allow_pickle=False) as f:
        if "features" not in f:
            raise ValueError(f"{path} keeps no features for precision/recall; compute it with archirf.eval ref "
                             f"--features N (e.g. 50000)")
        return torch.from_numpy(f["features"].astype(np.float32))


@torch.no_grad()
def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, block: int = 10_000) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): each set's manifold is the union of balls
    around its features with radius the distance to the k-th nearest other feature; precision is the share
    of fake features inside the real manifold, recall the share of real features inside the fake one.
    Distances in fp32 on the features' device, `block` rows at a time."""
    def radii(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= k:
            raise ValueError(f"precision/recall with k={k} needs more than {k} features per set, got {x.shape[0]}")
        return torch.cat([torch.cdist(r, x).kthvalue(k + 1, dim=1).values for r in x.split(block)])  # +1: itself

    def inside(points: torch.Tensor, centres: torch.Tensor, r: torch.Tensor) -> float:
        hits = [(torch.cdist(p, centres) <= r).any(dim=1) for p in points.split(block)]
        return torch.cat(hits).float().mean().item()

    real, fake = real.float(), fake.to(real.device).float()
    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """d² = |mu1 - mu2|² + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^½) (Heusel et al. 2017, Eq. 2), in float64.

    A singular product (fewer samples than dimensions) gets eps·I added to both covariances before the
    square root, as pytorch-fid does; an imaginary part beyond numerical noise is an error."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"shapes differ: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    import warnings

    import scipy.linalg             # here, not at the top: training runs import this module and never need it

    with warnings.catch_warnings():  # singular (fewer samples than dimensions): the finite check below decides
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(root).all():
        offset = np.eye(sigma1.shape[0]) * eps
        root = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(root):
        if not np.allclose(np.diagonal(root).imag, 0, atol=1e-3):
            raise ValueError(f"the covariances' product has a square root with imaginary part "
                             f"{np.max(np.abs(root.imag)):.3g}: the statistics are not valid covariances")
        root = root.real
    diff = mu1 - mu2
    return max(float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root)), 0.0)
