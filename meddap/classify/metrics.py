"""Classification metrics of MEDDAP Tables 2-3, from one confusion matrix.

Confusion C (k, k): C[i, j] = number of images of true class i predicted as j
(scikit-learn's `confusion_matrix` convention). For class c, one-vs-rest:

    TP = C[c, c]          FN = sum_j C[c, j] - TP
    FP = sum_i C[i, c] - TP                   TN = N - TP - FN - FP

    sensitivity (recall) = TP / (TP + FN)
    specificity          = TN / (TN + FP)
    precision            = TP / (TP + FP)
    F1                   = 2 TP / (2 TP + FP + FN)   (= 2 P R / (P + R))

A ratio 0/0 counts as 0 (scikit-learn's `zero_division=0`): a class that is
never predicted has precision 0, a class absent from the data has sensitivity
0. Accuracy = trace(C) / N over all images.

Macro means average the per-class values over `labels`. By default `labels`
is every class of the model, 0..k-1, exactly as scikit-learn's
`precision_recall_fscore_support(..., labels=range(k), average='macro',
zero_division=0)`, so a class absent from the data pulls the macro means
down with its zeros. For a model scored on a dataset that holds only some of
its classes (the 3-class model on benign/malignant Dataset B, Table 3), the
evaluation passes `labels` = the data's classes: the macro means are over the
classes present, while predictions of the absent class still count as errors
(they are false negatives of the true class and lower the accuracy).

Calibration, from the softmax probabilities p (N, k) and the labels y:

    confidence_i = max_c p_ic,   correct_i = [argmax_c p_ic = y_i]

    ECE   = sum_b |B_b|/N · |acc(B_b) - conf(B_b)|          (Guo et al. 2017,
          = sum_b |sum_{i in B_b} correct_i - confidence_i| / N   arXiv 1706.04599, Eq. 3)
    Brier = 1/N sum_i sum_c (p_ic - y_ic)²,  y_ic one-hot   (Brier 1950, multi-class form)

with ECE_BINS = 15 equal-width confidence bins B_b = ((b-1)/15, b/15], b = 1..15
(Guo et al.'s M = 15). A perfect one-hot correct prediction has ECE = Brier = 0;
a confident (p = 1) wrong one has ECE = 1 and Brier = 2. The per-bin sums
(`reliability_bins`) are kept so that bins of several evaluations add up into
one reliability diagram.
"""
from __future__ import annotations

import numpy as np

