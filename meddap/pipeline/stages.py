"""Resumable stages whose outputs carry the hashes of their inputs.

A stage owns one folder. When it finishes it writes `stage.json`:
{"stage", "inputs" (JSON-ready settings and the SHA-256 of upstream outputs),
"inputs_sha256", "outputs_sha256"}. On a re-run:
- `stage.json` present with the same inputs_sha256: the stage is skipped and
  its recorded outputs are used;
- inputs changed: the folder is emptied and the stage redone;
- no `stage.json` (killed mid-way): the stage runs again in its folder, so a
  stage that checkpoints (USLoRA training, classifier training, generation
  image by image) resumes where it stopped. `inputs.json`, written at the
  start, makes sure only a run with the same inputs resumes.

Each start and finish is one log line with times: "[fold0/lora] running
(01:05 into the run)" and "[fold0/lora] finished in 12:34 (13:39 into the
run)". A stage's time is measured from its `inputs.json`, written when it
starts or resumes, so it holds when the process that finishes the stage (rank
0 for the FID and classifier stages) is not the one that started it.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from meddap.io import json_sha256, sha256_file, write_json_atomic
from meddap.progress import format_seconds

MARKER, STARTED = "stage.json", "inputs.json"
_SKIP_SUFFIXES = (".pt", ".tmp")    # checkpoints and temporaries are not outputs
PROCESS_T0 = time.monotonic()       # the default start of the run: when this module was imported


def tree_sha256(folder: Path) -> str:
    """SHA-256 over the lines "<relative path> <sha256>" of a folder's files
    (stage markers, checkpoints and temporaries excluded)."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name not in (MARKER, STARTED) and not p.name.endswith(_SKIP_SUFFIXES):
            h.update(f"{p.relative_to(folder).as_posix()} {sha256_file(p)}\n".encode())
    return h.hexdigest()


class Stage:
    """`with`-less helper: `if not st.done(): ...work in st.folder...; st.finish(extra)`."""

    def __init__(self, folder: Path, name: str, inputs: dict, log=print, owns: tuple[Path, ...] = (),
                 prepare: bool = True, run_t0: float = PROCESS_T0):
        """`owns`: output folders outside `folder` that are emptied with it when inputs change.
        `prepare`: whether this process may empty and start the folder (one process per
        stage does: the others of a multi-process run only `peek`).
        `run_t0`: time.monotonic() when the run started, for the "into the run" times."""
        self.folder, self.name, self.inputs = Path(folder), name, inputs
        self.run_t0 = run_t0
        self.owns = tuple(Path(p) for p in owns)
        self.key = json_sha256(inputs)
        self.log = log
        self.prepare = prepare
        self.record: dict | None = None

    def peek(self) -> bool:
        """True (and the record loaded) when stage.json holds these inputs; no side effects."""
        marker = self.folder / MARKER
        if marker.is_file():
            record = json.loads(marker.read_text(encoding="utf-8"))
            if record.get("inputs_sha256") == self.key:
                self.record = record
                return True
        return False

    def done(self) -> bool:
        if not self.prepare:
            return self.peek()
        marker = self.folder / MARKER
        if marker.is_file():
            record = json.loads(marker.read_text(encoding="utf-8"))
            if record.get("inputs_sha256") == self.key:
                self.record = record
                self.log(f"[{self.name}] up to date (inputs {self.key[:12]}), skipped")
                return True
            self.log(f"[{self.name}] inputs changed, redoing it")
            self._clear()
        started = self.folder / STARTED
        if started.is_file() and json.loads(started.read_text(encoding="utf-8")).get("inputs_sha256") != self.key:
            self.log(f"[{self.name}] a partial run with other inputs is there; starting afresh "
                     f"({self._into_run()})")
            self._clear()
        elif started.is_file():
            self.log(f"[{self.name}] resuming an interrupted run ({self._into_run()})")
        else:
            self.log(f"[{self.name}] running ({self._into_run()})")
        write_json_atomic(started, {"inputs_sha256": self.key, "inputs": self.inputs})
        return False

    def _into_run(self) -> str:
        return f"{format_seconds(time.monotonic() - self.run_t0)} into the run"

    def _clear(self) -> None:
        for folder in (self.folder, *self.owns):
            if folder.exists():
                shutil.rmtree(folder)

    def finish(self, extra: dict | None = None) -> dict:
        self.record = {"stage": self.name, "inputs": self.inputs, "inputs_sha256": self.key,
                       "outputs_sha256": tree_sha256(self.folder), **(extra or {})}
        write_json_atomic(self.folder / MARKER, self.record)
        started, took = self.folder / STARTED, ""
        if started.is_file():                       # written when done() started the stage
            took = f" in {format_seconds(max(time.time() - started.stat().st_mtime, 0.0))}"
        self.log(f"[{self.name}] finished{took} ({self._into_run()})")
        return self.record

    @property
    def outputs_sha256(self) -> str:
        assert self.record is not None, "stage not finished"
        return self.record["outputs_sha256"]
