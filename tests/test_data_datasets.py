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


def _png(path, mode="L", size=(40, 32), value=100):
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
    assert im.mode == "RGB" and np.asarray(im).shape == (32, 40, 3)
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


# ---- load_rgb: one rule for every mode -------------------------------------------------
def _hand_rgb(grey):
    """(H, W) 0..255 ints -> (H, W, 3) uint8, computed by hand."""
    return np.repeat(np.asarray(grey, np.uint8)[..., None], 3, axis=2)


def test_16_bit_grey_is_round_v_over_257(tmp_path):
    v = np.array([0, 1, 128, 129, 385, 386, 257 * 100 + 128, 257 * 100 + 129, 65534, 65535] * 4,
                 np.uint16)
    v = np.concatenate([v, np.arange(0, 65536, 65536 // 984, dtype=np.uint16)[:984]]).reshape(32, 32)
    expected = _hand_rgb([[round(int(x) / 257) for x in row] for row in v])
    assert expected[0, :10, 0].tolist() == [0, 0, 0, 1, 1, 2, 100, 101, 255, 255]
    Image.fromarray(v).save(tmp_path / "i16.png")                       # mode I;16
    Image.fromarray(v.astype(">u2")).save(tmp_path / "i16b.tif")        # mode I;16B
    for name in ("i16.png", "i16b.tif"):
        with Image.open(tmp_path / name) as im:
            assert im.mode in ("I;16", "I;16B")
        assert np.array_equal(np.asarray(load_rgb(tmp_path / name)), expected), name
    wide = v.astype(np.int32)
    wide[0, :2] = [-5, 70_000]                                          # mode I: clipped to 0..65535
    Image.fromarray(wide).save(tmp_path / "i32.tif")
    got = np.asarray(load_rgb(tmp_path / "i32.tif"))
    assert got[0, :2, 0].tolist() == [0, 255] and np.array_equal(got[:, 2:], expected[:, 2:])


def test_float_grey_is_rounded_and_clipped_and_nan_refused(tmp_path):
    f = np.full((32, 32), 7.4, np.float32)
    f[0, :4] = [-3.0, 254.6, 300.0, 0.5]
    Image.fromarray(f).save(tmp_path / "f.tif")
    got = np.asarray(load_rgb(tmp_path / "f.tif"))
    assert got[0, :4, 0].tolist() == [0, 255, 255, 0] and (got[1:] == 7).all()
    f[5, 5] = np.nan
    Image.fromarray(f).save(tmp_path / "nan.tif")
    with pytest.raises(MeddapError, match=r"nan\.tif is a float image with NaN"):
        load_rgb(tmp_path / "nan.tif")


def test_alpha_is_composited_on_black(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = [200, 100, 51]
    rgba[..., 3] = np.arange(32 * 32).reshape(32, 32) % 256            # every alpha value
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    a = rgba[..., 3:].astype(int)
    expected = np.vectorize(lambda x: round(x))(rgba[..., :3] * a / 255).astype(np.uint8)
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "rgba.png")), expected)
    assert np.asarray(load_rgb(tmp_path / "rgba.png"))[0, 0].tolist() == [0, 0, 0]      # alpha 0
    Image.fromarray(rgba[..., [0, 3]]).save(tmp_path / "la.png")                         # mode LA
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "la.png")), _hand_rgb(expected[..., 0]))


def test_palette_with_and_without_transparency_and_bilevel(tmp_path):
    idx = (np.arange(32 * 32).reshape(32, 32) % 3).astype(np.uint8)
    p = Image.new("P", (32, 32))
    p.putpalette([10, 20, 30, 200, 150, 100, 255, 255, 255] + [0] * (256 * 3 - 9))
    p.putdata(idx.ravel().tolist())
    p.save(tmp_path / "p.png")
    colours = np.array([[10, 20, 30], [200, 150, 100], [255, 255, 255]], np.uint8)
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "p.png")), colours[idx])
    p.save(tmp_path / "p_t.png", transparency=1)                        # palette entry 1 transparent
    colours[1] = 0
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "p_t.png")), colours[idx])
    bits = Image.fromarray(idx == 2).convert("1")
    bits.save(tmp_path / "one.png")
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "one.png")), _hand_rgb((idx == 2) * 255))
    Image.new("CMYK", (32, 32), (0, 0, 0, 0)).save(tmp_path / "cmyk.tif")
    assert (np.asarray(load_rgb(tmp_path / "cmyk.tif")) == 255).all()   # no ink: white


def test_decompression_bomb_is_unreadable(tmp_path, monkeypatch):
    _png(tmp_path / "warned.png", size=(40, 40))                        # 1600 px: over the limit
    _png(tmp_path / "bomb.png", size=(64, 64))                          # 4096 px: over twice the limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for name in ("warned.png", "bomb.png"):
        with pytest.raises(MeddapError, match=rf"{name}: unreadable image \(.*decompression bomb"):
            load_rgb(tmp_path / name)


def test_truncated_and_tiny_images_are_errors(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(MeddapError, match=r"cut\.png: unreadable image \(.*truncated"):
        load_rgb(tmp_path / "cut.png")
    _png(tmp_path / "dot.png", size=(1, 1))
    with pytest.raises(MeddapError, match=r"dot\.png is 1x1 pixels; meddap needs at least 32 pixels"):
        load_rgb(tmp_path / "dot.png")
    _png(tmp_path / "thin.png", size=(32, 31))
    with pytest.raises(MeddapError, match=r"thin\.png is 32x31 pixels"):
        load_rgb(tmp_path / "thin.png")
    _png(tmp_path / "ok.png", size=(32, 32))
    assert load_rgb(tmp_path / "ok.png").size == (32, 32)
