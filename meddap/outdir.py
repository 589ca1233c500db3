"""Output folders: who made one (the marker) and who is writing in it (the lock);
and output files, which must not name a folder (`check_output_file`).

Every command that writes an output folder enters it with `owned_output`:
take the lock; as the lock's first holder, claim the folder, remove the
temporaries that killed writes left behind and say "ready"; as a later holder
(another process of the same job), wait for that "ready" and only then check
the claim and write.

Marker. `claim_folder` writes `.meddap.json` into a folder that is new or
empty: {"command", "config_sha256", "version", "created"}. meddap writes only
into folders it made: a folder with files but no marker belongs to someone
else and is always refused. A folder made by the same command is accepted
whatever its config hash: whether a run with more steps or other settings may
resume there is that command's own resume rule to judge. A folder made by
another command is refused unless `force` (the command line's --force) adopts
it.

Lock. `folder_lock` holds `.meddap.lock` while a command writes in the
folder, so two runs never interleave their files. The lock file is a small
log of JSON lines, one per event:
    {"event": "enter", "host", "pid", "started", "job_id"}
    {"event": "ready", "host", "pid"}      the first holder has claimed and cleaned the folder
    {"event": "leave", "host", "pid"}
The first process creates it (open with O_CREAT | O_EXCL, atomic). Its
holders are the processes that entered and have not left. Another process
is refused at once, with a holder's host, PID and start time, unless
  - it passes the lock's job id (ranks of one torchrun job share
    TORCHELASTIC_RUN_ID, see `torchrun_job_id`): it appends its own "enter"
    line and shares the lock;
  - every holder is dead (same host, `os.kill(pid, 0)` finds no process):
    the lock is stale (a killed run) and is taken over with a warning.
The last holder out removes the file. Holders on another host cannot be
checked and count as alive; so do holders whose PID was reused. If such a
lock outlives its run, the refusal names the file to remove by hand.
Appends of one line are atomic on local POSIX file systems; on NFS, run the
processes of one job on one host or give each its own folder.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from meddap import __version__
from meddap.errors import MeddapError
from meddap.io import clean_stale_temporaries, is_temporary_name, output_folder, write_json_atomic

MARKER = ".meddap.json"
LOCK = ".meddap.lock"
_SHOWN_FILES = 3            # foreign files named in a refusal
_READ_RETRIES = 100         # 10 ms apart: a creator writes its line right after creating the file
_ENTER_TRIES = 100          # each try loses only to another process entering or leaving meanwhile
_READY_POLL_S = 0.02        # a later holder's wait for the first holder's "ready"
_READY_TIMEOUT_S = 600.0    # for first holders on another host, whose death cannot be seen
FORCE_HELP = "adopt a folder that another meddap command created"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---- the marker: which command made this folder ---------------------------------------
@dataclass(frozen=True)
class Claim:
    folder: Path
    created: bool                 # the folder was missing or empty and now has our marker
    adopted_from: dict | None     # with force: the marker of another command/config it replaced


def claim_folder(folder: str | os.PathLike, command: str, config_sha256: str = "",
                 force: bool = False) -> Claim:
    """Make `folder` this command's output folder, or refuse.

    missing or empty (meddap's lock aside)  -> created, marker written
    marker of this command (any config)     -> fine: the command's resume rule judges the files
    marker of another command               -> refused; `force` adopts it (new marker)
    files but no marker                     -> refused, even with `force`
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise MeddapError(f"output folder {folder} is a file; choose an empty or new folder.")
    marker = folder / MARKER
    mine = {"command": command, "config_sha256": config_sha256, "version": __version__}
    if not marker.exists():
        found = sorted(e.name for e in os.scandir(folder) if not _is_ours(e.name)) if folder.exists() else []
        if found:
            shown = ", ".join(found[:_SHOWN_FILES]) + (f" and {len(found) - _SHOWN_FILES} more"
                                                       if len(found) > _SHOWN_FILES else "")
            why = " (--force only reuses folders meddap created)" if force else ""
            raise MeddapError(f"output folder {folder} is not empty ({shown}) and has no {MARKER}: "
                              f"meddap did not create it; choose an empty or new folder{why}.")
        write_json_atomic(marker, {**mine, "created": _now()})
        return Claim(folder, created=True, adopted_from=None)
    theirs = _read_marker(marker)
    if theirs["command"] == command:
        return Claim(folder, created=False, adopted_from=None)
    if not force:
        raise MeddapError(f"output folder {folder} was made by `meddap {theirs['command']}`, not by "
                          f"`meddap {command}`; choose another folder, or pass --force to adopt it "
                          f"(its files may be overwritten).")
    write_json_atomic(marker, {**mine, "created": _now()})
    return Claim(folder, created=False, adopted_from=theirs)


def _is_ours(name: str) -> bool:
    """The lock, a lock being released, or the marker's temporary while another
    process of the same job writes it: not files that make a folder "not empty"."""
    return (name == LOCK or (name.startswith(f"{LOCK}.") and name.endswith(".released"))
            or (name.startswith(f".{MARKER}.") and is_temporary_name(name)))


def _read_marker(marker: Path) -> dict:
    try:
        theirs = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        theirs = e
    if not (isinstance(theirs, dict) and isinstance(theirs.get("command"), str)
            and isinstance(theirs.get("config_sha256"), str)):
        raise MeddapError(f"{marker} is damaged (expected a JSON object with the strings \"command\" "
                          f"and \"config_sha256\"); choose another folder, or remove it to adopt "
                          f"the folder as yours.")
    return theirs


# ---- the lock: who writes in this folder now ------------------------------------------
@dataclass(frozen=True)
class FolderLock:
    folder: Path
    path: Path                    # folder/.meddap.lock
    first: bool                   # no other live holder when we entered: we may clean stale files
    took_over: dict | None        # the "enter" line of a dead holder whose stale lock we replaced


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, job_id: str | None = None) -> Iterator[FolderLock]:
    """Hold `folder`'s lock for the block (the folder is created if missing).

    Processes passing the same non-None `job_id` share it; a process already
    holding it may enter again. Raises MeddapError at once if another live
    process holds it.
    """
    folder = output_folder(folder)
    path = folder / LOCK
    me = {"event": "enter", "host": socket.gethostname(), "pid": os.getpid(), "started": _now(),
          "job_id": job_id}
    first, took_over = _enter(path, me)
    try:
        yield FolderLock(folder, path, first, took_over)
    finally:
        _leave(path, me)


