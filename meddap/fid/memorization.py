"""`meddap memorization`: does the generator copy its training images?

Diffusion models can reproduce training images, most of all when the
training set is small (Carlini et al. 2023, arXiv 2301.13188; Akbar et al.
2023, arXiv 2305.07644; Dar et al. 2023, arXiv 2307.01148, who apply the test
below to medical images). The check, after Dar et al.:

  1. features of every synthetic, training and held-out test image;
  2. for every synthetic image its nearest training image by cosine distance
     d(a, b) = 1 - a·b / (|a| |b|)   (a zero vector has similarity 0, d = 1);
  3. the same for every held-out test image: these distances show how close a
     NEW image of the same distribution comes to the training set by chance;
  4. flagged: a synthetic image whose distance is below the `percentile`-th
     percentile (numpy's linear interpolation) of the test-to-train distances,
     i.e. closer to a training image than almost every real unseen image is.

When every folder has class folders, the nearest training image is sought in
the same class only, for the synthetic and the test images alike (else among
all training images); the threshold is one, over all test images. Without a test set the reference is
each training image's nearest OTHER training image (leave-one-out); the result
says so (near-duplicates inside the training set lower that threshold).

Features (FeatureSpace, as `meddap fid`):
  inception: the FID Inception's 2048-d pool features (meddap.fid.inception),
    as they are;
  pixels: a labelled substitute needing no weights: the 16x16 grey thumbnails
    of meddap.fid.pixels (256 values), each minus its own mean, so that the
    cosine distance is one minus the Pearson correlation of the thumbnails.
    Why thumbnails: speckle decorrelates within a few pixels, so at full
    resolution a copy shifted by 2 pixels is no closer to its source than a
    novel image is. Measured on 64 px phantoms (meddap.data.phantom, 30 train /
    30 test / 50 novel images, seeds 1 / 2 / 3): full-resolution mean-centred
    cosine gives test-to-train distances from 0.42 and 2-pixel-shifted copies
    up to 0.68 (47 % of them below the 1st percentile); 16x16 mean-centred
    thumbnails give test-to-train from 0.146, 2-pixel shifts at most 0.075,
    Gaussian blurs (radius 1) at most 0.004 (all flagged), 2 of the 50 novel
    images flagged. Without the centring, the shared brightness makes every
    thumbnail alike: 16x16 raw thumbnails caught only 90 % of the shifts.
auto: inception when its weights file exists, else pixels.

The result (JSON-ready):

    {"feature_space", "distance": "cosine", "network", "weights", "weights_sha256",
     "official_weights", "notes": [...], "synthetic", "train", "test",
     "reference": "test" | "train leave-one-out", "n_synthetic", "n_train", "n_test",
     "percentile", "threshold", "n_flagged", "fraction_flagged",
     "flagged": [{"synthetic", "train", "distance"}, ...]           (closest first),
     "test_to_train_quantiles" | "train_to_train_quantiles": {"0%": d, "1%": d, ...},
     "synthetic_to_train_quantiles": {"0%": d, ...},
     "closest": [{"synthetic", "train", "distance", "flagged"}, ...]   (the 16 closest),
     "per_class": {class: {"n_synthetic", "n_flagged", "fraction_flagged"}}}
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meddap.errors import MeddapError
from meddap.fid.config import FeaturePass, FeatureSpace
from meddap.settings import Label, add_command, cli_label, from_args, in_range, setting, validate

QUANTILES = (0, 1, 5, 25, 50)   # percent: the distance distributions the result reports
CLOSEST = 16                    # pairs in "closest" and in the grid
MEMORIZATION_DIMS = 2048        # the FID Inception's pool features


@dataclass(frozen=True, kw_only=True)
class MemorizationConfig(FeaturePass):
    """One memorisation check: synthetic images against their training set."""
    synthetic: str = setting(help="the generated images: a folder (of class folders) or SPLIT.json:FOLD:PART")
    train: str = setting(help="the images the generator was trained on (same forms)")
    test: str | None = setting(
        None, help="held-out real images of the same distribution: their distance to the training set "
                   "sets the threshold (empty: each training image's nearest other training image)")
    features: FeatureSpace = setting(
        FeatureSpace.AUTO,
        help="inception: the FID Inception's 2048-d pool features; pixels: mean-centred 16x16 grey "
             "thumbnails, a substitute needing no weights; auto: inception when its weights file "
             "exists, else pixels")
    percentile: float = setting(1.0, help="flag distances below this percentile of the test-to-train ones",
                                check=in_range(0.0, 100.0))


# ---------------------------------------------------------------- distances

def cosine_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a: (M, D), b: (N, D) -> (M, N) float64, 1 - cos(a_i, b_j) in [0, 2]; a zero row has
    d = 1. Rounding can take an exact copy's 1 - cos slightly below 0: it is clipped there."""
    def unit(x):
        x = np.asarray(x, np.float64)
        norm = np.linalg.norm(x, axis=1, keepdims=True)                # (·, 1)
        return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)
    return np.clip(1.0 - unit(a) @ unit(b).T, 0.0, 2.0)


