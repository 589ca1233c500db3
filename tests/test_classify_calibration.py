"""Calibration (metrics.py): ECE with 15 equal-width bins (Guo et al. 2017) and the
multi-class Brier score, checked by hand, on closed cases, against a loop over
the definition, and drawn as a reliability diagram (figures.py)."""
import numpy as np
import pytest
from PIL import Image

from meddap.classify.metrics import (ECE_BINS, brier_score, calibration, ece_from_bins,
                                     reliability_bins)
from meddap.figures import reliability_diagram


def test_hand_computed_example():
    probs = [[0.90, 0.10], [0.38, 0.62], [0.30, 0.70], [0.95, 0.05], [0.88, 0.12]]
    y = [0, 0, 1, 1, 1]
    # confidences 0.9, 0.62, 0.7, 0.95, 0.88 -> bins (b/15 upper edges) 13, 9, 10, 14, 13
    # correct      1,   0,    1,   0,    0
    # |sum correct - sum confidence| per bin: 13: |1 - 1.78|, 9: 0.62, 10: 0.3, 14: 0.95
    r = calibration(y, probs)
    assert r["ece"] == pytest.approx((0.78 + 0.62 + 0.30 + 0.95) / 5, abs=1e-12)
    brier = (2 * 0.1 ** 2 + 2 * 0.62 ** 2 + 2 * 0.3 ** 2 + 2 * 0.95 ** 2 + 2 * 0.88 ** 2) / 5
    assert r["brier"] == pytest.approx(brier, abs=1e-12)
    bins = r["reliability"]
    assert len(bins["count"]) == ECE_BINS == 15
    assert [i for i, c in enumerate(bins["count"]) if c] == [9, 10, 13, 14]
    assert bins["count"][13] == 2 and bins["correct"][13] == 1.0
    assert bins["confidence"][13] == pytest.approx(1.78)


@pytest.mark.parametrize("k", [2, 3])
def test_closed_cases(k):
    y = np.arange(12) % k
    onehot = np.eye(k)[y]
    right = calibration(y, onehot)
    assert (right["ece"], right["brier"]) == (0.0, 0.0)
    wrong = calibration(y, np.eye(k)[(y + 1) % k])          # confident (p = 1) and wrong
    assert (wrong["ece"], wrong["brier"]) == (1.0, 2.0)
    uniform = calibration(y, np.full((12, k), 1.0 / k))     # argmax picks class 0
    acc = np.mean(y == 0)
    assert uniform["ece"] == pytest.approx(abs(acc - 1.0 / k))
    assert uniform["brier"] == pytest.approx(1 - 1.0 / k)   # (1 - 1/k)² + (k - 1)/k²


def test_ece_equals_the_definition_and_bins_add_up():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 3)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = rng.integers(0, 3, 500)
    conf, correct = probs.max(1), probs.argmax(1) == y
    ece = 0.0
    for b in range(15):                                         # B_b = (b/15, (b+1)/15]
        inside = (conf > b / 15) & (conf <= (b + 1) / 15)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    assert calibration(y, probs)["ece"] == pytest.approx(ece, abs=1e-12)
    brier = np.mean([sum((probs[i, c] - (c == y[i])) ** 2 for c in range(3)) for i in range(500)])
    assert brier_score(y, probs) == pytest.approx(brier, abs=1e-12)
    a, b = reliability_bins(y[:200], probs[:200]), reliability_bins(y[200:], probs[200:])
    pooled = {k: list(np.add(a[k], b[k])) for k in a}
    assert ece_from_bins(pooled) == pytest.approx(ece, abs=1e-12)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"must be \(N, k\)"):
        calibration([0, 1], [0.5, 0.5])
    with pytest.raises(ValueError, match="outside 0..1"):
        calibration([0, 2], [[0.5, 0.5], [0.5, 0.5]])


def test_reliability_diagram_is_drawn(tmp_path):
    rng = np.random.default_rng(1)
    probs = rng.dirichlet([1, 1, 1], 200)
    y = rng.integers(0, 3, 200)
    curves = {"real only": reliability_bins(y, probs), "empty": reliability_bins([], np.zeros((0, 3)))}
    path = reliability_diagram(tmp_path / "r.png", "resnet34 reliability", curves)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (50 + 300 + 20, 30 + 300 + 30 + 16 * 2 + 8)
