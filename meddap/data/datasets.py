"""Labelled image folders: BUSI, a plain ImageFolder, Dataset B, and split views.

A dataset is a folder with one sub-folder per class. BUSI keeps lesion masks
beside the images (`benign (1)_mask.png`, `benign (1)_mask_1.png`); they are
never images but are kept as masks of their image.

`resolve_images(spec)` is the one entry point the other stages use. `spec` is
either a folder, or `SPLIT.json:FOLD:PART` (e.g. `split.json:0:train`), a view
of one part of one fold of a split manifest written by `meddap split`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from meddap.errors import MeddapError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_MASK_RE = re.compile(r"^(?P<stem>.*)_mask(_\d+)?$")


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

    def label_ids(self) -> list[int]:
        index = {c: i for i, c in enumerate(self.classes)}
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
    """Open an image as 3-channel RGB (grayscale is replicated), or raise a
    MeddapError naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise MeddapError(f"cannot read image {path}: {e}; expected a PNG/JPEG/BMP/TIFF file.") from e


def scan_folder(root: str | Path, classes: list[str] | None = None) -> ImageSet:
    """List `root/{class}/*` images (masks excluded and attached to their image)."""
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
    items: list[Item] = []
    masks: dict[Path, list[Path]] = {}
    for c in classes:
        folder = root / c
        if not folder.is_dir():
            raise MeddapError(f"class folder {folder} does not exist; classes found in "
                              f"{root}: {', '.join(found) or 'none'}.")
        files = sorted(p for p in folder.iterdir() if is_image_file(p))
        images = {p.stem: p for p in files if not is_mask(p)}
        for p in files:
            m = _MASK_RE.match(p.stem)
            if m and m.group("stem") in images:
                masks.setdefault(images[m.group("stem")].resolve(), []).append(p.resolve())
        items += [Item(p.resolve(), c) for p in images.values()]
    return ImageSet(root=root.resolve(), classes=list(classes), items=items, masks=masks)


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


def resolve_images(spec: str | Path) -> ImageSet:
    """A folder of class folders, or `SPLIT.json:FOLD:PART`."""
    s = str(spec)
    if Path(s).is_dir():
        return scan_folder(s)
    if ".json:" in s:
        return read_split(s)
    raise MeddapError(f"{s} is neither a dataset folder nor a split spec "
                      f"SPLIT.json:FOLD:PART (e.g. split.json:0:train).")
