"""Evaluation: FID, FD-DINOv2, precision/recall of sample sets, and reconstruction metrics.

    python -m archirf.eval ref --config RECIPE --out ref.npz        # reference statistics of a dataset
    python -m archirf.eval fid RUN_DIR --ref ref.npz --samples 50000    # FID of a model (torchrun: sharded)

Statistics are running sums in float64 (sum of features, sum of their outer products, count: no
feature buffer, as EDM2 keeps them), summed over ranks, saved as .npz with what produced them. The
distance is the Fréchet distance of two Gaussians with a float64 matrix square root (Heusel et al.
2017, Eq. 2). docs/evaluation.md says which networks and preprocessing the numbers use.
"""

from .detectors import DetectorError, load_dinov2, load_inception
from .evaluate import Evaluator, evaluate_model
from .fid import FeatureStats, frechet_distance, load_statistics, precision_recall, save_statistics
from .recon import ReconstructionMetrics
from .reference import EvalError, compute_reference
from .sampling import sample_set, to_uint8

__all__ = ["DetectorError", "EvalError", "Evaluator", "FeatureStats", "ReconstructionMetrics", "compute_reference",
           "evaluate_model", "frechet_distance", "load_dinov2", "load_inception", "load_statistics",
           "precision_recall", "sample_set", "save_statistics", "to_uint8"]
