"""`meddap run` calls exactly what the commands call.

One small config (a phantom folder as the data source, the shipped tiny base, 2 folds, a few
steps) is run through `meddap run`, and the same stages are run by hand through `meddap split`
/ `train-lora` / `expand` / `fid` / `classify train` + `classify eval` with the same settings.
Adapters, images, FID/KID values and the result cells' metrics are bitwise equal on the CPU.
The run's folds also feed the multi-fold result collection and the tables.
"""
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from meddap.cli import main
from meddap.errors import MeddapError
from meddap.pipeline.config import REPO_ROOT, load_config
from meddap.sampling.text_to_image import image_seed

TINY = REPO_ROOT / "weights" / "tiny" / "tiny-sd.safetensors"
FOLDS, SIZE = 2, 64
CONFIG = f"""
[run]
name = "agreement"
seed = 0
device = "cpu"

[data]
source = "folder"
path = "{{data}}"
folds = {FOLDS}
val = 6
test = 6

[lora]
checkpoint = "{TINY}"
rank = 2
max_steps = 3
batch_size = 2
resolution = {SIZE}
cache_latents = true
checkpoint_every = 2
seed = 5

[generate]
adjectives = ["none"]
ratios = [0.25]
sampler = "ddim"
steps = 2
guidance = 5.0
height = {SIZE}
width = {SIZE}
batch_size = 4

[fid]
features = "pixels"

[classify]
networks = ["squeezenet1.1"]
epochs = 1
batch_size = 4
size = {SIZE}
gradcam_images = 0
classic = true
"""