def _enter(path: Path, me: dict) -> tuple[bool, dict | None]:
    took_over = None
    for _ in range(_ENTER_TRIES):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            pass
        else:
            _write_line(fd, me)
            return True, took_over
        log = _read_log(path)
        if log is None:                                          # removed meanwhile: try again
            continue
        holders = _holders(log)
        live = [h for h in holders if _alive(h)]
        if not live:                                             # killed holders, or all just left
            aside = _set_aside(path)
            if aside is not None:
                aside.unlink()
                if holders:
                    took_over = holders[0]
                    warnings.warn(f"{path}: took over a stale lock: PID {took_over['pid']} on host "
                                  f"{took_over['host']}, started {took_over['started']}, no longer runs.")
            continue
        same_job = me["job_id"] is not None and log[0].get("job_id") == me["job_id"]
        reentry = any(_key(h) == _key(me) for h in live)
        if not (same_job or reentry):
            h = live[0]
            job = f", job {h['job_id']}" if h.get("job_id") is not None else ""
            raise MeddapError(f"output folder {path.parent} is in use by another meddap process: host "
                              f"{h['host']}, PID {h['pid']}, started {h['started']}{job}. Wait for it "
                              f"to end or choose another folder; if that process no longer runs, "
                              f"remove {path}.")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:                                # its last holder just left
            continue
        _write_line(fd, me)
        log = _read_log(path)
        if log is not None and me in log:                        # not appended to a removed file
            return False, took_over
    raise MeddapError(f"could not take the lock {path}: it changed under {_ENTER_TRIES} tries; other "
                      f"processes are starting and ending in {path.parent} right now. Try again.")


def _announce_ready(lock: FolderLock) -> None:
    """As the first holder: the folder is claimed and cleaned; partners may write now."""
    _write_line(os.open(lock.path, os.O_WRONLY | os.O_APPEND),
                {"event": "ready", "host": socket.gethostname(), "pid": os.getpid()})


def _wait_ready(lock: FolderLock) -> None:
    """As a later holder: return once the lock's log holds a "ready" line. Raise if the
    holders that entered before us all left (or died) without one: the job's first
    process stopped before it claimed the folder, and its own message says why."""
    me = (socket.gethostname(), os.getpid())
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while True:
        log = _read_log(lock.path) or []
        if any(e["event"] == "ready" for e in log):
            return
        entered = [_key(e) for e in log if e["event"] == "enter"]
        earlier = set(entered[:entered.index(me)]) if me in entered else set()
        if not any(_key(h) in earlier and _alive(h) for h in _holders(log)) or time.monotonic() > deadline:
            raise MeddapError(f"output folder {lock.folder}: the first process of this job (lock "
                              f"{lock.path}) stopped before it claimed the folder; its own message says "
                              f"why. Nothing was written by this process.")
        time.sleep(_READY_POLL_S)


def _leave(path: Path, me: dict) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    except FileNotFoundError:
        return
    _write_line(fd, {"event": "leave", "host": me["host"], "pid": me["pid"]})
    log = _read_log(path)
    if log is None or any(_alive(h) for h in _holders(log)):
        return
    aside = _set_aside(path)                                     # we were the last one out
    if aside is not None:
        aside.unlink()


