"""The one FID scoring entry: every image set against one reference set.

`meddap fid A B` (meddap.fid.commands) and stage 6 of `meddap run`
(meddap.pipeline.run) both call `score_sets` with a FidConfig:

  1. resolve the sets (class folders, flat folders or SPLIT.json:FOLD:PART),
     at least 2 images each;
  2. pick the feature space (resolve_feature_space) and load its network once;
  3. the reference's features once, then each set's, through the feature
     cache (meddap.fid.stats_cache), in full float32 (inception.tf32_off);
  4. per set: the Fréchet distance d² (meddap.fid.metrics), KID,
     precision/recall/density/coverage (meddap.fid.prdc) and per-class scores
     when asked; or, with formula "as-released", the quantity of the authors'
     fid_calc.py (meddap.fid.as_released).

The result is JSON-ready:

    {"formula", "feature_space": "inception" | "pixels", "is_fid", "dims",
     "network", "weights", "weights_sha256", "official_weights", "notes": [...],
     ["skimage"],                                              (as-released)
     "reference": {"spec", "n", "content_sha256", "from_cache"},
     "sets": {name: {"spec", "n", "content_sha256", "from_cache", "frechet",
                     "mean_term", "trace_term", "rank", "sqrt_method", "offset",
                     ["kid", "kid_std", "kid_subset_size", "kid_num_subsets"],
                     ["precision", "recall", "density", "coverage"],      (prdc)
                     ["per_class": {class: {..., [precision, ...] or ["prdc_error"]}}],
                     "notes": [...]}}}

"frechet" is the FID when "is_fid" is true; on the pixel substitute it is a
Fréchet distance of thumbnails, NOT FID, and the notes say so.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from meddap.data.datasets import ImageSet
from meddap.device import resolve_device
from meddap.errors import MeddapError
from meddap.fid.as_released import as_released_distance, released_extractor
from meddap.fid.config import FeatureSpace, FidConfig, Formula
from meddap.fid.imagenet_inception import DEFAULT_IMAGENET_WEIGHTS, load_imagenet_inception
from meddap.fid.inception import (DEFAULT_FID_WEIGHTS, FID_WEIGHTS_FILE, FID_WEIGHTS_SHA256,
                                  FID_WEIGHTS_URL, fid_extractor, load_fid_inception)
from meddap.fid.metrics import feature_statistics, frechet_distance_detail, kid, per_class
from meddap.fid.pixels import PIXEL_SIDE, pixel_extractor
from meddap.fid.prdc import prdc
from meddap.fid.stats_cache import (FeatureExtractor, FeatureSet, cached_features, default_cache_dir,
                                    resolve_folder)
from meddap.settings import Label, cli_label, validate


def weights_path(cfg: FidConfig) -> Path:
    """cfg.inception_weights, or the default file of the formula's network."""
    if cfg.inception_weights:
        return Path(cfg.inception_weights)
    return DEFAULT_IMAGENET_WEIGHTS if cfg.formula is Formula.AS_RELEASED else DEFAULT_FID_WEIGHTS


def resolve_feature_space(cfg: FidConfig, label: Label = cli_label) -> FeatureSpace:
    """INCEPTION or PIXELS. auto: inception when the weights file exists, else the
    pixel substitute. inception with no weights file is an error. The as-released
    quantity has no substitute, so it always uses its network (cfg.cross_checks
    refuses pixels there)."""
    if cfg.formula is Formula.AS_RELEASED:
        return FeatureSpace.INCEPTION
    present = weights_path(cfg).is_file()
    if cfg.features is FeatureSpace.AUTO:
        return FeatureSpace.INCEPTION if present else FeatureSpace.PIXELS
    if cfg.features is FeatureSpace.INCEPTION and not present:
        raise MeddapError(
            f"{label('features')} = \"inception\" but {label('inception_weights')} = "
            f"{str(weights_path(cfg))!r} does not exist; put pytorch-fid's weight file {FID_WEIGHTS_FILE} "
            f"(SHA-256 {FID_WEIGHTS_SHA256}, released at {FID_WEIGHTS_URL} ; meddap never downloads) "
            f"there or set {label('features')} = \"auto\" (falls back to the pixel substitute, not FID).")
    return cfg.features


