"""Bad input at the command line: every case is one line on stderr that names the
file, key or value, exit code 2 (3 for a bug in meddap), no traceback, and no file
outside the output folder changed."""
import json
import os
import pickle
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from meddap.cli import main
from meddap.data.datasets import load_rgb
from meddap.data.phantom import write_phantom
from meddap.io import read_jsonl
from meddap.outdir import LOCK, MARKER

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "weights" / "tiny" / "tiny-sd.safetensors"
DEMO_FAST = ROOT / "meddap" / "pipeline" / "configs" / "demo-fast.toml"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def snapshot(root: Path, skip: Path | None = None) -> dict[str, bytes]:
    """Every file under `root` (outside `skip`) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not (skip is not None and (p == skip or skip in p.parents))}


def one_line_error(capsys, code: int, argv: list[str], pattern: str, command: str | None = None) -> str:
    """Run `meddap argv` in-process; assert the exit code and that stderr is one line
    "meddap COMMAND: error: ..." matching `pattern` (a regex), with no traceback."""
    assert main(argv) == code
    captured = capsys.readouterr()
    err = captured.err
    assert "Traceback" not in err + captured.out
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"meddap {command or argv[0]}: error: "), lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def sample_args(out, *extra, checkpoint=TINY):
    return ["sample", "--checkpoint", str(checkpoint), "--prompt", "benign tumor", "--n", "2",
            "--steps", "1", "--sampler", "ddim", "--height", "16", "--width", "16", "--seed", "3",
            "--out", str(out), "--quiet", *extra]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms") / "data"
    write_phantom(root, seed=0, size=32, counts={"benign": 3, "malignant": 3}, show_progress=False)
    return root


# ---- data loss ----------------------------------------------------------------------
def test_run_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "results").mkdir(parents=True)
    (out / "results" / "precious.txt").write_text("my notes")
    before = snapshot(tmp_path)
    one_line_error(capsys, 2, ["run", str(DEMO_FAST), "--out", str(out)],
                   rf"output folder {re.escape(str(out))} is not empty \(results\) and has no "
                   rf"\.meddap\.json: meddap did not create it")
    assert snapshot(tmp_path) == before


def test_phantom_over_a_dataset_is_refused_and_the_images_stay(tmp_path, capsys):
    real = tmp_path / "busi"
    (real / "benign").mkdir(parents=True)
    (real / "benign" / "benign (1).png").write_bytes(b"the real scan")
    before = snapshot(tmp_path)
    for extra in ([], ["--force"]):
        one_line_error(capsys, 2, ["phantom", "--out", str(real), "--counts", "benign=1", "--quiet",
                                   *extra],
                       rf"output folder {re.escape(str(real))} is not empty \(benign\)")
    assert snapshot(tmp_path) == before
    assert main(["phantom", "--out", str(tmp_path / "ph"), "--counts", "benign=1", "--size", "32",
                 "--quiet"]) == 0
    assert json.loads((tmp_path / "ph" / MARKER).read_text())["command"] == "phantom"
    one_line_error(capsys, 2, sample_args(tmp_path / "ph"),
                   r"was made by `meddap phantom`, not by `meddap sample`; .*--force")


def test_two_samples_on_one_folder_one_is_refused_with_the_holder(tmp_path, capsys):
    out = tmp_path / "gen"
    args = sample_args(out)
    args[args.index("--n") + 1] = "400"
    first = subprocess.Popen([sys.executable, "-m", "meddap.cli", *args], cwd=ROOT, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / LOCK).exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert first.poll() is None, first.stderr.read()
        one_line_error(capsys, 2, sample_args(out),
                       rf"output folder {re.escape(str(out))} is in use by another meddap process: "
                       rf"host {re.escape(socket.gethostname())}, PID {first.pid}, started "
                       rf"\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00\. Wait for it to end")
    finally:
        first.kill()
        first.wait(timeout=60)
    assert (out / LOCK).exists()                            # stale now: the next run takes it over


def test_torn_manifest_resumes(tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(sample_args(out)) == 0
    rows = read_jsonl(out / "manifest.jsonl")
    (out / "manifest.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:25])
    (out / "00001.png").unlink()
    capsys.readouterr()
    with pytest.warns(UserWarning, match=r"manifest\.jsonl: (ignored|dropped) a torn last line"):
        assert main(sample_args(out)) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert [r["file"] for r in read_jsonl(out / "manifest.jsonl")] == ["00000.png", "00001.png"]


# ---- images ---------------------------------------------------------------------------
def test_16_bit_png_is_read_as_hand_converted_8_bit(tmp_path, capsys):
    v = np.array([[0, 128, 129, 385], [65535, 65407, 32896, 257]], dtype=np.uint16)
    v = np.tile(v, (16, 8))                                              # (32, 32)
    (tmp_path / "d" / "benign").mkdir(parents=True)
    Image.fromarray(v).save(tmp_path / "d" / "benign" / "deep.png")
    expected = np.floor(v.astype(np.float64) / 257 + 0.5).astype(np.uint8)   # round(v / 257)
    assert expected[0, :4].tolist() == [0, 0, 1, 1] and expected[1, :4].tolist() == [255, 255, 128, 1]
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "d" / "benign" / "deep.png")),
                          np.repeat(expected[..., None], 3, axis=2))
    assert main(["dataset-info", str(tmp_path / "d"), "--json", "--strict"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == 1


def test_decompression_bomb_and_tiny_images(tmp_path, capsys, monkeypatch):
    data = tmp_path / "d"
    for label in ("benign", "malignant"):
        (data / label).mkdir(parents=True)
        for k in range(2):
            Image.new("L", (40, 40), 90 + k).save(data / label / f"{k}.png")
    Image.new("L", (200, 200), 0).save(data / "benign" / "bomb.png")        # 40000 pixels
    Image.new("L", (1, 1), 0).save(data / "malignant" / "dot.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 40 * 4)           # 6400: the bomb is over twice that
    assert main(["dataset-info", str(data)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"bomb\.png: cannot read image .*bomb\.png: unreadable image \(.*exceeds limit", text), text
    assert re.search(r"dot\.png: image .*dot\.png is 1x1 pixels; meddap needs at least 32", text), text
    (data / "malignant" / "dot.png").unlink()
    before = snapshot(tmp_path, skip=tmp_path / "cls")
    one_line_error(capsys, 2, ["classify", "train", "--arch", "resnet34", "--train", str(data), "--val",
                               str(data), "--out", str(tmp_path / "cls"), "--epochs", "1", "--size", "32",
                               "--batch-size", "2", "--device", "cpu", "--weights-dir", str(tmp_path / "none"), "--quiet"],
                   r"bomb\.png", command="classify")
    assert snapshot(tmp_path, skip=tmp_path / "cls") == before


def test_empty_class_folder_in_classify_train(tmp_path, phantoms, capsys):
    train = tmp_path / "train"
    (train / "benign").mkdir(parents=True)
    (train / "malignant").mkdir(parents=True)
    for k in range(2):
        Image.new("L", (40, 40), 90 + k).save(train / "benign" / f"{k}.png")
    one_line_error(capsys, 2, ["classify", "train", "--arch", "resnet34", "--train", str(train),
                               "--val", str(phantoms), "--out", str(tmp_path / "cls"), "--epochs", "1",
                               "--batch-size", "2", "--device", "cpu", "--quiet"],
                   rf"class 'malignant' of {re.escape(str(train))} has no images "
                   rf"\({re.escape(str(train / 'malignant'))}\)", command="classify")
    assert not (tmp_path / "cls").exists()


# ---- names and paths -------------------------------------------------------------------
def test_split_with_a_non_utf8_name_round_trips(tmp_path, capsys):
    data = tmp_path / "d"
    write_phantom(data, seed=2, size=32, counts={"benign": 6, "malignant": 6}, show_progress=False)
    odd = Path(os.fsdecode(os.fsencode(str(data / "benign")) + b"/\xff.png"))
    Image.new("L", (40, 40), 200).save(odd, format="PNG")
    assert main(["split", str(data), "--out", str(tmp_path / "s.json"), "--val", "2", "--test", "2",
                 "--folds", "2", "--quiet"]) == 0
    raw = (tmp_path / "s.json").read_bytes()
    assert b"\\udcff.png" in raw and raw.isascii()
    from meddap.data.datasets import resolve_images
    found = [it.path for part in ("train", "val", "test")
             for it in resolve_images(f"{tmp_path / 's.json'}:0:{part}").items if "\udcff" in str(it.path)]
    assert found == [odd] and os.fsencode(found[0]).endswith(b"/\xff.png")
    assert load_rgb(found[0]).size == (40, 40)


def test_long_output_names_and_directories_given_as_files(tmp_path, phantoms, capsys):
    long = tmp_path / ("s" * 245 + ".json")                               # 250 characters
    assert main(["split", str(phantoms), "--out", str(long), "--val", "1", "--test", "1", "--folds", "2",
                 "--quiet"]) == 0
    assert json.loads(long.read_text())["n_images"] == 6
    capsys.readouterr()
    folder = tmp_path / "folder"
    folder.mkdir()
    before = snapshot(tmp_path)
    one_line_error(capsys, 2, ["split", str(phantoms), "--out", str(folder), "--quiet"],
                   rf"^meddap split: error: --out {re.escape(str(folder))} is a directory, not a file")
    from meddap.lora import inject_lora, save_lora
    from meddap.models.stable_diffusion import build_stable_diffusion
    unet = build_stable_diffusion("tiny").unet
    inject_lora(unet, rank=2, targets="cross", generator=torch.Generator().manual_seed(0))
    save_lora(unet, tmp_path / "a.safetensors")
    before = snapshot(tmp_path)
    one_line_error(capsys, 2, ["lora-convert", str(tmp_path / "a.safetensors"), str(folder), "--to",
                               "diffusers"], rf"output {re.escape(str(folder))} is a directory, not a file")
    one_line_error(capsys, 2, sample_args(tmp_path / "gen", "--lora", str(folder)),
                   rf"LoRA file {re.escape(str(folder))} is a directory, not a file")
    one_line_error(capsys, 2, ["fid", str(phantoms), str(phantoms), "--features", "pixels", "--out",
                               str(folder)], rf"--out {re.escape(str(folder))} is a directory, not a file")
    assert snapshot(tmp_path) == before and not (tmp_path / "gen").exists()


@pytest.mark.parametrize("argv", [
    sample_args("OUT", "--device", "bogus"),
    ["train-lora", "--checkpoint", str(TINY), "--data", "DATA", "--out", "OUT", "--device", "bogus"],
    ["classify", "train", "--arch", "resnet34", "--train", "DATA", "--val", "DATA", "--out", "OUT",
     "--device", "bogus"],
    ["fid", "DATA", "DATA", "--device", "bogus"],
], ids=["sample", "train-lora", "classify", "fid"])
def test_bogus_device(tmp_path, phantoms, capsys, argv):
    argv = [str(tmp_path / "out") if a == "OUT" else str(phantoms) if a == "DATA" else a for a in argv]
    one_line_error(capsys, 2, argv, r"--device = 'bogus' is not a device; use cpu, cuda or cuda:N\.$")
    assert not (tmp_path / "out").exists()


# ---- hostile and broken files ----------------------------------------------------------------
class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_torn_and_hostile_train_state(tmp_path, phantoms, capsys):
    base = ["train-lora", "--checkpoint", str(TINY), "--data", str(phantoms), "--resolution", "32",
            "--rank", "2", "--max-steps", "1", "--device", "cpu", "--quiet"]
    before = snapshot(phantoms)
    out = tmp_path / "lora"
    out.mkdir()
    (out / MARKER).write_text(json.dumps({"command": "train-lora", "config_sha256": ""}))
    for name, data in (("torn", b"PK\x03\x04 torn by a crash"), ("hostile", pickle.dumps(Evil()))):
        (out / "train_state.pt").write_bytes(data)
        line = one_line_error(capsys, 2, [*base, "--out", str(out)],
                              rf"resume checkpoint {re.escape(str(out / 'train_state.pt'))} cannot be "
                              rf"read \(\w+\); delete it to restart this run from step 0\.$")
        assert "weights_only" not in line, name
    assert snapshot(phantoms) == before


def test_hostile_ckpt_and_deep_header_as_checkpoint(tmp_path, capsys):
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": Evil()}, evil)
    line = one_line_error(capsys, 2, sample_args(tmp_path / "g1", checkpoint=evil), re.escape(str(evil)))
    assert "weights_only" not in line and "pwned" not in line
    deep = b'{"w": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_001
    path = tmp_path / "deep.safetensors"
    path.write_bytes(len(deep).to_bytes(8, "little") + deep)
    one_line_error(capsys, 2, sample_args(tmp_path / "g2", checkpoint=path),
                   r"deep\.safetensors: the header is not a flat safetensors header")
    assert not (tmp_path / "g1").exists() and not (tmp_path / "g2").exists()


def test_hostile_classifier_init_file(tmp_path, phantoms, capsys):
    init = tmp_path / "init.pt"
    torch.save({"arch": Evil()}, init)
    line = one_line_error(capsys, 2, ["classify", "train", "--arch", "resnet34", "--train", str(phantoms),
                                      "--val", str(phantoms), "--out", str(tmp_path / "cls"), "--epochs",
                                      "1", "--size", "32", "--batch-size", "2", "--device", "cpu", "--init", str(init),
                                      "--weights-dir", str(tmp_path / "none"), "--quiet"],
                          rf"initial-weights file {re.escape(str(init))} is not a meddap init\.pt: .*"
                          rf"pickled Python objects, which meddap does not load", command="classify")
    assert "weights_only" not in line and "WeightsUnpickler" not in line


# ---- run configs: the message names "[section] key" -----------------------------------------
RUN_CASES = [
    ("guidance = 10.0", "guidance = nan", r"\[generate\] guidance = nan is not a finite number"),
    ("ratios = [0.5]", "ratios = [inf]", r"\[generate\] ratios = \[inf\] has the entry inf"),
    ("lr = 6e-3\n", "lr = 6e-3\nmax_steps = -1\n", r"\[lora\] max_steps = -1 must be at least 1"),
    ("rank = 16", "rank = 16\nalpha = -2", r"\[lora\] alpha = -2 must be a finite number above 0"),
    ("seed = 0                           # the demo", "seed = -1  # the demo",
     r"\[lora\] seed = -1 must be at least 0"),
    ('adjectives = ["none"]', 'adjectives = ["../x"]', r"\[generate\] adjectives = \['\.\./x'\] .*cannot name"),
    ('adjectives = ["none"]', 'adjectives = ["dark", "dark"]', r"\[generate\] adjectives = .*more than once"),
    ('networks = ["resnet34"]', "networks = []", r"\[classify\] networks = \[\] must name at least one"),
    ("val = 45", "val = 290", r"\[data\] val = 290 and \[data\] test = 45 leave no training images"),
]


@pytest.mark.parametrize("old,new,pattern", RUN_CASES, ids=[c[1].split("\n")[0] for c in RUN_CASES])
def test_bad_run_config(tmp_path, capsys, old, new, pattern):
    text = DEMO_FAST.read_text()
    assert old in text
    config = tmp_path / "bad.toml"
    config.write_text(text.replace(old, new, 1))
    before = snapshot(tmp_path)
    one_line_error(capsys, 2, ["run", str(config), "--out", str(tmp_path / "out")], pattern)
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


# ---- sample's settings and warnings ------------------------------------------------------------
@pytest.mark.parametrize("extra,pattern", [
    (["--guidance", "-5"], r"--guidance = -5 is out of range; use a value from 0 to 100\.$"),
    (["--seed", "-1"], r"--seed = -1 must be at least 0\.$"),
])
def test_sample_bad_settings(tmp_path, capsys, extra, pattern):
    one_line_error(capsys, 2, sample_args(tmp_path / "gen", *extra), pattern)
    assert not (tmp_path / "gen").exists()


def test_long_prompt_warning_is_one_short_line(tmp_path):
    args = sample_args(tmp_path / "gen")
    args[args.index("benign tumor")] = "benign tumor " * 200
    args[args.index("--n") + 1] = "1"
    done = subprocess.run([sys.executable, "-m", "meddap.cli", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("meddap sample: warning: prompt 'benign tumor"), lines
    assert "longer than the text encoder's 77 tokens" in lines[0] and len(lines[0]) < 300, lines[0]


# ---- the top level: bugs, OS errors, --debug ------------------------------------------------------
def test_internal_error_os_error_and_debug(tmp_path, phantoms, capsys, monkeypatch):
    import meddap.data.commands as data_commands

    def bug(*_, **__):
        raise ValueError("unexpected shape\nsecond line")
    monkeypatch.setattr(data_commands, "describe", bug)
    assert main(["dataset-info", str(phantoms)]) == 3
    err = capsys.readouterr().err
    assert err == (f"meddap dataset-info: internal error: ValueError: unexpected shape; this is a bug in "
                   f"meddap: please report it with the output of `meddap --debug dataset-info "
                   f"{phantoms}`\n")
    with pytest.raises(ValueError, match="unexpected shape"):
        main(["--debug", "dataset-info", str(phantoms)])

    def denied(*_, **__):
        raise PermissionError(13, "Permission denied", "/data/busi/benign (1).png")
    monkeypatch.setattr(data_commands, "describe", denied)
    assert main(["dataset-info", str(phantoms)]) == 2
    assert capsys.readouterr().err == ("meddap dataset-info: error: Permission denied: "
                                       "/data/busi/benign (1).png\n")
