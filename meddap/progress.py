"""A dependency-free progress bar with rate and ETA, written to stderr.

`for x in progress(items, desc="sampling"):` draws a bar; `enabled=False`
(tests, `--quiet`) draws nothing at all. How often it draws depends on where
the stream goes:
- a terminal (`stream.isatty()`): the line is redrawn in place with "\\r", at
  most every `min_interval` seconds (4 times a second);
- anything else (a log file, a pipe, `meddap run > log`): plain lines, no "\\r".
  A bar with a total prints a line when it passes 5%, 10%, ..., 95% of it
  (`LOG_STEPS`), and `close()` prints the final one: at most 20 lines however
  many updates. A bar without a total prints at most one line per
  `LOG_INTERVAL_S` seconds, plus the final line.
"""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

LOG_STEPS = 20            # off a terminal: one line per 1/20 (5%) of the total
LOG_INTERVAL_S = 10.0     # off a terminal, total unknown: one line per 10 s


def format_seconds(s: float) -> str:
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
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_interval = min_interval
        self.t0 = time.monotonic()
        self._last = 0.0 if self.tty else self.t0     # when the last line was drawn
        self._step = self._log_step(initial)    # off a terminal: the last 1/20 step printed
        self.postfix = ""

    def _log_step(self, n: int) -> int:
        """How many whole 1/20 steps of the total `n` units are (0 when the total is unknown)."""
        return n * LOG_STEPS // self.total if self.total else 0

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        self.n += n
        if postfix is not None:
            self.postfix = postfix
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            draw = now - self._last >= self.min_interval
        elif self.total:                    # a new 1/20 step; the total's line is close()'s
            step = self._log_step(self.n)
            draw = step > self._step and self.n < self.total
            if draw:
                self._step = step
        else:
            draw = now - self._last >= LOG_INTERVAL_S
        if draw:
            self._last = now
            self._draw(now)

    def _line(self, now: float) -> str:
        elapsed = now - self.t0
        done = self.n - self.start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        if self.total:
            frac = min(self.n / self.total, 1.0)
            bar = "#" * int(frac * 20)
            eta = (self.total - self.n) / rate if rate > 0 else float("nan")
            eta_s = format_seconds(eta) if eta == eta else "?"
            line = (f"{self.desc} [{bar:<20}] {self.n}/{self.total} "
                    f"{format_seconds(elapsed)}<{eta_s} {rate:.2f}/s")
        else:
            line = f"{self.desc} {self.n} {format_seconds(elapsed)} {rate:.2f}/s"
        if self.postfix:
            line += f" {self.postfix}"
        return line

    def _draw(self, now: float) -> None:
        """A terminal redraws the line in place; anything else gets one line."""
        if self.tty:
            self.stream.write("\r" + self._line(now))
        else:
            self.stream.write(self._line(now) + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state (and end a terminal's line)."""
        if self.enabled:
            self._draw(time.monotonic())
            if self.tty:
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
