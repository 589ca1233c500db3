"""Data safety: output-folder markers and locks (meddap.outdir), hostile safetensors headers."""
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from meddap import __version__
from meddap.errors import MeddapError
from meddap.io import json_sha256
from meddap.models.checkpoint import read_state_dict, write_safetensors
from meddap.outdir import (FORCE_HELP, LOCK, MARKER, check_output_file, claim_folder, folder_lock,
                           owned_output, torchrun_job_id)

SHA_A, SHA_B = "a" * 64, "b" * 64


# ---- the marker ------------------------------------------------------------------------
def test_new_or_empty_folder_is_claimed_with_a_marker(tmp_path):
    claim = claim_folder(tmp_path / "new" / "out", "sample", SHA_A)
    assert claim.created and claim.adopted_from is None
    marker = json.loads((tmp_path / "new" / "out" / MARKER).read_text())
    assert set(marker) == {"command", "config_sha256", "version", "created"}
    assert (marker["command"], marker["config_sha256"], marker["version"]) == ("sample", SHA_A, __version__)
    (tmp_path / "empty").mkdir()
    assert claim_folder(tmp_path / "empty", "sample", SHA_A).created
    with folder_lock(tmp_path / "locked"):                  # only the lock file inside: still empty
        assert claim_folder(tmp_path / "locked", "sample", SHA_A).created


def test_same_command_resumes_whatever_its_config_another_needs_force(tmp_path):
    out = tmp_path / "out"
    claim_folder(out, "sample", SHA_A)
    (out / "image.png").write_bytes(b"x")
    for sha in (SHA_A, SHA_B):                              # e.g. more steps: the command's resume rule judges
        again = claim_folder(out, "sample", sha)
        assert not again.created and again.adopted_from is None
    assert json.loads((out / MARKER).read_text())["config_sha256"] == SHA_A   # the marker is kept
    with pytest.raises(MeddapError, match=rf"^output folder {re.escape(str(out))} was made by `meddap "
                                          rf"sample`, not by `meddap train-lora`; choose another "
                                          rf"folder, or pass --force to adopt it \(its files may be "
                                          rf"overwritten\)\.$"):
        claim_folder(out, "train-lora", SHA_A)
    adopted = claim_folder(out, "train-lora", SHA_B, force=True)
    assert adopted.adopted_from["command"] == "sample" and adopted.adopted_from["config_sha256"] == SHA_A
    marker = json.loads((out / MARKER).read_text())
    assert (marker["command"], marker["config_sha256"]) == ("train-lora", SHA_B)
    assert (out / "image.png").read_bytes() == b"x"


@pytest.mark.parametrize("force", [False, True])
def test_foreign_folder_is_always_refused(tmp_path, force):
    for name in ("e.txt", "a.png", "d", "c.csv", "b.jpg"):
        (tmp_path / name).write_bytes(b"")
    why = r" \(--force only reuses folders meddap created\)" if force else ""
    with pytest.raises(MeddapError, match=rf"output folder {re.escape(str(tmp_path))} is not empty "
                                          rf"\(a\.png, b\.jpg, c\.csv and 2 more\) and has no "
                                          rf"\.meddap\.json: meddap did not create it; choose an "
                                          rf"empty or new folder{why}\.$"):
        claim_folder(tmp_path, "sample", SHA_A, force=force)
    assert not (tmp_path / MARKER).exists()


