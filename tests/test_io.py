import hashlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from meddap.errors import MeddapError
from meddap.io import (append_jsonl, atomic_path, dataset_sha256, read_jsonl, save_torch_atomic,
                       sha256_file, stream_seed, truncate_log, write_bytes_atomic)


def test_sha256_matches_hashlib(tmp_path):
    data = bytes(range(256)) * 5000
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()


def test_atomic_write_leaves_old_file_on_error(tmp_path):
    p = tmp_path / "out.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert p.read_text() == "old"
    assert list(tmp_path.iterdir()) == [p]  # no temporary left behind
    write_bytes_atomic(p, b"new")
    assert p.read_bytes() == b"new"


def test_unwritable_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MeddapError, match="cannot create output folder"):
        write_bytes_atomic(blocker / "sub" / "out.bin", b"")


def test_jsonl_ignores_torn_last_line(tmp_path):
    p = tmp_path / "m.jsonl"
    append_jsonl(p, {"a": 1})
    append_jsonl(p, {"a": 2})
    with open(p, "a") as f:
        f.write('{"a": 3')  # a kill in the middle of a write
    assert read_jsonl(p) == [{"a": 1}, {"a": 2}]


def test_save_torch_atomic_round_trips_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "state.pt"
    state = {"w": torch.arange(6.0).reshape(2, 3), "step": 7}
    save_torch_atomic(state, p)
    back = torch.load(p, weights_only=True)
    assert back["step"] == 7 and torch.equal(back["w"], state["w"])
    assert list(tmp_path.iterdir()) == [p]


def test_truncate_log_keeps_header_and_complete_kept_rows(tmp_path):
    p = tmp_path / "log.csv"
    p.write_text("stage,step\nvae,1\nvae,2\nunet,1\nvae,3\nunet,2")      # last row torn
    truncate_log(p, "stage,step\n", keep=lambda f: not (f[0] == "vae" and int(f[1]) > 1))
    assert p.read_text() == "stage,step\nvae,1\nunet,1\n"
    truncate_log(tmp_path / "new.csv", "a,b\n", keep=lambda f: True)
    assert (tmp_path / "new.csv").read_text() == "a,b\n"


def test_stream_seed_closed_form():
    assert stream_seed(0, 5) == 5
    assert stream_seed(3, 7) == 3 * 1_000_003 + 7
    assert stream_seed(2 ** 62, 1) == (2 ** 62 * 1_000_003 + 1) % 2 ** 63


def test_dataset_sha256_is_over_labels_and_file_hashes_not_paths(tmp_path):
    @dataclass
    class It:
        label: str
        path: Path

    (tmp_path / "a.png").write_bytes(b"one")
    (tmp_path / "b.png").write_bytes(b"two")
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved" / "x.png").write_bytes(b"one")
    lines = (f"benign\t{hashlib.sha256(b'one').hexdigest()}\n"
             f"normal\t{hashlib.sha256(b'two').hexdigest()}\n")
    items = [It("benign", tmp_path / "a.png"), It("normal", tmp_path / "b.png")]
    assert dataset_sha256(items) == hashlib.sha256(lines.encode()).hexdigest()
    moved = [It("benign", tmp_path / "moved" / "x.png"), It("normal", tmp_path / "b.png")]
    assert dataset_sha256(moved) == dataset_sha256(items)
    assert dataset_sha256(items[::-1]) != dataset_sha256(items)