def _write_line(fd: int, event: dict) -> None:
    """One os.write of one line: an O_APPEND write lands whole at the end of the file."""
    try:
        os.write(fd, (json.dumps(event) + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_log(path: Path) -> list[dict] | None:
    """The lock's events (None: no lock file). A torn last line (a holder mid-append) is
    left out; an empty file (its creator about to write) is waited for, then an error."""
    for _ in range(_READ_RETRIES):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        events = []
        for line in data.split(b"\n")[:-1]:
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if not (isinstance(event, dict) and event.get("event") in ("enter", "ready", "leave")
                    and isinstance(event.get("pid"), int) and isinstance(event.get("host"), str)):
                raise MeddapError(f"lock file {path} is damaged (line {line[:80]!r}); if no meddap "
                                  f"process is writing in {path.parent}, remove it.")
            events.append(event)
        if events and events[0]["event"] != "enter":
            raise MeddapError(f"lock file {path} is damaged (it does not start with an \"enter\" "
                              f"line); if no meddap process is writing in {path.parent}, remove it.")
        if events:
            return events
        time.sleep(0.01)
    raise MeddapError(f"lock file {path} stays empty; if no meddap process is writing in "
                      f"{path.parent}, remove it.")


def _key(event: dict) -> tuple[str, int]:
    return event["host"], event["pid"]


def _holders(log: list[dict]) -> list[dict]:
    """The "enter" lines of processes that entered (more often) than they left."""
    left = Counter(_key(e) for e in log if e["event"] == "leave")
    holders = []
    for e in log:
        if e["event"] == "enter":
            if left[_key(e)]:
                left[_key(e)] -= 1
            else:
                holders.append(e)
    return holders


def _alive(holder: dict) -> bool:
    """Whether a holder may still run: False only for a PID of this host with no process."""
    if holder["host"] != socket.gethostname() or os.name != "posix":  # Windows' os.kill would end it
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:                                      # another user's process
        return True
    return True


def _set_aside(path: Path) -> Path | None:
    """Rename a lock without live holders to a unique name and return that name.

    None if it is gone, or if a live process entered it (or created a new
    lock) since we read it; such a lock is put back. Renaming first makes the
    check and the removal one step for everyone else."""
    aside = path.with_name(f"{LOCK}.{secrets.token_hex(4)}.released")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return None
    log = _read_log(aside)
    if log is not None and not any(_alive(h) for h in _holders(log)):
        return aside
    with contextlib.suppress(FileExistsError):                   # someone's live lock: restore it
        os.link(aside, path)
    aside.unlink()
    return None


# ---- both: a command's output folder ------------------------------------------------
def torchrun_job_id() -> str | None:
    """The job id that the processes of one launch share: torchrun's TORCHELASTIC_RUN_ID
    (the same in every rank), None for a process started on its own."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or None


@contextlib.contextmanager
def owned_output(folder: str | os.PathLike, command: str, config_sha256: str = "",
                 force: bool = False, job_id: str | None = None) -> Iterator[Claim]:
    """Hold `folder` for the block as `command`'s output folder.

    1. take its lock (`folder_lock`: refused at once while another process
       writes there; `job_id` shares it among one job's processes);
    2. as the first holder: claim it (`claim_folder`: refused when another
       command or no meddap command made it; `force` adopts another command's
       folder), remove the temporaries of killed writes
       (`meddap.io.clean_stale_temporaries`), then say "ready" in the lock;
    3. as a later holder of the same job: wait for that "ready", then check the
       claim (the marker is there by then, so nothing is written). Before, a
       later holder could write the marker while the first one cleaned, and
       lose its temporary to the cleaning.
    A block that fails before writing anything leaves no trace: the marker it
    wrote is removed, and the folder too when this call made it.
    """
    made = not Path(folder).exists()
    try:
        with folder_lock(folder, job_id) as lock:
            if not lock.first:
                _wait_ready(lock)
            claim = claim_folder(lock.folder, command, config_sha256, force)
            if lock.first:
                clean_stale_temporaries(lock.folder)
                _announce_ready(lock)
            try:
                yield claim
            except BaseException:
                if claim.created and _only_marker(lock.folder):
                    (lock.folder / MARKER).unlink()
                raise
    except BaseException:
        if made:
            with contextlib.suppress(OSError):          # not empty (files, a partner's lock): kept
                os.rmdir(folder)
        raise


def _only_marker(folder: Path) -> bool:
    return [e.name for e in os.scandir(folder) if not _is_ours(e.name)] == [MARKER]


# ---- output files ---------------------------------------------------------------------
def check_output_file(path: str | os.PathLike, what: str, example: str) -> Path:
    """`path` as a file to write; when it is a directory, an error naming `what`
    (e.g. "--out") that suggests the file `example` inside it."""
    path = Path(path)
    if path.is_dir():
        raise MeddapError(f"{what} {path} is a directory, not a file; give the name of a file "
                          f"to write, e.g. {path / example}.")
    return path
