"""`--formula as-released` against a line-by-line numpy transcription of the
authors' fid_calc.py (yasamin-med/MEDDAP), with torchvision's Inception3 as
Keras' InceptionV3 stand-in, on random weights."""
from __future__ import annotations

import numpy
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg, ndimage
from test_fid_support import randomize, write_images

from meddap.cli import main
from meddap.errors import MeddapError
from meddap.fid.as_released import SkimageResize, as_released_distance, nearest_resize, released_pixels


@pytest.fixture(scope="module")
def keras_stand_in(tmp_path_factory):
    """torchvision Inception3 with TF-style pools (Keras' graph), its random weights
    saved as a torchvision-layout file, and a Keras-like `predict` (NHWC in)."""
    import torchvision.models.inception as tvi
    from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1
    model = tvi.Inception3(num_classes=1000, aux_logits=True, init_weights=False,
                           inception_blocks=[tvi.BasicConv2d, FIDInceptionA, tvi.InceptionB,
                                             FIDInceptionC, tvi.InceptionD, FIDInceptionE_1,
                                             tvi.InceptionAux])
    state = randomize(model.state_dict(), seed=11)
    model.load_state_dict(state)
    model.fc = torch.nn.Identity()                     # include_top=False, pooling='avg'
    model.eval()
    path = tmp_path_factory.mktemp("w") / "inception_v3_google-0cc3c7bd.pth"
    torch.save(state, path)

    def predict(images_nhwc):
        # contiguous NCHW as ours: a different memory layout changes float32 round-off,
        # and this quantity is dominated by round-off (near-constant inputs)
        x = torch.from_numpy(np.asarray(images_nhwc, np.float32)).permute(0, 3, 1, 2).contiguous()
        with torch.no_grad():
            return model(x).numpy()                    # float32, like Keras
    return path, predict


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    write_images(root / "real", [(40, 52), (61, 47), (50, 50)], seed=1)
    write_images(root / "synthetic", [(64, 64), (33, 70), (45, 45)], seed=2, lo=60, hi=200)
    return root


def fid_calc_transcription(paths1, paths2, predict):
    """fid_calc.py, step for step; only os.listdir is replaced by the sorted list
    (the value depends on the pairing of images) and Keras by `predict`."""
    def scale_images(images, new_shape):
        # skimage.transform.resize(image, new_shape, 0) with scikit-image <= 0.18:
        # same shape, nearest neighbour -> pixels unchanged, converted by img_as_float
        assert images.shape[1:] == new_shape
        return numpy.asarray([image / 255.0 for image in images])

    def preprocess_input(x):                           # keras, mode 'tf'
        x = x.copy()
        x /= 127.5
        x -= 1.
        return x

    def calculate_fid(images1, images2):
        act1 = predict(images1)
        act2 = predict(images2)
        mu1, sigma1 = act1.mean(axis=0), numpy.cov(act1.T, rowvar=False)
        mu2, sigma2 = act2.mean(axis=0), numpy.cov(act2.T, rowvar=False)
        mu1, mu2 = numpy.atleast_1d(mu1), numpy.atleast_1d(mu2)
        sigma1, sigma2 = numpy.atleast_2d(sigma1), numpy.atleast_2d(sigma2)
        temp = sigma1.dot(sigma2)
        covmean = linalg.sqrtm(temp)
        if numpy.iscomplexobj(covmean):
            if not numpy.allclose(numpy.diagonal(covmean).imag, 0, atol=1e-3):
                covmean = covmean.real
        diff = mu1 - mu2
        tr_covmean = numpy.trace(covmean)
        return (diff.dot(diff) + numpy.trace(sigma1) + numpy.trace(sigma2) - 2 * tr_covmean)

    def load(paths):
        images = []
        for path in paths:
            img = Image.open(path)
            img = img.resize((299, 299))  # Resize to 299x299
            img = numpy.array(img)
            images.append(img)
        return numpy.array(images)

    images1 = scale_images(load(paths1), (299, 299, 3))
    images2 = scale_images(load(paths2), (299, 299, 3))
    images1 = preprocess_input(images1 / 255)
    images2 = preprocess_input(images2 / 255)
    return float(numpy.real(calculate_fid(images1, images2)))


def test_cli_equals_transcription(keras_stand_in, folders, tmp_path, capsys):
    import json
    weights, predict = keras_stand_in
    expected = fid_calc_transcription(sorted((folders / "real").glob("*.png")),
                                      sorted((folders / "synthetic").glob("*.png")), predict)
    assert main(["fid", str(folders / "real"), str(folders / "synthetic"), "--formula", "as-released",
                 "--inception-weights", str(weights), "--cache-dir", str(tmp_path), "--json",
                 "--quiet", "--batch-size", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["formula"] == "as-released" and result["a"]["n"] == 3
    assert result["fid"] == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_pixels_follow_each_scikit_image_behaviour(folders):
    path = sorted((folders / "real").glob("*.png"))[0]
    raw = np.array(Image.open(path).resize((299, 299)), dtype=np.float64)       # Pillow default filter
    old = released_pixels(path, SkimageResize.FLOAT_0_1)
    new = released_pixels(path, SkimageResize.KEEP_UINT8)
    np.testing.assert_array_equal(old, raw / 255 / 255 / 127.5 - 1)
    np.testing.assert_array_equal(new, raw / 255 / 127.5 - 1)
    assert old.max() <= -1 + 2 / 255 ** 2 + 1e-12 and new.max() <= -1 + 2 / 255 + 1e-12  # near-constant


@pytest.mark.parametrize("src,dst", [((299, 299), (299, 299)), ((7, 9), (3, 4)),
                                     ((5, 6), (11, 13)), ((10, 10), (5, 5))])
def test_nearest_resize_matches_scikit_image_zoom(src, dst):
    """scikit-image >= 0.19 resizes with ndimage.zoom(order=0, grid_mode=True)."""
    image = np.random.default_rng(0).integers(0, 256, src + (3,), dtype=np.uint8)
    expected = ndimage.zoom(image, (dst[0] / src[0], dst[1] / src[1], 1), order=0,
                            mode="grid-mirror", grid_mode=True)
    np.testing.assert_array_equal(nearest_resize(image, dst), expected)


def test_unequal_sizes_are_refused():
    with pytest.raises(MeddapError, match="same number of images"):
        as_released_distance(np.zeros((3, 2048), np.float32), np.zeros((4, 2048), np.float32))
