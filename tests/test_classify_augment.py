"""The classic-augmentation arm (train.augment_batch, --augment classic): it changes
the inputs, is a function of the run's epoch generator, resumes bit-identically
after a kill, and runs made before the option existed still resume."""
import json

import pytest
import torch

from meddap.classify import train as train_mod
from meddap.classify.cells import CellSpec, cell_path, condition_name, load_cells, run_cell
from meddap.classify.networks import Arch
from meddap.classify.train import Augment, augment_batch, train_classifier
from meddap.cli import main
from meddap.errors import MeddapError
from tests.test_classify_train import _cfg, data  # noqa: F401  (the phantom fixture)


def test_augment_changes_the_batch_and_is_seeded():
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    a = augment_batch(x, torch.Generator().manual_seed(5))
    b = augment_batch(x, torch.Generator().manual_seed(5))
    c = augment_batch(x, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert all(not torch.equal(a[i], x[i]) for i in range(6))
    # the parameters are one (B, 7) draw: the generator ends where that draw leaves it
    g, ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    augment_batch(x, g)
    torch.rand(6, 7, generator=ref, dtype=torch.float64)
    assert torch.equal(g.get_state(), ref.get_state())


def test_cli_flag_comes_from_the_config(capsys):
    with pytest.raises(SystemExit):
        main(["classify", "train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--augment {none,classic}" in text and "(default: none)" in text
    assert condition_name(None, 0.0, Augment.CLASSIC) == "classic"
    assert condition_name("dark", 0.5, Augment.CLASSIC) == "classic+dark_50"
    assert condition_name("dark", 0.5) == "dark_50" and condition_name(None, 0.0) == "real"


def test_classic_resumed_equals_uninterrupted(data, tmp_path, monkeypatch):  # noqa: F811
    cfg = lambda out: _cfg(data, out, epochs=2, augment=Augment.CLASSIC, checkpoint_every=1)  # noqa: E731
    straight = train_classifier(cfg(tmp_path / "straight"))
    plain = train_classifier(_cfg(data, tmp_path / "plain", epochs=2))
    real_save = train_mod.save_torch_atomic
    calls = {"n": 0}

    def dying_save(obj, path):
        if path.name == "state.pt":
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
        real_save(obj, path)

    monkeypatch.setattr(train_mod, "save_torch_atomic", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train_classifier(cfg(tmp_path / "resumed"))
    monkeypatch.setattr(train_mod, "save_torch_atomic", real_save)
    resumed = train_classifier(cfg(tmp_path / "resumed"))
    s1, s2, s0 = (torch.load(tmp_path / d / "state.pt", weights_only=True)
                  for d in ("straight", "resumed", "plain"))
    for key in s1["model"]:
        assert torch.equal(s1["model"][key], s2["model"][key]), key
    b1, b2 = (torch.load(tmp_path / d / "best.pt", weights_only=True) for d in ("straight", "resumed"))
    for key in b1["state_dict"]:
        assert torch.equal(b1["state_dict"][key], b2["state_dict"][key]), key
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(s1["log"]) == drop(s2["log"]) and straight["best_epoch"] == resumed["best_epoch"]
    assert straight["config"]["augment"] == "classic" and plain["config"]["augment"] == "none"
    assert any(not torch.equal(s0["model"][k], s1["model"][k]) for k in s0["model"])
    with pytest.raises(MeddapError, match="settings"):     # augment is part of a run's settings
        train_classifier(_cfg(data, tmp_path / "resumed", epochs=2))


def test_run_without_augment_key_still_resumes(data, tmp_path):  # noqa: F811
    """state.pt and train.json written before --augment existed have no `augment` key."""
    out = tmp_path / "old"
    train_classifier(_cfg(data, out, epochs=1))
    state = torch.load(out / "state.pt", weights_only=True)
    del state["settings"]["augment"]
    torch.save(state, out / "state.pt")
    summary = json.loads((out / "train.json").read_text())
    del summary["config"]["augment"]
    (out / "train.json").write_text(json.dumps(summary))
    assert train_classifier(_cfg(data, out, epochs=1)) == summary      # finished: returned as is
    assert train_classifier(_cfg(data, out, epochs=2))["epochs_run"] == 2


def test_classic_cell_identity_and_correctness(data, tmp_path):  # noqa: F811
    spec = CellSpec(_cfg(data, tmp_path / "w", augment=Augment.CLASSIC, seed=3), fold=1,
                    tests=(("dataset_a", str(data["val"])),))
    path = cell_path(tmp_path / "res", Arch.SQUEEZENET1_1, spec.condition, 1, seed=3)
    assert path == tmp_path / "res" / "cells" / "squeezenet1.1" / "classic" / "fold1_seed3.json"
    cell = run_cell(spec, path)
    assert (cell["condition"], cell["augment"], cell["seed"], cell["fold"]) == ("classic", "classic", 3, 1)
    ev = cell["evaluations"]["dataset_a"]
    assert "predictions" not in ev and len(ev["correct"]) == ev["n"] == 3
    assert sum(ev["correct"]) == round(ev["accuracy"] * ev["n"])
    assert sum(ev["correct"]) == sum(ev["confusion"][i][i] for i in range(3))
    assert load_cells(tmp_path / "res") == [cell]