def _image_set(spec: str) -> ImageSet:
    image_set = resolve_folder(spec)
    if len(image_set.items) < 2:
        raise MeddapError(f"{spec} has {len(image_set.items)} image; a mean and covariance need "
                          f"at least 2 images per set.")
    return image_set


def feature_extractor(cfg: FidConfig, space: FeatureSpace, label: Label) -> tuple[FeatureExtractor, dict]:
    """The feature extractor (its network loaded once) and the result's fields about it:
    {"network", "weights", "weights_sha256", "official_weights", "notes"}. Also used by
    meddap.fid.memorization."""
    if space is FeatureSpace.PIXELS:
        extractor = pixel_extractor()
        how = "set to \"pixels\"" if cfg.features is FeatureSpace.PIXELS else \
            f"\"auto\" and the FID Inception weights {weights_path(cfg)} are absent"
        note = (f"NOT FID: {label('features')} is {how}, so every distance here is computed on "
                f"{PIXEL_SIDE}x{PIXEL_SIDE} grey thumbnails (meddap.fid.pixels), not on Inception "
                f"features; compare these values only with each other.")
        return extractor, {"network": extractor.settings["network"], "weights": None,
                           "weights_sha256": None, "official_weights": None, "notes": [note]}
    device = resolve_device(cfg.device, label("device"))
    if cfg.formula is Formula.AS_RELEASED:
        net = load_imagenet_inception(weights_path(cfg), device)
        extractor = released_extractor(net, cfg.as_released_skimage)
        notes = ["as-released: the MEDDAP authors' fid_calc.py quantity (paper Table 1); "
                 "it is not an FID (N×N covariances, near-constant network inputs)."]
        if not net.official:
            notes.append(f"weights {net.path} are not torchvision's IMAGENET1K_V1 file "
                         f"(SHA-256 {net.sha256[:12]}...).")
    else:
        net = load_fid_inception(weights_path(cfg), device)
        extractor = fid_extractor(net, cfg.dims)
        notes = [] if net.official else [
            f"weights {net.path} are not pytorch-fid's released file (SHA-256 {net.sha256[:12]}...); "
            f"values are not comparable with published FIDs."]
    return extractor, {"network": extractor.settings["network"], "weights": str(net.path),
                       "weights_sha256": net.sha256, "official_weights": net.official, "notes": notes}


def _describe(spec: str, feats: FeatureSet) -> dict:
    return {"spec": str(spec), "n": len(feats.labels), "content_sha256": feats.content_sha256,
            "from_cache": feats.from_cache}


def _with_prdc(cfg: FidConfig, ref: FeatureSet, feats: FeatureSet, entry: dict) -> None:
    """Add precision/recall/density/coverage (meddap.fid.prdc) to `entry`, for the whole
    set and for each class of entry["per_class"]; the reference is the real set."""
    entry.update(prdc(ref.features, feats.features, cfg.prdc_k))
    ref_labels, labels = np.asarray(ref.labels), np.asarray(feats.labels)
    for c, row in entry.get("per_class", {}).items():
        a, b = ref.features[ref_labels == c], feats.features[labels == c]
        if min(len(a), len(b)) <= cfg.prdc_k:
            row["prdc_error"] = f"PRDC with k = {cfg.prdc_k} needs more than {cfg.prdc_k} images on each side"
        else:
            row.update(prdc(a, b, cfg.prdc_k))