def test_damaged_marker_and_file_in_place_of_folder(tmp_path):
    (tmp_path / MARKER).write_text('{"command": "sample"')
    with pytest.raises(MeddapError, match=r"\.meddap\.json is damaged"):
        claim_folder(tmp_path, "sample", SHA_A, force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(MeddapError, match=r"output folder .*file is a file"):
        claim_folder(tmp_path / "file", "sample", SHA_A)


def test_lock_and_marker_temporaries_do_not_make_a_folder_foreign(tmp_path):
    """A second rank of one job may look while the first writes its marker."""
    (tmp_path / f".{MARKER}.0123abcd.tmp").write_text("{")
    (tmp_path / f"{LOCK}.89abcdef.released").write_text("")
    assert claim_folder(tmp_path, "expand", SHA_A).created
    (tmp_path / MARKER).unlink()
    (tmp_path / ".other.0123abcd.tmp").write_text("")     # a temporary of some other file is a file
    with pytest.raises(MeddapError, match=r"is not empty \(\.other\.0123abcd\.tmp\)"):
        claim_folder(tmp_path, "expand", SHA_A)


# ---- owned_output: lock, claim, clean ------------------------------------------------
def test_owned_output_cleans_stale_temporaries_as_first_holder_only(tmp_path):
    out = tmp_path / "out"
    with owned_output(out, "sample", SHA_A) as claim:
        assert claim.created and (out / LOCK).exists()
        (out / "sub").mkdir()
        stale = [out / ".00000.png.0123abcd.tmp", out / "sub" / ".x.json.89abcdef.tmp"]
        for p in stale:
            p.write_bytes(b"torn")
        with owned_output(out, "sample", SHA_B) as inner:    # a re-entry is not the first holder
            assert not inner.created
        assert all(p.exists() for p in stale)
    assert not (out / LOCK).exists()
    with owned_output(out, "sample", SHA_B) as claim:       # the killed run's leftovers go
        assert not claim.created
        assert not any(p.exists() for p in stale)
        assert json.loads((out / MARKER).read_text())["command"] == "sample"


def test_owned_output_refuses_foreign_and_other_command_folders_untouched(tmp_path):
    (tmp_path / "data" / "benign").mkdir(parents=True)
    (tmp_path / "data" / "benign" / "a.png").write_bytes(b"real")
    for force in (False, True):
        with pytest.raises(MeddapError, match=r"is not empty \(benign\) and has no \.meddap\.json"):
            with owned_output(tmp_path / "data", "phantom", force=force):
                pass
    assert sorted(p.name for p in (tmp_path / "data").rglob("*")) == ["a.png", "benign"]
    with owned_output(tmp_path / "lora", "train-lora"):
        pass
    with pytest.raises(MeddapError, match=r"made by `meddap train-lora`, not by `meddap sample`"):
        with owned_output(tmp_path / "lora", "sample"):
            pass
    with owned_output(tmp_path / "lora", "sample", force=True) as claim:
        assert claim.adopted_from["command"] == "train-lora"


def test_owned_output_that_fails_before_writing_leaves_no_trace(tmp_path):
    with pytest.raises(MeddapError, match="bad input"):
        with owned_output(tmp_path / "new", "sample"):
            raise MeddapError("bad input")
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(KeyboardInterrupt):
        with owned_output(tmp_path / "empty", "sample"):
            raise KeyboardInterrupt
    assert list((tmp_path / "empty").iterdir()) == []
    with pytest.raises(MeddapError, match="later"):
        with owned_output(tmp_path / "wrote", "sample"):
            (tmp_path / "wrote" / "00000.png").write_bytes(b"png")
            raise MeddapError("later")
    assert sorted(p.name for p in (tmp_path / "wrote").iterdir()) == [MARKER, "00000.png"]


def test_torchrun_job_id_and_settings_hash(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert torchrun_job_id() is None
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "")
    assert torchrun_job_id() is None
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "8f0c")
    assert torchrun_job_id() == "8f0c"
    import hashlib
    assert json_sha256({"b": 1, "a": [1.5, None]}) == hashlib.sha256(
        b'{"a": [1.5, null], "b": 1}').hexdigest()
    assert FORCE_HELP == "adopt a folder that another meddap command created"


