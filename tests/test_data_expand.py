"""`meddap expand` on the tiny config: counts, manifest, links between ratios,
resume after a kill and after damage, and a 2-process gloo run equal to a
1-process run byte for byte."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from meddap.data.expand import ExpandConfig, expand, parse_ratios
from meddap.data.phantom import write_phantom
from meddap.errors import MeddapError
from meddap.io import read_jsonl, sha256_file
from meddap.sampling.text_to_image import read_png_metadata

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["--ratios", "0.5,1", "--adjectives", "none,colorful", "--sampler", "ddim",
            "--steps", "2", "--height", "64", "--width", "64", "--batch-size", "2", "--seed", "5",
            "--copy-real", "--quiet"]
# benign 3 real -> 1 and 3 synthetic; malignant 2 real -> 1 and 2; two adjectives.
EXPECTED = {("no_adjective", "ratio_0.5", "benign"): 1, ("no_adjective", "ratio_1", "benign"): 3,
            ("no_adjective", "ratio_0.5", "malignant"): 1, ("no_adjective", "ratio_1", "malignant"): 2}
EXPECTED.update({("colorful",) + k[1:]: v for k, v in EXPECTED.items()})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every run here uses one CPU thread: float sums split over a different
    number of threads round differently, and torchrun's workers default to
    one thread (OMP_NUM_THREADS=1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from meddap.lora import inject_lora, lora_layers, save_lora
    from meddap.models.stable_diffusion import build_stable_diffusion, save_stable_diffusion
    root = tmp_path_factory.mktemp("expand_inputs")
    torch.manual_seed(0)
    sd = build_stable_diffusion("tiny")
    save_stable_diffusion(sd, root / "tiny.safetensors")
    inject_lora(sd.unet, rank=2, targets="cross", generator=torch.Generator().manual_seed(1))
    for m in lora_layers(sd.unet).values():
        torch.nn.init.normal_(m.lora_up, std=0.1)          # a non-zero update
    save_lora(sd.unet, root / "lora.safetensors")
    write_phantom(root / "data", seed=0, size=64, counts={"benign": 3, "malignant": 2},
                  show_progress=False)
    return root


def _args(inputs, out):
    return ["expand", "--checkpoint", str(inputs / "tiny.safetensors"), "--lora",
            str(inputs / "lora.safetensors"), "--data", str(inputs / "data"), "--out", str(out),
            *SETTINGS]


def _run_in_process(inputs, out):
    from meddap.cli import main
    assert main(_args(inputs, out)) == 0


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))}


@pytest.fixture(scope="module")
def reference(inputs):
    out = inputs / "one_process"
    _run_in_process(inputs, out)
    return out


def test_counts_layout_and_manifest(reference, inputs):
    for (adj, ratio, label), n in EXPECTED.items():
        folder = reference / adj / ratio / "train" / label
        assert len(list(folder.glob("syn_*.png"))) == n
        assert len(list(folder.glob("real_*.png"))) == {"benign": 3, "malignant": 2}[label]
    rows = read_jsonl(reference / "manifest.jsonl")
    assert len(rows) == len(_files(reference)) == sum(EXPECTED.values()) + 4 * 5
    assert not list(reference.glob("manifest.rank*.jsonl"))
    for row in rows:
        assert row["sha256"] == sha256_file(reference / row["file"])
        if row["source"] == "synthetic":
            assert {"prompt", "seed", "sampler", "steps", "guidance"} <= set(row)
            assert row["sampler"] == "ddim" and row["steps"] == 2 and row["guidance"] == 7.5
            assert row["lora_sha256"] == sha256_file(inputs / "lora.safetensors")
    by_file = {r["file"]: r for r in rows}
    a = by_file["colorful/ratio_1/train/benign/syn_00000.png"]
    assert a["prompt"] == "colorful ultrasound image of benign tumor in the breast"
    b = by_file["no_adjective/ratio_1/train/malignant/syn_00001.png"]
    assert b["prompt"] == "ultrasound image of malignant tumor in the breast"
    # Paired design: adjectives share seeds; ratios share images (hard links).
    assert a["seed"] == by_file["no_adjective/ratio_1/train/benign/syn_00000.png"]["seed"]
    small = reference / "colorful/ratio_0.5/train/benign/syn_00000.png"
    assert os.path.samefile(small, reference / a["file"])
    assert read_png_metadata(small)["prompt"] == a["prompt"]
    summary = json.loads((reference / "expand.json").read_text())
    assert summary["synthetic_counts"]["colorful"]["ratio_0.5"] == {"benign": 1, "malignant": 1}


def test_resume_after_kill_and_damage(inputs, reference):
    out = inputs / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "meddap.cli", *_args(inputs, out)], cwd=ROOT,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if list(out.rglob("syn_*.png")):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p: p.stat().st_ino for p in out.rglob("syn_*.png")}
    assert before and not (out / "manifest.jsonl").exists()          # interrupted mid-run
    _run_in_process(inputs, out)
    assert _files(out) == _files(reference)
    assert (out / "manifest.jsonl").read_bytes() == (reference / "manifest.jsonl").read_bytes()
    kept = [p for p, ino in before.items() if p.stat().st_ino == ino]
    assert kept, "finished images were sampled again"
    # Damage: a truncated image and a lost link are made again, the rest kept.
    victim = out / "no_adjective/ratio_1/train/benign/syn_00001.png"
    victim.write_bytes(victim.read_bytes()[:100])
    (out / "colorful/ratio_0.5/train/malignant/syn_00000.png").unlink()
    other = out / "colorful/ratio_1/train/benign/syn_00002.png"
    ino = other.stat().st_ino
    _run_in_process(inputs, out)
    assert _files(out) == _files(reference)
    assert other.stat().st_ino == ino


def test_two_processes_equal_one(inputs, reference):
    out = inputs / "two_processes"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", "2", "-m", "meddap.cli", *_args(inputs, out)],
                   cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)
    assert _files(out) == _files(reference)
    assert (out / "manifest.jsonl").read_bytes() == (reference / "manifest.jsonl").read_bytes()
    assert json.loads((out / "expand.json").read_text())["settings"]["world_size"] == 2


def test_bad_input(inputs, tmp_path):
    base = dict(checkpoint=str(inputs / "tiny.safetensors"), data=str(inputs / "data"),
                out=str(tmp_path / "o"))
    for ratios in ("0,1", "-0.5"):
        with pytest.raises(MeddapError, match="above 0"):
            expand(ExpandConfig(**base, ratios=parse_ratios(ratios)))
    with pytest.raises(MeddapError, match="comma-separated list of numbers"):
        parse_ratios("half,1")
    with pytest.raises(MeddapError, match="more than once"):
        expand(ExpandConfig(**base, ratios=(1.0, 1.0)))
    with pytest.warns(UserWarning, match="glossy"):
        with pytest.raises(MeddapError, match="checkpoint .* does not exist"):
            expand(ExpandConfig(**{**base, "checkpoint": str(tmp_path / "none.ckpt")},
                                adjectives=("none", "glossy")))
    with pytest.raises(MeddapError, match="does not exist"):
        expand(ExpandConfig(**{**base, "data": str(tmp_path / "missing")}))
