"""`meddap fid` on image folders against pytorch-fid's calculate_fid_given_paths,
the feature cache, mixed sizes and grayscale, and bad input; random weights."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_fid_support import fid_state_dict, pytorch_fid_on, write_images

from meddap.cli import main
from meddap.fid.inception import fid_extractor, load_fid_inception
from meddap.fid.stats_cache import cached_features, resolve_folder


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    state = fid_state_dict(seed=5)
    path = tmp_path_factory.mktemp("w") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    return state, path


def run_cli(capsys, *args) -> tuple[int, dict | None, str]:
    code = main(["fid", *map(str, args), "--quiet"])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 and "--json" in args else None), captured.err


def test_equals_calculate_fid_given_paths(weights, tmp_path, capsys):
    from pytorch_fid.fid_score import calculate_fid_given_paths
    state, path = weights
    write_images(tmp_path / "real", [(48, 64)] * 4, seed=1)
    write_images(tmp_path / "fake", [(48, 64)] * 5, seed=2, lo=40, hi=220)
    with pytorch_fid_on(state):
        expected = calculate_fid_given_paths([str(tmp_path / "real"), str(tmp_path / "fake")],
                                             batch_size=3, device="cpu", dims=192, num_workers=0)
    code, result, _ = run_cli(capsys, tmp_path / "real", tmp_path / "fake", "--dims", 192,
                              "--inception-weights", path, "--batch-size", 2, "--no-cache",
                              "--device", "cpu", "--json", "--out", tmp_path / "fid.json")
    assert code == 0
    assert result["fid"] == pytest.approx(expected, rel=1e-6)
    assert (result["a"]["n"], result["b"]["n"], result["dims"]) == (4, 5, 192)
    assert json.loads((tmp_path / "fid.json").read_text())["fid"] == result["fid"]
    assert any("singular" in n for n in result["notes"]) and not result["official_weights"]


def test_mixed_sizes_and_grayscale(weights, tmp_path):
    """Each image is read as pytorch-fid reads it (PIL convert('RGB'), ToTensor) and
    resized to 299 on its own: features equal pytorch-fid's with batch size 1."""
    from pytorch_fid.fid_score import get_activations
    state, path = weights
    folder = tmp_path / "mixed"
    paths = write_images(folder, [(40, 33), (52, 61)], seed=3)
    paths += write_images(tmp_path / "gray", [(33, 45)], seed=4, mode="L")
    (tmp_path / "gray" / "000.png").rename(folder / "002.png")
    paths[2] = folder / "002.png"
    assert Image.open(paths[2]).mode == "L"
    net = load_fid_inception(path)
    ours = cached_features(resolve_folder(folder), fid_extractor(net, 192), show_progress=False).features
    with pytorch_fid_on(state) as pfi:
        model = pfi.InceptionV3([1])
        expected = np.concatenate([get_activations([p], model, batch_size=1, dims=192, num_workers=0)
                                   for p in paths])
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)


def test_cache_hit_and_invalidation(weights, tmp_path):
    _, path = weights
    write_images(tmp_path / "set" / "benign", [(32, 32)] * 2, seed=6)
    write_images(tmp_path / "set" / "malignant", [(32, 32)], seed=7)
    extractor = fid_extractor(load_fid_inception(path), dims=64)
    calls = []

    def counting_embed(batch):
        calls.append(batch.shape[0])
        return extractor.embed(batch)
    counting = dataclasses.replace(extractor, embed=counting_embed)
    cache = tmp_path / "cache"

    def features():
        return cached_features(resolve_folder(tmp_path / "set"), counting, cache_dir=cache,
                               batch_size=2, show_progress=False)
    first = features()
    assert sum(calls) == 3 and not first.from_cache and first.labels == ["benign", "benign", "malignant"]
    second = features()
    assert sum(calls) == 3 and second.from_cache                  # no model call
    np.testing.assert_array_equal(first.features, second.features)
    write_images(tmp_path / "set" / "malignant", [(32, 32)], seed=8)  # same name, new pixels
    third = features()
    assert sum(calls) == 6 and not third.from_cache
    assert not np.array_equal(third.features[2], first.features[2])
    np.testing.assert_array_equal(third.features[:2], first.features[:2])
    other_dims = dataclasses.replace(counting, settings={**counting.settings, "dims": 192})
    cached_features(resolve_folder(tmp_path / "set"), other_dims, cache_dir=cache, show_progress=False)
    assert sum(calls) == 9                                         # settings are part of the key


def test_per_class_and_kid_in_json(weights, tmp_path, capsys):
    _, path = weights
    for name, seed in (("a", 10), ("b", 20)):
        write_images(tmp_path / name / "benign", [(33, 33)] * 3, seed=seed)
        write_images(tmp_path / name / "malignant", [(33, 33)] * 2, seed=seed + 1)
    code, result, _ = run_cli(capsys, tmp_path / "a", tmp_path / "b", "--dims", 64, "--inception-weights",
                              path, "--cache-dir", tmp_path / "cache", "--per-class", "--kid",
                              "--kid-subsets", 5, "--kid-subset-size", 4, "--json")
    assert code == 0 and set(result["per_class"]) == {"benign", "malignant"}
    assert result["kid"]["subset_size"] == 4 and result["kid"]["num_subsets"] == 5
    assert result["per_class"]["malignant"]["n1"] == 2
    assert result["per_class"]["benign"]["kid"]["num_subsets"] == 1      # 3 vs 3: whole sets
    code, again, _ = run_cli(capsys, tmp_path / "a", tmp_path / "b", "--dims", 64, "--inception-weights",
                             path, "--cache-dir", tmp_path / "cache", "--json")
    assert again["a"]["from_cache"] and again["fid"] == result["fid"]


def test_bad_input(weights, tmp_path, capsys):
    _, path = weights
    write_images(tmp_path / "one", [(33, 33)], seed=1)
    write_images(tmp_path / "three", [(33, 33)] * 3, seed=2)
    (tmp_path / "empty").mkdir()
    common = ("--inception-weights", path, "--no-cache", "--dims", 64)
    code, _, err = run_cli(capsys, tmp_path / "one", tmp_path / "three", *common)
    assert code == 2 and str(tmp_path / "one") in err and "at least 2 images" in err
    code, _, err = run_cli(capsys, tmp_path / "empty", tmp_path / "three", *common)
    assert code == 2 and "holds no images" in err
    code, _, err = run_cli(capsys, tmp_path / "three", tmp_path / "three", "--inception-weights", path,
                           "--dims", 100)
    assert code == 2 and "accepted: 64, 192, 768, 2048" in err
    code, _, err = run_cli(capsys, tmp_path / "three", tmp_path / "three",
                           "--inception-weights", tmp_path / "absent.pth")
    assert code == 2 and "absent.pth" in err and "pytorch-fid/releases" in err
    code, _, err = run_cli(capsys, tmp_path / "three", tmp_path / "three", "--formula", "as-released",
                           "--kid", "--inception-weights", tmp_path / "absent.pth")
    assert code == 2 and "no KID" in err
    write_images(tmp_path / "two", [(33, 33)] * 2, seed=3)
    code, _, err = run_cli(capsys, tmp_path / "three", tmp_path / "two", "--formula", "as-released",
                           "--inception-weights", tmp_path / "absent.pth")
    assert code == 2 and "same number of images" in err
