"""Leakage-safe, stratified folds for `meddap run`, in the manifest format of `meddap split`.

Note: this is the pipeline's own splitter because `meddap.data.splits` had
not landed when the pipeline was written; it writes the same JSON manifest
(`{"root", "classes", "folds": [{"train", "val", "test"}]}`, each entry
`{"path", "class", "sha256"}`, paths relative to root), so that
`resolve_images("split.json:FOLD:PART")` reads it.

Duplicates never straddle parts: exact copies (equal SHA-256) and near copies
(pHash Hamming distance <= meddap.data.hashing.NEAR_DUPLICATE_HAMMING) form a
group (meddap.data.hashing.duplicate_groups) and groups are assigned whole.
Per class, groups are shuffled with the seed; fold k's test part takes the
class's share of `test` images from position k * share (so test parts of
different folds are disjoint while k * test <= N), its val part the next
share, and the training part everything else.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from meddap.data.datasets import ImageSet
from meddap.data.hashing import duplicate_groups, hash_file
from meddap.errors import MeddapError
from meddap.io import write_json_atomic


def make_split(image_set: ImageSet, out: Path, folds: int, val: int, test: int, seed: int) -> dict:
    """Write the split manifest `out` and return it."""
    n = len(image_set.items)
    if val + test >= n:
        raise MeddapError(f"[data] val = {val} and test = {test} leave no training images out of "
                          f"{n} in {image_set.root}; lower them.")
    hashes = [hash_file(it.path) for it in image_set.items]
    groups = duplicate_groups(hashes)
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[list[int]]] = {c: [] for c in image_set.classes}
    for g in groups:                            # a group belongs to its first member's class
        by_class[image_set.items[g[0]].label].append(g)
    for c in by_class:
        order = rng.permutation(len(by_class[c]))
        by_class[c] = [by_class[c][i] for i in order]

    def entry(i: int) -> dict:
        it = image_set.items[i]
        return {"path": it.path.relative_to(image_set.root).as_posix(), "class": it.label,
                "sha256": hashes[i].sha256}

    manifest = {"root": str(image_set.root.resolve()), "classes": list(image_set.classes), "seed": seed,
                "duplicate_groups": sum(len(g) > 1 for g in groups), "folds": []}
    for k in range(folds):
        parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
        for c, cgroups in by_class.items():
            size = sum(len(g) for g in cgroups)
            n_test, n_val = round(test * size / n), round(val * size / n)
            start = (k * n_test) % max(size, 1)
            rotated = cgroups[_index_at(cgroups, start):] + cgroups[:_index_at(cgroups, start)]
            taken = 0
            for g in rotated:
                part = "test" if taken < n_test else "val" if taken < n_test + n_val else "train"
                parts[part].extend(g)
                taken += len(g)
        manifest["folds"].append({p: [entry(i) for i in sorted(ix)] for p, ix in parts.items()})
    write_json_atomic(out, manifest)
    return manifest


def _index_at(groups: list[list[int]], images: int) -> int:
    """The index of the group holding image number `images` in the flattened list."""
    seen = 0
    for i, g in enumerate(groups):
        if seen >= images:
            return i
        seen += len(g)
    return len(groups)
