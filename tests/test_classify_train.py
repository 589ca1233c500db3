"""Classifier training end to end on tiny phantom-like images: every
architecture trains and is scored; conditions share initial weights; a
killed run resumes to the bit-identical result; bad input is refused."""
import dataclasses
import json
import re
from enum import Enum
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from meddap.classify import train as train_mod
from meddap.classify.cells import CellSpec, cell_path, run_cell
from meddap.classify.evaluate import evaluate
from meddap.classify.networks import (ARCHITECTURES, Arch, build_network,
                                      load_imagenet_body, make_initial_state, read_imagenet_state,
                                      state_sha256)
from meddap.classify.train import Augment, Precision, TrainConfig, train_classifier
from meddap.cli import main
from meddap.data.datasets import resolve_images
from meddap.errors import MeddapError
from meddap.io import dataset_sha256, stream_seed

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
                batch_size=4, size=32, weights_dir=out / "no-weights", show_progress=False)
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
    assert a["train"]["train_manifest_sha256"] == dataset_sha256(resolve_images(str(data["train"])).items)
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
    straight = train_classifier(_cfg(data, tmp_path / "straight", epochs=2, checkpoint_every=1))
    # a kill while writing the checkpoint of epoch 2
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
        train_classifier(_cfg(data, tmp_path / "resumed", epochs=2, checkpoint_every=1))
    monkeypatch.setattr(train_mod, "save_torch_atomic", real_save)
    assert torch.load(tmp_path / "resumed" / "state.pt", weights_only=True)["epoch"] == 1
    resumed = train_classifier(_cfg(data, tmp_path / "resumed", epochs=2, checkpoint_every=1))
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
    # the choices named are the architecture table's, in its order
    assert [a.value for a in Arch] == list(ARCHITECTURES) == ["resnet34", "squeezenet1.1", "densenet121"]
    assert ("unknown architecture 'vgg16'; accepted: resnet34, squeezenet1.1, densenet121.\n"
            in err)
    assert not (tmp_path / "o").exists()


