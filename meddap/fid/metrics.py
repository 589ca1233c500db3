"""Fréchet distance and kernel inception distance of two feature sets, in float64.

FID (Heusel et al. 2017, arXiv 1706.08500) is the Fréchet (2-Wasserstein)
distance between Gaussians fitted to the features (Dowson & Landau 1982):

    d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2})

KID (Bińkowski et al. 2018, arXiv 1801.01401, "Kernel Inception Distance") is
the unbiased squared MMD with the cubic polynomial kernel
k(x, y) = (xᵀy / d + 1)³, averaged over random subsets. Unlike FID it has no
bias from the sample size, which matters for a few hundred images per class.
"""
from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass

import numpy as np

from meddap.errors import MeddapError

# pytorch-fid / TTUR: added to both diagonals when sqrtm of the product fails.
SQRTM_OFFSET = 1e-6
# KID defaults of Bińkowski et al.'s reference code and torch-fidelity.
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_DEGREE = 3


class SqrtMethod(enum.Enum):
    """How Tr((Σ₁Σ₂)^{1/2}) is computed.

    EIGEN: Σ₁Σ₂ is similar to the symmetric PSD matrix A = Σ₁^{1/2} Σ₂ Σ₁^{1/2},
      so the trace is Σᵢ √λᵢ(A), with both eigen-decompositions symmetric
      (eigh) and round-off negatives clipped to 0. Exact for singular
      covariances (N ≤ dims); never needs an offset.
    SCHUR: scipy.linalg.sqrtm of Σ₁Σ₂, and if that is not finite, of
      (Σ₁ + εI)(Σ₂ + εI) with ε = 1e-6: pytorch-fid's and TTUR's algorithm.
    """
    EIGEN = "eigen"
    SCHUR = "schur"


@dataclass(frozen=True)
class FrechetResult:
    value: float          # d²
    mean_term: float      # ‖μ₁ − μ₂‖²
    trace_term: float     # Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^{1/2})
    method: SqrtMethod
    offset: float         # ε added to the diagonals (SCHUR fallback), else 0
    rank: int | None      # numerical rank of Σ₁Σ₂ (EIGEN only); < dims: singular
    dims: int


def feature_statistics(features: np.ndarray, name: str = "feature set") -> tuple[np.ndarray, np.ndarray]:
    """features (N, d) -> μ (d,), Σ (d, d) in float64 (Σ with the 1/(N−1) normalisation)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise MeddapError(f"{name} has {features.shape[0] if features.ndim else 0} image(s); "
                          f"a mean and covariance need at least 2 images.")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _check_stats(mu1, sigma1, mu2, sigma2):
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu1.shape != mu2.shape or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise MeddapError(f"statistics do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, "
                          f"mu2 {mu2.shape}, sigma2 {sigma2.shape}; expected (d,) and (d, d) "
                          f"with the same d for both sets.")
    if not all(np.isfinite(x).all() for x in (mu1, sigma1, mu2, sigma2)):
        raise MeddapError("statistics contain NaN or inf: the features are not finite "
                          "(a broken weights file, or images that overflow the network).")
    return mu1, sigma1, mu2, sigma2


def _nonzero(eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with round-off set to 0: those at or below
    numpy.linalg.matrix_rank's tolerance λ_max·d·eps (√ would amplify them)."""
    tol = max(eigenvalues.max(initial=0.0), 0.0) * eigenvalues.shape[0] * np.finfo(np.float64).eps
    return np.where(eigenvalues > tol, eigenvalues, 0.0)


def _trace_sqrt_eigen(sigma1, sigma2) -> tuple[float, int]:
    """Tr((Σ₁Σ₂)^{1/2}) = Σᵢ √λᵢ(Σ₁^{1/2} Σ₂ Σ₁^{1/2}), and the rank of Σ₁Σ₂."""
    w, v = np.linalg.eigh(sigma1)                       # Σ₁ = v diag(w) vᵀ
    root1 = (v * np.sqrt(_nonzero(w))) @ v.T            # Σ₁^{1/2}, (d, d)
    a = root1 @ sigma2 @ root1                          # (d, d), symmetric PSD
    lam = _nonzero(np.linalg.eigvalsh((a + a.T) / 2))
    return float(np.sqrt(lam).sum()), int(np.count_nonzero(lam))


def _trace_sqrt_schur(sigma1, sigma2) -> tuple[float, float]:
    """pytorch-fid's calculate_frechet_distance, step for step (returns trace, offset)."""
    from scipy import linalg  # here, not at the top: every command's parser imports this module

    offset = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)   # "matrix is singular" noise
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = SQRTM_OFFSET
            eye = np.eye(sigma1.shape[0]) * offset
            covmean = linalg.sqrtm((sigma1 + eye) @ (sigma2 + eye))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise MeddapError(f"the matrix square root has an imaginary part of "
                              f"{np.abs(covmean.imag).max():.3g}; the covariances are not "
                              f"positive semi-definite. Use SqrtMethod.EIGEN.")
        covmean = covmean.real
    return float(np.trace(covmean)), offset


