"""Image folders -> features (Inception, or the pixel substitute), cached by
content so that repeated comparisons against the same real set cost nothing.

The cache key is the SHA-256 of the set's content hash (meddap.io.dataset_sha256:
every image's label and file SHA-256, in order) + the extractor's settings (network, weights SHA-256, dims,
preprocessing). Any changed, added, removed or relabelled file, or any other
setting, gives a new key; stale entries are simply never read again. Entries
are `.npz` files written atomically (meddap.io.atomic_path).

Folders: a folder of class folders or `SPLIT.json:FOLD:PART`
(meddap.data.datasets.resolve_images), or a flat folder of images as
pytorch-fid reads them (all images get the label FLAT_LABEL). BUSI masks
(`*_mask.png`) are never images.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from meddap.data.datasets import ImageSet, Item, is_image_file, is_mask, resolve_images
from meddap.errors import MeddapError
from meddap.io import atomic_path, dataset_sha256, sha256_bytes
from meddap.progress import Progress

CACHE_FORMAT = 1
FLAT_LABEL = ""   # label of the images of a flat folder (no class sub-folders)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "meddap" / "fid"


@dataclass(frozen=True)
class FeatureExtractor:
    """One way of turning image files into feature vectors.

    settings: everything that changes the features (part of the cache key).
    prepare:  one image file -> one input tensor, e.g. (3, 299, 299) float32 for
              the Inception networks, (256,) float64 for the pixel substitute.
    embed:    the stacked inputs (B, ...) -> (B, d) numpy features.
    """
    settings: dict
    prepare: Callable[[Path], torch.Tensor]
    embed: Callable[[torch.Tensor], np.ndarray]


@dataclass(frozen=True)
class FeatureSet:
    features: np.ndarray      # (N, d)
    labels: list[str]         # class of each row
    paths: list[str]          # file of each row
    content_sha256: str
    from_cache: bool


def resolve_folder(spec: str | Path) -> ImageSet:
    """A flat folder of images, a folder of class folders, or SPLIT.json:FOLD:PART."""
    path = Path(spec)
    if path.is_dir() and not any(c.is_dir() and not c.name.startswith(".") for c in path.iterdir()):
        files = sorted(f for f in path.iterdir() if is_image_file(f) and not is_mask(f))
        image_set = ImageSet(root=path.resolve(), classes=[FLAT_LABEL],
                             items=[Item(f.resolve(), FLAT_LABEL) for f in files])
    else:
        image_set = resolve_images(spec)
    if not image_set.items:
        raise MeddapError(f"{spec} holds no images (.png, .jpg, .jpeg, .bmp, .tif, .tiff); "
                          f"FID needs at least 2.")
    return image_set


def _compute(image_set: ImageSet, extractor: FeatureExtractor, batch_size: int,
             show_progress: bool, desc: str) -> np.ndarray:
    items = image_set.items
    bar = Progress(total=len(items), desc=desc, enabled=show_progress)
    chunks = []
    for start in range(0, len(items), batch_size):
        batch = torch.stack([extractor.prepare(it.path) for it in items[start:start + batch_size]])
        chunks.append(extractor.embed(batch))             # (B, d)
        bar.update(batch.shape[0])
    bar.close()
    return np.concatenate(chunks)                          # (N, d)


def _read(path: Path, n: int) -> np.ndarray | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            features = f["features"]
    except (OSError, ValueError, KeyError):
        return None                                        # torn or foreign file: recompute
    return features if features.shape[0] == n else None


def cached_features(image_set: ImageSet, extractor: FeatureExtractor, *,
                    cache_dir: Path | None = None, batch_size: int = 50,
                    show_progress: bool = True, desc: str = "features") -> FeatureSet:
    """Features of every image of `image_set`, read from `cache_dir` when this
    content was already seen with these settings (cache_dir None: no cache)."""
    if batch_size < 1:
        raise MeddapError(f"batch size {batch_size} must be at least 1.")
    content = dataset_sha256(image_set.items)
    labels = [it.label for it in image_set.items]
    paths = [str(it.path) for it in image_set.items]
    key = sha256_bytes(json.dumps({"format": CACHE_FORMAT, "content": content,
                                   "settings": extractor.settings}, sort_keys=True).encode())
    entry = None if cache_dir is None else Path(cache_dir) / f"{key}.npz"
    if entry is not None and entry.is_file():
        features = _read(entry, len(paths))
        if features is not None:
            return FeatureSet(features, labels, paths, content, from_cache=True)
    features = _compute(image_set, extractor, batch_size, show_progress, desc)
    if entry is not None:
        with atomic_path(entry) as tmp, open(tmp, "wb") as f:
            np.savez(f, features=features, labels=np.array(labels), paths=np.array(paths),
                     settings=json.dumps(extractor.settings, sort_keys=True), content_sha256=content)
    return FeatureSet(features, labels, paths, content, from_cache=False)
