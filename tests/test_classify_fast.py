"""The classifier's fast path and its sparse checkpoints: the ImageNet statistics are
built once per run and the CUDA inputs need no copy; state.pt is written every
--checkpoint-every epochs and on SIGTERM/SIGINT; a run killed with SIGKILL, or
stopped by a signal inside an epoch, resumes to the bytes of an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fake_cuda import fake_cuda, line_of
from meddap.classify import train as train_mod
from meddap.classify.networks import Arch, build_network
from meddap.classify.train import (CHECKPOINT_EVERY, IMAGENET_MEAN, IMAGENET_STD, Compute, Precision,
                                   TrainConfig, TrainingStopped, imagenet_statistics, normalise,
                                   predict, stop_requests, train_classifier)
from meddap.cli import main

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda", 0)
TRAIN = "meddap/classify/train.py"
STATISTICS = Counter({("cpu->cuda", line_of(TRAIN, "mean = torch.tensor(IMAGENET_MEAN")): 1,
                      ("cpu->cuda", line_of(TRAIN, "std = torch.tensor(IMAGENET_STD")): 1})
EPOCHS, BATCHES = 5, 3                  # 12 training images in batches of 4: 3 steps per epoch


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three classes of grey squares with a class-dependent bright patch: 4 training and
    1 validation image per class, 32 x 32."""
    root = tmp_path_factory.mktemp("fast")
    rng = np.random.default_rng(0)
    for part, n in (("train", 4), ("val", 1)):
        for k, c in enumerate(("benign", "malignant", "normal")):
            (root / part / c).mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 120, (32, 32), dtype=np.uint8)
                a[8 * k:8 * k + 8, 4:28] = 230
                Image.fromarray(a).save(root / part / c / f"{c} ({i}).png")
    return root


def _flags(data: Path, out: Path, every: int) -> list[str]:
    return ["classify", "train", "--arch", "squeezenet1.1", "--train", str(data / "train"),
            "--val", str(data / "val"), "--out", str(out), "--epochs", str(EPOCHS), "--batch-size", "4",
            "--size", "32", "--augment", "classic", "--device", "cpu", "--checkpoint-every", str(every),
            "--weights-dir", str(out.parent / "no-weights"), "--quiet"]


# The child process: `meddap classify train FLAGS`, whose batch number AT (counted over the
# whole run, 1-based) ends by sending SIGNAL to the process itself, through the progress bar
# that the loop advances once per batch. The torch thread count is the parent's, so the
# child's arithmetic is the parent's (meddap.device: bitwise only with equal threads).
CHILD = """
import os, signal, sys, torch
from meddap.classify import train
from meddap.cli import main
torch.set_num_threads(int(sys.argv[1]))
at, sig = int(sys.argv[2]), signal.Signals[sys.argv[3]]

class SignallingBar(train.Progress):
    done = 0
    def update(self, n=1, **kw):
        super().update(n, **kw)
        SignallingBar.done += n
        if n and SignallingBar.done == at:
            os.kill(os.getpid(), sig)

train.Progress = SignallingBar
sys.exit(main(sys.argv[4:]))
"""


