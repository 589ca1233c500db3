"""Classifier training end to end on tiny phantom-like images: every
architecture trains and is scored; conditions share initial weights; a
killed run resumes to the bit-identical result; bad input is refused."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from meddap.classify import train as train_mod
from meddap.classify.evaluate import evaluate
from meddap.classify.networks import (IMAGENET_FILES, Arch, build_network, load_imagenet_body,
                                      make_initial_state, read_imagenet_state, state_sha256)
from meddap.classify.tables import CellSpec, cell_path, run_cell
from meddap.classify.train import TrainConfig, train_classifier
from meddap.cli import main
from meddap.errors import MeddapError

CLASSES = ("benign", "malignant", "normal")


def _phantoms(root, n_per_class, seed, classes=CLASSES, size=40):
    """Speckle (gamma noise) with a dark round (benign) or elongated
    (malignant) lesion, none for normal."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = rng.gamma(2.0, 40.0, (size, size))
            if c != "normal":
                cx, cy = rng.uniform(0.3, 0.7, 2)
                r = (xx - cx) ** 2 + (yy - cy) ** 2 * (1 if c == "benign" else 4)
                img = np.where(r < 0.03, img * 0.2, img)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / c / f"{c} ({i}).png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    return {"train": _phantoms(root / "train", 4, 0), "val": _phantoms(root / "val", 1, 1),
            "synthetic": _phantoms(root / "synthetic", 2, 2),
            "b": _phantoms(root / "b", 2, 3, classes=("benign", "malignant"))}


def _cfg(data, out, arch=Arch.SQUEEZENET1_1, **kw):
    base = dict(arch=arch, train=(str(data["train"]),), val=str(data["val"]), out=out, epochs=1,
                batch_size=4, size=32, weights_dir=None, show_progress=False)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("arch", [a.value for a in Arch])
