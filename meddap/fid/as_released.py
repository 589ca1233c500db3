"""The quantity of the MEDDAP authors' `fid_calc.py` (Table 1's "FID"), quirks and all.

Source: yasamin-med/MEDDAP, fid_calc.py. For each image file:

  1. `Image.open(path).resize((299, 299))`: Pillow's default filter, bicubic
     for RGB images (Pillow >= 7).
  2. `numpy.array(img)`: uint8 (299, 299, 3).
  3. `skimage.transform.resize(image, (299, 299, 3), 0)`: nearest-neighbour
     resize to the size the image already has, i.e. no change of pixels; what
     changes is the dtype (meddap.fid.config.SkimageResize).
  4. `images / 255`.
  5. Keras `preprocess_input` ('tf' mode): x / 127.5 - 1, which expects [0, 255].
  6. Keras `InceptionV3(include_top=False, pooling='avg')`: act (N, 2048) float32.

Then, in `calculate_fid`:

  μ = act.mean(axis=0)                 (2048,)   the mean term is over features
  Σ = cov(act.T, rowvar=False)         (N, N)    rows of act.T are features, so
                                                  the N images are the variables
  d = ‖μ₁ − μ₂‖² + Tr(Σ₁) + Tr(Σ₂) − 2 Tr(sqrtm(Σ₁ Σ₂))

which needs the same N in both sets, and pairs image i of one set with image
i of the other inside Σ₁Σ₂, so the value also depends (slightly) on file order:
fid_calc.py used os.listdir order, we use sorted order. After steps 4-5 every pixel is within
2/255 (or 2/255², see SkimageResize) of -1: the network sees near-constant
images, all images give almost the same features, and the N×N Σ's are near
rank one; hence values below 1. It is not FID (README, "The paper's FID").

Deviations, labelled: images are converted to RGB first (the released script
fails on grayscale/palette files, whose arrays have no channel axis);
torchvision's ImageNet weights replace Keras' (imagenet_inception.py).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import linalg

from meddap.data.datasets import load_rgb
from meddap.errors import MeddapError
from meddap.fid.config import SkimageResize
from meddap.fid.imagenet_inception import ImageNetInception
from meddap.fid.inception import INCEPTION_SIZE, InceptionGraph
from meddap.fid.stats_cache import FeatureExtractor

UINT8_MAX = 255.0             # fid_calc.py: `images1/255`
KERAS_TF_SCALE = 127.5        # keras.applications.imagenet_utils, mode 'tf': x / 127.5 - 1


def nearest_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Order-0 resize of the first two axes of image (H, W, C) -> (h, w, C), dtype kept.

    scikit-image's pixel-centre mapping: source index of output index o is
    round((o + 0.5) * H / h - 0.5) (rounding half up), which stays inside
    [0, H - 1], so no boundary mode is needed. At h = H it is the identity.
    """
    rows = np.floor((np.arange(size[0]) + 0.5) * image.shape[0] / size[0]).astype(np.int64)
    cols = np.floor((np.arange(size[1]) + 0.5) * image.shape[1] / size[1]).astype(np.int64)
    return image[rows[:, None], cols[None, :]]


def released_pixels(path: Path, skimage: SkimageResize = SkimageResize.FLOAT_0_1) -> np.ndarray:
    """Steps 1-5 for one file -> (299, 299, 3) float64 network input (NHWC, Keras)."""
    img = load_rgb(path).resize((INCEPTION_SIZE, INCEPTION_SIZE), Image.Resampling.BICUBIC)
    x = nearest_resize(np.array(img), (INCEPTION_SIZE, INCEPTION_SIZE))          # (299, 299, 3) uint8
    if skimage is SkimageResize.FLOAT_0_1:
        x = x / UINT8_MAX                                                     # img_as_float
    x = x / UINT8_MAX                                                         # fid_calc.py
    return x / KERAS_TF_SCALE - 1.0                                           # preprocess_input


def released_extractor(net: ImageNetInception,
                       skimage: SkimageResize = SkimageResize.FLOAT_0_1) -> FeatureExtractor:
    """Features as fid_calc.py computes them: float32 (N, 2048), like Keras' predict."""

    def prepare(path: Path) -> torch.Tensor:
        x = released_pixels(path, skimage)                                    # (299, 299, 3) float64
        return torch.from_numpy(x).permute(2, 0, 1).to(torch.float32)         # (3, 299, 299)

    def embed(batch: torch.Tensor) -> np.ndarray:
        return net.avgpool_features(batch).cpu().numpy()                      # (B, 2048) float32

    settings = {"network": InceptionGraph.IMAGENET_KERAS.value, "weights_sha256": net.sha256,
                "dims": 2048, "input": f"as-released-skimage-{skimage.value}"}
    return FeatureExtractor(settings=settings, prepare=prepare, embed=embed)


def as_released_distance(act1: np.ndarray, act2: np.ndarray) -> float:
    """fid_calc.py's calculate_fid on activations (N, 2048) of two sets of equal N.

    The released code keeps `covmean` complex when its diagonal's imaginary
    part is below 1e-3 and then fails to print it with '%.3f'; every value it
    printed was therefore the real part, which is what we return.
    """
    if act1.shape[0] != act2.shape[0]:
        raise MeddapError(f"the as-released formula needs the same number of images in both "
                          f"sets (its covariances are N×N); got {act1.shape[0]} and {act2.shape[0]}. "
                          f"Use --formula standard, or compare sets of equal size.")
    if act1.shape[0] < 2:
        raise MeddapError(f"the as-released formula needs at least 2 images per set; got {act1.shape[0]}.")
    mu1, sigma1 = act1.mean(axis=0), np.cov(act1.T, rowvar=False)   # (2048,), (N, N)
    mu2, sigma2 = act2.mean(axis=0), np.cov(act2.T, rowvar=False)
    with warnings.catch_warnings():
        # sqrtm warns that the product is singular; fid_calc.py's disp=False silenced that
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))                   # (N, N)
    diff = mu1 - mu2
    value = diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)
    return float(np.real(value))
