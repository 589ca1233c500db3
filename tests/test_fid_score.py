"""score_sets, the one FID scoring entry of `meddap fid` and `meddap run`: equal to
the per-set computation it replaces, the pixel substitute, the feature cache,
the feature-space rule, KID's subset size, the TF32-off rule; random weights."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from test_fid_support import fid_state_dict, write_images

import meddap.fid.score as score
from meddap.cli import main
from meddap.data.datasets import load_rgb, resolve_images
from meddap.errors import MeddapError
from meddap.fid import FeatureSpace, FidConfig, Formula, score_sets
from meddap.fid.inception import FID_WEIGHTS_URL, inception_features, load_fid_inception, load_image_01, tf32_off
from meddap.fid.metrics import KID_SUBSET_SIZE, feature_statistics, frechet_distance, kid
from meddap.fid.pixels import pixel_extractor
from meddap.fid.stats_cache import cached_features, resolve_folder
from meddap.settings import toml_label


def old_pixels(spec) -> np.ndarray:
    """meddap.pipeline.run._features before score_sets: the formula, image by image."""
    return np.stack([np.asarray(load_rgb(it.path).convert("L").resize((16, 16)), np.float64).ravel() / 255
                     for it in resolve_folder(spec).items])                                  # (N, 256)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    for name, seed, lo in (("real", 1, 0), ("x", 2, 40), ("y", 3, 90)):
        write_images(root / name / "benign", [(40, 36), (47, 33), (32, 32)], seed=seed, lo=lo)
        write_images(root / name / "malignant", [(36, 44), (34, 34)], seed=seed + 10, lo=lo)
    write_images(root / "gray" / "normal", [(37, 35), (32, 46)], seed=4, mode="L")
    return root


def pixel_cfg(**kw) -> FidConfig:
    return FidConfig(features=FeatureSpace.PIXELS, quiet=True, **{"no_cache": True, **kw})


def test_pixel_extractor_is_the_formula_bitwise(folders):
    for name in ("real", "gray"):
        feats = cached_features(resolve_folder(folders / name), pixel_extractor(), batch_size=2,
                                show_progress=False).features
        expected = old_pixels(folders / name)
        assert feats.dtype == np.float64 and feats.shape == (expected.shape[0], 256)
        np.testing.assert_array_equal(feats, expected)
        assert 0.0 <= feats.min() and feats.max() <= 1.0


def test_pixels_equal_the_old_per_set_computation(folders):
    result = score_sets(pixel_cfg(kid=True), str(folders / "real"),
                        {"x": str(folders / "x"), "y": str(folders / "y")})
    assert (result["feature_space"], result["is_fid"], result["dims"]) == ("pixels", False, 256)
    assert any(n.startswith("NOT FID") for n in result["notes"]) and result["weights"] is None
    real = old_pixels(folders / "real")
    for name in ("x", "y"):
        feats = old_pixels(folders / name)
        row = result["sets"][name]
        assert row["frechet"] == frechet_distance(*feature_statistics(real), *feature_statistics(feats))
        k = kid(real, feats, num_subsets=100, subset_size=KID_SUBSET_SIZE, seed=0)
        assert (row["kid"], row["kid_std"], row["n"]) == (k.mean, k.std, 5)
    json.dumps(result)                                               # JSON-ready


def test_inception_equals_the_old_per_image_computation(tmp_path, monkeypatch):
    """The pipeline embedded one image per call with a network loaded per set; one
    network and batch size 1 give the same features, so the same distances bitwise."""
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(fid_state_dict(seed=3), path)
    for name, seed in (("real", 1), ("x", 2), ("y", 3)):
        write_images(tmp_path / name / "benign", [(40, 36), (47, 33), (32, 32)], seed=seed, lo=30 * seed)
    loads = []
    monkeypatch.setattr(score, "load_fid_inception", lambda *a: loads.append(a) or load_fid_inception(*a))
    cfg = FidConfig(features=FeatureSpace.AUTO, inception_weights=str(path), dims=64, batch_size=1,
                    kid=True, device="cpu", no_cache=True, quiet=True)
    result = score_sets(cfg, str(tmp_path / "real"), {"x": str(tmp_path / "x"), "y": str(tmp_path / "y")})
    assert len(loads) == 1 and result["feature_space"] == "inception" and result["is_fid"]
    net = load_fid_inception(path)

    def old(spec):
        return np.concatenate([inception_features(load_image_01(it.path)[None], net, dims=64)
                               for it in resolve_images(spec).items])
    real = old(tmp_path / "real")
    for name in ("x", "y"):
        feats = old(tmp_path / name)
        row = result["sets"][name]
        assert row["frechet"] == frechet_distance(*feature_statistics(real), *feature_statistics(feats))
        assert row["kid"] == kid(real, feats, num_subsets=100, subset_size=KID_SUBSET_SIZE).mean
    batched = score_sets(dataclasses.replace(cfg, batch_size=3), str(tmp_path / "real"), {"x": str(tmp_path / "x")})
    assert batched["sets"]["x"]["frechet"] == pytest.approx(result["sets"]["x"]["frechet"], rel=1e-5)


def test_reference_once_and_the_cache_the_second_time(folders, tmp_path, monkeypatch):
    extractor = pixel_extractor()
    calls = []

    def counting_embed(batch):
        calls.append(batch.shape[0])
        return extractor.embed(batch)
    monkeypatch.setattr(score, "pixel_extractor", lambda: dataclasses.replace(extractor, embed=counting_embed))
    sets = {"x": str(folders / "x"), "y": str(folders / "y")}
    cfg = pixel_cfg(no_cache=False, cache_dir=str(tmp_path / "cache"))
    first = score_sets(cfg, str(folders / "real"), sets)
    assert sum(calls) == 15                                          # 5 reference + 5 + 5 images
    assert not first["reference"]["from_cache"] and not first["sets"]["x"]["from_cache"]
    second = score_sets(cfg, str(folders / "real"), sets)
    assert sum(calls) == 15                                          # nothing embedded again
    assert second["reference"]["from_cache"] and all(s["from_cache"] for s in second["sets"].values())
    assert [s["frechet"] for s in second["sets"].values()] == [s["frechet"] for s in first["sets"].values()]


def test_kid_subset_size_is_the_one_constant_capped_at_the_smaller_set(tmp_path):
    assert KID_SUBSET_SIZE == 1000
    assert FidConfig.__dataclass_fields__["kid_subset_size"].default == KID_SUBSET_SIZE
    write_images(tmp_path / "a", [(32, 32)] * 110, seed=1)
    write_images(tmp_path / "b", [(32, 32)] * 105, seed=2, lo=30)
    row = score_sets(pixel_cfg(kid=True, kid_subsets=3), str(tmp_path / "a"), {"b": str(tmp_path / "b")})["sets"]["b"]
    assert (row["kid_subset_size"], row["kid_num_subsets"]) == (105, 3)   # not the old pipeline's 100
    a, b = old_pixels(tmp_path / "a"), old_pixels(tmp_path / "b")
    assert row["kid"] == kid(a, b, num_subsets=3, subset_size=KID_SUBSET_SIZE, seed=0).mean


def test_feature_space_rule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                                      # no weights/ here
    absent = str(tmp_path / "absent.pth")
    resolve = score.resolve_feature_space
    assert resolve(FidConfig(features=FeatureSpace.AUTO)) is FeatureSpace.PIXELS
    assert resolve(FidConfig(features=FeatureSpace.PIXELS, inception_weights=absent)) is FeatureSpace.PIXELS
    with pytest.raises(MeddapError) as e:
        resolve(FidConfig(inception_weights=absent))
    assert f"--features = \"inception\" but --inception-weights = {absent!r} does not exist" in str(e.value)
    assert FID_WEIGHTS_URL in str(e.value) and "features = \"auto\"" in str(e.value)
    with pytest.raises(MeddapError, match=r"^\[fid\] features = \"inception\" but \[fid\] inception_weights"):
        resolve(FidConfig(inception_weights=absent), toml_label("fid"))
    present = tmp_path / "w.pth"
    present.write_bytes(b"")
    assert resolve(FidConfig(features=FeatureSpace.AUTO, inception_weights=str(present))) is FeatureSpace.INCEPTION
    with pytest.raises(MeddapError, match="no pixel substitute"):
        score_sets(FidConfig(formula=Formula.AS_RELEASED, features=FeatureSpace.PIXELS), "a", {})


def test_cli_pixels_without_weights(folders, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)                                      # no weights/ here
    code = main(["fid", "--features", "pixels", str(folders / "real"), str(folders / "x"), "--json",
                 "--kid", "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    real, x = old_pixels(folders / "real"), old_pixels(folders / "x")
    assert result["fid"] == frechet_distance(*feature_statistics(real), *feature_statistics(x))
    assert (result["feature_space"], result["is_fid"], result["dims"], result["weights"]) == ("pixels", False, 256, None)
    assert result["kid"]["mean"] == kid(real, x).mean and result["kid"]["subset_size"] == 5
    assert (result["a"]["n"], result["b"]["n"]) == (5, 5) and any("NOT FID" in n for n in result["notes"])
    assert main(["fid", str(folders / "real"), str(folders / "x"), "--quiet"]) == 2   # default: inception
    assert "weights/pt_inception-2015-12-05-6726825d.pth" in capsys.readouterr().err


def test_tf32_is_off_inside_and_restored_after():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        with pytest.raises(RuntimeError, match="inside"):
            with tf32_off():
                assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
                raise RuntimeError("inside")
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
