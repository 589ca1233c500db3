"""The pixel substitute for the FID Inception: NOT FID.

When pytorch-fid's Inception weights are absent (meddap never downloads
them), `features = "auto"` scores the images in a space that needs no
weights: each image becomes a 16x16 grey thumbnail, flattened to 256 values
in [0, 1]. The Fréchet distance and KID of meddap.fid.metrics are then
computed on these vectors exactly as on Inception features; the numbers
compare sets with each other within one run, but are not FID values and
never comparable with published FIDs.

Thumbnail: PIL `.convert("L")` of the RGB image (ITU-R 601-2 luma), then
`.resize((16, 16))` with Pillow's default filter (bicubic for "L"), then /255,
in float64.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from meddap.data.datasets import load_rgb
from meddap.fid.stats_cache import FeatureExtractor

PIXEL_SIDE = 16                      # 16 x 16 grey thumbnails
PIXEL_DIMS = PIXEL_SIDE * PIXEL_SIDE  # = 256 features
UINT8_MAX = 255.0


def pixel_thumbnail(path: Path) -> np.ndarray:
    """One image file -> (256,) float64 in [0, 1]: its 16x16 grey thumbnail, row by row."""
    grey = load_rgb(path).convert("L").resize((PIXEL_SIDE, PIXEL_SIDE))
    return np.asarray(grey, np.float64).ravel() / UINT8_MAX                      # (256,)


def pixel_extractor() -> FeatureExtractor:
    """The thumbnails as a feature extractor (batched and cached like the Inception ones)."""
    settings = {"network": "pixels", "dims": PIXEL_DIMS,
                "input": f"pil-rgb-L-resize{PIXEL_SIDE}-default-filter-div255-float64"}
    return FeatureExtractor(settings=settings,
                            prepare=lambda path: torch.from_numpy(pixel_thumbnail(path)),  # (256,)
                            embed=lambda batch: batch.numpy())                              # (B, 256)
