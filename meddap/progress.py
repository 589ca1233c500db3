"""A dependency-free progress bar with rate and ETA, written to stderr.

`for x in progress(items, desc="sampling"):` prints at most ~4 updates a second,
and nothing at all when disabled (tests, `--quiet`).
"""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class Progress:
    """Counts units of work; call `update(n)` and `close()`, or use `progress()`."""

    def __init__(self, total: int | None = None, desc: str = "", initial: int = 0,
                 enabled: bool = True, stream=None, min_interval: float = 0.25):
        self.total, self.desc, self.n = total, desc, initial
        self.start_n = initial
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.min_interval = min_interval
        self.t0 = time.monotonic()
        self._last = 0.0
        self.postfix = ""

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        self.n += n
        if postfix is not None:
            self.postfix = postfix
        now = time.monotonic()
        if self.enabled and now - self._last >= self.min_interval:  # close() draws the last state
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = now - self.t0
        done = self.n - self.start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        if self.total:
            frac = min(self.n / self.total, 1.0)
            bar = "#" * int(frac * 20)
            eta = (self.total - self.n) / rate if rate > 0 else float("nan")
            eta_s = _fmt_seconds(eta) if eta == eta else "?"
            line = (f"{self.desc} [{bar:<20}] {self.n}/{self.total} "
                    f"{_fmt_seconds(elapsed)}<{eta_s} {rate:.2f}/s")
        else:
            line = f"{self.desc} {self.n} {_fmt_seconds(elapsed)} {rate:.2f}/s"
        if self.postfix:
            line += f" {self.postfix}"
        self.stream.write("\r" + line)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()


def progress(items: Iterable[T], total: int | None = None, desc: str = "",
             enabled: bool = True) -> Iterator[T]:
    """Wrap an iterable with a `Progress` bar."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    bar = Progress(total=total, desc=desc, enabled=enabled)
    try:
        for x in items:
            yield x
            bar.update(1)
    finally:
        bar.close()
