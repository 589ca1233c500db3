"""Leakage-safe, stratified k-fold splits of a labelled image folder.

MEDDAP splits BUSI 545 / 115 / 120 (train / validation / test) with five-fold
cross-validation (paper_facts.md, Data). BUSI has no patient identifiers and
many duplicates, so a naive split puts copies of one scan on both sides. Here:

1. every image is hashed (SHA-256 of the bytes, pHash of the pixels) and
   exact or near copies are grouped (union-find, `hashing.duplicate_groups`);
   a group is placed as a whole and counts for its majority class;
2. per class, groups are put in a seeded random order; fold f's test set
   takes the next groups not yet tested, so test sets of different folds are
   disjoint whenever folds x test <= images (per class); otherwise the groups
   tested longest ago are reused;
3. fold f's validation set is drawn from the following folds' test groups
   (never from its own test set), so validation sets are disjoint too when
   sizes allow; everything else is training data.

Per-class targets are the largest-remainder apportionment of the requested
sizes to the class frequencies; a group that would overshoot a target is
skipped in favour of smaller ones, so sizes are exact unless groups forbid it.

The manifest (JSON) lists every file of every part of every fold with paths
relative to the data folder, whose location is stored as `root`, relative to
the manifest's own folder (so a project folder can be moved as a whole).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meddap.data.datasets import ImageSet, scan_folder
from meddap.data.hashing import NEAR_DUPLICATE_HAMMING, FileHash, duplicate_groups, hash_file
from meddap.errors import MeddapError
from meddap.io import sha256_bytes, write_json_atomic
from meddap.progress import progress
from meddap.settings import as_dict, at_least, in_range, setting, validate

SPLIT_FORMAT = "meddap-split/1"
PARTS = ("train", "val", "test")


@dataclass(frozen=True, kw_only=True)
class SplitConfig:
    """The split's settings; defaults are the paper's (paper_facts.md, Data:
    545 / 115 / 120 of BUSI's 780 images, five folds). `meddap split` derives its
    flags from it, and the pipeline's [data] section extends it."""
    val: int = setting(115, help="validation images per fold", check=at_least(1))
    test: int = setting(120, help="test images per fold", check=at_least(1))
    folds: int = setting(5, help="number of folds", check=in_range(1, 10))
    seed: int = setting(0, help="seed of the fold assignment", check=at_least(0))
    max_hamming: int = setting(NEAR_DUPLICATE_HAMMING, check=at_least(-1),
                               help="pHash distance (of 256 bits) up to which images are near "
                                    "duplicates; -1: exact copies only")

    def settings(self) -> dict:
        """The values of SplitConfig's own fields (not a subclass's), as the manifest records them."""
        values = as_dict(self)
        return {f.name: values[f.name] for f in dataclasses.fields(SplitConfig)}


def hash_images(image_set: ImageSet, strict: bool = False, show_progress: bool = True
                ) -> tuple[list[FileHash], list[int], list[Path]]:
    """Hashes of the readable items, their indices in `image_set.items`, and the
    unreadable paths (an error naming them under `strict`)."""
    hashes, kept, bad = [], [], []
    for i, it in enumerate(progress(image_set.items, desc="hashing", enabled=show_progress)):
        try:
            hashes.append(hash_file(it.path))
            kept.append(i)
        except MeddapError:
            bad.append(it.path)
    if bad and strict:
        raise MeddapError(f"{len(bad)} unreadable image file(s) (strict mode): "
                          + ", ".join(str(p) for p in bad[:20]) + "; remove or replace them.")
    return hashes, kept, bad


def apportion(total: int, sizes: list[int]) -> list[int]:
    """Largest-remainder split of `total` proportional to `sizes` (sums to total)."""
    n = sum(sizes)
    exact = [total * s / n for s in sizes]
    out = [int(e) for e in exact]
    for i in sorted(range(len(sizes)), key=lambda i: (out[i] - exact[i], i))[: total - sum(out)]:
        out[i] += 1
    return out


def _fill(candidates: list[int], sizes: list[int], need: int, banned: set[int]) -> list[int]:
    """Greedy: take candidate groups in order while they fit in `need`."""
    taken = []
    for g in candidates:
        if need == 0:
            break
        if g not in banned and g not in taken and sizes[g] <= need:
            taken.append(g)
            need -= sizes[g]
    return taken


def assign_folds(group_class: list[int], sizes: list[int], n_classes: int, cfg: SplitConfig
                 ) -> tuple[list[dict[str, list[int]]], bool]:
    """Group indices of train/val/test for every fold, and whether the test sets
    are pairwise disjoint. `group_class[g]`: class index of group g."""
    per_class = [[g for g in range(len(sizes)) if group_class[g] == c] for c in range(n_classes)]
    counts = [sum(sizes[g] for g in groups) for groups in per_class]
    test_t = apportion(cfg.test, counts)
    val_t = apportion(cfg.val, counts)
    rng = np.random.default_rng(cfg.seed)
    folds = [{p: [] for p in PARTS} for _ in range(cfg.folds)]
    disjoint = True
    for c, groups in enumerate(per_class):
        order = [groups[i] for i in rng.permutation(len(groups))]
        last_test: dict[int, int] = {}                     # group -> last fold it was tested in
        chunks: list[list[int]] = []
        for f in range(cfg.folds):
            fresh = [g for g in order if g not in last_test]
            reused = sorted((g for g in order if g in last_test), key=lambda g: last_test[g])
            chunk = _fill(fresh + reused, sizes, test_t[c], set())
            disjoint &= not any(g in last_test for g in chunk)
            last_test.update({g: f for g in chunk})
            chunks.append(chunk)
        # Test chunks in fold order, then the never-tested groups: fold f's
        # validation set starts at fold f+1's test chunk.
        sequence = list(dict.fromkeys(g for ch in chunks + [order] for g in ch))
        for f in range(cfg.folds):
            start = sequence.index(chunks[(f + 1) % cfg.folds][0]) if chunks[(f + 1) % cfg.folds] else 0
            rotated = sequence[start:] + sequence[:start]
            val = _fill(rotated, sizes, val_t[c], set(chunks[f]))
            folds[f]["test"] += chunks[f]
            folds[f]["val"] += val
            folds[f]["train"] += [g for g in groups if g not in set(chunks[f]) | set(val)]
    return folds, disjoint


def make_split(data: str | Path, cfg: SplitConfig, manifest_dir: str | Path = ".", *,
               strict: bool = False, show_progress: bool = True) -> dict:
    """The split manifest of the class folders in `data` (see the module doc)."""
    validate(cfg)
    image_set = scan_folder(data)
    hashes, kept, unreadable = hash_images(image_set, strict, show_progress)
    items = [image_set.items[i] for i in kept]
    if cfg.val + cfg.test >= len(items):
        raise MeddapError(f"--val {cfg.val} + --test {cfg.test} leaves no training images: {data} "
                          f"has {len(items)} readable images.")
    groups = duplicate_groups(hashes, cfg.max_hamming)
    classes = image_set.classes
    group_class = []
    for members in groups:
        votes = [classes.index(items[i].label) for i in members]
        group_class.append(max(sorted(set(votes)), key=votes.count))    # majority, ties: first class
    # Canonical group order (by first path) so the seed alone fixes the result.
    rel = [it.path.relative_to(image_set.root).as_posix() for it in items]
    groups = [sorted(m, key=lambda i: rel[i]) for m in groups]
    order = sorted(range(len(groups)), key=lambda g: rel[groups[g][0]])
    groups, group_class = [groups[g] for g in order], [group_class[g] for g in order]
    folds, disjoint = assign_folds(group_class, [len(m) for m in groups], len(classes), cfg)

    def entries(group_ids: list[int]) -> list[dict]:
        idx = sorted((i for g in group_ids for i in groups[g]), key=lambda i: rel[i])
        return [{"path": rel[i], "class": items[i].label, "sha256": hashes[i].sha256} for i in idx]

    manifest_folds = [{p: entries(fold[p]) for p in PARTS} for fold in folds]
    fingerprint = "".join(f"{rel[i]}\t{hashes[i].sha256}\n" for i in sorted(range(len(items)),
                                                                          key=lambda i: rel[i]))
    # A name that is not UTF-8 (b"\xff.png") reaches Python as a lone surrogate ("\udcff.png",
    # os.fsdecode); surrogateescape hashes its bytes as they are on disk, and the manifest's JSON
    # (ASCII, escapes) keeps it as "\udcff", which json.loads and os.fsencode turn back into them.
    return {
        "format": SPLIT_FORMAT,
        "root": os.path.relpath(image_set.root, Path(manifest_dir).resolve()),
        "classes": classes,
        "seed": cfg.seed,
        "settings": {**cfg.settings(), "phash_bits": 256},
        "n_images": len(items),
        "data_sha256": sha256_bytes(fingerprint.encode("utf-8", "surrogateescape")),
        "test_sets_disjoint": disjoint,
        "duplicate_groups": [
            {"paths": [rel[i] for i in m], "classes": sorted({items[i].label for i in m}),
             "exact": len({hashes[i].sha256 for i in m}) == 1}
            for m in groups if len(m) > 1],
        "unreadable": [str(p) for p in unreadable],
        "counts": [{p: {c: sum(e["class"] == c for e in fold[p]) for c in classes} for p in PARTS}
                   for fold in manifest_folds],
        "folds": manifest_folds,
    }


def write_split(data: str | Path, out: str | Path, cfg: SplitConfig, *, strict: bool = False,
                show_progress: bool = True, replace: bool = True) -> dict:
    """`make_split` written atomically to `out` (JSON). With `replace=False`, an
    existing `out` that holds another manifest is an error and stays as it is."""
    out = Path(out)
    manifest = make_split(data, cfg, out.parent, strict=strict, show_progress=show_progress)
    if not replace and out.exists() and _read_json(out) != manifest:
        raise MeddapError(f"{out} exists and holds another split; pass --force to replace it, "
                          f"or choose another --out.")
    write_json_atomic(out, manifest)
    return manifest


def _read_json(path: Path):
    """The JSON in `path`, or None when it is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
