"""Evaluation: feature statistics and the Fréchet distance (FID) between two sets of features.

The statistics are running sums in float64 (sum of features, sum of their outer products, count: no
feature buffer, as EDM2 keeps them), reduced over ranks, saved as .npz with what produced them. The
distance is the Fréchet distance of two Gaussians with a float64 matrix square root (Heusel et al.
2017, Eq. 2).
"""

from .fid import FeatureStats, frechet_distance, load_statistics

__all__ = ["FeatureStats", "frechet_distance", "load_statistics"]
