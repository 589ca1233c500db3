import hashlib

import pytest

from meddap.errors import MeddapError
from meddap.io import append_jsonl, atomic_path, read_jsonl, sha256_file, write_bytes_atomic


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
