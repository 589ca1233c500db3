"""Loaders: BUSI masks (incl. _mask_1), grayscale, corrupt files, empty classes,
Dataset B and ImageFolder layouts, dataset-info, bad input."""
import json
import re

import numpy as np
import pytest
from PIL import Image

from meddap.cli import main
from meddap.data.datasets import (Layout, describe, detect_layout, load_rgb, resolve_images,
                                  scan_folder)
from meddap.errors import MeddapError


def _png(path, mode="L", size=(20, 16), value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0]) + ((3,) if mode == "RGB" else ()), value, np.uint8)
    Image.fromarray(arr).save(path)


@pytest.fixture()
def busi(tmp_path):
    root = tmp_path / "busi"
    _png(root / "benign" / "benign (1).png")
    _png(root / "benign" / "benign (1)_mask.png", value=255)
    _png(root / "benign" / "benign (1)_mask_1.png", value=255)
    _png(root / "benign" / "benign (2).png", mode="RGB")
    _png(root / "malignant" / "malignant (1).png")
    _png(root / "malignant" / "malignant (1)_mask.png", value=255)
    _png(root / "malignant" / "malignant (7)_mask.png", value=255)      # no image: orphan
    (root / "malignant" / "malignant (2).png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (root / "normal").mkdir()                                            # empty class
    return root


def test_busi_masks_attached_and_excluded(busi):
    s = scan_folder(busi)
    names = sorted(it.path.name for it in s.items)
    assert names == ["benign (1).png", "benign (2).png", "malignant (1).png", "malignant (2).png"]
    masks = {p.name: sorted(m.name for m in ms) for p, ms in s.masks.items()}
    assert masks == {"benign (1).png": ["benign (1)_mask.png", "benign (1)_mask_1.png"],
                     "malignant (1).png": ["malignant (1)_mask.png"]}
    assert [p.name for p in s.orphan_masks] == ["malignant (7)_mask.png"]
    assert s.counts() == {"benign": 2, "malignant": 2, "normal": 0}
    assert detect_layout(s) is Layout.BUSI


def test_grayscale_becomes_three_channels(busi):
    im = load_rgb(busi / "benign" / "benign (1).png")
    assert im.mode == "RGB" and np.asarray(im).shape == (16, 20, 3)
    assert (np.asarray(im) == 100).all()


def test_corrupt_file_reported_by_path_and_fatal_when_strict(busi):
    s = scan_folder(busi, check=True)
    assert [p.name for p in s.unreadable] == ["malignant (2).png"]
    assert s.counts()["malignant"] == 1
    with pytest.raises(MeddapError, match=r"malignant \(2\)\.png"):
        scan_folder(busi, strict=True)
    with pytest.raises(MeddapError, match="cannot read image .*malignant \\(2\\)"):
        load_rgb(busi / "malignant" / "malignant (2).png")


def test_dataset_info_json(busi, capsys):
    assert main(["dataset-info", str(busi), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["classes"] == {"benign": 2, "malignant": 1, "normal": 0}
    assert info["masks"] == {"benign": 2, "malignant": 1, "normal": 0}
    assert [p.endswith("malignant (2).png") for p in info["unreadable"]] == [True]
    assert info["layout"] == "busi"
    assert main(["dataset-info", str(busi), "--strict"]) == 2       # MeddapError -> exit 2
    assert "strict mode" in capsys.readouterr().err


def test_dataset_b_and_imagefolder_layouts(tmp_path):
    b = tmp_path / "kaggle" / "val"
    for c in ("benign", "malignant"):
        for k in range(2):
            _png(b / c / f"{c}{k}.jpg".replace(".jpg", ".png"))
    s = resolve_images(b)
    assert detect_layout(s) is Layout.DATASET_B and describe(s)["layout"] == "dataset-b"
    # Labels by name in a 3-class model's list: benign 0, malignant 1.
    assert s.label_ids(["benign", "malignant", "normal"]) == [0, 0, 1, 1]
    with pytest.raises(MeddapError, match="parts"):        # the Kaggle folder itself holds parts
        scan_folder(tmp_path / "kaggle")
    f = tmp_path / "folder"
    _png(f / "cat" / "a.png")
    _png(f / "dog" / "b.png")
    assert detect_layout(scan_folder(f)) is Layout.IMAGEFOLDER
    with pytest.raises(MeddapError, match="not in the class list"):
        scan_folder(f).label_ids(["cat"])


def test_bad_input(tmp_path):
    with pytest.raises(MeddapError, match="does not exist"):
        scan_folder(tmp_path / "missing")
    (tmp_path / "empty" / "benign").mkdir(parents=True)
    with pytest.raises(MeddapError, match="no images"):
        scan_folder(tmp_path / "empty")
    (tmp_path / "flat").mkdir()
    with pytest.raises(MeddapError, match="no class sub-folders"):
        scan_folder(tmp_path / "flat")
    with pytest.raises(MeddapError, match="nothing does not exist; expected a dataset folder"):
        resolve_images(tmp_path / "nothing")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(MeddapError, match="is not a folder"):
        resolve_images(tmp_path / "file.png")


def test_two_images_with_one_stem_are_an_error_naming_both(tmp_path):
    _png(tmp_path / "d" / "benign" / "a.png")
    _png(tmp_path / "d" / "benign" / "a.jpg")
    _png(tmp_path / "d" / "benign" / "b.png")
    folder = tmp_path / "d" / "benign"
    with pytest.raises(MeddapError, match=f"^class folder {re.escape(str(folder))} holds two images named 'a': "
                                          r"a\.jpg and a\.png; keep one of them or rename the other\.$"):
        scan_folder(tmp_path / "d")