def nearest(query: np.ndarray, query_labels: list[str], keys: np.ndarray, key_labels: list[str],
            leave_one_out: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """For each query row its nearest key row of the same label: (index (M,), distance (M,)).
    leave_one_out: query and keys are one set, and a row is not its own neighbour."""
    d = cosine_distances(query, keys)                                  # (M, N)
    if leave_one_out:
        np.fill_diagonal(d, np.inf)
    d[np.asarray(query_labels)[:, None] != np.asarray(key_labels)[None, :]] = np.inf
    index = d.argmin(axis=1)                                           # (M,)
    return index, d[np.arange(len(index)), index]


def quantiles(distances: np.ndarray) -> dict[str, float]:
    return {f"{q}%": float(np.percentile(distances, q)) for q in QUANTILES}


# ---------------------------------------------------------------- the check

def _features(space: FeatureSpace, feats: np.ndarray) -> np.ndarray:
    """The vectors compared: Inception features as they are, thumbnails minus their mean."""
    if space is FeatureSpace.PIXELS:
        return feats - feats.mean(axis=1, keepdims=True)               # (N, 256)
    return feats


def _check_classes(what: str, spec: str, labels: list[str], train: str, train_labels: list[str],
                   label: Label) -> None:
    missing = sorted(set(labels) - set(train_labels))
    if missing:
        shown = ", ".join(repr(c) for c in missing)
        raise MeddapError(f"{label(what)} = {spec!r} has the class {shown}, which {label('train')} = "
                          f"{train!r} does not have; the nearest training image is sought within the "
                          f"same class, so use folders with the same class folders (or flat folders).")


def closest_grid(result: dict, path: Path) -> Path:
    """The closest (synthetic above its nearest training image) pairs as one picture, with distances."""
    from meddap.figures import pair_grid

    return pair_grid([(Path(p["synthetic"]), Path(p["train"]),
                       f"{p['distance']:.4f}" + (" flagged" if p["flagged"] else "")) for p in result["closest"]], path)


def memorization(cfg: MemorizationConfig, *, label: Label = cli_label) -> dict:
    """The check of the module docstring; the JSON-ready result described there."""
    from meddap.fid.config import FidConfig
    from meddap.fid.score import feature_extractor, resolve_feature_space
    from meddap.fid.stats_cache import FLAT_LABEL, cached_features, default_cache_dir, resolve_folder

    validate(cfg, label)
    # 1. features, with the extractor (and its network) of `meddap fid`, loaded once
    fid_cfg = FidConfig(features=cfg.features, dims=MEMORIZATION_DIMS, inception_weights=cfg.inception_weights,
                        batch_size=cfg.batch_size, device=cfg.device)
    space = resolve_feature_space(fid_cfg, label)
    extractor, about = feature_extractor(fid_cfg, space, label)
    cache_dir = None if cfg.no_cache else Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    sets = {"synthetic": cfg.synthetic, "train": cfg.train}
    if cfg.test is not None:
        sets["test"] = cfg.test
    feats = {}
    for what, spec in sets.items():
        feats[what] = cached_features(resolve_folder(spec), extractor, cache_dir=cache_dir,
                                      batch_size=cfg.batch_size, show_progress=not cfg.quiet,
                                      desc=f"features {spec}")
    # nearest within the class only when every folder has class folders
    by_class = all(FLAT_LABEL not in f.labels for f in feats.values())
    if by_class:
        for what in sorted(sets.keys() - {"train"}):
            _check_classes(what, sets[what], feats[what].labels, cfg.train, feats["train"].labels, label)
    labels = {what: f.labels if by_class else [FLAT_LABEL] * len(f.labels) for what, f in feats.items()}
    train, syn = feats["train"], feats["synthetic"]
    x_train = _features(space, train.features)                         # (N, D)
    # 2. each synthetic image's nearest training image
    index, distance = nearest(_features(space, syn.features), labels["synthetic"], x_train, labels["train"])
    # 3. the reference: each test image's nearest training image (or leave-one-out)
    if cfg.test is not None:
        _, reference = nearest(_features(space, feats["test"].features), labels["test"], x_train, labels["train"])
    else:
        _, reference = nearest(x_train, labels["train"], x_train, labels["train"], leave_one_out=True)
    if not np.isfinite(reference).all():
        raise MeddapError(f"{label('train')} = {cfg.train!r} has a class with a single image, which has no "
                          f"nearest other training image; give {label('test')}.")
    # 4. flagged: closer than `percentile` % of the reference distances
    threshold = float(np.percentile(reference, cfg.percentile))
    flagged = distance < threshold                                     # (M,)
    order = np.argsort(distance, kind="stable")                        # closest first

    def pair(j: int) -> dict:
        return {"synthetic": syn.paths[j], "train": train.paths[index[j]], "distance": float(distance[j])}

    notes = list(about["notes"])
    if cfg.test is None:
        notes.append(f"no {label('test')}: the threshold is the {cfg.percentile:g}th percentile of each "
                     f"training image's distance to its nearest other training image.")
    per_class = {}
    for c in sorted(set(labels["synthetic"])):
        rows = np.asarray(labels["synthetic"]) == c
        per_class[c] = {"n_synthetic": int(rows.sum()), "n_flagged": int(flagged[rows].sum()),
                        "fraction_flagged": float(flagged[rows].mean())}
    return {"feature_space": space.value, "distance": "cosine", **about, "notes": notes,
            "synthetic": cfg.synthetic, "train": cfg.train, "test": cfg.test,
            "reference": "test" if cfg.test is not None else "train leave-one-out",
            "n_synthetic": len(syn.labels), "n_train": len(train.labels),
            "n_test": len(feats["test"].labels) if cfg.test is not None else 0,
            "percentile": cfg.percentile, "threshold": threshold,
            "n_flagged": int(flagged.sum()), "fraction_flagged": float(flagged.mean()),
            "flagged": [pair(j) for j in order if flagged[j]],
            ("test_to_train_quantiles" if cfg.test is not None else "train_to_train_quantiles"):
                quantiles(reference),
            "synthetic_to_train_quantiles": quantiles(distance),
            "closest": [{**pair(j), "flagged": bool(flagged[j])} for j in order[:CLOSEST]],
            "per_class": per_class}


# ---------------------------------------------------------------- the command

def register(subparsers) -> None:
    """Add `meddap memorization` to the `meddap` parser."""
    p = add_command(
        subparsers, "memorization", MemorizationConfig, run_memorization,
        help="flag synthetic images that are (near) copies of training images",
        description="For every synthetic image its nearest training image (cosine distance on FID "
                    "Inception features, or on mean-centred 16x16 thumbnails); flagged when closer "
                    "than the --percentile-th percentile of held-out test images' distances.")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result to this file")
    p.add_argument("--grid", type=Path, default=None,
                   help=f"write a PNG of the {CLOSEST} closest pairs (synthetic above its nearest training image)")


def run_memorization(args: argparse.Namespace) -> int:
    from meddap.io import write_json_atomic
    from meddap.outdir import check_output_file

    cfg = from_args(MemorizationConfig, args)
    for flag, path, example in (("--out", args.out, "memorization.json"),
                                ("--grid", args.grid, "memorization.png")):
        if path is not None:
            check_output_file(path, flag, example)
    result = memorization(cfg)
    if args.out is not None:
        write_json_atomic(args.out, result)
    if args.grid is not None:
        closest_grid(result, args.grid)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    quantiles_key = "test_to_train_quantiles" if result["test"] is not None else "train_to_train_quantiles"
    print(f"{result['n_flagged']} of {result['n_synthetic']} synthetic images flagged "
          f"({100 * result['fraction_flagged']:.1f} %): nearer a training image than "
          f"{result['percentile']:g} % of the {result['reference']} distances (threshold "
          f"{result['threshold']:.6f}, {result['feature_space']} features, cosine distance)")
    print("reference quantiles: " + ", ".join(f"{q} {v:.6f}" for q, v in result[quantiles_key].items()))
    print("synthetic quantiles: " + ", ".join(f"{q} {v:.6f}" for q, v in
                                              result["synthetic_to_train_quantiles"].items()))
    for p in result["flagged"][:CLOSEST]:
        print(f"  {p['distance']:.6f}  {p['synthetic']}  ~  {p['train']}")
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    return 0
