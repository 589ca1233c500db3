"""Precision, recall, density and coverage (meddap.fid.prdc): equal to a loop-by-loop
transcription of the published formulas, the closed cases, and `meddap fid --prdc`
through score_sets."""
from __future__ import annotations

import math

import numpy as np
import pytest
from test_fid_support import write_images

from meddap.errors import MeddapError
from meddap.fid import FeatureSpace, FidConfig, Formula, score_sets
from meddap.fid.pixels import pixel_extractor
from meddap.fid.prdc import prdc
from meddap.fid.stats_cache import cached_features, resolve_folder


def transcribed(real, fake, k):
    """Naeem et al. 2020 (arXiv 2002.09797) Eq. 1-4, one indicator at a time:
    B(x, r) = {z : |z - x| < r} and NND_k the k-th neighbour distance among the others."""
    def dist(a, b):
        return math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b)))

    def nnd(points, i):
        others = sorted(dist(points[i], points[j]) for j in range(len(points)) if j != i)
        return others[k - 1]
    N, M = len(real), len(fake)
    r_real = [nnd(real, i) for i in range(N)]
    r_fake = [nnd(fake, j) for j in range(M)]
    precision = sum(any(dist(fake[j], real[i]) < r_real[i] for i in range(N)) for j in range(M)) / M
    recall = sum(any(dist(real[i], fake[j]) < r_fake[j] for j in range(M)) for i in range(N)) / N
    density = sum(dist(fake[j], real[i]) < r_real[i] for j in range(M) for i in range(N)) / (k * M)
    coverage = sum(any(dist(fake[j], real[i]) < r_real[i] for j in range(M)) for i in range(N)) / N
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


@pytest.mark.parametrize("k, n, m, shift", [(5, 40, 30, 0.5), (3, 25, 35, 0.0), (1, 12, 9, 1.0)])
def test_equals_the_transcribed_formulas(k, n, m, shift):
    rng = np.random.default_rng(k * 100 + n)
    real = rng.standard_normal((n, 6))
    fake = rng.standard_normal((m, 6)) * 1.3 + shift
    got = prdc(real, fake, k=k)
    want = transcribed(real.tolist(), fake.tolist(), k)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert 0 < got["precision"] < 1 or 0 < got["recall"] < 1                       # not a trivial case


def test_identical_sets_and_far_apart_sets():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((50, 8))                                                # no ties (continuous)
    assert prdc(x, x.copy(), k=5) == {"precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0}
    far = rng.standard_normal((40, 8)) + 1e3
    assert prdc(x, far, k=5) == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_density_counts_every_ball_and_exceeds_one():
    """Real points: the 8 vertices of a regular octagon of radius 1; their 3rd
    neighbour is 2 sin(2π/8) = √2 away, so every ball holds the centre. Fake points
    all at the centre: each lies in all 8 balls (density 8/3, precision = coverage
    = 1), and their own k-th neighbour distance is 0, so recall is 0."""
    angles = 2 * np.pi * np.arange(8) / 8
    real = np.stack([np.cos(angles), np.sin(angles)], axis=1)                       # (8, 2)
    fake = np.zeros((7, 2))
    r = prdc(real, fake, k=3)
    assert r == pytest.approx({"precision": 1.0, "recall": 0.0, "density": 8 / 3, "coverage": 1.0}, abs=1e-15)
    assert r == pytest.approx(transcribed(real.tolist(), fake.tolist(), 3), abs=1e-12)


def test_too_few_images_is_a_sentence():
    x = np.zeros((5, 3))
    with pytest.raises(MeddapError, match=r"^PRDC with k = 5 needs k >= 1 and more than k images in each "
                                          r"set .*got 5 real and 6 fake images\.$"):
        prdc(x, np.zeros((6, 3)), k=5)
    with pytest.raises(MeddapError, match=r"one width D; got shapes \(5, 3\) and \(6, 2\)\.$"):
        prdc(x, np.zeros((6, 2)))


def test_score_sets_adds_prdc_per_set_and_per_class(tmp_path):
    for name, seed, lo in (("real", 1, 0), ("x", 2, 40)):
        write_images(tmp_path / name / "benign", [(32, 32)] * 8, seed=seed, lo=lo)
        write_images(tmp_path / name / "malignant", [(32, 32)] * 2, seed=seed + 10, lo=lo)
    cfg = FidConfig(features=FeatureSpace.PIXELS, prdc=True, prdc_k=2, per_class=True, no_cache=True, quiet=True)
    row = score_sets(cfg, str(tmp_path / "real"), {"x": str(tmp_path / "x")})["sets"]["x"]
    extractor = pixel_extractor()
    ref = cached_features(resolve_folder(tmp_path / "real"), extractor, show_progress=False)
    feats = cached_features(resolve_folder(tmp_path / "x"), extractor, show_progress=False)
    assert {k: row[k] for k in ("precision", "recall", "density", "coverage")} == \
        prdc(ref.features, feats.features, k=2)
    a = ref.features[[lab == "benign" for lab in ref.labels]]
    b = feats.features[[lab == "benign" for lab in feats.labels]]
    assert {k: row["per_class"]["benign"][k] for k in ("precision", "recall", "density", "coverage")} == \
        prdc(a, b, k=2)
    assert row["per_class"]["malignant"]["prdc_error"] == "PRDC with k = 2 needs more than 2 images on each side"
    without = score_sets(FidConfig(features=FeatureSpace.PIXELS, no_cache=True, quiet=True),
                         str(tmp_path / "real"), {"x": str(tmp_path / "x")})["sets"]["x"]
    assert "precision" not in without and without["frechet"] == row["frechet"]


def test_config_checks():
    with pytest.raises(MeddapError, match=r"^--prdc-k = 0 must be at least 1\.$"):
        score_sets(FidConfig(prdc=True, prdc_k=0), "unused", {})
    with pytest.raises(MeddapError, match=r"^--formula = 'as-released' has no precision/recall/density/"
                                          r"coverage; drop --prdc, or use --formula = 'standard'\.$"):
        score_sets(FidConfig(formula=Formula.AS_RELEASED, prdc=True), "unused", {})


def test_fid_command_prints_prdc_with_its_keys(tmp_path, capsys):
    """`meddap fid A B --prdc --json`: the keys precision, recall, density, coverage."""
    import json

    from PIL import Image

    from meddap.cli import main

    rng = np.random.default_rng(0)
    for name, lo in (("a", 0), ("b", 60)):
        (tmp_path / name).mkdir()
        for i in range(12):
            Image.fromarray(rng.integers(lo, lo + 120, (40, 40, 3), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    assert main(["fid", str(tmp_path / "a"), str(tmp_path / "b"), "--features", "pixels", "--prdc", "--json",
                 "--no-cache", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert all(0.0 <= result[k] <= 10.0 for k in ("precision", "recall", "density", "coverage"))
    assert main(["fid", str(tmp_path / "a"), str(tmp_path / "a"), "--features", "pixels", "--prdc",
                 "--no-cache", "--quiet"]) == 0
    assert "precision 1.0000  recall 1.0000  density 1.0000  coverage 1.0000  (k = 5)" in capsys.readouterr().out