def test_output_file_that_is_a_directory(tmp_path):
    assert check_output_file(tmp_path / "r.json", "--out", "r.json") == tmp_path / "r.json"
    with pytest.raises(MeddapError, match=rf"^--out {re.escape(str(tmp_path))} is a directory, not a "
                                          rf"file; give the name of a file to write, e\.g\. "
                                          rf"{re.escape(str(tmp_path / 'r.json'))}\.$"):
        check_output_file(tmp_path, "--out", "r.json")


# ---- the lock --------------------------------------------------------------------------
HOLDER = r"""
import sys, time
from pathlib import Path
from meddap.errors import MeddapError
from meddap.outdir import folder_lock
folder, job, go, stop = sys.argv[1], sys.argv[2] or None, Path(sys.argv[3]), Path(sys.argv[4])
while not go.exists():
    time.sleep(0.005)
try:
    with folder_lock(folder, job) as lock:
        print("entered", int(lock.first), flush=True)
        while not stop.exists():
            time.sleep(0.01)
except MeddapError as e:
    print("refused", e, flush=True)
"""


def _holder(tmp_path, folder, job="", go=None):
    """A process that takes the lock once `go` exists and holds it until tmp_path/stop exists."""
    go = go or tmp_path / "go"
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), job, str(go), str(tmp_path / "stop")],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)


def _entered_holder(tmp_path, job=""):
    """A `_holder` of tmp_path/out that has taken the lock (the first holder): (out, process)."""
    out = tmp_path / "out"
    (tmp_path / "go").touch()
    proc = _holder(tmp_path, out, job=job)
    assert proc.stdout.readline().strip() == "entered 1"
    return out, proc


def test_two_processes_on_one_folder_exactly_one_is_refused(tmp_path):
    out = tmp_path / "out"
    procs = [_holder(tmp_path, out) for _ in range(2)]
    (tmp_path / "go").touch()                               # both race for the lock now
    lines = {p.pid: p.stdout.readline().strip() for p in procs}
    (tmp_path / "stop").touch()
    for p in procs:
        p.wait(timeout=60)
    winner = [pid for pid, line in lines.items() if line == "entered 1"]
    loser = [line for line in lines.values() if line.startswith("refused")]
    assert len(winner) == 1 and len(loser) == 1, lines
    started = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00"
    assert re.fullmatch(rf"refused output folder {re.escape(str(out))} is in use by another meddap "
                        rf"process: host {re.escape(socket.gethostname())}, PID {winner[0]}, started "
                        rf"{started}\. Wait for it to end or choose another folder; if that process no "
                        rf"longer runs, remove {re.escape(str(out / LOCK))}\.", loser[0]), loser[0]
    assert not (out / LOCK).exists()                        # the last one out removed it


def test_refused_at_once_while_held_and_free_after(tmp_path):
    out, proc = _entered_holder(tmp_path)
    t0 = time.monotonic()
    with pytest.raises(MeddapError, match=rf"in use by another meddap process: host .*, PID {proc.pid}, "
                                          rf"started "):
        with folder_lock(out):
            pass
    assert time.monotonic() - t0 < 5                        # no waiting for the holder
    (tmp_path / "stop").touch()
    proc.wait(timeout=60)
    with folder_lock(out) as lock:
        assert lock.first and lock.took_over is None


def test_stale_lock_of_a_killed_process_is_taken_over(tmp_path):
    out, proc = _entered_holder(tmp_path)
    proc.kill()                                             # SIGKILL: no cleanup runs
    proc.wait(timeout=60)
    assert (out / LOCK).exists()
    with pytest.warns(UserWarning, match=rf"took over a stale lock: PID {proc.pid} on host "
                                         rf"{re.escape(socket.gethostname())}, started .*, no longer runs"):
        with folder_lock(out) as lock:
            assert lock.first and lock.took_over["pid"] == proc.pid
            assert [e["pid"] for e in map(json.loads, lock.path.read_text().splitlines())] == [os.getpid()]
    assert not (out / LOCK).exists()


