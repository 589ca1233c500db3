"""Labelled image folders: BUSI, a plain ImageFolder, Dataset B, and split views.

A dataset is a folder with one sub-folder per class. BUSI keeps lesion masks
beside the images (`benign (1)_mask.png`, `benign (1)_mask_1.png`); they are
never images but are kept as masks of their image. Since a mask names its
image by stem, two images with one stem in a class folder (`a.png`, `a.jpg`)
are an error.

Three layouts are recognised (`detect_layout`): BUSI (classes benign,
malignant, normal, with masks), Dataset B (the Kaggle test set: benign and
malignant only, no masks) and any other ImageFolder. All load the same way;
the layout only tells `meddap dataset-info` what it is looking at. A folder
whose sub-folders are parts (train/, val/, test/) is refused with a hint to
pick one part.

`resolve_images(spec)` is the one entry point the other stages use. `spec` is
either a folder, or `SPLIT.json:FOLD:PART` (e.g. `split.json:0:train`), a view
of one part of one fold of a split manifest written by `meddap split`.
Images are only listed there; `check_readable` (or `check=True`) opens every
file and moves the ones that cannot be decoded to `unreadable`, and
`strict=True` turns any unreadable file into an error naming it.
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np
from PIL import Image

from meddap.errors import MeddapError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_MASK_RE = re.compile(r"^(?P<stem>.*)_mask(_\d+)?$")
BUSI_CLASSES = ("benign", "malignant", "normal")      # paper_facts.md, Data: Dataset A
DATASET_B_CLASSES = ("benign", "malignant")           # paper_facts.md, Data: Dataset B
PART_NAMES = ("train", "val", "valid", "validation", "test")
MIN_IMAGE_SIDE = 32     # pixels; smaller files are icons or damage, never scans


class Layout(Enum):
    BUSI = "busi"                 # benign/ malignant/ normal/ (some of them), masks beside images
    DATASET_B = "dataset-b"       # benign/ malignant/ only, no masks
    IMAGEFOLDER = "imagefolder"   # any other class names


@dataclass(frozen=True)
class Item:
    path: Path   # absolute path of the image
    label: str   # class name (the sub-folder's name)


@dataclass
class ImageSet:
    root: Path
    classes: list[str]                     # sorted class names; index = label id
    items: list[Item]
    masks: dict[Path, list[Path]] = field(default_factory=dict)  # image -> its masks
    unreadable: list[Path] = field(default_factory=list)
    orphan_masks: list[Path] = field(default_factory=list)       # masks with no image beside them

    def label_ids(self, classes: list[str] | None = None) -> list[int]:
        """Class index of every item in `classes` (default: this set's own
        classes). Pass a model's class list to score Dataset B (benign,
        malignant) with a 3-class BUSI model: labels are matched by name."""
        names = list(self.classes if classes is None else classes)
        missing = sorted({it.label for it in self.items} - set(names))
        if missing:
            raise MeddapError(f"images of {self.root} have class(es) {missing} that are not in "
                              f"the class list {names}.")
        index = {c: i for i, c in enumerate(names)}
        return [index[it.label] for it in self.items]

    def counts(self) -> dict[str, int]:
        out = {c: 0 for c in self.classes}
        for it in self.items:
            out[it.label] += 1
        return out


def is_mask(path: Path) -> bool:
    """BUSI masks: `<stem>_mask.png` and `<stem>_mask_<k>.png`."""
    return _MASK_RE.match(Path(path).stem) is not None


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image file as 8-bit RGB, or raise a MeddapError naming the file.

    Every reader of images calls this one function, so every stage sees the
    same pixels. Pillow's modes become (H, W, 3) uint8 by one rule:
      RGB            as stored
      L, 1           grey replicated to three channels (1: 0 or 255)
      I;16*, I       16-bit grey: 8-bit = round(v / 257), so 0 -> 0 and 65535 -> 255
                     (I, 32-bit, is clipped to 0..65535 first); v / 257 never ends
                     in .5, so the rounding has no ties
      F              float grey on the 8-bit scale (Pillow's convention): rounded
                     (ties to even), clipped to 0..255; NaN or infinity is an error
      RGBA, LA, PA   composited on black: c · a / 255, rounded (no ties either),
                     so what was transparent is black; also P, L and RGB files
                     with a transparency key
      P              its palette's colours
      CMYK, YCbCr,   Pillow's conversion to RGB
      LAB, HSV, RGBX
    Any other mode is an error. A file that cannot be decoded (damaged,
    truncated, not an image) or is a decompression bomb (more pixels than
    `PIL.Image.MAX_IMAGE_PIXELS`) is "unreadable"; an image with a side under
    MIN_IMAGE_SIDE pixels is refused as too small.
    """
    im = _decode(path)
    w, h = im.size
    if min(w, h) < MIN_IMAGE_SIDE:
        raise MeddapError(f"image {path} is {w}x{h} pixels; meddap needs at least {MIN_IMAGE_SIDE} "
                          f"pixels on each side.")
    if "transparency" in im.info and im.mode in ("P", "L", "RGB"):
        im = im.convert("RGBA")                 # Pillow applies the transparency key here
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("L", "1", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return im.convert("RGB")
    if mode in ("RGBA", "LA", "PA"):
        if mode == "PA":
            im = im.convert("RGBA")
        a = np.asarray(im, dtype=np.int64)     # (H, W, 4) or (H, W, 2) for LA
        colour, alpha = a[..., :-1], a[..., -1:]
        on_black = (2 * colour * alpha + 255) // 510            # round(c · a / 255), no ties
        return _rgb_from_array(on_black)
    if mode.startswith("I;16") or mode == "I":
        v = np.clip(np.asarray(im, dtype=np.int64), 0, 65535)  # (H, W)
        return _rgb_from_array((2 * v + 257) // 514)            # round(v / 257), no ties
    if mode == "F":
        v = np.asarray(im, dtype=np.float64)                   # (H, W)
        if not np.isfinite(v).all():
            raise MeddapError(f"image {path} is a float image with NaN or infinite pixels; "
                              f"meddap reads finite values on the 0..255 scale.")
        return _rgb_from_array(np.clip(np.rint(v), 0, 255))
    raise MeddapError(f"image {path} has Pillow mode {mode!r}; meddap reads RGB, RGBA, L, LA, 1, P, PA, "
                      f"I;16, I, F, CMYK, YCbCr, LAB, HSV and RGBX.")


def _decode(path: str | Path) -> Image.Image:
    """Decode the whole file into memory (a copy detached from the file)."""
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; both refuse here
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return im.copy()
    except Exception as e:  # Pillow's decoders raise OSError, ValueError, SyntaxError, EOFError, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MeddapError(f"cannot read image {path}: unreadable image ({reason}); expected a PNG, "
                          f"JPEG, BMP or TIFF image file.") from e


def _rgb_from_array(grey_or_rgb: np.ndarray) -> Image.Image:
    """An RGB image from (H, W) grey or (H, W, 1|3) values already in 0..255."""
    a = grey_or_rgb.astype(np.uint8)
    if a.ndim == 2:
        a = a[..., None]                        # (H, W, 1)
    return Image.fromarray(np.ascontiguousarray(np.broadcast_to(a, a.shape[:2] + (3,))))  # (H, W, 3)


def scan_folder(root: str | Path, classes: list[str] | None = None, *, check: bool = False,
                strict: bool = False) -> ImageSet:
    """List `root/{class}/*` images (masks excluded and attached to their image).

    A class folder may be empty; a dataset with no image at all is an error.
    With `check` (implied by `strict`), every image is opened: see `check_readable`.
    """
    root = Path(root)
    if not root.is_dir():
        raise MeddapError(f"dataset folder {root} does not exist; expected a folder "
                          f"with one sub-folder per class (e.g. benign/, malignant/, normal/).")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = found
    if not classes:
        raise MeddapError(f"dataset folder {root} has no class sub-folders; expected "
                          f"e.g. {root}/benign/*.png, {root}/malignant/*.png.")
    parts = [c for c in classes if c.lower() in PART_NAMES]
    if parts and len(parts) == len(classes):
        raise MeddapError(f"dataset folder {root} holds parts ({', '.join(parts)}), not classes; "
                          f"pass one part, e.g. {root / parts[0]}.")
    items: list[Item] = []
    masks: dict[Path, list[Path]] = {}
    orphans: list[Path] = []
    for c in classes:
        folder = root / c
        if not folder.is_dir():
            raise MeddapError(f"class folder {folder} does not exist; classes found in "
                              f"{root}: {', '.join(found) or 'none'}.")
        files = sorted(p for p in folder.iterdir() if is_image_file(p))
        images: dict[str, Path] = {}
        for p in files:
            if is_mask(p):
                continue
            if p.stem in images:      # masks are matched by stem, so a stem names one image
                raise MeddapError(f"class folder {folder} holds two images named {p.stem!r}: "
                                  f"{images[p.stem].name} and {p.name}; keep one of them or "
                                  f"rename the other.")
            images[p.stem] = p
        for p in files:
            m = _MASK_RE.match(p.stem)
            if m and m.group("stem") in images:
                masks.setdefault(images[m.group("stem")].resolve(), []).append(p.resolve())
            elif m:
                orphans.append(p.resolve())
        items += [Item(p.resolve(), c) for p in images.values()]
    if not items:
        raise MeddapError(f"dataset folder {root} has class folders ({', '.join(classes)}) but no "
                          f"images in them; expected files ending in {', '.join(IMAGE_SUFFIXES)}.")
    image_set = ImageSet(root=root.resolve(), classes=list(classes), items=items, masks=masks,
                         orphan_masks=orphans)
    return check_readable(image_set, strict) if check or strict else image_set


def check_readable(image_set: ImageSet, strict: bool = False) -> ImageSet:
    """Decode every image; unreadable ones move from `items` to `unreadable`.
    With `strict`, any unreadable file is an error that lists them by path."""
    good, bad = [], list(image_set.unreadable)
    for it in image_set.items:
        try:
            load_rgb(it.path)
            good.append(it)
        except MeddapError:
            bad.append(it.path)
    if bad and strict:
        shown = "\n  ".join(str(p) for p in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise MeddapError(f"{len(bad)} unreadable image file(s) in {image_set.root} (strict mode):"
                          f"\n  {shown}{more}\nremove or replace them, or run without --strict "
                          f"to skip them.")
    image_set.items, image_set.unreadable = good, bad
    return image_set


def detect_layout(image_set: ImageSet) -> Layout:
    """BUSI if the classes are among benign/malignant/normal and masks exist (or
    normal is present); Dataset B for exactly benign and malignant without
    masks; otherwise a plain ImageFolder."""
    names = set(image_set.classes)
    if names == set(DATASET_B_CLASSES) and not image_set.masks:
        return Layout.DATASET_B
    if names <= set(BUSI_CLASSES) and (image_set.masks or "normal" in names):
        return Layout.BUSI
    return Layout.IMAGEFOLDER


def describe(image_set: ImageSet) -> dict:
    """The record `meddap dataset-info --json` prints: per-class image counts,
    mask files per class, unreadable files and orphan masks (lists of paths)."""
    mask_counts = {c: 0 for c in image_set.classes}
    with_mask = {c: 0 for c in image_set.classes}
    for it in image_set.items:
        n = len(image_set.masks.get(it.path, []))
        mask_counts[it.label] += n
        with_mask[it.label] += n > 0
    return {"root": str(image_set.root), "layout": detect_layout(image_set).value,
            "classes": image_set.counts(), "total": len(image_set.items),
            "masks": mask_counts, "images_with_masks": with_mask,
            "unreadable": [str(p) for p in image_set.unreadable],
            "orphan_masks": [str(p) for p in image_set.orphan_masks]}


def read_split(spec: str) -> ImageSet:
    """`SPLIT.json:FOLD:PART` -> the listed files, paths taken relative to the
    manifest's `root` (or the manifest's folder)."""
    try:
        path_s, fold_s, part = spec.rsplit(":", 2)
        fold = int(fold_s)
    except ValueError:
        raise MeddapError(f"split spec {spec!r} is not of the form SPLIT.json:FOLD:PART, "
                          f"e.g. split.json:0:train.") from None
    path = Path(path_s)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MeddapError(f"split manifest {path} does not exist; write one with `meddap split`.") from None
    except json.JSONDecodeError as e:
        raise MeddapError(f"split manifest {path} is not valid JSON: {e.msg}.") from e
    folds = manifest.get("folds", [])
    if not 0 <= fold < len(folds):
        raise MeddapError(f"split manifest {path} has folds 0..{len(folds) - 1}; fold {fold} asked.")
    if part not in folds[fold]:
        raise MeddapError(f"split manifest {path}, fold {fold}, has parts "
                          f"{', '.join(folds[fold])}; part {part!r} asked.")
    root = Path(manifest.get("root", path.parent))
    if not root.is_absolute():
        root = (path.parent / root).resolve()
    entries = folds[fold][part]
    classes = manifest.get("classes") or sorted({e["class"] for e in entries})
    items = [Item((root / e["path"]).resolve(), e["class"]) for e in entries]
    return ImageSet(root=root, classes=list(classes), items=items)


def resolve_images(spec: str | Path, *, check: bool = False, strict: bool = False) -> ImageSet:
    """A folder of class folders, or `SPLIT.json:FOLD:PART`; `check`/`strict`
    as in `scan_folder`."""
    s = str(spec)
    if Path(s).is_dir():
        return scan_folder(s, check=check, strict=strict)
    if ".json:" in s:
        image_set = read_split(s)
        return check_readable(image_set, strict) if check or strict else image_set
    what = "is not a folder" if Path(s).exists() else "does not exist"
    raise MeddapError(f"{s} {what}; expected a dataset folder of class folders or a split "
                      f"spec SPLIT.json:FOLD:PART (e.g. split.json:0:train).")


def resolve_training_images(spec: str) -> ImageSet:
    """`resolve_images(spec)` for a trainer: every class folder must hold an image
    (an empty one would silently train a model with a class it never saw)."""
    image_set = resolve_images(spec)
    empty = [c for c, n in image_set.counts().items() if n == 0]
    if empty:
        raise MeddapError(f"class {empty[0]!r} of {spec} has no images ({image_set.root / empty[0]}); "
                          f"every class folder needs at least one PNG/JPEG/BMP/TIFF image.")
    return image_set