def frechet_distance_detail(mu1, sigma1, mu2, sigma2,
                            method: SqrtMethod = SqrtMethod.EIGEN) -> FrechetResult:
    """d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^{1/2}), with its parts and diagnostics."""
    mu1, sigma1, mu2, sigma2 = _check_stats(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    mean_term = float(diff @ diff)
    if method is SqrtMethod.EIGEN:
        (tr_covmean, rank), offset = _trace_sqrt_eigen(sigma1, sigma2), 0.0
    else:
        (tr_covmean, offset), rank = _trace_sqrt_schur(sigma1, sigma2), None
    trace_term = float(np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
    return FrechetResult(value=mean_term + trace_term, mean_term=mean_term, trace_term=trace_term,
                         method=method, offset=offset, rank=rank, dims=mu1.shape[0])


def frechet_distance(mu1, sigma1, mu2, sigma2, method: SqrtMethod = SqrtMethod.EIGEN) -> float:
    """The Fréchet distance d² between N(μ₁, Σ₁) and N(μ₂, Σ₂), float64."""
    return frechet_distance_detail(mu1, sigma1, mu2, sigma2, method).value


@dataclass(frozen=True)
class KIDResult:
    mean: float          # mean over subsets of the unbiased MMD²
    std: float           # standard deviation over subsets
    num_subsets: int
    subset_size: int


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = KID_DEGREE) -> np.ndarray:
    """k(x, y) = (xᵀy / d + 1)^degree; x (m, d), y (n, d) -> (m, n)."""
    return (x @ y.T / x.shape[1] + 1.0) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int = KID_DEGREE) -> float:
    """Unbiased MMD² (Gretton et al. 2012, JMLR 13, Eq. 3):
    Σ_{i≠j} k(xᵢ,xⱼ)/(m(m−1)) + Σ_{i≠j} k(yᵢ,yⱼ)/(n(n−1)) − 2 Σ k(xᵢ,yⱼ)/(mn)."""
    m, n = x.shape[0], y.shape[0]
    kxx = polynomial_kernel(x, x, degree)              # (m, m)
    kyy = polynomial_kernel(y, y, degree)              # (n, n)
    kxy = polynomial_kernel(x, y, degree)              # (m, n)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
                 + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kid(features1: np.ndarray, features2: np.ndarray, num_subsets: int = KID_SUBSETS,
        subset_size: int = KID_SUBSET_SIZE, degree: int = KID_DEGREE, seed: int = 0) -> KIDResult:
    """KID: unbiased MMD² between random subsets of `subset_size` (capped at the
    smaller set) drawn without replacement from each set, `num_subsets` times.
    When the subsets are both whole sets, the one exact value is returned
    (num_subsets 1, std 0)."""
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise MeddapError(f"KID needs two feature arrays (N, d) of the same d; "
                          f"got {f1.shape} and {f2.shape}.")
    m = min(subset_size, f1.shape[0], f2.shape[0])
    if m < 2:
        raise MeddapError(f"KID needs at least 2 images in each set; got {f1.shape[0]} and {f2.shape[0]}.")
    if num_subsets < 1:
        raise MeddapError(f"KID needs at least one subset; got {num_subsets}.")
    if m == f1.shape[0] == f2.shape[0]:
        # every draw would be a permutation of both whole sets: one exact value
        return KIDResult(mean=mmd2_unbiased(f1, f2, degree), std=0.0, num_subsets=1, subset_size=m)
    rng = np.random.default_rng(seed)
    values = np.array([
        mmd2_unbiased(f1[rng.choice(f1.shape[0], m, replace=False)],
                      f2[rng.choice(f2.shape[0], m, replace=False)], degree)
        for _ in range(num_subsets)])
    return KIDResult(mean=float(values.mean()), std=float(values.std()),
                     num_subsets=num_subsets, subset_size=m)


def per_class(features1: np.ndarray, labels1: list[str], features2: np.ndarray, labels2: list[str],
              *, with_kid: bool = False, **kid_kwargs) -> dict[str, dict]:
    """FID (and KID) per class present in both sets: {class: {fid, n1, n2[, kid]}}.

    A class with fewer than 2 images on a side gets {"error": reason} instead.
    """
    labels1, labels2 = np.asarray(labels1), np.asarray(labels2)
    out: dict[str, dict] = {}
    for c in sorted(set(labels1.tolist()) & set(labels2.tolist())):
        a, b = features1[labels1 == c], features2[labels2 == c]
        entry: dict = {"n1": int(a.shape[0]), "n2": int(b.shape[0])}
        if min(a.shape[0], b.shape[0]) < 2:
            entry["error"] = "fewer than 2 images on one side"
        else:
            entry["fid"] = frechet_distance(*feature_statistics(a), *feature_statistics(b))
            if with_kid:
                r = kid(a, b, **kid_kwargs)
                entry["kid"] = {"mean": r.mean, "std": r.std, "subset_size": r.subset_size,
                                "num_subsets": r.num_subsets}
        out[c] = entry
    return out
