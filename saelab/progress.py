"""Progress on stderr: stage names, counts, rate and ETA, the same way for every long command.

Two shapes, one place:

- :func:`bar` is a counter (``update(n)``, ``set_postfix``, context manager, iteration; the subset of
  tqdm that saelab uses). On a terminal it *is* a tqdm bar (one line, redrawn). When stderr is not a
  terminal (a log file, a pipe, CI) it is a :class:`LineProgress`: it never redraws (no ``\\r``), and
  writes one plain line after 2 s, then at most one every ``interval`` seconds, then one at the end (none
  at all for a step done within 2 s) — a redirected log of a long run stays a few lines long and each line
  says how far and how long to go.
- :func:`stage` names one step of a multi-step command (``[2/5] train``): a line when it starts and one
  with its duration when it ends, whatever the terminal.

``SAELAB_PROGRESS=0`` silences both (results and errors are still printed); ``SAELAB_PROGRESS_INTERVAL``
sets the seconds between log lines (default 20).
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Iterable, Iterator, TextIO

from tqdm import tqdm

DEFAULT_INTERVAL = 20.0
"""Seconds between two lines of a :class:`LineProgress` (a log stays short; a 10-minute job writes ~30)."""
QUIET_SECONDS = 2.0
"""A :class:`LineProgress` says nothing before this: a step that ends sooner leaves no lines in the log."""


def enabled() -> bool:
    """False when the user asked for silence with ``SAELAB_PROGRESS=0``."""
    return os.environ.get("SAELAB_PROGRESS", "1") not in ("0", "false", "no", "off")


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default stderr) is an interactive terminal, where redrawing one line is right."""
    stream = stream or sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):   # a closed or replaced stream
        return False


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min 25 s``, ``1 h 02 min``: what a person reads at a glance."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def format_count(n: float, scale: bool) -> str:
    """``1234`` as is, or ``1.23k`` / ``4.50M`` when ``scale`` (token counts)."""
    if not scale:
        return f"{int(n):,}"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}"
    return f"{int(n)}"


class LineProgress:
    """A counter that writes whole lines, never redraws: for stderr that is a file or a pipe.

    ``saelab: analysing: 120.00k/1.00M tok (12%) · 41 s · 2.93k tok/s · ETA 5 min 00 s``
    """

    def __init__(self, total: float | None = None, desc: str = "", unit: str = "it", initial: float = 0,
                 unit_scale: bool = False, stream: TextIO | None = None, interval: float | None = None):
        self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
        self.n = self._n0 = initial
        self.stream = stream or sys.stderr
        self.interval = interval if interval is not None else _env_interval()
        self.postfix = ""
        self._t0 = time.monotonic()
        self._last = self._t0 - self.interval + QUIET_SECONDS   # the first line once QUIET_SECONDS have passed
        self._closed = self._wrote = False

    # -- tqdm's interface, the part saelab uses -----------------------------------------------------
    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._write()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        """tqdm redraws here; a log gets its next line on the interval instead."""

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._wrote or time.monotonic() - self._t0 >= QUIET_SECONDS:
                self._write(final=True)

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the line ------------------------------------------------------------------------------------
    def line(self, final: bool = False) -> str:
        """The text of one progress line (without the ``saelab:`` prefix)."""
        elapsed = time.monotonic() - self._t0
        done = format_count(self.n, self.unit_scale)
        parts = [f"{done}/{format_count(self.total, self.unit_scale)} {self.unit}" if self.total
                 else f"{done} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(("done in " if final else "") + format_duration(elapsed))
        rate = (self.n - self._n0) / elapsed if elapsed > 0 else 0.0
        if rate > 0 and elapsed >= 1:
            shown = format_count(rate, scale=True) if rate >= 10 else f"{rate:.2g}"
            parts.append(f"{shown} {self.unit}/s")
            if self.total and not final and self.n < self.total:
                parts.append(f"ETA {format_duration((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        return (f"{self.desc}: " if self.desc else "") + " · ".join(parts)

    def _write(self, final: bool = False) -> None:
        self._wrote = True
        print(f"saelab: {self.line(final)}", file=self.stream, flush=True)


class _Silent(LineProgress):
    """A counter that counts and writes nothing (``disable=True`` or ``SAELAB_PROGRESS=0``)."""

    def _write(self, final: bool = False) -> None:
        pass


def _env_interval() -> float:
    try:
        return float(os.environ.get("SAELAB_PROGRESS_INTERVAL", DEFAULT_INTERVAL))
    except ValueError:
        return DEFAULT_INTERVAL


def bar(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "", unit: str = "it",
        initial: float = 0, unit_scale: bool = False, disable: bool = False, leave: bool = True,
        stream: TextIO | None = None, **tqdm_kwargs):
    """A progress counter on stderr: a tqdm bar on a terminal, :class:`LineProgress` otherwise.

    With ``iterable`` it is iterated (and counted) like ``tqdm(iterable)``; ``total`` defaults to its length.
    ``leave`` and other tqdm options apply on a terminal only.
    """
    stream = stream or sys.stderr
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if disable or not enabled():
        counter = _Silent(total, desc, unit, initial, unit_scale, stream)
    elif is_terminal(stream):
        # disable=False explicitly: the CLI sets TQDM_DISABLE to hide the bars of the libraries underneath
        counter = tqdm(total=total, desc=desc, unit=unit, initial=initial, unit_scale=unit_scale, leave=leave,
                       file=stream, dynamic_ncols=True, disable=False, **tqdm_kwargs)
    else:
        counter = LineProgress(total, desc, unit, initial, unit_scale, stream)
    return counter if iterable is None else _counted(iterable, counter)


def _counted(iterable: Iterable, counter) -> Iterator:
    with counter:
        for item in iterable:
            yield item
            counter.update(1)


def say(message: str, stream: TextIO | None = None) -> None:
    """One line of news on stderr (``saelab: ...``), unless ``SAELAB_PROGRESS=0``."""
    if enabled():
        print(f"saelab: {message}", file=stream or sys.stderr, flush=True)


@contextmanager
def stage(name: str, index: int | None = None, of: int | None = None, stream: TextIO | None = None) -> Iterator[None]:
    """Name one step of a command: ``saelab: [2/5] train ...`` when it starts, ``... done in 3 min 10 s`` when it
    ends (or ``... failed after 12 s``), so a log says where a long command is and where its time went."""
    label = f"[{index}/{of}] {name}" if index is not None and of is not None else name
    say(f"{label} ...", stream)
    t0 = time.monotonic()
    try:
        yield
    except BaseException:
        say(f"{label} failed after {format_duration(time.monotonic() - t0)}", stream)
        raise
    say(f"{label} done in {format_duration(time.monotonic() - t0)}", stream)
