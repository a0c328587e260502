"""Progress on stderr: one rewritten status line on a terminal, plain lines in a log.

On a terminal the line is redrawn at most every ``interval`` seconds (with ``\\r`` and an
erase-to-end escape); when stderr is redirected (a file, a pipe, CI) no control characters are
written, only a plain line at most every ``log_interval`` seconds and one at the end.
``--quiet`` silences both.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Status updates of one command; nothing is shown for runs shorter than ``delay``."""

    def __init__(self, label: str, quiet: bool = False, interval: float = 0.2,
                 delay: float = 0.5, stream: TextIO | None = None,
                 log_interval: float = 10.0) -> None:
        self.label = label
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.live = _is_terminal(self.stream)
        self.interval = interval if self.live else log_interval
        self.started = time.monotonic()
        self.last = self.started + delay - self.interval
        self.shown = False
        self.pending: str | None = None

    def update(self, text: str, force: bool = False) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            self.pending = text
            return
        self.last = now
        self.shown = True
        self.pending = None
        stamp = f"[{now - self.started:6.1f}s]"
        if self.live:
            self.stream.write(f"\r{self.label}: {text} {stamp}\033[K")
        else:
            self.stream.write(f"{self.label}: {text} {stamp}\n")
        self.stream.flush()

    def close(self, text: str | None = None) -> None:
        if self.quiet:
            return
        if text is None and not self.live and self.shown and self.pending is not None:
            text = self.pending  # a log ends on the final state, not on a stale one
        if text is not None:
            self.update(text, force=True)
        if self.shown and self.live:
            self.stream.write("\n")
            self.stream.flush()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