def test_architecture_table_drives_cli_help_and_gradcam(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["classify", "train", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "network: resnet34, squeezenet1.1, densenet121" in text
    for arch in Arch:                       # head keys and Grad-CAM layers exist in the network
        net = build_network(arch, 3)
        names = dict(net.named_modules())
        assert arch.spec.gradcam_layer in names
        params = dict(net.named_parameters())
        assert [tuple(params[k].shape)[0] for k in arch.spec.head_keys] == [3, 3]
        assert arch.spec.imagenet_file.startswith(arch.value.replace(".", "_") + "-")
        assert len(arch.spec.hash_prefix) == 8 and int(arch.spec.hash_prefix, 16) >= 0


def test_train_help_shows_the_config_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["classify", "train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    # the authors' defaults (evaluate_new.py), and auto device (meddap.device's rule)
    expected = {"epochs": 100, "batch_size": 32, "lr": 0.001, "seed": 0, "size": 224,
                "augment": Augment.NONE, "precision": Precision.FP16, "checkpoint_every": 3, "device": None, "init": None, "weights_dir": Path("weights")}
    shown = {f.name: f.default for f in dataclasses.fields(TrainConfig)
             if f.metadata["cli"] and f.default is not dataclasses.MISSING}
    assert shown == expected
    for name, default in expected.items():
        if default is None:                # explained by the help text (auto device, OUT/init.pt)
            continue
        default = default.value if isinstance(default, Enum) else default
        flag = "--" + name.replace("_", "-")
        help_of_flag = r" (?:[A-Z_]+|\{[a-z0-9,]+\}) (?:(?! --).)*?"  # metavar or choices, up to the next flag
        assert re.search(re.escape(flag) + help_of_flag + re.escape(f"(default: {default})"), text), flag
    for flag in ("--arch ARCH", "--train TRAIN", "--val VAL", "--out OUT", "--quiet"):
        assert flag in text


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs = 0 must be at least 1."),
    (["--size", "16"], "--size = 16 must be at least 32."),
    (["--lr", "0"], "--lr = 0 must be a finite number above 0."),
    (["--device", "gpu"], "--device = 'gpu' is not a device; use cpu, cuda or cuda:N."),
])
def test_train_flags_are_checked_before_any_work(data, tmp_path, capsys, flags, message):
    assert main(["classify", "train", "--arch", "resnet34", "--train", str(data["train"]),
                 "--val", str(data["val"]), "--out", str(tmp_path / "o"), *flags]) == 2
    assert capsys.readouterr().err == f"meddap classify: error: {message}\n"
    assert not (tmp_path / "o").exists()


def test_empty_class_folder_is_refused(data, tmp_path):
    train = _phantoms(tmp_path / "train", 2, 6, classes=("benign", "malignant"))
    (train / "normal").mkdir()
    with pytest.raises(MeddapError) as err:
        train_classifier(_cfg(data, tmp_path / "o", train=(str(data["train"]), str(train)),
                              batch_size=2))
    assert str(err.value) == (f"class 'normal' of {train} has no images ({train.resolve() / 'normal'}); "
                              f"every class folder needs at least one PNG/JPEG/BMP/TIFF image.")
    assert not (tmp_path / "o").exists()


def test_stream_seed_gives_the_old_shuffle_seeds():
    """Epoch e used to shuffle with seed * 1_000_003 + e; stream_seed(seed, e) is that number
    for every seed below 2^63 / 1_000_003 (about 9.2e12), so old runs resume identically."""
    for seed in (0, 1, 7, 42, 123, 2 ** 31 - 1, 2 ** 32, 9_000_000_000_000):
        for epoch in (0, 1, 2, 99, 100, 999):
            assert stream_seed(seed, epoch) == seed * 1_000_003 + epoch
            old = torch.randperm(50, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
            new = torch.randperm(50, generator=torch.Generator().manual_seed(stream_seed(seed, epoch)))
            assert torch.equal(old, new)


def test_corrupt_weight_file(data, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / Arch.SQUEEZENET1_1.spec.imagenet_file).write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(MeddapError, match="corrupt or not torchvision's file"):
        train_classifier(_cfg(data, tmp_path / "o", weights_dir=weights))
    with pytest.raises(MeddapError, match="not a readable torch checkpoint"):
        read_imagenet_state(Arch.SQUEEZENET1_1, weights / Arch.SQUEEZENET1_1.spec.imagenet_file,
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
    monkeypatch.setitem(ARCHITECTURES, "squeezenet1.1",
                        dataclasses.replace(ARCHITECTURES["squeezenet1.1"], imagenet_file=name))
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


@pytest.mark.parametrize("arch", list(Arch))
def test_network_from_state_equals_build_then_load(arch):
    """The meta-device build holds the state's values, every parameter and buffer, as copies,
    and computes what build_network + load_state_dict computes, bitwise."""
    from meddap.classify.networks import network_from_state
    torch.manual_seed(3)
    ref = build_network(arch, 3)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    net = network_from_state(arch, 3, state)
    ours = net.state_dict()
    assert ours.keys() == state.keys()
    assert all(torch.equal(ours[k], state[k]) and ours[k].data_ptr() != state[k].data_ptr() for k in state)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), ref.eval()(x))


def test_adam_is_the_fused_kernel_with_the_default_update_rule():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 3), torch.nn.Linear(8, 3)
    b.load_state_dict(a.state_dict())
    fused, plain = train_mod._adam(a, 1e-2), torch.optim.Adam(b.parameters(), lr=1e-2, fused=False)
    cpu_kernel = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4)
    assert bool(fused.defaults["fused"]) is cpu_kernel          # torch 2.4 added the CPU kernel
    for step in range(5):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
        for net, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            net(x).square().sum().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
