"""Result cells: one trained classifier and its scores (MEDDAP Tables 1-3, Fig. 1a).

Result folder layout: one JSON file per cell, written atomically when the
cell finishes (so a file that exists is complete):

    RESULTS/cells/<network>/<condition>/fold<k>_seed<s>.json

    network    a command-line name of networks.ARCHITECTURES, e.g. resnet34
    condition  real                          real training images only
               classic                       real images, classic augmentation
                                             (train.augment_batch)
               <adjective>_<percent>         real + synthetic, e.g. high-contrast_50
               classic+<adjective>_<percent> real + synthetic, classic augmentation
    k          fold index
    s          the training seed (TrainConfig.seed: initial weights, shuffles, dropout)

A file named fold<k>.json (written before seeds existed) is read as seed 0;
a cell stored under both names is refused, since it would count twice.

A cell file holds `complete: true`, the cell's identity (network, adjective,
ratio, augment, condition, fold, seed), whether training started from
ImageNet weights, the training summary (train.json), `n_train_real` (real
training images, for the Nadeau-Bengio correction) and `evaluations`: one
metrics dict per test set (evaluate.py: metrics.py's numbers, calibration
`ece`, `brier`, `reliability`, and `correct`, the 0/1 correctness of each
test image in test order, which replaces evaluate's per-image predictions),
keyed `dataset_a` (the fold's BUSI test part), `dataset_b` (the unseen
dataset) and `synthetic/<adjective>` (Fig. 1a: real-only networks scored on
each synthetic set). Cells read by `load_cells` always have `augment` and
`seed` (older files: "none" and 0).

`run_cell(spec, out_path)` is what the pipeline calls per cell; it does
nothing when `out_path` already holds a complete cell.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from meddap.classify.networks import Arch
from meddap.classify.train import Augment, TrainConfig
from meddap.errors import MeddapError
from meddap.io import write_json_atomic

CELL_FORMAT = "meddap-classify-cell/1"
REAL, CLASSIC = "real", "classic"
DATASET_A, DATASET_B, SYNTHETIC = "dataset_a", "dataset_b", "synthetic/"


def condition_name(adjective: str | None, ratio: float, augment: Augment = Augment.NONE) -> str:
    """'real' / 'classic' without synthetic images, else '<adjective>_<percent>'
    (0.5 -> 50), prefixed 'classic+' with classic augmentation."""
    if adjective is None:
        return CLASSIC if augment is Augment.CLASSIC else REAL
    synthetic = f"{adjective}_{round(ratio * 100)}"
    return f"{CLASSIC}+{synthetic}" if augment is Augment.CLASSIC else synthetic


@dataclass(frozen=True)
class CellSpec:
    """One trained classifier and the test sets it is scored on.
    `train.train[0]` is the real training data; further entries are the
    synthetic folders pooled with it."""
    train: TrainConfig
    fold: int
    adjective: str | None = None       # None: real only
    ratio: float = 0.0                 # synthetic images per real image, per class
    tests: tuple[tuple[str, str], ...] = ()   # (test name, folder or SPLIT.json:FOLD:PART)

    @property
    def condition(self) -> str:
        return condition_name(self.adjective, self.ratio, self.train.augment)


def cell_path(results: str | Path, network: Arch, condition: str, fold: int, seed: int = 0) -> Path:
    return Path(results) / "cells" / network.value / condition / f"fold{fold}_seed{seed}.json"


def read_cell(path: Path) -> dict | None:
    """The cell's record, or None when the file is absent or not complete."""
    if not path.is_file():
        return None
    try:
        cell = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MeddapError(f"result cell {path} is not valid JSON ({e}); delete it to recompute.") from e
    return cell if cell.get("complete") is True and cell.get("format") == CELL_FORMAT else None


def run_cell(spec: CellSpec, out_path: str | Path, device: str | None = None) -> dict:
    """Train (resumably, in spec.train.out) and evaluate one cell; write its
    JSON atomically to out_path. A complete existing cell is returned as is."""
    from meddap.classify.evaluate import evaluate
    from meddap.classify.train import train_classifier
    from meddap.data.datasets import resolve_images
    out_path = Path(out_path)
    done = read_cell(out_path)
    if done is not None:
        return done
    summary = train_classifier(spec.train)
    evaluations = {}
    for name, data in spec.tests:
        result = evaluate(spec.train.out, data, device=device or spec.train.device)
        predictions = result.pop("predictions")
        result["correct"] = [int(p["true"] == p["pred"]) for p in predictions]   # test order
        evaluations[name] = result
    cell = {"format": CELL_FORMAT, "complete": True, "network": spec.train.arch.value,
            "adjective": spec.adjective, "ratio": spec.ratio, "augment": spec.train.augment.value,
            "condition": spec.condition, "fold": spec.fold, "seed": spec.train.seed,
            "imagenet_init": summary["imagenet_init"],
            "n_train_real": len(resolve_images(spec.train.train[0]).items),
            "train": summary, "evaluations": evaluations}
    write_json_atomic(out_path, cell)
    return cell


def load_cells(results: str | Path) -> list[dict]:
    """Every complete cell under RESULTS/cells/, in path order; cells written
    before augmentation and seeds existed read as augment "none", seed 0."""
    root = Path(results) / "cells"
    if not root.is_dir():
        raise MeddapError(f"results folder {results} has no cells/ folder; expected "
                          f"cells/<network>/<condition>/fold<k>_seed<s>.json files.")
    cells, seen = [], {}
    for path in sorted(root.glob("*/*/fold*.json")):
        cell = read_cell(path)
        if cell is None:
            continue
        cell = {"augment": Augment.NONE.value, "seed": 0, **cell}
        key = (cell["network"], cell["condition"], cell["fold"], cell["seed"])
        if key in seen:
            raise MeddapError(f"result cells {seen[key]} and {path} are both {key[0]} {key[1]} "
                              f"fold {key[2]} seed {key[3]}; delete one of them.")
        seen[key] = path
        cells.append(cell)
    if not cells:
        raise MeddapError(f"results folder {results} holds no complete cells; expected "
                          f"cells/<network>/<condition>/fold<k>_seed<s>.json files written by "
                          f"`meddap run` (a run with no networks has none).")
    return cells