def _run_child(flags: list[str], at_batch: int, sig: signal.Signals) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", CHILD, str(torch.get_num_threads()), str(at_batch),
                           sig.name, *flags], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """An uninterrupted run, checkpointing every epoch."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(_flags(data, out, 1)) == 0
    return out


def _assert_same_run(a: Path, b: Path) -> None:
    """best.pt and log.csv are the same bytes; state.pt holds the same weights and RNG state."""
    for name in ("best.pt", "log.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    s1, s2 = (torch.load(p / "state.pt", weights_only=True) for p in (a, b))
    assert s1["epoch"] == s2["epoch"] == EPOCHS and s2["partial"] is None
    for key in s1["model"]:
        assert torch.equal(s1["model"][key], s2["model"][key]), key
    assert torch.equal(s1["rng_cpu"], s2["rng_cpu"])
    j1, j2 = (json.loads((p / "train.json").read_text()) for p in (a, b))
    assert len(j2.pop("epoch_seconds")) == len(j1.pop("epoch_seconds")) == EPOCHS
    assert j1 == j2


# ---------------------------------------------------------------- the fast path

def test_normalisation_constants_built_once_give_the_same_bits():
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    mean, std = imagenet_statistics(torch.device("cpu"))
    assert mean.shape == std.shape == (1, 3, 1, 1) and mean.dtype == std.dtype == torch.float32
    assert mean.flatten().tolist() == torch.tensor(IMAGENET_MEAN).tolist()
    assert std.flatten().tolist() == torch.tensor(IMAGENET_STD).tolist()
    once = normalise(x, (mean, std))
    assert torch.equal(once, normalise(x))
    assert torch.equal(once, (x.float() / 255.0 - mean) / std)
    for precision in Precision:                  # the CPU ignores --precision: float32, default layout
        compute = Compute.on(torch.device("cpu"), precision)
        assert (compute.autocast, compute.memory_format) == (None, torch.contiguous_format)
        assert torch.equal(compute.inputs(x), once) and compute.inputs(x).is_contiguous()


@pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")   # the fake's autocast is off
@pytest.mark.parametrize("precision, autocast", [(Precision.FP16, torch.float16),
                                                 (Precision.BF16, torch.bfloat16), (Precision.FP32, None)])
def test_cuda_inputs_are_channels_last_and_copy_nothing_per_batch(precision, autocast, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    with fake_cuda() as fc:
        compute = Compute.on(CUDA, precision)                       # the statistics: once per run
        assert fc.syncs == STATISTICS
        assert (compute.autocast, compute.memory_format) == (autocast, torch.channels_last)
        with torch.device("cuda"):
            model = build_network(Arch.SQUEEZENET1_1, 3).eval()   # (Module.to cannot swap fakes)
        images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8).to(CUDA)   # (N, 3, S, S)
        fc.reset()
        x = compute.inputs(images[:2])                               # (2, 3, S, S)
        assert (x.dtype, x.device) == (torch.float32, CUDA)
        assert x.is_contiguous(memory_format=torch.channels_last)
        logits = predict(model, images, 2, compute)                  # (N, k), 3 batches
        assert (logits.shape, logits.dtype, logits.device) == ((5, 3), torch.float32, CUDA)
        assert fc.syncs == Counter()


# ---------------------------------------------------------------- checkpoints and signals

def test_state_is_written_every_k_epochs_and_after_the_last(data, tmp_path, monkeypatch):
    saved = []
    real_save = train_mod.save_torch_atomic

    def recording_save(obj, path):
        if path.name == "state.pt":
            saved.append(obj["epoch"])
        real_save(obj, path)

    monkeypatch.setattr(train_mod, "save_torch_atomic", recording_save)
    train_classifier(TrainConfig(arch=Arch.SQUEEZENET1_1, train=(str(data / "train"),),
                                 val=str(data / "val"), out=tmp_path / "o", epochs=EPOCHS, batch_size=4,
                                 size=32, checkpoint_every=2, weights_dir=tmp_path / "none",
                                 show_progress=False))
    assert saved == [2, 4, 5]
    assert CHECKPOINT_EVERY == TrainConfig.__dataclass_fields__["checkpoint_every"].default == 3


def test_checkpoint_every_is_checked(data, tmp_path, capsys):
    assert main(_flags(data, tmp_path / "o", 0)) == 2
    assert capsys.readouterr().err == ("meddap classify: error: --checkpoint-every = 0 must be at "
                                       "least 1.\n")


def test_stop_requests_record_signals_and_restore_the_handlers():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with stop_requests() as stop:
        assert signal.getsignal(signal.SIGTERM) is signal.getsignal(signal.SIGINT) is not before[0]
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop == ["SIGTERM"]
        with pytest.raises(KeyboardInterrupt):              # a second signal stops at once
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert issubclass(TrainingStopped, KeyboardInterrupt)


def test_sigkill_with_sparse_checkpoints_resumes_to_the_uninterrupted_bytes(data, straight, tmp_path):
    out = tmp_path / "run"
    killed = _run_child(_flags(data, out, 2), 3 * BATCHES + 1, signal.SIGKILL)   # inside epoch 4
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert torch.load(out / "state.pt", weights_only=True)["epoch"] == 2
    assert (out / "log.csv").read_text().count("\n") == 1 + 3         # epoch 3 ran, unsaved
    assert not (out / "train.json").exists()
    with pytest.warns(UserWarning, match="took over a stale lock"):    # the killed run's lock
        assert main(_flags(data, out, 2)) == 0                         # redoes epochs 3 to 5
    _assert_same_run(straight, out)


@pytest.mark.parametrize("sig, at_batch, state", [
    (signal.SIGTERM, BATCHES + 2, {"epoch": 1, "batch": 2}),         # inside epoch 2: after its batch
    (signal.SIGINT, 2 * BATCHES, {"epoch": 2, "batch": None}),       # last batch: after the epoch
])
def test_a_signal_saves_the_state_and_the_resume_is_exact(data, straight, tmp_path, sig, at_batch, state):
    out = tmp_path / "run"
    stopped = _run_child(_flags(data, out, 10), at_batch, sig)
    assert stopped.returncode == 130, stopped.stderr
    where = (f"after batch {state['batch']} of epoch {state['epoch'] + 1}" if state["batch"]
             else f"after epoch {state['epoch']}")
    assert (f"classify: {sig.name}: stopped {where}; the state is in {out / 'state.pt'}; re-run the "
            f"same command to resume.\n") in stopped.stdout
    assert stopped.stderr.endswith("meddap classify: interrupted; re-run the same command to resume.\n")
    saved = torch.load(out / "state.pt", weights_only=True)
    assert saved["epoch"] == state["epoch"]
    assert (saved["partial"] or {}).get("batch") == state["batch"]
    assert main(_flags(data, out, 10)) == 0
    _assert_same_run(straight, out)
