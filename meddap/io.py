"""Small file helpers shared by every stage: hashing and atomic writes.

Nothing is lost on a crash: each output is written under a temporary name in
its final folder and renamed into place (rename is atomic on POSIX), so a
reader sees either the old file, the whole new file, or nothing.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from meddap.errors import MeddapError

_CHUNK = 1 << 20  # 1 MiB reads keep hashing of multi-GB checkpoints cheap on RAM


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` on success.

    On any exception the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MeddapError(f"cannot create output folder {folder}: {e.strerror}; "
                          f"choose a folder you can write to.") from e
    if not os.access(folder, os.W_OK):
        raise MeddapError(f"output folder {folder} is not writable; "
                          f"choose a folder you can write to.")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line and flush it to disk (manifests survive a kill)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL manifest; a torn last line (killed mid-write) is ignored."""
    out = []
    path = Path(path)
    if not path.exists():
        return out
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break  # the write of the last line was interrupted
            raise MeddapError(f"{path}, line {i + 1}: not valid JSON ({e.msg}).") from e
    return out


def save_torch_atomic(obj, path: str | os.PathLike) -> None:
    """`torch.save(obj)` to `path` atomically (serialised in memory, then renamed into place)."""
    import io as _io

    import torch
    buf = _io.BytesIO()
    torch.save(obj, buf)
    write_bytes_atomic(path, buf.getvalue())


def truncate_log(path: str | os.PathLike, header: str, keep) -> None:
    """Rewrite a CSV log atomically with `header` and the complete rows for which
    `keep(fields)` is true (fields: the row split on commas). A resumed run calls
    it so the log holds only the steps before its checkpoint, which it then redoes."""
    path = Path(path)
    rows = path.read_text(encoding="utf-8").splitlines(keepends=True)[1:] if path.exists() else []
    kept = [r for r in rows if r.endswith("\n") and keep(r.rstrip("\n").split(","))]
    write_text_atomic(path, header + "".join(kept))


# The per-stream seed rule: stream k of a run seeded S draws from a generator
# seeded (S · 1_000_003 + k) mod 2^63. A prime multiplier keeps the streams of
# nearby base seeds apart for up to a million streams (images, epochs, steps).
SEED_STREAM_MULTIPLIER = 1_000_003
SEED_MODULUS = 2 ** 63


def stream_seed(base_seed: int, stream: int) -> int:
    """(base_seed · 1_000_003 + stream) mod 2^63: the seed of one stream of a run."""
    return (int(base_seed) * SEED_STREAM_MULTIPLIER + int(stream)) % SEED_MODULUS


def dataset_sha256(items) -> str:
    """The one hash of a labelled image set: SHA-256 over its ordered lines
    "<label>\\t<SHA-256 of the file's bytes>\\n". Paths do not enter it, so a moved
    copy of the same images hashes the same. `items`: objects with .label and .path."""
    lines = [f"{it.label}\t{sha256_file(it.path)}\n" for it in items]
    return sha256_bytes("".join(lines).encode("utf-8"))
