"""A throttled one-line progress display on stderr (silenced by ``--quiet``)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Rewrites one status line at most every ``interval`` seconds; prints nothing when quiet.

    Nothing is shown for runs shorter than ``delay`` seconds, so quick commands stay quiet.
    """

    def __init__(self, label: str, quiet: bool = False, interval: float = 0.2,
                 delay: float = 0.5, stream: TextIO | None = None) -> None:
        self.label = label
        self.quiet = quiet
        self.interval = interval
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self.last = self.started + delay - interval
        self.shown = False

    def update(self, text: str, force: bool = False) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        self.shown = True
        self.stream.write(f"\r{self.label}: {text} [{now - self.started:6.1f}s]\033[K")
        self.stream.flush()

    def close(self, text: str | None = None) -> None:
        if self.quiet:
            return
        if text is not None:
            self.update(text, force=True)
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