def test_same_job_id_shares_the_lock_and_the_last_one_out_removes_it(tmp_path):
    out, proc = _entered_holder(tmp_path, "run-7")
    with pytest.raises(MeddapError, match=rf"PID {proc.pid}, started .*, job run-7\."):
        with folder_lock(out, job_id="run-8"):
            pass
    with pytest.raises(MeddapError, match=rf"PID {proc.pid}"):
        with folder_lock(out):
            pass
    with folder_lock(out, job_id="run-7") as lock:
        assert not lock.first
        (tmp_path / "stop").touch()                         # the first holder leaves before us
        proc.wait(timeout=60)
        assert (out / LOCK).exists()
    assert not (out / LOCK).exists()


def _owned_in_thread(out, job):
    """owned_output(out, "sample", job_id=job) in a thread: (thread, what it got: claim or error)."""
    import threading
    got = {}

    def enter():
        try:
            with owned_output(out, "sample", SHA_A, job_id=job) as claim:
                got["claim"] = claim
        except MeddapError as e:
            got["error"] = str(e)

    thread = threading.Thread(target=enter)
    thread.start()
    return thread, got


def test_a_later_holder_of_the_job_writes_nothing_before_the_first_says_ready(tmp_path):
    """The first holder claims and cleans, then says "ready"; a partner that entered meanwhile
    waits for it, so the first holder's cleaning can never remove the partner's marker write
    (a torchrun rank once failed with "No such file or directory: ..meddap.json.<hex>.tmp")."""
    out, proc = _entered_holder(tmp_path, "run-7")     # the first holder, still preparing
    thread, got = _owned_in_thread(out, "run-7")
    time.sleep(0.5)
    assert thread.is_alive() and not got                  # waiting ...
    assert sorted(p.name for p in out.iterdir()) == [LOCK]  # ... having written nothing
    claim_folder(out, "sample", SHA_A)                      # the first holder's claim, then "ready"
    with open(out / LOCK, "a") as f:
        f.write(json.dumps({"event": "ready", "host": socket.gethostname(), "pid": proc.pid}) + "\n")
    thread.join(timeout=60)
    assert not thread.is_alive() and not got["claim"].created, got
    (tmp_path / "stop").touch()
    proc.wait(timeout=60)
    assert not (out / LOCK).exists()


def test_a_later_holder_stops_when_the_first_leaves_without_ready(tmp_path):
    out, proc = _entered_holder(tmp_path, "run-7")
    thread, got = _owned_in_thread(out, "run-7")
    time.sleep(0.3)
    (tmp_path / "stop").touch()                             # the first holder leaves, never ready
    proc.wait(timeout=60)
    thread.join(timeout=60)
    assert re.fullmatch(rf"output folder {re.escape(str(out))}: the first process of this job \(lock "
                        rf"{re.escape(str(out / LOCK))}\) stopped before it claimed the folder; its own "
                        rf"message says why\. Nothing was written by this process\.", got["error"]), got
    assert not (out / MARKER).exists() and not (out / LOCK).exists()


def test_reentry_by_the_holder_and_other_hosts_count_as_alive(tmp_path):
    with folder_lock(tmp_path) as outer:
        with folder_lock(tmp_path) as inner:                # e.g. `meddap run` calling a stage
            assert outer.first and not inner.first
        assert (tmp_path / LOCK).exists()                   # the outer hold is still recorded
    assert not (tmp_path / LOCK).exists()
    far = {"event": "enter", "host": "node-17.cluster", "pid": 1, "started": "2026-01-02T03:04:05+00:00",
           "job_id": None}
    (tmp_path / LOCK).write_text(json.dumps(far) + "\n")
    with pytest.raises(MeddapError, match=r"host node-17\.cluster, PID 1, started 2026-01-02T03:04:05"):
        with folder_lock(tmp_path):
            pass
    (tmp_path / LOCK).write_text("not json\n")
    with pytest.raises(MeddapError, match=r"lock file .*\.meddap\.lock is damaged"):
        with folder_lock(tmp_path):
            pass


