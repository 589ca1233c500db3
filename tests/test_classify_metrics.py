"""Metrics against scikit-learn, specificity by hand, t-tests against scipy and
their formulas, Holm against a worked example."""
import math

import numpy as np
import pytest
from scipy import stats as sps
from sklearn import metrics as skm

from meddap.classify.metrics import bootstrap_ci, compute_metrics, summary_from_confusion
from meddap.classify.stats import (CORRECTED_T, PAIRED_T, corrected_resampled_t_test, holm,
                                   mean_std, paired_t_test)


def _sk(y_true, y_pred, labels):
    p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                      average="macro", zero_division=0)
    return p, r, f


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_sklearn_random(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 3, 60)
    y_pred = np.where(rng.random(60) < 0.6, y_true, rng.integers(0, 3, 60))
    m = compute_metrics(y_true, y_pred, 3)
    p, r, f = _sk(y_true, y_pred, [0, 1, 2])
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred), abs=1e-12)
    assert m["precision"] == pytest.approx(p, abs=1e-12)
    assert m["sensitivity"] == pytest.approx(r, abs=1e-12)
    assert m["f1"] == pytest.approx(f, abs=1e-12)
    assert m["confusion"] == skm.confusion_matrix(y_true, y_pred, labels=[0, 1, 2]).tolist()


def test_class_never_predicted_and_absent_class():
    y_true = [0, 0, 1, 1, 2, 2, 2]
    y_pred = [0, 1, 1, 1, 0, 1, 1]          # class 2 never predicted
    m = compute_metrics(y_true, y_pred, 3)
    p, r, f = _sk(y_true, y_pred, [0, 1, 2])
    assert (m["precision"], m["sensitivity"], m["f1"]) == pytest.approx((p, r, f), abs=1e-12)
    assert m["per_class"][2]["precision"] == 0.0   # 0/0 counts as 0
    # class 3 of a 4-class model absent from y_true: macro over all 4 labels, as sklearn
    m4 = compute_metrics(y_true, y_pred, 4)
    p, r, f = _sk(y_true, y_pred, [0, 1, 2, 3])
    assert (m4["precision"], m4["sensitivity"], m4["f1"]) == pytest.approx((p, r, f), abs=1e-12)
    # macro over the data's labels only (cross-dataset scoring)
    ms = compute_metrics(y_true, y_pred, 4, labels=[0, 1, 2])
    p, r, f = _sk(y_true, y_pred, [0, 1, 2])
    assert (ms["precision"], ms["sensitivity"], ms["f1"]) == pytest.approx((p, r, f), abs=1e-12)


def test_cross_dataset_absent_class_predictions_are_errors():
    # 3-class model (0 benign, 1 malignant, 2 normal) on benign/malignant data
    y_true = [0, 0, 0, 1, 1]
    y_pred = [0, 2, 0, 1, 2]                # two "normal" predictions: errors
    m = compute_metrics(y_true, y_pred, 3, labels=[0, 1])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["sensitivity"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["macro_over"] == ["0", "1"]


def test_specificity_by_hand():
    # confusion rows true, columns predicted
    #        p0 p1 p2
    # t0      5  1  0
    # t1      2  3  1
    # t2      0  2  4          N = 18
    conf = np.array([[5, 1, 0], [2, 3, 1], [0, 2, 4]])
    y_true = np.repeat([0, 0, 0, 1, 1, 1, 2, 2, 2], conf.ravel())
    y_pred = np.repeat([0, 1, 2, 0, 1, 2, 0, 1, 2], conf.ravel())
    m = compute_metrics(y_true, y_pred, 3)
    # class 0: TN = 18 - 6 (row) - 2 (FP) = 10, FP = 2 -> 10/12
    # class 1: TN = 18 - 6 - 3 = 9,  FP = 3 -> 9/12
    # class 2: TN = 18 - 6 - 1 = 11, FP = 1 -> 11/12
    spec = [10 / 12, 9 / 12, 11 / 12]
    assert [c["specificity"] for c in m["per_class"]] == pytest.approx(spec)
    assert m["specificity"] == pytest.approx(sum(spec) / 3)
    assert m["confusion"] == conf.tolist()


def test_bootstrap_ci_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 3, 80)
    y_pred = np.where(rng.random(80) < 0.7, y_true, rng.integers(0, 3, 80))
    a = bootstrap_ci(y_true, y_pred, 3, n_boot=300, seed=5)
    assert a == bootstrap_ci(y_true, y_pred, 3, n_boot=300, seed=5)
    m = compute_metrics(y_true, y_pred, 3)
    for name, (lo, hi) in a.items():
        assert lo <= m[name] <= hi
    # the batched confusion path equals the single one
    conf = np.array(m["confusion"])
    batched = summary_from_confusion(np.stack([conf, conf]), [0, 1, 2])
    assert batched["f1"] == pytest.approx([m["f1"]] * 2)


def test_paired_t_equals_scipy():
    a = [0.80, 0.83, 0.79, 0.85, 0.82]
    b = [0.78, 0.80, 0.80, 0.81, 0.79]
    ours = paired_t_test(a, b)
    ref = sps.ttest_rel(a, b)
    assert ours.statistic == pytest.approx(ref.statistic, rel=1e-12)
    assert ours.pvalue == pytest.approx(ref.pvalue, rel=1e-10)
    assert ours.df == 4 and ours.test == PAIRED_T


def test_corrected_t_matches_formula():
    a = np.array([0.80, 0.83, 0.79, 0.85, 0.82])
    b = np.array([0.78, 0.80, 0.80, 0.81, 0.79])
    d = a - b
    k, n_train, n_test = 5, 545, 120
    t = d.mean() / math.sqrt((1 / k + n_test / n_train) * d.var(ddof=1))
    p = 2 * sps.t.sf(abs(t), k - 1)
    ours = corrected_resampled_t_test(a, b, n_train=n_train, n_test=n_test)
    assert ours.statistic == pytest.approx(t, rel=1e-12)
    assert ours.pvalue == pytest.approx(p, rel=1e-12)
    assert ours.test == CORRECTED_T
    assert ours.pvalue > paired_t_test(a, b).pvalue      # the correction is conservative


def test_degenerate_t_tests_follow_scipy():
    same = paired_t_test([0.8, 0.8, 0.8], [0.8, 0.8, 0.8])
    assert math.isnan(same.pvalue) and math.isnan(sps.ttest_rel([0.8] * 3, [0.8] * 3).pvalue)
    shift = paired_t_test([0.9, 0.9, 0.9], [0.8, 0.8, 0.8])
    assert shift.pvalue == 0.0 and shift.statistic == math.inf
    assert math.isnan(paired_t_test([0.9], [0.8]).pvalue)


def test_holm_worked_example():
    # p sorted: 0.01, 0.02, 0.03, 0.04 (m=4): 0.04, 0.06, 0.06, 0.06
    assert holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert holm([0.5, 0.4]) == pytest.approx([0.8, 0.8])
    out = holm([float("nan"), 0.01, 0.02])
    assert math.isnan(out[0]) and out[1:] == pytest.approx([0.02, 0.02])


def test_mean_std_sample():
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert math.isnan(mean_std([1.0])[1])
