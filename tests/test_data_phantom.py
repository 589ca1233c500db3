"""Phantom: determinism, counts, masks, brightness that does not tell the class,
and lesion shapes as BI-RADS describes them (oracles: scipy ConvexHull, sklearn AUC)."""
import json

import numpy as np
import pytest
from PIL import Image
from scipy.spatial import ConvexHull
from sklearn.metrics import roc_auc_score

from meddap.cli import main
from meddap.data.datasets import scan_folder
from meddap.data.phantom import (DEFAULT_COUNTS, PROBES, Site, image_rng, parse_counts, simulate,
                                 write_phantom)
from meddap.errors import MeddapError

N_SHAPE = 100      # per class: AUC standard error about 0.04


def solidity(mask: np.ndarray) -> float:
    """Area / convex-hull area, pixels as unit squares (hull of their corners)."""
    ys, xs = np.nonzero(mask)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    return mask.sum() / ConvexHull(corners).volume


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    write_phantom(out, seed=3, counts={"benign": N_SHAPE, "malignant": N_SHAPE, "normal": 5},
                  show_progress=False)
    return out


@pytest.fixture(scope="module")
def lesions(phantom):
    """(is_malignant, mean grey in mask, solidity, width/height) per lesion, read from disk."""
    s = scan_folder(phantom)
    rows = []
    for it in s.items:
        if it.label == "normal":
            continue
        image = np.asarray(Image.open(it.path))
        mask = np.asarray(Image.open(s.masks[it.path][0])) > 127
        ys, xs = np.nonzero(mask)
        rows.append((it.label == "malignant", image[mask].mean(), solidity(mask),
                     (np.ptp(xs) + 1) / (np.ptp(ys) + 1)))
    return np.array(rows, dtype=float)


def test_layout_counts_and_masks(phantom):
    s = scan_folder(phantom, check=True)
    assert s.counts() == {"benign": N_SHAPE, "malignant": N_SHAPE, "normal": 5}
    assert not s.unreadable
    assert (phantom / "benign" / "benign (1).png").is_file()
    assert (phantom / "benign" / "benign (1)_mask.png").is_file()
    for it in s.items:
        (mask_path,) = s.masks[it.path]
        image, mask = Image.open(it.path), np.asarray(Image.open(mask_path))
        assert image.mode == "L" and image.size == (256, 256) and mask.shape == (256, 256)
        assert set(np.unique(mask)) <= {0, 255}
        assert (mask.any()) == (it.label != "normal")      # normal: empty mask
    record = json.loads((phantom / "phantom.json").read_text())
    assert record["seed"] == 3 and record["counts"]["normal"] == 5


def test_same_seed_same_bytes_and_counts_do_not_reshuffle(tmp_path, phantom):
    write_phantom(tmp_path / "a", seed=3, counts={"benign": 2, "malignant": 1}, show_progress=False)
    for name in ("benign (1).png", "benign (2).png", "benign (2)_mask.png"):
        assert (tmp_path / "a" / "benign" / name).read_bytes() == \
            (phantom / "benign" / name).read_bytes()
    write_phantom(tmp_path / "b", seed=4, counts={"benign": 1}, show_progress=False)
    assert (tmp_path / "b" / "benign" / "benign (1).png").read_bytes() != \
        (phantom / "benign" / "benign (1).png").read_bytes()


def test_mean_lesion_brightness_does_not_tell_the_class(lesions):
    auc = roc_auc_score(lesions[:, 0], lesions[:, 1])
    assert 0.35 <= auc <= 0.65, auc


def test_shapes_follow_birads(lesions):
    malignant, sol, aspect = lesions[:, 0] == 1, lesions[:, 2], lesions[:, 3]
    assert sol[~malignant].mean() > sol[malignant].mean() + 0.15       # benign more convex
    assert roc_auc_score(~malignant, sol) >= 0.9                       # solidity alone separates
    assert (aspect[~malignant] > 1).mean() >= 0.9                      # parallel: wider than tall
    assert (aspect[malignant] < 1).mean() >= 0.6                       # non-parallel, mostly
    assert (aspect[malignant] < 1).mean() > (aspect[~malignant] < 1).mean() + 0.5


def test_site_b_second_device():
    assert DEFAULT_COUNTS[Site.B] == {"benign": 500, "malignant": 400}
    a, b = PROBES[Site.A], PROBES[Site.B]
    assert b.frequency_mhz < a.frequency_mhz and b.geometry != a.geometry
    image, mask = simulate(image_rng(0, Site.B, "malignant", 1), "malignant", b, 128)
    assert image.shape == mask.shape == (128, 128) and mask.any()
    assert image[0, 0] == 0 and image[0, -1] == 0          # outside the fan: black corners
    again, _ = simulate(image_rng(0, Site.B, "malignant", 1), "malignant", b, 128)
    assert (again == image).all()


def test_speckle_is_rayleigh():
    """Envelope statistics of a uniform region: for a Rayleigh envelope the
    ratio mean^2 / E[A^2] is pi/4 (Goodman, Speckle Phenomena, Eq. 3.2-12ff)."""
    import scipy.fft

    from meddap.data.phantom import beam_grid, psf_transfer
    rng = np.random.default_rng(0)
    size = 256
    n = rng.standard_normal((2, size, size)) * np.sqrt(0.5)
    h = psf_transfer(PROBES[Site.A], beam_grid(PROBES[Site.A], size), size)
    env = np.abs(scipy.fft.ifft2(scipy.fft.fft2(n[0] + 1j * n[1]) * h))
    assert abs(np.mean(env ** 2) - 1) < 0.05                            # unit-energy PSF
    assert abs(np.mean(env) ** 2 / np.mean(env ** 2) - np.pi / 4) < 0.01


def test_bad_counts_and_sizes(tmp_path, capsys):
    assert parse_counts("benign=3, normal=0") == {"benign": 3, "normal": 0}
    for text, match in (("cyst=3", "CLASS=N"), ("benign", "CLASS=N"), ("benign=x", "whole number"),
                        ("benign=-1", "0 or more"), ("", "names no class")):
        with pytest.raises(MeddapError, match=match):
            parse_counts(text)
    assert main(["phantom", "--out", str(tmp_path), "--counts", "tumour=3", "--quiet"]) == 2
    assert "tumour=3" in capsys.readouterr().err
    with pytest.raises(MeddapError, match="--size 8"):
        write_phantom(tmp_path, size=8)


def test_cli_site_b(tmp_path):
    assert main(["phantom", "--out", str(tmp_path), "--site", "b", "--size", "64",
                 "--counts", "benign=2,malignant=1", "--quiet"]) == 0
    assert scan_folder(tmp_path).counts() == {"benign": 2, "malignant": 1}
