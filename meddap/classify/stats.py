"""Statistics for comparing real-only and real+synthetic classifiers across folds.

MEDDAP reports a paired t-test with p < 0.05 (section 4). Folds of a
cross-validation share most of their training images, so the fold scores are
not independent and the plain paired t-test is too liberal; we report it (to
compare with the paper) next to the Nadeau-Bengio corrected resampled t-test,
and Holm's step-down correction when many adjective x ratio conditions are
tested against one baseline. Every p-value travels with the name of its test.

Notation: a_j, b_j are the scores of the two conditions on fold j = 1..k,
d_j = a_j - b_j, d̄ = mean d_j, σ̂² = sum (d_j - d̄)² / (k - 1).

Paired t-test (Student; same as scipy.stats.ttest_rel, two-sided):

    t = d̄ / sqrt(σ̂² / k),   df = k - 1

Corrected resampled t-test (Nadeau & Bengio 2003, "Inference for the
Generalization Error", Machine Learning 52:239-281, corrected variance):

    t = d̄ / sqrt((1/k + n_test/n_train) σ̂²),   df = k - 1

with n_test / n_train the sizes of one fold's test and training sets. For
k-fold cross-validation n_test/n_train ≈ 1/(k-1) (Bouckaert & Frank 2004).

p = 2 · P(T_df > |t|). When σ̂² = 0: t = ±inf and p = 0 if d̄ ≠ 0, and t = p =
nan if d̄ = 0 (scipy's convention). With k < 2 there is no test: nan.

Several seeds (`compare_runs`): a score belongs to a run (fold f, seed s).
The paired t-test pairs the runs by (f, s) and has one d per pair. The
corrected test treats the folds as the resampling unit (the seeds of one fold
share its training and test images): each condition's scores are first
averaged over the seeds of the pairs within each fold, then the corrected
test runs over the k fold means. With one seed per fold both tests are the
single-seed ones above.

Accuracy difference with a 95% bootstrap interval (`paired_bootstrap_difference`):
the test images of all folds are pooled; image i has c_i^A, c_i^B in [0, 1]
(its correctness under each condition, averaged over seeds), d_i = c_i^A -
c_i^B, and the difference of accuracies is mean d_i. The images are resampled
with replacement (paired: one index draws both c_i^A and c_i^B), and the
interval is the percentile pair of the resampled means.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as _scipy_stats

PAIRED_T = "paired t-test (Student, two-sided; as MEDDAP)"
CORRECTED_T = "corrected resampled t-test (Nadeau & Bengio 2003, two-sided)"


@dataclass(frozen=True)
class TestResult:
    test: str          # the name of the test, reported with every p-value
    statistic: float   # t
    df: int
    pvalue: float
    mean_difference: float
    n_folds: int

    def as_dict(self) -> dict:
        return asdict(self)


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1) across folds; std is nan
    for a single fold."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan")


def _t_test(name: str, a, b, variance_factor) -> TestResult:
    """Two-sided t-test of mean d = a - b with Var(d̄) = variance_factor(k) · σ̂²."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.ndim != 1:
        raise ValueError(f"scores must be 1-d (one per fold); got shape {d.shape}")
    k = d.size
    if k < 2:
        return TestResult(name, float("nan"), max(k - 1, 0), float("nan"),
                          float(d.mean()) if k else float("nan"), k)
    mean, var = float(d.mean()), float(d.var(ddof=1))
    se = math.sqrt(variance_factor(k) * var)
    if se == 0.0:
        t = math.copysign(math.inf, mean) if mean != 0.0 else float("nan")
    else:
        t = mean / se
    p = float("nan") if math.isnan(t) else float(2.0 * _scipy_stats.t.sf(abs(t), k - 1))
    return TestResult(name, t, k - 1, p, mean, k)


def paired_t_test(a, b) -> TestResult:
    """Student's paired t-test of a vs b, matched by fold."""
    return _t_test(PAIRED_T, a, b, lambda k: 1.0 / k)


def corrected_resampled_t_test(a, b, n_train: int, n_test: int) -> TestResult:
    """Nadeau-Bengio corrected resampled t-test: Var(d̄) = (1/k + n_test/n_train) σ̂²."""
    if n_train <= 0 or n_test <= 0:
        raise ValueError(f"n_train ({n_train}) and n_test ({n_test}) must be positive")
    return _t_test(CORRECTED_T, a, b, lambda k: 1.0 / k + n_test / n_train)


def holm(pvalues) -> list[float]:
    """Holm (1979) step-down adjusted p-values, in the input's order.

    Sort p ascending, p_(1) <= ... <= p_(m); adjusted
    p̃_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)). Reject H_(i) at level α
    iff p̃_(i) <= α. nan p-values are left out of m and stay nan.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = valid.size
    order = valid[np.argsort(p[valid], kind="stable")]
    running = 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[j]))
        out[j] = running
    return out.tolist()


# ---------------------------------------------------------------- several seeds

Run = tuple[int, int]     # (fold, seed)


def compare_runs(a: dict[Run, float], b: dict[Run, float], n_train: int, n_test: int
                 ) -> dict[str, TestResult]:
    """`paired`: the paired t-test over the runs (fold, seed) both conditions
    have; `corrected`: the Nadeau-Bengio test over folds, each condition's
    scores averaged over those runs' seeds within each fold first."""
    runs = sorted(set(a) & set(b))
    folds = sorted({f for f, _ in runs})
    fold_a = [float(np.mean([a[r] for r in runs if r[0] == f])) for f in folds]
    fold_b = [float(np.mean([b[r] for r in runs if r[0] == f])) for f in folds]
    return {"paired": paired_t_test([a[r] for r in runs], [b[r] for r in runs]),
            "corrected": corrected_resampled_t_test(fold_a, fold_b, n_train, n_test)}


def paired_bootstrap_difference(correct_a, correct_b, n_boot: int = 1000, seed: int = 0,
                                level: float = 0.95) -> dict:
    """Difference of accuracies mean(c^A - c^B) over paired images c (N,) in
    [0, 1], with its percentile bootstrap interval (`n_boot` resamples of the
    images, numpy Generator PCG64 seeded with `seed`): {"difference", "ci": [lo, hi]}."""
    d = np.asarray(correct_a, dtype=np.float64) - np.asarray(correct_b, dtype=np.float64)  # (N,)
    if d.ndim != 1:
        raise ValueError(f"correctness must be 1-d (one per image); got shape {d.shape}")
    if d.size == 0:
        return {"difference": float("nan"), "ci": [float("nan"), float("nan")]}
    idx = np.random.default_rng(seed).integers(0, d.size, size=(n_boot, d.size))   # (B, N)
    means = d[idx].mean(axis=1)                                                    # (B,)
    lo, hi = (1 - level) / 2, (1 + level) / 2
    return {"difference": float(d.mean()),
            "ci": [float(np.quantile(means, lo)), float(np.quantile(means, hi))]}
