"""A pull's progress for people: a bar on a terminal, a line now and then otherwise.

A bar redrawn in place (bytes, percent, rate, providers) when the output is a
terminal; when it is a file or a pipe, one line every ``every_s`` seconds and
one at the end, so a log holds a few lines, not thousands.
"""

from __future__ import annotations

import time
from typing import TextIO

from .pull import Progress

BAR = 28


def line(p: Progress) -> str:
    share = p.done_bytes / p.total_bytes if p.total_bytes else 1.0
    struck = f", {len(p.struck)} struck" if p.struck else ""
    return (
        f"{p.content[:12]}... {p.done_bytes / 1e6:.1f}/{p.total_bytes / 1e6:.1f} MB "
        f"{share:4.0%} {p.rate / 1e6:.1f} MB/s, {len(p.active)} provider(s){struck}"
    )


class ProgressDisplay:
    """``on_progress`` for a Puller: writes to ``out``."""

    def __init__(self, out: TextIO, *, terminal: bool | None = None, every_s: float = 2.0) -> None:
        self.out = out
        self.terminal = out.isatty() if terminal is None else terminal
        self.every_s = every_s
        self._last = 0.0
        self._ended = False

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        if self._ended:
            return
        if self.terminal:
            if now - self._last < 0.1 and not p.finished:
                return
            share = p.done_bytes / p.total_bytes if p.total_bytes else 1.0
            filled = int(share * BAR)
            bar = "#" * filled + "." * (BAR - filled)
            self.out.write(f"\r[{bar}] {line(p)}   ")
            if p.finished:
                self.out.write("\n")
        elif p.finished or now - self._last >= self.every_s:
            self.out.write(("pulled " if p.finished else "pulling ") + line(p) + "\n")
        self._ended = p.finished
        self._last = now
        self.out.flush()
