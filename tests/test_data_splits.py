"""Splits: stratified, deterministic, disjoint test sets, duplicates kept together;
the perceptual hash; `meddap leakage`."""
import argparse
import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image, ImageFilter

from meddap.cli import main
from meddap.data.datasets import resolve_images
from meddap.data.hashing import (NEAR_DUPLICATE_HAMMING, hamming_matrix, hash_words, phash)
from meddap.data.phantom import write_phantom
from meddap.data import commands
from meddap.data.splits import SplitConfig, apportion, make_split, write_split
from meddap.errors import MeddapError
from meddap.settings import from_table

COUNTS = {"benign": 30, "malignant": 18, "normal": 12}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """60 phantom images plus three duplicate groups: an exact copy, a re-saved
    near copy (JPEG, 2 % crop) and a copy filed under another class."""
    root = tmp_path_factory.mktemp("split") / "data"
    write_phantom(root, seed=1, size=96, counts=COUNTS, show_progress=False)
    shutil.copy(root / "benign" / "benign (1).png", root / "benign" / "benign copy.png")
    im = Image.open(root / "benign" / "benign (2).png").convert("RGB")
    im.crop((2, 2, 94, 94)).resize((96, 96)).save(root / "benign" / "benign recrop.jpg", quality=80)
    shutil.copy(root / "malignant" / "malignant (1).png", root / "benign" / "misfiled.png")
    return root


GROUPS = [{"benign/benign (1).png", "benign/benign copy.png"},
          {"benign/benign (2).png", "benign/benign recrop.jpg"},
          {"benign/misfiled.png", "malignant/malignant (1).png"}]


def _paths(part):
    return {e["path"] for e in part}


def test_phash_near_copies_close_distinct_images_far(data):
    base = Image.open(data / "normal" / "normal (3).png")
    variants = [base.resize((150, 150)), base.filter(ImageFilter.GaussianBlur(1)),
                base.crop((2, 2, 94, 94)),
                Image.fromarray(np.clip(np.asarray(base, int) + 10, 0, 255).astype(np.uint8))]
    h0 = hash_words([phash(base)])
    near = hamming_matrix(hash_words([phash(v) for v in variants]), h0)[:, 0]
    assert (near <= NEAR_DUPLICATE_HAMMING).all(), near
    originals = resolve_images(data).items
    codes = hash_words([phash(Image.open(it.path)) for it in originals if "(" in it.path.name])
    d = hamming_matrix(codes, codes)[np.triu_indices(len(codes), 1)]
    assert d.min() > NEAR_DUPLICATE_HAMMING, d.min()


def test_hamming_matrix_matches_python_popcount():
    rng = np.random.default_rng(0)
    hexes = [rng.bytes(32).hex() for _ in range(6)]
    d = hamming_matrix(hash_words(hexes), hash_words(hexes))
    for i in range(6):
        for j in range(6):
            assert d[i, j] == bin(int(hexes[i], 16) ^ int(hexes[j], 16)).count("1")
    assert len(phash(Image.new("L", (8, 8)))) == 64


def test_apportion_largest_remainder():
    assert apportion(120, [437, 210, 133]) == [67, 32, 21]
    assert apportion(115, [437, 210, 133]) == [64, 31, 20]
    assert sum(apportion(7, [1, 1, 1])) == 7


