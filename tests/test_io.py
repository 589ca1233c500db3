import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from meddap.errors import MeddapError
from meddap.io import (append_jsonl, atomic_path, clean_stale_temporaries, dataset_sha256,
                       is_temporary_name, read_jsonl, save_torch_atomic, sha256_file, stream_seed,
                       truncate_log, write_bytes_atomic)


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
    with pytest.warns(UserWarning, match="m.jsonl: ignored a torn last line"):
        assert read_jsonl(p) == [{"a": 1}, {"a": 2}]


def test_save_torch_atomic_round_trips_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "state.pt"
    state = {"w": torch.arange(6.0).reshape(2, 3), "step": 7}
    save_torch_atomic(state, p)
    back = torch.load(p, weights_only=True)
    assert back["step"] == 7 and torch.equal(back["w"], state["w"])
    assert list(tmp_path.iterdir()) == [p]


def test_save_torch_atomic_bytes_do_not_depend_on_the_file_name(tmp_path):
    """Bitwise resume claims compare saved files byte for byte: the bytes must be those of
    torch.save into memory, whatever the (temporary) file is called."""
    state = {"w": torch.arange(6.0).reshape(2, 3), "step": 7}
    buf = io.BytesIO()
    torch.save(state, buf)
    for name in ("a.pt", "best.pt"):
        save_torch_atomic(state, tmp_path / name)
        assert (tmp_path / name).read_bytes() == buf.getvalue(), name


def test_save_torch_atomic_failing_mid_stream_keeps_the_old_file(tmp_path):
    """torch.save streams into the temporary: a failure after some bytes are written
    (a tensor, then an object pickle refuses) must leave the old file and no temporary."""
    p = tmp_path / "state.pt"
    save_torch_atomic({"step": 1}, p)
    old = p.read_bytes()
    with pytest.raises(Exception):
        save_torch_atomic({"w": torch.zeros(1000), "f": lambda: 0}, p)
    assert p.read_bytes() == old
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


def test_long_name_fits_name_max_and_temporary_is_short(tmp_path):
    p = tmp_path / ("n" * 250 + ".png")                     # 254 bytes: at NAME_MAX with any suffix
    seen = []
    with atomic_path(p) as tmp:
        seen.append(tmp.name)
        tmp.write_bytes(b"x")
    assert p.read_bytes() == b"x"
    assert len(seen[0].encode()) == 1 + 40 + 1 + 8 + 4 and is_temporary_name(seen[0])
    assert seen[0].startswith("." + "n" * 40 + ".")
    multibyte = tmp_path / ("é" * 127)                      # 254 bytes of UTF-8
    write_bytes_atomic(multibyte, b"y")
    assert multibyte.read_bytes() == b"y"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_final_file_permissions_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_bytes_atomic(tmp_path / "out.bin", b"z")
    finally:
        os.umask(old)
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o666 & ~umask


def test_non_utf8_file_name_round_trips(tmp_path):
    name = os.fsdecode(b"scan\xff.png")                     # surrogateescape: not valid UTF-8
    write_bytes_atomic(tmp_path / name, b"bytes")
    assert (tmp_path / name).read_bytes() == b"bytes"
    assert os.listdir(os.fsencode(tmp_path)) == [b"scan\xff.png"]


def test_clean_stale_temporaries_removes_only_atomic_path_leftovers(tmp_path):
    (tmp_path / "sub").mkdir()
    stale = [tmp_path / ".out.png.0123abcd.tmp", tmp_path / "sub" / ".state.pt.deadbeef.tmp"]
    kept = [tmp_path / "out.png", tmp_path / "notes.tmp", tmp_path / ".hidden.tmp",
            tmp_path / ".out.png.0123ABCD.tmp", tmp_path / ".out.png.0123abc.tmp",
            tmp_path / "sub" / "a.0123abcd.tmp"]
    for f in stale + kept:
        f.write_bytes(b"")
    assert sorted(clean_stale_temporaries(tmp_path)) == sorted(stale)
    assert sorted(f for f in tmp_path.rglob("*") if f.is_file()) == sorted(kept)
    with pytest.raises(RuntimeError):                       # a real leftover has the cleaned form
        with atomic_path(tmp_path / "x.bin") as tmp:
            leftover = tmp
            raise RuntimeError
    assert is_temporary_name(leftover.name)


def _manifest(tmp_path, raw_utf8=False):
    """Three records; `raw_utf8`: written by hand with multi-byte UTF-8 (a tear can split a character)."""
    p = tmp_path / "m.jsonl"
    records = [{"k": k, "name": f"img {k} \u00e9\u4e2d"} for k in range(3)]
    if raw_utf8:
        p.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
    for r in records if not raw_utf8 else []:
        append_jsonl(p, r)
    return p


@pytest.mark.parametrize("raw_utf8", [False, True])
def test_torn_manifest_at_every_byte_of_its_last_record(tmp_path, raw_utf8):
    p = _manifest(tmp_path, raw_utf8)
    data = p.read_bytes()
    records = read_jsonl(p)
    start = data[:-1].rfind(b"\n") + 1                     # first byte of the last record
    for cut in range(start, len(data)):                     # keep data[:cut]: torn inside record 3
        p.write_bytes(data[:cut])
        whole = cut == len(data) - 1                         # only its final newline is lost
        expected = records if whole else records[:2]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert read_jsonl(p) == expected, cut
        assert len(caught) == (0 if whole or cut == start else 1), cut
        if caught:
            assert "m.jsonl: ignored a torn last line" in str(caught[0].message)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            append_jsonl(p, {"k": "next"})
        assert p.read_bytes().endswith(b"\n")
        with warnings.catch_warnings():
            warnings.simplefilter("error")                  # the appended file is whole: no warning
            assert read_jsonl(p) == expected + [{"k": "next"}], cut


def test_append_drops_a_torn_line_with_a_warning(tmp_path):
    p = _manifest(tmp_path)
    with open(p, "ab") as f:
        f.write(b'{"k": 3, "na')
    with pytest.warns(UserWarning, match=r"m.jsonl: dropped a torn last line \(12 bytes"):
        append_jsonl(p, {"k": 4})
    assert [r["k"] for r in read_jsonl(p)] == [0, 1, 2, 4]
    one_torn = tmp_path / "one.jsonl"
    one_torn.write_bytes(b'{"k"')
    with pytest.warns(UserWarning, match="dropped a torn last line"):
        append_jsonl(one_torn, {"k": 0})
    assert one_torn.read_bytes() == b'{"k": 0}\n'


def test_torn_middle_line_stays_an_error(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_bytes(b'{"k": 0}\n{"k": 1\n{"k": 2}\n')
    with pytest.raises(MeddapError, match=r"m.jsonl, line 2: not valid JSON"):
        read_jsonl(p)
    p.write_bytes(b'{"k": 0}\n{"k": 1\n')                 # a whole line (with newline) is never torn
    with pytest.raises(MeddapError, match=r"m.jsonl, line 2: not valid JSON"):
        read_jsonl(p)
    p.write_bytes(b"[" * 100_000 + b"\n")
    with pytest.raises(MeddapError, match=r"line 1: not valid JSON \(JSON nested too deep\)"):
        read_jsonl(p)
