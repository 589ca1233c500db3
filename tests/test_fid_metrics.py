"""Fréchet distance and KID against pytorch-fid, closed forms and direct formulas."""
from __future__ import annotations

import numpy as np
import pytest
from pytorch_fid.fid_score import calculate_frechet_distance

from meddap.errors import MeddapError
from meddap.fid import SqrtMethod, feature_statistics, frechet_distance, frechet_distance_detail, kid
from meddap.fid.metrics import mmd2_unbiased, per_class


def gaussian_sets(n1, n2, d, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    a = rng.normal(size=(n1, d)) @ mix
    b = (rng.normal(size=(n2, d)) * 1.3 + 0.2) @ mix
    return a, b


def nuclear_norm_trace(a, b) -> float:
    """Tr((Σ₁Σ₂)^{1/2}) = ‖A_c B_cᵀ‖_* / √((n₁−1)(n₂−1)) for centred data A_c, B_c
    (the eigenvalues of Σ₁Σ₂ are the squared singular values of A_c B_cᵀ, scaled):
    an oracle that never forms a d×d square root."""
    ac, bc = a - a.mean(0), b - b.mean(0)
    s = np.linalg.svd(ac @ bc.T, compute_uv=False)
    return s.sum() / np.sqrt((a.shape[0] - 1) * (b.shape[0] - 1))


@pytest.mark.parametrize("n1,n2,d", [(300, 250, 32),     # full rank
                                     (20, 17, 64),       # rank-deficient: N < d
                                     (12, 12, 192)])
def test_equals_pytorch_fid(n1, n2, d):
    a, b = gaussian_sets(n1, n2, d)
    s1, s2 = feature_statistics(a), feature_statistics(b)
    expected = calculate_frechet_distance(*s1, *s2)
    for method in SqrtMethod:
        assert frechet_distance(*s1, *s2, method=method) == pytest.approx(expected, rel=1e-6)


def test_rank_deficient_is_exact():
    a, b = gaussian_sets(10, 14, 128, seed=3)
    (m1, s1), (m2, s2) = feature_statistics(a), feature_statistics(b)
    exact = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * nuclear_norm_trace(a, b)
    r = frechet_distance_detail(m1, s1, m2, s2)
    assert r.value == pytest.approx(exact, rel=1e-9)
    assert r.offset == 0.0 and r.rank <= 9 and r.dims == 128
    assert r.value == pytest.approx(r.mean_term + r.trace_term)


def test_schur_method_reports_its_offset(monkeypatch):
    """When sqrtm(Σ₁Σ₂) is not finite (older SciPy on singular products), the
    SCHUR path adds ε = 1e-6 to both diagonals as pytorch-fid does, and says so."""
    import scipy.linalg
    a, b = gaussian_sets(8, 8, 16, seed=8)
    (m1, s1), (m2, s2) = feature_statistics(a), feature_statistics(b)
    clean = frechet_distance_detail(m1, s1, m2, s2, method=SqrtMethod.SCHUR)
    assert clean.offset == 0.0
    real_sqrtm, calls = scipy.linalg.sqrtm, []

    def failing_once(m):
        calls.append(m)
        return np.full_like(m, np.inf) if len(calls) == 1 else real_sqrtm(m)
    monkeypatch.setattr(scipy.linalg, "sqrtm", failing_once)
    r = frechet_distance_detail(m1, s1, m2, s2, method=SqrtMethod.SCHUR)
    eps = np.eye(16) * 1e-6
    assert r.offset == 1e-6 and np.allclose(calls[1], (s1 + eps) @ (s2 + eps), rtol=0, atol=0)
    assert r.value == pytest.approx(clean.value, rel=1e-3)
    assert frechet_distance_detail(m1, s1, m2, s2).offset == 0.0   # EIGEN never needs one


def test_closed_forms():
    rng = np.random.default_rng(1)
    d = 16
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    x = rng.normal(size=(d, d))
    sigma = x @ x.T + np.eye(d)
    # equal covariances: the trace term vanishes, d² = ‖μ₁ − μ₂‖²
    assert frechet_distance(m1, sigma, m2, sigma) == pytest.approx(np.sum((m1 - m2) ** 2), rel=1e-9)
    # identical statistics: 0
    assert frechet_distance(m1, sigma, m1, sigma) == pytest.approx(0.0, abs=1e-9)
    # 1-D Gaussians: (μ₁ − μ₂)² + (σ₁ − σ₂)²
    assert frechet_distance(1.0, 4.0, -2.0, 0.25) == pytest.approx(9.0 + (2.0 - 0.5) ** 2)
    # commuting (diagonal) covariances: Σᵢ (√aᵢ − √bᵢ)²
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    assert frechet_distance(m1, np.diag(a), m1, np.diag(b)) == pytest.approx(
        np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-9)


def direct_kid(x, y) -> float:
    """Unbiased MMD² with k(x, y) = (xᵀy/d + 1)³, written as the O(n²) double sums."""
    d = x.shape[1]
    k = lambda u, v: (np.dot(u, v) / d + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return kxx + kyy - 2 * kxy


def test_kid_matches_direct_formula():
    a, b = gaussian_sets(15, 15, 8, seed=2)
    # one subset as large as the sets is a permutation of each set: the full estimate
    r = kid(a, b, num_subsets=100, subset_size=1000)
    assert (r.subset_size, r.num_subsets, r.std) == (15, 1, 0.0)
    assert r.mean == pytest.approx(direct_kid(a, b), rel=1e-10)
    a2, b2 = gaussian_sets(9, 13, 8, seed=4)               # unequal sizes
    assert mmd2_unbiased(a2, b2) == pytest.approx(direct_kid(a2, b2), rel=1e-10)


def test_kid_subsets_are_unbiased_and_seeded():
    rng = np.random.default_rng(5)
    same1, same2 = rng.normal(size=(200, 8)), rng.normal(size=(200, 8))
    r = kid(same1, same2, num_subsets=50, subset_size=50, seed=7)
    assert abs(r.mean) < 3 * r.std / np.sqrt(50) + 1e-3    # no bias for equal distributions
    assert kid(same1, same2, num_subsets=50, subset_size=50, seed=7) == r
    shifted = kid(same1, same2 + 1.0, num_subsets=50, subset_size=50, seed=7)
    assert shifted.mean > 10 * r.std


def test_per_class():
    a, b = gaussian_sets(12, 10, 4, seed=6)
    la = ["benign"] * 6 + ["malignant"] * 5 + ["normal"]
    lb = ["benign"] * 5 + ["malignant"] * 5
    out = per_class(a, la, b, lb, with_kid=True, num_subsets=3, subset_size=4)
    assert set(out) == {"benign", "malignant"}
    assert out["benign"]["fid"] == pytest.approx(frechet_distance(
        *feature_statistics(a[:6]), *feature_statistics(b[:5])))
    assert out["malignant"]["kid"]["subset_size"] == 4


def test_bad_input():
    with pytest.raises(MeddapError, match="at least 2 images"):
        feature_statistics(np.zeros((1, 8)), "generated/")
    with pytest.raises(MeddapError, match="statistics do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(MeddapError, match="NaN or inf"):
        frechet_distance(np.zeros(2), np.eye(2), np.array([0.0, np.nan]), np.eye(2))
    with pytest.raises(MeddapError, match="at least 2 images"):
        kid(np.zeros((1, 8)), np.zeros((5, 8)))
    with pytest.raises(MeddapError, match="same d"):
        kid(np.zeros((5, 8)), np.zeros((5, 9)))
