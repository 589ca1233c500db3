"""`meddap run` on several processes gives the results of one process.

One small config (phantom data, the tiny base, 2 folds, 2 adjectives, a few steps, 1 network):
- `torchrun --nproc-per-node 2` (gloo) gives adapters, images, FID values, result cells and
  tables bitwise equal to one process;
- a 2-rank run killed (SIGKILL to one rank) during the LoRA stage, resumed by 1 process, gives
  the same results;
- `--shard 0/2`, `--shard 1/2`, then a run without --shard give the same results;
- a failing rank stops both ranks with its message; a second run on a held folder is refused;
  a stale lock is taken over.
CPU results are bitwise only at equal thread counts: every process here runs with
OMP_NUM_THREADS=1, as torchrun sets for its workers.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from meddap.pipeline.config import REPO_ROOT

TINY = REPO_ROOT / "weights" / "tiny" / "tiny-sd.safetensors"
FOLDS = 2
CONFIG = f"""
[run]
name = "ranks"
device = "cpu"

[data]
source = "phantom"
phantom_size = 64
phantom_counts = {{ benign = 12, malignant = 12, normal = 12 }}
folds = {FOLDS}
val = 6
test = 6

[lora]
checkpoint = "{TINY}"
rank = 2
max_steps = 24
batch_size = 2
resolution = 64
cache_latents = true
checkpoint_every = 4

[generate]
adjectives = ["none", "dark"]
ratios = [0.25]
sampler = "ddim"
steps = 2
guidance = 5.0
height = 64
width = 64
batch_size = 2

[fid]
features = "pixels"

[classify]
networks = ["squeezenet1.1"]
epochs = 1
batch_size = 4
size = 64
gradcam_images = 0
"""
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# torchrun --standalone: its rendezvous store binds a free port itself (no port picked here
# and released before torchrun binds it, a race with any other process on the machine).
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def meddap(*args, ranks: int = 1, script=None, timeout=600):
    if ranks == 1:
        cmd = [sys.executable, "-m", "meddap", *map(str, args)]
    else:
        cmd = [*TORCHRUN, "--nproc-per-node", str(ranks),
               *([str(script)] if script else ["-m", "meddap"]), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)


def ok(r):
    assert r.returncode == 0, f"{r.args}\nSTDOUT\n{r.stdout[-3000:]}\nSTDERR\n{r.stderr[-5000:]}"
    return r


def results(out: Path) -> dict:
    """What must be identical: adapter tensors, image pixels, FID/KID values, cells' metrics, tables."""
    got = {}
    for k in range(FOLDS):
        for name, t in load_file(out / f"fold{k}" / "lora" / "lora.safetensors").items():
            got[f"fold{k}/lora/{name}"] = t.numpy().tobytes()
        fid = json.loads((out / f"fold{k}" / "fid" / "fid.json").read_text())
        got[f"fold{k}/fid"] = {n: (r["frechet"], r.get("kid")) for n, r in fid["sets"].items()}
    for p in sorted(out.glob("fold*/synthetic/**/*.png")):
        got[p.relative_to(out).as_posix()] = np.asarray(Image.open(p)).tobytes()
    for p in sorted((out / "results" / "cells").rglob("*.json")):
        cell = json.loads(p.read_text())
        got[p.relative_to(out).as_posix()] = {t: {k: v for k, v in e.items() if k not in ("model", "data")}
                                              for t, e in cell["evaluations"].items()}
    for p in sorted((out / "tables").glob("*.csv")) + [out / "tables" / "tables.md"]:
        got[p.relative_to(out).as_posix()] = p.read_text()
    return got


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    path = root / "ranks.toml"
    path.write_text(CONFIG)
    return root, path


@pytest.fixture(scope="module")
def reference(config):
    root, cfg = config
    out = root / "one"
    ok(meddap("run", cfg, "--out", out))
    return results(out)


def test_two_ranks_equal_one_process(config, reference):
    root, cfg = config
    r = ok(meddap("run", cfg, "--out", root / "two", ranks=2))
    assert "[rank 1/2]" in r.stdout and "stage lora: 2 unit(s) on 2 rank(s), 1 here" in r.stdout
    assert results(root / "two") == reference


def test_killed_two_rank_run_resumes_on_one_process(config, reference):
    root, cfg = config
    out = root / "killed"
    cmd = [*TORCHRUN, "--nproc-per-node", "2", "-m", "meddap", "run", str(cfg), "--out", str(out)]
    agent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    state = out / "fold1" / "lora" / "train_state.pt"
    deadline = time.monotonic() + 300
    while not state.exists() and agent.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state.exists() and agent.poll() is None, "the LoRA stage of rank 1 never checkpointed"
    workers = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
    rank1 = [pid for pid in workers if f"--out\x00{out}" in Path(f"/proc/{pid}/cmdline").read_text()
             and "RANK=1\x00" in Path(f"/proc/{pid}/environ").read_text()]
    os.kill(int(rank1[0]), signal.SIGKILL)
    assert agent.wait(timeout=300) != 0
    assert not (out / "fold1" / "lora" / "lora.safetensors").exists()
    ok(meddap("run", cfg, "--out", out))
    assert results(out) == reference


def test_shards_then_assemble_equal_one_process(config, reference):
    root, cfg = config
    out = root / "shards"
    first = ok(meddap("run", cfg, "--out", out, "--shard", "0/2"))
    assert "waits for other shards" in first.stdout
    assert (out / "fold0" / "lora" / "lora.safetensors").exists()
    assert not (out / "fold1" / "lora" / "lora.safetensors").exists()        # fold 1 is shard 1's
    ok(meddap("run", cfg, "--out", out, "--shard", "1/2"))
    assert (out / "fold1" / "lora" / "lora.safetensors").exists()
    ok(meddap("run", cfg, "--out", out))
    assert results(out) == reference


def test_a_failing_rank_stops_both_with_its_message(config):
    root, cfg = config
    t0 = time.monotonic()
    r = meddap("run", cfg, "--out", root / "fails", ranks=2, script=Path(__file__).parent / "run_failing_rank.py")
    assert r.returncode != 0 and time.monotonic() - t0 < 240
    assert "planted failure in the LoRA stage of fold 1" in r.stderr
    assert "rank 1 failed during lora: planted failure" in r.stderr            # rank 0's own message


def test_second_run_on_a_held_folder_is_refused_and_a_stale_lock_taken_over(config):
    root, cfg = config
    out = root / "locked"
    first = subprocess.Popen([sys.executable, "-m", "meddap", "run", str(cfg), "--out", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        deadline = time.monotonic() + 120
        while not (out / ".meddap.lock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        second = meddap("run", cfg, "--out", out)
        assert second.returncode == 2
        assert f"PID {first.pid}" in second.stderr and socket.gethostname() in second.stderr
    finally:
        first.kill()
        first.wait()
    assert (out / ".meddap.lock").exists()                 # left behind by the killed run
    third = meddap("run", cfg, "--out", out, "--shard", "0/2")
    assert third.returncode == 0, third.stderr[-2000:]
    assert "stale" in third.stderr.lower() or "took over" in third.stderr.lower()
