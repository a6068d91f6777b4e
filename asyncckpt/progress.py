"""A progress line for long reads in interactive use: ``verify  312/1024 MiB (30%)``, redrawn in place.

Opt-in, and only where someone watches: :func:`for_terminal` gives one only when the stream is a
terminal, so logs and pipes never see carriage returns. It is a plain callable
``(bytes done, bytes in all)``, the shape the reader's ``on_progress`` hook calls.
"""

from __future__ import annotations

import time
from typing import TextIO

__all__ = ["Progress", "for_terminal"]

MiB = 1 << 20


class Progress:
    """Draws ``label done/total MiB (percent)`` on ``stream``, at most every ``interval`` seconds."""

    def __init__(self, stream: TextIO, label: str, *, interval: float = 0.1) -> None:
        self._stream, self._label, self._interval = stream, label, interval
        self._last = 0.0
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < self._interval:
            return
        self._last = now
        percent = 100 * done // total if total else 100
        self._stream.write(f"\r{self._label}  {done / MiB:.0f}/{total / MiB:.0f} MiB ({percent}%)")
        self._stream.flush()
        self._drawn = True

    def close(self) -> None:
        """End the line (if one was drawn), so the next output starts on a fresh one."""
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False


def for_terminal(stream: TextIO, label: str) -> Progress | None:
    """A :class:`Progress` on ``stream`` if it is a terminal, else ``None`` (no progress output)."""
    isatty = getattr(stream, "isatty", None)
    return Progress(stream, label) if callable(isatty) and isatty() else None
