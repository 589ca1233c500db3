"""Exact and near-duplicate detection: SHA-256 and a 256-bit DCT perceptual hash.

BUSI holds many duplicates and near-duplicates (the same scan saved twice,
re-cropped, with or without calipers; paper_facts.md, "BUSI data hygiene").
A split must keep every copy on one side, so duplicates are grouped first.

pHash (Zauner, "Implementation and Benchmarking of Perceptual Image Hash
Functions", 2010), ours:
    1. grayscale, resize to 64 x 64 (PIL's bilinear filter, which widens its
       support when it downsamples, so it averages rather than skips pixels);
    2. black background (cells within 2 grey levels of the darkest) set to the
       mean of the rest;
    3. 2-D DCT-II, orthonormal (scipy.fft.dctn, norm="ortho");
    4. keep the 16 x 16 lowest frequencies (DC included);
    5. bit = coefficient > median of those 256 coefficients; hex digits read
       the bits row-major, most significant first.
Two images are near duplicates when the Hamming distance of their hashes is at
most NEAR_DUPLICATE_HAMMING.

Deviation from the `imagehash` package's `phash(image, hash_size=16)` (4.3.2,
JohannesBuchner/imagehash, commit 4e289eb): it shares the 64 x 64 size
(hash_size x highfreq_factor 4), the 16 x 16 block with its DC term, the
median threshold and the bit order, but it resizes with LANCZOS, has no
step 2, and takes scipy.fftpack.dct (type II) with its default, unnormalised
scaling along each axis. Unnormalised coefficients are 2N = 128 times ours
except row 0 and column 0, which are 128 sqrt(2) times ours (the DC term 256
times), so the median and the bits of the first row and column can differ.
Our hashes are therefore not imagehash's hashes.

Note: the common pHash has 64 bits (8 x 8). Ultrasound images of one device
look alike at that resolution: among 780 distinct phantom images some pairs
came within 4-6 bits, as close as a copy cropped by 2%. 256 bits separate
them (distinct phantom pairs: 62 bits or more; copies re-scaled, JPEG-saved,
blurred, brightened or cropped by 2%: 42 or fewer). Like every pHash it does
not see through rotation: a copy rotated by 3 degrees is 50-65 bits away.
Step 2 is ours too: without it the scan area's outline (a fan for convex
probes), shared by every image of a device, dominates the low frequencies.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from meddap.io import sha256_file

PHASH_SIZE = 64          # resize side before the DCT
PHASH_LOW = 16           # low-frequency block side: 16 x 16 = 256 bits
PHASH_WORDS = PHASH_LOW * PHASH_LOW // 64      # the hash as 4 uint64 words
BACKGROUND_LEVELS = 2    # grey levels above the darkest cell that count as background
NEAR_DUPLICATE_HAMMING = 48    # of 256 bits; see the note above


def phash(image: Image.Image) -> str:
    """256-bit DCT perceptual hash of a PIL image, as 64 hex digits
    (bit i = row-major coefficient i, most significant first)."""
    gray = image.convert("L").resize((PHASH_SIZE, PHASH_SIZE), Image.Resampling.BILINEAR)
    pixels = np.asarray(gray, dtype=np.float64)                          # (64, 64)
    background = pixels <= pixels.min() + BACKGROUND_LEVELS
    if not background.all():
        pixels = np.where(background, pixels[~background].mean(), pixels)
    import scipy.fft  # here, not at the top: every command's parser imports this module

    low = scipy.fft.dctn(pixels, type=2, norm="ortho")[:PHASH_LOW, :PHASH_LOW]   # (16, 16)
    return np.packbits((low > np.median(low)).ravel()).tobytes().hex()  # 256 bits


def hash_words(hashes: list[str]) -> np.ndarray:
    """Hex hashes -> (N, PHASH_WORDS) uint64 array for fast Hamming distances."""
    raw = b"".join(bytes.fromhex(h) for h in hashes)
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64).reshape(len(hashes), PHASH_WORDS)


def hamming_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances (Na, Nb) of hash arrays a (Na, W), b (Nb, W)."""
    x = np.bitwise_xor(a[:, None, :], b[None, :, :])                    # (Na, Nb, W) uint64
    return np.bitwise_count(x).sum(axis=-1, dtype=np.int64)            # (Na, Nb)


@dataclass(frozen=True)
class FileHash:
    path: Path
    sha256: str
    phash: str       # 64 hex digits


def hash_file(path: Path) -> FileHash:
    """SHA-256 of the bytes and pHash of the decoded image (raises MeddapError
    naming the file when it cannot be decoded)."""
    from meddap.data.datasets import load_rgb
    return FileHash(path, sha256_file(path), phash(load_rgb(path)))


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving; `groups()` lists them."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)

    def groups(self) -> list[list[int]]:
        out: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            out.setdefault(self.find(i), []).append(i)
        return sorted(out.values())


def duplicate_groups(hashes: list[FileHash], max_hamming: int = NEAR_DUPLICATE_HAMMING
                     ) -> list[list[int]]:
    """Indices grouped so that exact copies (equal SHA-256) and near copies
    (pHash Hamming <= max_hamming) share a group, transitively. Singletons
    included; groups sorted by their smallest index."""
    uf = UnionFind(len(hashes))
    first: dict[str, int] = {}
    for i, h in enumerate(hashes):
        uf.union(first.setdefault(h.sha256, i), i)
    if max_hamming >= 0 and hashes:
        codes = hash_words([h.phash for h in hashes])                   # (N, W)
        for start in range(0, len(codes), 256):                          # rows in blocks: bounded memory
            d = hamming_matrix(codes[start:start + 256], codes)          # (block, N)
            for i, j in zip(*np.nonzero(d <= max_hamming)):
                uf.union(start + int(i), int(j))
    return uf.groups()


def cross_duplicates(a: list[FileHash], b: list[FileHash],
                     max_hamming: int = NEAR_DUPLICATE_HAMMING) -> list[tuple[int, int, str, int]]:
    """Pairs (i, j, kind, hamming) with a[i] duplicating b[j]: kind "exact"
    (same SHA-256) or "near" (pHash Hamming <= max_hamming). A file is never
    paired with itself (same resolved path)."""
    if not a or not b:
        return []
    by_sha: dict[str, list[int]] = {}
    for j, h in enumerate(b):
        by_sha.setdefault(h.sha256, []).append(j)
    pairs = {(i, j): "exact" for i, h in enumerate(a) for j in by_sha.get(h.sha256, [])}
    codes_a, codes_b = hash_words([h.phash for h in a]), hash_words([h.phash for h in b])
    dist: dict[tuple[int, int], int] = {}
    for start in range(0, len(a), 256):                                  # rows in blocks
        d = hamming_matrix(codes_a[start:start + 256], codes_b)          # (block, Nb)
        for i, j in zip(*np.nonzero(d <= max(max_hamming, 0))):
            dist[(start + int(i), int(j))] = int(d[i, j])
        for i, j in pairs:
            if start <= i < start + 256:
                dist[(i, j)] = int(d[i - start, j])
    for key, hd in dist.items():
        if hd <= max_hamming:
            pairs.setdefault(key, "near")
    return sorted((i, j, kind, dist[(i, j)]) for (i, j), kind in pairs.items()
                  if a[i].path.resolve() != b[j].path.resolve())