def meddap(*args):
    """The command line, in this process (the same parser and handlers as the `meddap` script)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in args])
    assert code == 0, (args, out.getvalue()[-2000:])
    return out.getvalue()


def pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.relative_to(folder).as_posix(): np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.png"))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("agreement")
    data = root / "data"
    meddap("phantom", "--out", data, "--size", SIZE, "--counts", "benign=12,malignant=12,normal=12", "--quiet")
    config = root / "agreement.toml"
    config.write_text(CONFIG.replace("{data}", str(data)))
    run_out = root / "run"
    meddap("run", config, "--out", run_out)

    # The same stages by hand, each with the settings of its config section.
    hand = root / "hand"
    split = hand / "split.json"
    meddap("split", data, "--out", split, "--val", 6, "--test", 6, "--folds", FOLDS, "--seed", 0, "--quiet")
    for k in range(FOLDS):
        part = f"{split}:{k}"
        lora = hand / f"fold{k}" / "lora"
        meddap("train-lora", "--checkpoint", TINY, "--data", f"{part}:train", "--out", lora, "--rank", 2,
               "--max-steps", 3, "--batch-size", 2, "--resolution", SIZE, "--cache-latents",
               "--checkpoint-every", 2, "--seed", 5, "--device", "cpu", "--quiet")
        syn = hand / f"fold{k}" / "synthetic"
        meddap("expand", "--checkpoint", TINY, "--lora", lora / "lora.safetensors", "--data", f"{part}:train",
               "--out", syn, "--ratios", "0.25", "--adjectives", "none", "--sampler", "ddim", "--steps", 2,
               "--guidance", 5, "--height", SIZE, "--width", SIZE, "--batch-size", 4,
               "--seed", image_seed(0, k), "--device", "cpu", "--quiet")
        fid = json.loads(meddap("fid", f"{part}:train", syn / "no_adjective" / "ratio_0.25" / "train",
                                "--features", "pixels", "--kid", "--json", "--no-cache", "--device", "cpu",
                                "--quiet"))
        (hand / f"fold{k}" / "fid.json").write_text(json.dumps(fid))
        for name, extra in (("real", ()), ("classic", ("--augment", "classic")),
                            ("none_25", ("--train", syn / "no_adjective" / "ratio_0.25" / "train"))):
            net = hand / f"fold{k}" / "squeezenet1.1"
            meddap("classify", "train", "--arch", "squeezenet1.1", "--train", f"{part}:train", *extra,
                   "--val", f"{part}:val", "--out", net / name, "--epochs", 1, "--batch-size", 4, "--size", SIZE,
                   "--seed", 0, "--device", "cpu", "--init", net / "init.pt", "--weights-dir",
                   REPO_ROOT / "weights", "--quiet")
            meddap("classify", "eval", "--model", net / name, "--data", f"{part}:test", "--device", "cpu",
                   "--out", net / f"{name}.eval.json")
    return run_out, hand, split


def test_split_is_the_split_command(runs):
    run_out, hand, split = runs
    ours, theirs = (json.loads(p.read_text()) for p in (run_out / "split" / "split.json", split))
    assert ours["folds"] == theirs["folds"] and ours["settings"] == theirs["settings"]


@pytest.mark.parametrize("k", range(FOLDS))
def test_adapters_images_fid_and_cells_equal_the_commands(runs, k):
    run_out, hand, _ = runs
    ours, theirs = (load_file(d / f"fold{k}" / "lora" / "lora.safetensors") for d in (run_out, hand))
    assert ours.keys() == theirs.keys() and all((ours[n] == theirs[n]).all() for n in ours)

    ours_px, theirs_px = (pixels(d / f"fold{k}" / "synthetic") for d in (run_out, hand))
    assert ours_px.keys() == theirs_px.keys() and ours_px
    assert all(np.array_equal(ours_px[f], theirs_px[f]) for f in ours_px)

    fid = json.loads((run_out / f"fold{k}" / "fid" / "fid.json").read_text())
    row = fid["sets"]["none (x0.25)"]
    by_hand = json.loads((hand / f"fold{k}" / "fid.json").read_text())
    assert fid["feature_space"] == "pixels" and not fid["is_fid"]
    assert row["frechet"] == by_hand["fid"] and row["kid"] == by_hand["kid"]["mean"]

    for name in ("real", "classic", "none_25"):
        cell_file, = (run_out / "results" / "cells" / "squeezenet1.1" / name).glob(f"fold{k}*.json")
        cell = json.loads(cell_file.read_text())
        evaluation = json.loads((hand / f"fold{k}" / "squeezenet1.1" / f"{name}.eval.json").read_text())
        ours = cell["evaluations"]["dataset_a"]
        assert ours.pop("correct") == [int(p["true"] == p["pred"]) for p in evaluation["predictions"]]
        for result in (ours, evaluation):      # where the model and the split live, not what they are
            result.pop("predictions", None), result.pop("model"), result.pop("data")
        assert ours == evaluation and ours["accuracy"] == cell["evaluations"]["dataset_a"]["accuracy"]


def test_multi_fold_collection_and_tables(runs):
    run_out, _, _ = runs
    cells = sorted(p.relative_to(run_out / "results").parent.as_posix() + "/" + p.name[:5]
                   for p in (run_out / "results").rglob("fold*.json"))
    assert cells == [f"cells/squeezenet1.1/{c}/fold{k}" for c in ("classic", "none_25", "real") for k in range(FOLDS)]
    tables = (run_out / "tables" / "tables.md").read_text()
    assert "6 cells" in tables and "| adjective | ratio | squeezenet1.1 |" in tables
    assert "| none | +25% |" in tables and "| real only | — |" in tables


def test_collect_cells_keeps_what_it_did_not_write(runs):
    from meddap.pipeline.run import collect_cells

    run_out, _, _ = runs
    precious = run_out / "results" / "precious.txt"
    precious.write_text("mine")
    try:
        with pytest.raises(MeddapError, match="precious.txt"):
            collect_cells(run_out, FOLDS)
        assert precious.read_text() == "mine"
    finally:
        precious.unlink()
    assert collect_cells(run_out, FOLDS) == run_out / "results"


def test_sections_are_the_stage_configs():
    """No parallel section dataclasses: [lora] is train-lora's config, [generate] extends expand's, ..."""
    from meddap.classify.train import TrainConfig
    from meddap.data.expand import ExpandConfig
    from meddap.data.splits import SplitConfig
    from meddap.fid import FidConfig
    from meddap.lora.train import LoRARunConfig

    cfg = load_config("busi-sd14")
    assert type(cfg.lora) is LoRARunConfig and type(cfg.fid) is FidConfig
    assert isinstance(cfg.generate, ExpandConfig) and isinstance(cfg.classify, TrainConfig)
    assert isinstance(cfg.data, SplitConfig)
    assert cfg.lora.seed == 42 and cfg.lora.mixed_precision.value == "fp16" and cfg.generate.dtype == "fp16"
    assert load_config("demo").lora.seed == 0