METRIC_NAMES: tuple[str, ...] = ("accuracy", "sensitivity", "specificity", "precision", "f1")
CALIBRATION_NAMES: tuple[str, ...] = ("ece", "brier")
ECE_BINS = 15                     # Guo et al. 2017 (arXiv 1706.04599), Section 2: M = 15


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """(k, k) int64 counts; rows = true class, columns = predicted class."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} must be equal 1-d shapes")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} holds labels outside 0..{num_classes - 1}")
    codes = y_true * num_classes + y_pred                                       # (N,)
    return np.bincount(codes, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0/0 (and x/0) counted as 0."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def rates_from_confusion(conf: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class one-vs-rest rates of a confusion stack conf (..., k, k) ->
    each (..., k); plus `accuracy` (...)."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diagonal(conf, axis1=-2, axis2=-1)                                  # (..., k)
    row = conf.sum(axis=-1)                                                     # (..., k) true counts
    col = conf.sum(axis=-2)                                                     # (..., k) predicted counts
    n = conf.sum(axis=(-2, -1))[..., None]                                      # (..., 1)
    fn, fp = row - tp, col - tp
    tn = n - tp - fn - fp
    return {
        "accuracy": _ratio(tp.sum(axis=-1), n[..., 0]),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "support": row,
    }


def summary_from_confusion(conf: np.ndarray, labels) -> dict[str, np.ndarray]:
    """The five headline numbers of a confusion stack (..., k, k): accuracy and
    the macro means over `labels` of sensitivity, specificity, precision, F1."""
    rates = rates_from_confusion(conf)
    labels = list(labels)
    out = {"accuracy": rates["accuracy"]}
    for name in METRIC_NAMES[1:]:
        out[name] = rates[name][..., labels].mean(axis=-1)
    return out


def compute_metrics(y_true, y_pred, num_classes: int, labels=None,
                    class_names: list[str] | None = None) -> dict:
    """Accuracy, macro sensitivity/specificity/precision/F1 over `labels`
    (default: all k classes), `per_class` rates and the `confusion` matrix.

    0/0 counts as 0; see the module docstring for what the macro means
    average over when a class is absent from `y_true`.
    """
    labels = list(range(num_classes)) if labels is None else [int(c) for c in labels]
    conf = confusion_matrix(y_true, y_pred, num_classes)
    rates = rates_from_confusion(conf)
    summary = summary_from_confusion(conf, labels)
    names = class_names or [str(c) for c in range(num_classes)]
    per_class = [{"class": names[c], **{m: float(rates[m][c]) for m in METRIC_NAMES[1:]},
                  "support": int(rates["support"][c])} for c in range(num_classes)]
    return {**{m: float(v) for m, v in summary.items()},
            "macro_over": [names[c] for c in labels],
            "per_class": per_class,
            "confusion": conf.tolist(),
            "n": int(conf.sum())}


def bootstrap_ci(y_true, y_pred, num_classes: int, labels=None, n_boot: int = 1000,
                 seed: int = 0, level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap confidence intervals of the five headline metrics.

    The test images are resampled with replacement `n_boot` times
    (numpy Generator PCG64 seeded with `seed`); each metric's interval is the
    ((1 - level)/2, (1 + level)/2) quantile pair of its bootstrap values.
    The intervals describe test-set sampling only, not training variability.
    """
    labels = list(range(num_classes)) if labels is None else [int(c) for c in labels]
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    n, kk = y_true.size, num_classes * num_classes
    if n == 0:
        return {m: [float("nan"), float("nan")] for m in METRIC_NAMES}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))                                  # (B, N)
    codes = (y_true * num_classes + y_pred)[idx] + kk * np.arange(n_boot)[:, None]  # (B, N)
    conf = np.bincount(codes.ravel(), minlength=n_boot * kk).reshape(n_boot, num_classes, num_classes)
    summary = summary_from_confusion(conf, labels)                              # each (B,)
    lo, hi = (1 - level) / 2, (1 + level) / 2
    return {m: [float(np.quantile(summary[m], lo)), float(np.quantile(summary[m], hi))]
            for m in METRIC_NAMES}


# ---------------------------------------------------------------- calibration

def _check_probabilities(y_true, probs) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or y_true.shape != (probs.shape[0],):
        raise ValueError(f"probs {probs.shape} must be (N, k) and y_true {y_true.shape} (N,)")
    if y_true.size and (y_true.min() < 0 or y_true.max() >= probs.shape[1]):
        raise ValueError(f"y_true holds labels outside 0..{probs.shape[1] - 1}")
    return y_true, probs


def reliability_bins(y_true, probs, n_bins: int = ECE_BINS) -> dict[str, list]:
    """Per confidence bin b = ((b-1)/M, b/M]: `count` |B_b|, `correct` sum of
    correct_i and `confidence` sum of confidence_i over B_b (lists of M)."""
    y_true, probs = _check_probabilities(y_true, probs)
    confidence = probs.max(axis=1) if probs.size else np.zeros(0)              # (N,)
    correct = (probs.argmax(axis=1) == y_true) if probs.size else np.zeros(0)  # (N,)
    b = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)  # (N,)
    return {"count": np.bincount(b, minlength=n_bins).tolist(),
            "correct": np.bincount(b, weights=correct.astype(np.float64), minlength=n_bins).tolist(),
            "confidence": np.bincount(b, weights=confidence, minlength=n_bins).tolist()}


def ece_from_bins(bins: dict[str, list]) -> float:
    """ECE = sum_b |sum correct - sum confidence| / N over the bins (nan when N = 0)."""
    n = float(np.sum(bins["count"]))
    gap = np.abs(np.asarray(bins["correct"]) - np.asarray(bins["confidence"]))  # (M,)
    return float(gap.sum() / n) if n > 0 else float("nan")


def brier_score(y_true, probs) -> float:
    """Multi-class Brier score 1/N sum_i sum_c (p_ic - y_ic)² (Brier 1950); nan when N = 0."""
    y_true, probs = _check_probabilities(y_true, probs)
    if y_true.size == 0:
        return float("nan")
    onehot = np.eye(probs.shape[1])[y_true]                                     # (N, k)
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def calibration(y_true, probs, n_bins: int = ECE_BINS) -> dict:
    """`ece`, `brier` and the `reliability` bins of softmax probabilities probs (N, k)."""
    bins = reliability_bins(y_true, probs, n_bins)
    return {"ece": ece_from_bins(bins), "brier": brier_score(y_true, probs), "reliability": bins}
