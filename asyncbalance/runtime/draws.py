"""The standard exponential draws of a host's message delays: a stream of their own, which
can be drawn ahead of need on the block's second thread while the first sorts a window.

A host scales one standard exponential per link message by its link's mean (exponential
delays, ``DelaySampler.sample_many``). Drawn from the host's one generator, in order with
its wake intervals, a window's draws could only be taken once its moves had picked the
senders, on the critical path: ~5 ms per window at 10^5 neurons, 8 % of the run. From a
generator of their own they can be drawn earlier: ``prepare(n)`` draws until ``n`` are
waiting, ``take(m)`` returns the next ``m`` of the stream, drawing what is missing. The
values are the same whether or not any were drawn ahead, and however the draws were split
into calls (numpy's generator yields one sequence however it is called; ``test_draws``).
"""

from __future__ import annotations

from collections import deque

import numpy as np


class DelayDraws:
    """A stream of standard exponential draws from ``rng`` (used by nothing else). Not
    thread-safe: one thread at a time calls ``prepare`` or ``take`` (the block host waits
    for a ``prepare`` on its second thread before it takes)."""

    def __init__(self, rng: np.random.Generator):
        self._rng = rng
        self._blocks: deque[np.ndarray] = deque()
        self._at = 0  # draws of the first block already taken
        self._waiting = 0

    @property
    def waiting(self) -> int:
        """Draws drawn and not yet taken."""
        return self._waiting

    def prepare(self, n: int) -> None:
        """Draw until at least ``n`` draws are waiting."""
        missing = n - self._waiting
        if missing > 0:
            self._blocks.append(self._rng.standard_exponential(size=missing))
            self._waiting += missing

    def take(self, m: int) -> np.ndarray:
        """The next ``m`` draws of the stream."""
        self.prepare(m)
        blocks = self._blocks
        first = blocks[0] if blocks else np.zeros(0)
        if first.shape[0] - self._at >= m:
            # The common case, drawn ahead for this window: a view, no copy.
            out = first[self._at:self._at + m]
            self._at += m
        else:
            out = np.empty(m)
            filled = 0
            while filled < m:
                block = blocks[0]
                k = min(m - filled, block.shape[0] - self._at)
                out[filled:filled + k] = block[self._at:self._at + k]
                self._at += k
                filled += k
                if self._at == block.shape[0]:
                    blocks.popleft()
                    self._at = 0
        if blocks and self._at == blocks[0].shape[0]:
            blocks.popleft()
            self._at = 0
        self._waiting -= m
        return out