def _standard(cfg: FidConfig, ref: FeatureSet, ref_stats, feats: FeatureSet, spec: str) -> dict:
    """d² against the reference, its parts, and KID / PRDC / per-class scores when asked."""
    r = frechet_distance_detail(*ref_stats, *feature_statistics(feats.features, spec))
    entry = {"frechet": r.value, "mean_term": r.mean_term, "trace_term": r.trace_term, "rank": r.rank,
             "sqrt_method": r.method.value, "offset": r.offset, "notes": []}
    kid_kw = {"num_subsets": cfg.kid_subsets, "subset_size": cfg.kid_subset_size, "seed": cfg.seed}
    if cfg.kid:
        k = kid(ref.features, feats.features, **kid_kw)
        entry.update(kid=k.mean, kid_std=k.std, kid_subset_size=k.subset_size, kid_num_subsets=k.num_subsets)
    if cfg.per_class:
        entry["per_class"] = per_class(ref.features, ref.labels, feats.features, feats.labels,
                                       with_kid=cfg.kid, **kid_kw)
    if cfg.prdc:
        _with_prdc(cfg, ref, feats, entry)
    n_min = min(len(ref.labels), len(feats.labels))
    if n_min <= r.dims:
        entry["notes"].append(
            f"covariances are singular: {n_min} images <= {r.dims} dims, so their rank is at most "
            f"{n_min - 1} (Σ₁Σ₂ has rank {r.rank}). The distance is exact for these sample statistics, "
            f"but FID is biased upwards at small N: compare only at equal N, or use KID.")
    if r.offset:
        entry["notes"].append(f"an offset of {r.offset:g} was added to the covariance diagonals.")
    return entry


def _as_released(cfg: FidConfig, ref: FeatureSet, feats: FeatureSet) -> dict:
    """fid_calc.py's value against the reference (and per class when asked)."""
    entry: dict = {"frechet": as_released_distance(ref.features, feats.features), "notes": []}
    if cfg.per_class:
        entry["per_class"] = {}
        for c in sorted(set(ref.labels) & set(feats.labels)):
            a = ref.features[[lab == c for lab in ref.labels]]
            b = feats.features[[lab == c for lab in feats.labels]]
            row = {"n1": len(a), "n2": len(b)}
            try:
                row["fid"] = as_released_distance(a, b)
            except MeddapError as e:
                row["error"] = str(e)
            entry["per_class"][c] = row
    return entry


def score_sets(cfg: FidConfig, reference: str, sets: dict[str, str], *, label: Label = cli_label) -> dict:
    """Score each of `sets` ({name: folder or SPLIT.json:FOLD:PART}) against
    `reference`, as configured by `cfg`; the JSON-ready result of the module
    docstring. `label` names the settings in errors: cli_label ("--features")
    for `meddap fid`, settings.toml_label("fid") ("[fid] features") for a run."""
    validate(cfg, label)
    # 1. the image sets
    ref_set = _image_set(reference)
    image_sets = {name: _image_set(spec) for name, spec in sets.items()}
    if cfg.formula is Formula.AS_RELEASED:
        for name, spec in sets.items():
            if len(image_sets[name].items) != len(ref_set.items):
                raise MeddapError(f"{label('formula')} = 'as-released' needs the same number of images in "
                                  f"both sets (its covariances are N×N); {reference} has "
                                  f"{len(ref_set.items)}, {spec} has {len(image_sets[name].items)}.")
    # 2. the feature space and its network, loaded once
    space = resolve_feature_space(cfg, label)
    extractor, about = feature_extractor(cfg, space, label)
    cache_dir = None if cfg.no_cache else Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()

    def features(spec: str, image_set: ImageSet) -> FeatureSet:
        return cached_features(image_set, extractor, cache_dir=cache_dir, batch_size=cfg.batch_size,
                               show_progress=not cfg.quiet, desc=f"features {spec}")

    # 3. the reference's features, once
    ref = features(reference, ref_set)
    ref_stats = feature_statistics(ref.features, reference) if cfg.formula is Formula.STANDARD else None
    result = {"formula": cfg.formula.value, "feature_space": space.value,
              "is_fid": cfg.formula is Formula.STANDARD and space is FeatureSpace.INCEPTION,
              "dims": extractor.settings["dims"], **about}
    if cfg.formula is Formula.AS_RELEASED:
        result["skimage"] = cfg.as_released_skimage.value
    result["reference"] = _describe(reference, ref)
    # 4. each set against it
    result["sets"] = {}
    for name, spec in sets.items():
        feats = features(spec, image_sets[name])
        entry = (_standard(cfg, ref, ref_stats, feats, spec) if cfg.formula is Formula.STANDARD
                 else _as_released(cfg, ref, feats))
        result["sets"][name] = {**_describe(spec, feats), **entry}
    return result