def test_cli_train_and_eval_each_architecture(arch, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["classify", "train", "--arch", arch, "--train", str(data["train"]), "--val",
                 str(data["val"]), "--out", str(out), "--epochs", "1", "--batch-size", "4",
                 "--size", "32", "--quiet", "--weights-dir", str(tmp_path / "no-weights")]) == 0
    for name in ("init.pt", "state.pt", "best.pt", "log.csv", "train.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "train.json").read_text())
    assert summary["imagenet_init"] is False and "random init" in summary["init_description"]
    assert summary["classes"] == list(CLASSES) and summary["n_train"] == 12
    assert "random init" in capsys.readouterr().out
    assert main(["classify", "eval", "--model", str(out), "--data", str(data["val"]),
                 "--bootstrap", "50", "--out", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    for key in ("accuracy", "sensitivity", "specificity", "precision", "f1", "confusion", "ci95"):
        assert key in result
    assert np.sum(result["confusion"]) == 3 and result["imagenet_init"] is False
    assert main(["classify", "gradcam", "--model", str(out), "--images", str(data["val"]),
                 "--out", str(tmp_path / "cam"), "--limit", "1"]) == 0
    with Image.open(tmp_path / "cam" / "benign_benign (0).png") as im:
        assert im.size == (2 * 32, 32 + 26)                   # input | overlay, caption strip


def test_conditions_start_from_identical_weights(data, tmp_path):
    init = tmp_path / "init.pt"
    real = CellSpec(_cfg(data, tmp_path / "w_real", init=init), fold=0,
                    tests=(("dataset_a", str(data["val"])), ("dataset_b", str(data["b"]))))
    synth = CellSpec(_cfg(data, tmp_path / "w_syn", init=init,
                          train=(str(data["train"]), str(data["synthetic"]))),
                     fold=0, adjective="dark", ratio=0.5, tests=real.tests)
    a = run_cell(real, cell_path(tmp_path / "res", Arch.SQUEEZENET1_1, real.condition, 0))
    b = run_cell(synth, cell_path(tmp_path / "res", Arch.SQUEEZENET1_1, synth.condition, 0))
    assert a["train"]["init"]["init_sha256"] == b["train"]["init"]["init_sha256"]
    assert a["train"]["train_manifest_sha256"] != b["train"]["train_manifest_sha256"]
    assert (a["train"]["n_train"], b["train"]["n_train"]) == (12, 18)
    assert a["n_train_real"] == b["n_train_real"] == 12
    # the shared file holds exactly the seeded initial state, whatever the global RNG did
    torch.manual_seed(123)
    fresh = make_initial_state(Arch.SQUEEZENET1_1, list(CLASSES), 0, None)
    assert state_sha256(fresh.state_dict) == a["train"]["init"]["init_sha256"]
    # cross-dataset cell: 3-class model on benign/malignant data, macro over the 2 present
    assert a["evaluations"]["dataset_b"]["macro_over"] == ["benign", "malignant"]
    # data classes the model never saw are refused
    other = _phantoms(tmp_path / "other", 1, 5, classes=("benign", "cyst"))
    with pytest.raises(MeddapError, match=r"\['cyst'\] that the model"):
        evaluate(tmp_path / "w_real", str(other))
    # a finished cell is not recomputed
    path = cell_path(tmp_path / "res", Arch.SQUEEZENET1_1, "real", 0)
    stamp = path.stat().st_mtime_ns
    assert run_cell(real, path) == a and path.stat().st_mtime_ns == stamp


def test_resumed_run_equals_uninterrupted(data, tmp_path, monkeypatch):
    straight = train_classifier(_cfg(data, tmp_path / "straight", epochs=2))
    # a kill while writing the checkpoint of epoch 2
    real_save = train_mod._save_torch
    calls = {"n": 0}

    def dying_save(obj, path):
        if path.name == "state.pt":
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
        real_save(obj, path)

    monkeypatch.setattr(train_mod, "_save_torch", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train_classifier(_cfg(data, tmp_path / "resumed", epochs=2))
    monkeypatch.setattr(train_mod, "_save_torch", real_save)
    assert torch.load(tmp_path / "resumed" / "state.pt", weights_only=True)["epoch"] == 1
    resumed = train_classifier(_cfg(data, tmp_path / "resumed", epochs=2))
    s1 = torch.load(tmp_path / "straight" / "state.pt", weights_only=True)
    s2 = torch.load(tmp_path / "resumed" / "state.pt", weights_only=True)
    for key in s1["model"]:
        assert torch.equal(s1["model"][key], s2["model"][key]), key
    assert torch.equal(s1["rng_cpu"], s2["rng_cpu"])
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(s1["log"]) == drop(s2["log"])
    assert straight["best_epoch"] == resumed["best_epoch"]
    with pytest.raises(MeddapError, match="settings"):
        train_classifier(_cfg(data, tmp_path / "resumed", epochs=2, lr=0.5))
    with pytest.raises(MeddapError, match="fewer"):
        train_classifier(_cfg(data, tmp_path / "resumed", epochs=1))


def test_validation_class_missing_from_training(data, tmp_path):
    val = _phantoms(tmp_path / "val", 1, 4, classes=("benign", "cyst"))
    with pytest.raises(MeddapError, match=r"validation data .* \['cyst'\]"):
        train_classifier(_cfg(data, tmp_path / "o", val=str(val)))


def test_fewer_images_than_one_batch(data, tmp_path):
    with pytest.raises(MeddapError, match="fewer than one batch of 32"):
        train_classifier(_cfg(data, tmp_path / "o", batch_size=32))
    assert not (tmp_path / "o").exists()


def test_unknown_architecture(data, tmp_path, capsys):
    assert main(["classify", "train", "--arch", "vgg16", "--train", str(data["train"]),
                 "--val", str(data["val"]), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown architecture 'vgg16'" in err and "squeezenet1.1" in err


def test_corrupt_weight_file(data, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / IMAGENET_FILES[Arch.SQUEEZENET1_1]).write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(MeddapError, match="corrupt or not torchvision's file"):
        train_classifier(_cfg(data, tmp_path / "o", weights_dir=weights))
    with pytest.raises(MeddapError, match="not a readable torch checkpoint"):
        read_imagenet_state(Arch.SQUEEZENET1_1, weights / IMAGENET_FILES[Arch.SQUEEZENET1_1],
                            check_hash=False)


def test_imagenet_file_used_when_present(tmp_path, monkeypatch):
    """A 1000-class torchvision state dict under the expected name initialises
    everything but the head; the head is the seeded k-class one."""
    torch.manual_seed(7)
    imagenet = build_network(Arch.SQUEEZENET1_1, 1000).state_dict()
    path = tmp_path / "file.pth"
    torch.save(imagenet, path)
    from meddap.io import sha256_file
    name = f"squeezenet1_1-{sha256_file(path)[:8]}.pth"
    path.rename(tmp_path / name)
    monkeypatch.setitem(IMAGENET_FILES, Arch.SQUEEZENET1_1, name)
    init = make_initial_state(Arch.SQUEEZENET1_1, list(CLASSES), 0, tmp_path)
    random = make_initial_state(Arch.SQUEEZENET1_1, list(CLASSES), 0, None)
    assert init.imagenet_init and init.weights_file == name and not random.imagenet_init
    for key, value in init.state_dict.items():
        expected = random.state_dict[key] if key.startswith("classifier.1.") else imagenet[key]
        assert torch.equal(value, expected), key


def test_old_densenet_keys_are_renamed(tmp_path):
    """torchvision's densenet121-a639ec97.pth names `...denselayer1.norm.1.weight`
    and has no `num_batches_tracked` (saved before PyTorch 0.4.1)."""
    torch.manual_seed(3)
    ours = build_network(Arch.DENSENET121, 1000).state_dict()
    old = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
           for k, v in ours.items() if not k.endswith("num_batches_tracked")}
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    assert "features.denseblock4.denselayer16.conv.2.weight" in old
    torch.save(old, tmp_path / "d.pth")
    state = read_imagenet_state(Arch.DENSENET121, tmp_path / "d.pth", check_hash=False)
    model = build_network(Arch.DENSENET121, 3)
    load_imagenet_body(model, Arch.DENSENET121, state, "d.pth")
    for key, value in model.state_dict().items():
        if not key.startswith("classifier.") and not key.endswith("num_batches_tracked"):
            assert torch.equal(value, ours[key]), key