@pytest.fixture(scope="module")
def manifest(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("manifest") / "split.json"
    write_split(data, out, SplitConfig(val=9, test=10, folds=4, seed=0), show_progress=False)
    return out


def test_manifest_format_and_parts(manifest, data):
    m = json.loads(manifest.read_text())
    assert m["classes"] == ["benign", "malignant", "normal"] and m["seed"] == 0
    assert m["settings"]["folds"] == 4 and m["n_images"] == 63
    assert (manifest.parent / m["root"]).resolve() == data.resolve()
    all_files = {it.path.relative_to(data.resolve()).as_posix() for it in resolve_images(data).items}
    for fold in m["folds"]:
        parts = [_paths(fold[p]) for p in ("train", "val", "test")]
        assert set.union(*parts) == all_files and sum(map(len, parts)) == len(all_files)
        assert len(parts[2]) == 10 and len(parts[1]) == 9
        e = fold["test"][0]
        assert set(e) == {"path", "class", "sha256"} and len(e["sha256"]) == 64
    view = resolve_images(f"{manifest}:2:val")
    assert len(view.items) == 9 and all(it.path.is_file() for it in view.items)


def test_stratified(manifest):
    m = json.loads(manifest.read_text())
    # Class shares of the 63 files by group majority: benign 33, malignant 18, normal 12.
    want_test, want_val = apportion(10, [32, 19, 12]), apportion(9, [32, 19, 12])
    for counts in m["counts"]:
        for part, want in (("test", want_test), ("val", want_val)):
            got = [counts[part][c] for c in m["classes"]]
            assert all(abs(g - w) <= 1 for g, w in zip(got, want)), (part, got, want)


def test_test_sets_disjoint_and_val_never_in_test(manifest):
    m = json.loads(manifest.read_text())
    assert m["test_sets_disjoint"] is True
    tests = [_paths(f["test"]) for f in m["folds"]]
    for i in range(4):
        assert not _paths(m["folds"][i]["val"]) & tests[i]
        for j in range(i):
            assert not tests[i] & tests[j]


def test_duplicates_never_straddle(manifest):
    m = json.loads(manifest.read_text())
    assert sorted(map(frozenset, (g["paths"] for g in m["duplicate_groups"])), key=sorted) == \
        sorted(map(frozenset, GROUPS), key=sorted)
    cross = next(g for g in m["duplicate_groups"] if "benign/misfiled.png" in g["paths"])
    assert cross["classes"] == ["benign", "malignant"] and cross["exact"]
    for fold in m["folds"]:
        for group in GROUPS:
            assert sum(bool(group & _paths(fold[p])) for p in ("train", "val", "test")) == 1


def test_deterministic_per_seed(data, manifest, tmp_path):
    again = tmp_path / "again.json"
    assert main(["split", str(data), "--out", str(again), "--val", "9", "--test", "10",
                 "--folds", "4", "--seed", "0", "--quiet"]) == 0
    a, b = json.loads(manifest.read_text()), json.loads(again.read_text())
    assert a["folds"] == b["folds"]
    other = make_split(data, SplitConfig(val=9, test=10, folds=4, seed=1), tmp_path,
                       show_progress=False)
    assert other["folds"] != a["folds"]


def test_overlapping_tests_when_too_few_images(data, tmp_path):
    m = make_split(data, SplitConfig(val=5, test=20, folds=4), tmp_path, show_progress=False)
    assert m["test_sets_disjoint"] is False
    for fold in m["folds"]:
        assert not _paths(fold["val"]) & _paths(fold["test"])


def test_leakage_command(data, manifest, tmp_path, capsys):
    assert main(["leakage", str(manifest)]) == 0
    other = tmp_path / "other"
    (other / "benign").mkdir(parents=True)
    Image.open(data / "normal" / "normal (4).png").resize((128, 128)).save(other / "benign" / "x.png")
    shutil.copy(data / "benign" / "benign (5).png", other / "benign" / "y.png")
    capsys.readouterr()
    assert main(["leakage", f"{manifest}:0:train", str(other), "--json"]) in (0, 1)
    assert main(["leakage", str(data), str(other), "--json"]) == 1
    report = json.loads(capsys.readouterr().out.split("\n]\n")[-2] + "\n]")
    kinds = {(p["a"].split("/")[-1], p["b"].split("/")[-1]): p["kind"]
             for p in report[0]["duplicates"]}
    assert kinds == {("normal (4).png", "x.png"): "near", ("benign (5).png", "y.png"): "exact"}


def test_bad_split_input(data, tmp_path):
    with pytest.raises(MeddapError, match="leaves no training images"):
        make_split(data, SplitConfig(val=30, test=40), tmp_path, show_progress=False)
    with pytest.raises(MeddapError, match="--folds = 0"):
        make_split(data, SplitConfig(folds=0), tmp_path, show_progress=False)
    with pytest.raises(MeddapError, match="does not exist"):
        make_split(tmp_path / "missing", SplitConfig(), tmp_path, show_progress=False)


def test_split_config_checks_name_the_setting():
    with pytest.raises(MeddapError, match=r"^--val = 0 must be at least 1\.$"):
        make_split("unused", SplitConfig(val=0), ".", show_progress=False)
    with pytest.raises(MeddapError, match=r"^\[data\] folds = 11 is out of range; use a value from 1 to 10\.$"):
        from_table(SplitConfig, {"folds": 11}, "data")
    with pytest.raises(MeddapError, match=r"^--max-hamming = -2 must be at least -1\.$"):
        make_split("unused", SplitConfig(max_hamming=-2), ".", show_progress=False)


def _data_command(argv):
    """Parse `argv` with meddap.data's own sub-commands and run the handler."""
    parser = argparse.ArgumentParser(prog="meddap")
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_split_help_shows_the_config_defaults(capsys):
    with pytest.raises(SystemExit):
        _data_command(["split", "--help"])
    text = " ".join(capsys.readouterr().out.split())            # argparse wraps lines
    for f in dataclasses.fields(SplitConfig):
        assert f"--{f.name.replace('_', '-')} {f.name.upper()} " in text
        assert f"{f.metadata['help']} (default: {f.default})" in text
    assert "(default: 115)" in text and "(default: 120)" in text and "(default: 48)" in text


def test_split_out_is_not_replaced_by_another_split_without_force(data, tmp_path, capsys):
    out = tmp_path / "split.json"
    flags = ["--val", "9", "--test", "10", "--folds", "2", "--quiet"]
    assert _data_command(["split", str(data), "--out", str(out), *flags, "--seed", "0"]) == 0
    first = out.read_bytes()
    assert _data_command(["split", str(data), "--out", str(out), *flags, "--seed", "0"]) == 0
    assert out.read_bytes() == first                            # the same split: rewriting is harmless
    with pytest.raises(MeddapError, match=f"^{re.escape(str(out))} exists and holds another split; pass --force"):
        _data_command(["split", str(data), "--out", str(out), *flags, "--seed", "1"])
    assert out.read_bytes() == first
    assert _data_command(["split", str(data), "--out", str(out), *flags, "--seed", "1", "--force"]) == 0
    assert json.loads(out.read_text())["seed"] == 1


def test_bad_split_spec(manifest):
    with pytest.raises(MeddapError, match="fold 7 asked"):
        resolve_images(f"{manifest}:7:test")
    with pytest.raises(MeddapError, match="part 'dev' asked"):
        resolve_images(f"{manifest}:0:dev")
