"""Precision, recall, density and coverage of a generated set against a real set.

FID mixes two questions: are the generated images realistic (fidelity), and
do they cover the real variety (diversity)? These four numbers answer them
separately, with k-nearest-neighbour balls in a feature space.

Notation (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for
Generative Models", arXiv 2002.09797, Section 3):

    X_1..X_N    real features, Y_1..Y_M fake features, rows of (N, D) and (M, D)
    NND_k(X_i)  euclidean distance from X_i to its k-th nearest neighbour among
                the other real points (X_i itself excluded); NND_k(Y_j) likewise
                among the other fake points
    B(x, r)     the open ball {z : |z - x| < r}
    manifold(X) = ∪_i B(X_i, NND_k(X_i))

    precision = 1/M Σ_j 1[Y_j ∈ manifold(X)]              (Kynkäänniemi et al. 2019,
    recall    = 1/N Σ_i 1[X_i ∈ manifold(Y)]               arXiv 1904.06991, Eq. 1-2)
    density   = 1/(kM) Σ_j Σ_i 1[Y_j ∈ B(X_i, NND_k(X_i))]   (Naeem et al. Eq. 3)
    coverage  = 1/N Σ_i 1[∃ j: Y_j ∈ B(X_i, NND_k(X_i))]      (Naeem et al. Eq. 4)

The ball is open (`<`), as in the authors' released code
(clovaai/generative-evaluation-prdc, prdc.py); with it, a set scored against
itself has density exactly 1 when no two distances tie (each X_i's ball then
holds X_i and its k - 1 nearer neighbours). Distances are computed in float64.
"""
from __future__ import annotations

import numpy as np

from meddap.errors import MeddapError

PRDC_K = 5                                                    # the k of Naeem et al. 2020's experiments
PRDC_NAMES = ("precision", "recall", "density", "coverage")


def kth_neighbour_distance(features: np.ndarray, k: int) -> np.ndarray:
    """features: (N, D) -> (N,) NND_k: the distance of each row to its k-th nearest other row."""
    from scipy.spatial.distance import cdist  # here, not at the top: every command's parser imports this module

    d = cdist(features, features)                          # (N, N) euclidean, float64
    np.fill_diagonal(d, np.inf)                            # the point itself is not its neighbour
    return np.partition(d, k - 1, axis=1)[:, k - 1]        # (N,) k-th smallest of the others


def prdc(real: np.ndarray, fake: np.ndarray, k: int = PRDC_K) -> dict[str, float]:
    """real: (N, D), fake: (M, D) -> {"precision", "recall", "density", "coverage"}
    (the formulas of the module docstring), each a float; density may exceed 1."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise MeddapError(f"PRDC needs two feature matrices (N, D) and (M, D) of one width D; got "
                          f"shapes {real.shape} and {fake.shape}.")
    if k < 1 or min(len(real), len(fake)) <= k:
        raise MeddapError(f"PRDC with k = {k} needs k >= 1 and more than k images in each set (the "
                          f"k-th neighbour excludes the point itself); got {len(real)} real and "
                          f"{len(fake)} fake images.")
    from scipy.spatial.distance import cdist  # here, not at the top: every command's parser imports this module

    nnd_real = kth_neighbour_distance(real, k)             # (N,) NND_k(X_i)
    nnd_fake = kth_neighbour_distance(fake, k)             # (M,) NND_k(Y_j)
    d = cdist(real, fake)                                  # (N, M) |X_i - Y_j|
    in_real_ball = d < nnd_real[:, None]                   # (N, M) Y_j ∈ B(X_i, NND_k(X_i))
    in_fake_ball = d < nnd_fake[None, :]                   # (N, M) X_i ∈ B(Y_j, NND_k(Y_j))
    return {"precision": float(in_real_ball.any(axis=0).mean()),
            "recall": float(in_fake_ball.any(axis=1).mean()),
            "density": float(in_real_ball.sum(axis=0).mean() / k),
            "coverage": float(in_real_ball.any(axis=1).mean())}