# ---- hostile safetensors headers -------------------------------------------------------
def _safetensors(path: Path, header_bytes: bytes, data: bytes = b"\0" * 64) -> Path:
    path.write_bytes(len(header_bytes).to_bytes(8, "little") + header_bytes + data)
    return path


def test_deeply_nested_header_is_not_a_flat_header(tmp_path):
    deep = b'{"w": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_001
    with pytest.raises(MeddapError, match=r"deep\.safetensors: the header is not a flat safetensors header"):
        read_state_dict(_safetensors(tmp_path / "deep.safetensors", deep))
    with pytest.raises(MeddapError, match=r"list\.safetensors: the header is not a flat"):
        read_state_dict(_safetensors(tmp_path / "list.safetensors", b"[" * 100_000 + b"]" * 100_000))


ENTRY = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
HOSTILE = [
    {"dtype": ["F32"]}, {"dtype": {"x": 1}}, {"dtype": None}, {"dtype": 7},
    {"shape": "23"}, {"shape": [2.0, 3]}, {"shape": [True, 6]}, {"shape": [-2, -3]}, {"shape": 6},
    {"shape": [2, None]}, {"shape": [10 ** 30, 0], "data_offsets": [0, 0]},
    {"shape": [0, 2 ** 62, 2 ** 62], "data_offsets": [0, 0]},
    {"data_offsets": ["0", "24"]}, {"data_offsets": [0.0, 24.0]}, {"data_offsets": [-8, 16]},
    {"data_offsets": [24, 0]}, {"data_offsets": [0, 24, 48]}, {"data_offsets": {"0": 24}},
    {"data_offsets": [0, 10 ** 40]}, {"data_offsets": None},
]


@pytest.mark.parametrize("change", HOSTILE, ids=[json.dumps(c) for c in HOSTILE])
def test_hostile_header_entries_are_meddap_errors(tmp_path, change):
    header = json.dumps({"w": {**ENTRY, **change}}).encode()
    with pytest.raises(MeddapError, match=r"h\.safetensors: (the header entry of tensor w is malformed|"
                                          r"tensor w has dtype|tensor w ends at byte \d+ but the file)"):
        read_state_dict(_safetensors(tmp_path / "h.safetensors", header))


def test_random_hostile_headers_raise_only_meddap_errors(tmp_path):
    write_safetensors(tmp_path / "good.safetensors", {"w": torch.arange(6.0).reshape(2, 3)})
    assert torch.equal(read_state_dict(tmp_path / "good.safetensors")["w"], torch.arange(6.0).reshape(2, 3))
    values = [None, True, False, 0, -1, 1.5, float("nan"), "F32", "", [], {}, [0], [0, 24], [[0]],
              {"dtype": "F32"}, 10 ** 20, "x" * 5, [-1, 2], [2, 3], [1e308, 1]]
    rng = random.Random(0)
    for k in range(300):
        entry = dict(ENTRY)
        for key in rng.sample(["dtype", "shape", "data_offsets", "extra"], rng.randint(1, 3)):
            entry[key] = rng.choice(values)
        top = rng.choice([{"w": entry}, {"w": entry, "__metadata__": rng.choice(values)},
                          {"w": rng.choice(values)}, rng.choice(values)])
        text = json.dumps(top).encode()
        cut = text[: rng.randint(1, len(text))] if rng.random() < 0.2 else text
        path = _safetensors(tmp_path / f"r{k}.safetensors", cut, data=b"\0" * rng.choice([0, 8, 24, 64]))
        try:
            read_state_dict(path)
        except MeddapError:
            pass
    digits = b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 24]}}'
    with pytest.raises(MeddapError, match=r"digits\.safetensors: the safetensors header is not valid JSON"):
        read_state_dict(_safetensors(tmp_path / "digits.safetensors", digits))
