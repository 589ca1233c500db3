"""`meddap memorization` (meddap.fid.memorization): planted copies of training
images (exact, blurred, shifted by 2 pixels) among novel phantoms are flagged,
novel ones are not, in both feature spaces; the cosine rule, the per-class
rule, the leave-one-out reference and the errors."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from test_fid_support import fid_state_dict

from meddap.data.phantom import write_phantom
from meddap.errors import MeddapError
from meddap.fid.config import FeatureSpace
from meddap.fid.memorization import (CLOSEST, MemorizationConfig, cosine_distances, memorization, nearest,
                                     register)

COUNTS = {"benign": 10, "malignant": 10, "normal": 10}
NOVEL = {"benign": 17, "malignant": 17, "normal": 16}              # 50 novel images
KEYS = {"n_synthetic", "n_train", "n_test", "threshold", "fraction_flagged", "flagged",
        "test_to_train_quantiles", "synthetic_to_train_quantiles", "closest", "feature_space", "notes"}


def images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.png") if not p.name.endswith("_mask.png"))


def shift_2px(grey: Image.Image) -> Image.Image:
    """Two pixels to the right; the first column is repeated into the gap."""
    a = np.asarray(grey)
    return Image.fromarray(np.concatenate([np.repeat(a[:, :1], 2, axis=1), a[:, :-2]], axis=1))


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("memorization")
    write_phantom(root / "train", seed=1, size=64, counts=COUNTS, show_progress=False)
    write_phantom(root / "test", seed=2, size=64, counts=COUNTS, show_progress=False)
    write_phantom(root / "novel", seed=3, size=64, counts=NOVEL, show_progress=False)
    return root


def synthetic_set(root: Path, name: str, blur_radius: float) -> tuple[Path, dict[str, str]]:
    """50 novel phantoms and 15 planted copies of training images (5 exact, 5
    Gaussian-blurred, 5 shifted by 2 px), each in its source's class folder.
    Returns the folder and {planted file: its training source}."""
    out = root / name
    for p in images(root / "novel"):
        (out / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, out / p.parent.name / f"novel {p.name}")
    planted = {}
    sources = images(root / "train")[::2]                           # 15 of the 30, all classes
    kinds = {"exact": lambda g: g, "blur": lambda g: g.filter(ImageFilter.GaussianBlur(blur_radius)),
             "shift": shift_2px}
    for n, src in enumerate(sources):
        kind = list(kinds)[n % 3]
        dst = out / src.parent.name / f"copy {kind} {n}.png"
        kinds[kind](Image.open(src).convert("L")).save(dst)
        planted[str(dst.resolve())] = str(src.resolve())
    return out, planted


def run_command(argv: list[str], capsys) -> dict:
    """`meddap memorization ...` through its own register() (the lead wires it into meddap.cli)."""
    parser = argparse.ArgumentParser(prog="meddap")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["memorization", *argv])
    capsys.readouterr()
    assert args.func(args) == 0
    return json.loads(capsys.readouterr().out)


def check_planted(result: dict, planted: dict[str, str]) -> None:
    assert KEYS <= result.keys()
    assert (result["n_synthetic"], result["n_train"], result["n_test"]) == (65, 30, 30)
    flagged = {f["synthetic"]: f["train"] for f in result["flagged"]}
    hits = [p for p in planted if p in flagged]
    recall = len(hits) / len(planted)
    false_flags = len(flagged) - len(hits)
    assert recall >= 0.9, (recall, sorted(set(planted) - set(flagged)))
    assert false_flags <= 4, false_flags
    assert all(flagged[p] == planted[p] for p in hits)              # flagged against its own source
    assert result["fraction_flagged"] == len(flagged) / 65
    assert all(f["distance"] < result["threshold"] for f in result["flagged"])
    assert result["test_to_train_quantiles"]["1%"] == pytest.approx(result["threshold"])
    assert list(result["test_to_train_quantiles"]) == ["0%", "1%", "5%", "25%", "50%"]
    closest = [c["distance"] for c in result["closest"]]
    assert len(closest) == CLOSEST and closest == sorted(closest)
    assert closest[0] == result["synthetic_to_train_quantiles"]["0%"]
    exact = [p for p in planted if " exact " in Path(p).name]
    assert all(flagged[p] == planted[p] for p in exact)
    assert {c["synthetic"]: c["distance"] for c in result["closest"]}[exact[0]] == pytest.approx(0.0, abs=1e-12)
    assert sum(row["n_synthetic"] for row in result["per_class"].values()) == 65


def test_pixels_flag_the_planted_copies(phantoms, tmp_path, capsys):
    synthetic, planted = synthetic_set(phantoms, "synthetic-pixels", blur_radius=1.0)
    grid = tmp_path / "closest.png"
    result = run_command(["--synthetic", str(synthetic), "--train", str(phantoms / "train"),
                          "--test", str(phantoms / "test"), "--features", "pixels", "--json",
                          "--grid", str(grid), "--no-cache", "--quiet"], capsys)
    check_planted(result, planted)
    assert result["feature_space"] == "pixels" and result["weights"] is None
    assert any(n.startswith("NOT FID") and "16x16 grey thumbnails" in n for n in result["notes"])
    assert Image.open(grid).size == (8 * 68, 2 * (2 * 64 + 14 + 4))   # 16 pairs, 8 a row


def test_random_inception_flags_exact_shifted_and_faintly_blurred_copies(phantoms, tmp_path, capsys):
    """On random weights the FID Inception is a texture descriptor: it separates exact
    and 2-pixel-shifted copies, and blurs up to radius 0.3; a blur of radius 0.5
    already moves the features beyond the test images' distances (measured: 0 of 10
    flagged), so only the faint blur is planted here. With pytorch-fid's weights the
    inception mode is the standard one."""
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(fid_state_dict(seed=0), weights)
    synthetic, planted = synthetic_set(phantoms, "synthetic-inception", blur_radius=0.3)
    result = run_command(["--synthetic", str(synthetic), "--train", str(phantoms / "train"),
                          "--test", str(phantoms / "test"), "--inception-weights", str(weights),
                          "--device", "cpu", "--json", "--no-cache", "--quiet"], capsys)
    check_planted(result, planted)
    assert result["feature_space"] == "inception" and result["official_weights"] is False


# ---------------------------------------------------------------- the rules, on small vectors

def test_cosine_distance_and_nearest_within_the_class():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    b = np.array([[3.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(cosine_distances(a, b), [[0.0, 1 - 2 ** -0.5], [1.0, 1 - 2 ** -0.5], [1.0, 1.0]],
                               atol=1e-15)
    index, distance = nearest(a[:2], ["x", "y"], b, ["y", "x"])      # each row only sees the other class
    assert index.tolist() == [1, 0] and distance.tolist() == pytest.approx([1 - 2 ** -0.5, 1.0])
    index, distance = nearest(b, ["", ""], b, ["", ""], leave_one_out=True)
    assert index.tolist() == [1, 0]


def test_without_test_set_the_reference_is_leave_one_out(phantoms):
    cfg = MemorizationConfig(synthetic=str(phantoms / "novel"), train=str(phantoms / "train"),
                             features=FeatureSpace.PIXELS, percentile=5.0, no_cache=True, quiet=True)
    result = memorization(cfg)
    assert result["reference"] == "train leave-one-out" and result["n_test"] == 0
    assert "test_to_train_quantiles" not in result and "train_to_train_quantiles" in result
    assert result["train_to_train_quantiles"]["5%"] == pytest.approx(result["threshold"])
    assert any(n.startswith("no --test: the threshold is the 5th percentile") for n in result["notes"])


def test_flat_folders_compare_across_classes_and_missing_classes_are_errors(phantoms, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in images(phantoms / "train" / "benign")[:3]:
        shutil.copy(p, flat / p.name)
    cfg = MemorizationConfig(synthetic=str(flat), train=str(phantoms / "train"), test=str(phantoms / "test"),
                             features=FeatureSpace.PIXELS, no_cache=True, quiet=True)
    result = memorization(cfg)
    assert result["n_flagged"] == 3 and list(result["per_class"]) == [""]
    only_benign = tmp_path / "only-benign"
    shutil.copytree(phantoms / "train" / "benign", only_benign / "benign")
    with pytest.raises(MeddapError, match=r"^--synthetic = .* has the class 'malignant', 'normal', which "
                                          r"--train = .* does not have; the nearest training image"):
        memorization(MemorizationConfig(synthetic=str(phantoms / "novel"), train=str(only_benign),
                                        features=FeatureSpace.PIXELS, no_cache=True, quiet=True))
    with pytest.raises(MeddapError, match=r"^--percentile = 101 is out of range; use a value from 0.0 to 100.0"):
        memorization(MemorizationConfig(synthetic="a", train="b", percentile=101.0))
