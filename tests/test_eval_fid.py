"""Feature statistics and the Fréchet distance: against closed forms, stable when singular, independent of
how the set is chunked or sharded."""

import json

import numpy as np
import pytest
import torch

from archirf.eval import FeatureStats, frechet_distance, load_statistics, save_statistics


def _trace_sqrt_of_product(a: np.ndarray, b: np.ndarray) -> float:
    """tr((A B)^½) = tr((A^½ B A^½)^½), through symmetric eigendecompositions only (no sqrtm)."""
    w, v = np.linalg.eigh(a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ b @ root_a), 0, None)).sum())


def _random_cov(rng, d: int) -> np.ndarray:
    m = rng.standard_normal((d, d))
    return m @ m.T / d + 0.1 * np.eye(d)


def test_diagonal_gaussians_match_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    s1, s2 = rng.uniform(0.1, 2, 16), rng.uniform(0.1, 2, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_full_covariances_match_the_closed_form():
    rng = np.random.default_rng(1)
    a, b = _random_cov(rng, 32), _random_cov(rng, 32)
    mu1, mu2 = rng.standard_normal(32), rng.standard_normal(32)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(a) + np.trace(b) - 2 * _trace_sqrt_of_product(a, b)
    assert frechet_distance(mu1, a, mu2, b) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu1, a, mu2, b) == pytest.approx(frechet_distance(mu2, b, mu1, a), rel=1e-8)


def test_singular_covariances_fewer_samples_than_dimensions():
    gen = torch.Generator().manual_seed(0)
    one, two = FeatureStats(64), FeatureStats(64)
    one.add(torch.randn(10, 64, generator=gen))
    two.add(torch.randn(10, 64, generator=gen) + 0.5)
    d = frechet_distance(*one.mean_cov(), *two.mean_cov())
    assert np.isfinite(d) and d > 0
    assert frechet_distance(*one.mean_cov(), *one.mean_cov()) == pytest.approx(0.0, abs=1e-5)


def test_statistics_are_the_mean_and_unbiased_covariance_whatever_the_chunking():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=gen, dtype=torch.float64) * torch.arange(1, 9) + 3
    whole, chunked = FeatureStats(8), FeatureStats(8)
    whole.add(x)
    for part in x.split([1, 120, 179]):
        chunked.add(part.float())                              # fp32 features are accumulated in fp64
    mu, sigma = whole.mean_cov()
    np.testing.assert_allclose(mu, x.mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.numpy(), rowvar=False), rtol=1e-10)
    np.testing.assert_allclose(chunked.mean_cov()[1], sigma, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"features must be \(N, 8\)"):
        whole.add(torch.zeros(3, 7))


def test_saved_statistics_load_and_a_mismatch_is_refused(tmp_path):
    stats = FeatureStats(4)
    stats.add(torch.randn(50, 4, generator=torch.Generator().manual_seed(0)))
    ours = tmp_path / "ref.npz"
    save_statistics(ours, {"inception": stats}, {"networks": {"inception": "inception-2015-12-05"}, "note": "test"})
    mu, sigma, info = load_statistics(ours, dim=4, network="inception-2015-12-05")
    np.testing.assert_array_equal(mu, stats.mean_cov()[0])
    assert info["networks"]["inception"] == "inception-2015-12-05" and info["count"] == 50
    with pytest.raises(ValueError, match="holds 4-d features, the feature network gives 2048-d"):
        load_statistics(ours, dim=2048)
    with pytest.raises(ValueError, match="computed with network inception-2015-12-05, this evaluation uses dinov2"):
        load_statistics(ours, network="dinov2")
    theirs = tmp_path / "pytorch_fid.npz"                       # pytorch-fid / ADM layout: mu and sigma only
    np.savez(theirs, mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
    assert load_statistics(theirs, dim=4, network="anything")[0].dtype == np.float64
    other = tmp_path / "other.npz"
    np.savez(other, arr_0=np.zeros(3))
    with pytest.raises(ValueError, match="need 'mu' and 'sigma'"):
        load_statistics(other)
    assert json.loads(json.dumps(info))                          # info is plain json


def test_statistics_of_two_ranks_equal_one(tmp_path):
    """gloo, 2 processes: each adds its half; after all_reduce both hold the whole set's statistics."""
    import torch.multiprocessing as mp

    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    whole = FeatureStats(6)
    whole.add(x)
    mp.spawn(_two_rank_worker, args=(str(tmp_path), x), nprocs=2, join=True)
    for rank in range(2):
        with np.load(tmp_path / f"rank{rank}.npz") as f:
            mu, sigma = f["mu"], f["sigma"]
        np.testing.assert_allclose(mu, whole.mean_cov()[0], rtol=1e-12)
        np.testing.assert_allclose(sigma, whole.mean_cov()[1], rtol=1e-10)


def _two_rank_worker(rank: int, folder: str, x: torch.Tensor) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    try:
        stats = FeatureStats(6)
        stats.add(x[rank::2])
        stats.all_reduce()
        assert stats.count == 40
        mu, sigma = stats.mean_cov()
        np.savez(f"{folder}/rank{rank}.npz", mu=mu, sigma=sigma)
    finally:
        dist.destroy_process_group()
