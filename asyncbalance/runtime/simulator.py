"""The deterministic discrete-event simulator: one shard host on a simulated clock.

The simulator runs the very ``ShardHost`` that each Ray process runs: the same wake
schedule and event-driven wakes, per-link delays and means, loss, duplication, partitions,
crashes and checkpoints, with every shard in one host and the clock jumping from one event to
the next instead of following the wall. Everything random is drawn from generators seeded by
the scenario, in event order, and ties between events at the same time are broken by the
order they were scheduled in: the same seed gives the same event log, byte for byte.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .events import EventWriter
from .host import ShardHost, link_means, settings_for, split_by_shard
from .scenario import Scenario
from .shard import Rule, ShardSpec


@dataclass
class MessageCounters:
    """Message and work counters; ``delivered`` counts duplicates, so it may exceed ``sent``."""

    sent: int = 0
    delivered: int = 0
    applied: int = 0
    dropped: int = 0
    duplicated: int = 0
    unit_updates: int = 0
    crashes: int = 0
    restarts: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def rule_of(scenario: Scenario) -> Rule:
    b = scenario.balance
    return Rule(b.rule, b.alpha, b.eta)


class HostReadings:
    """Counters and crash records of a simulator that runs one host (``self.host``: a
    ``ShardHost`` or a ``BlockHost``, which keep the same counters and crash log)."""

    host: Any

    def message_counters(self) -> MessageCounters:
        c = self.host.counters
        log = self.host.crash_log
        return MessageCounters(
            sent=c["sent"], delivered=c["delivered"], applied=c["applied"],
            dropped=c["dropped"] + c["stale"], duplicated=c["duplicated"],
            unit_updates=self.host.unit_updates(), crashes=len(log),
            restarts=sum(r.restarted_at is not None for r in log))

    def crash_records(self) -> list[dict]:
        return [record.as_dict() for record in self.host.crash_log]


class Simulator(HostReadings):
    """Runs the shards in simulated time; ``advance(until)`` plays every event up to ``until``."""

    name = "sim"

    def __init__(self, specs: Sequence[ShardSpec], scenario: Scenario, events: EventWriter):
        self.specs = list(specs)
        self.scenario = scenario
        self.events = events
        self.host = ShardHost(0, self.specs, [0] * len(self.specs),
                              settings_for(scenario, link_means(scenario, self.specs)))
        self.now = 0.0
        self.busy_seconds = 0.0

    def start(self) -> None:
        """Nothing to start: the simulator runs inside ``advance``."""

    def advance(self, until: float) -> float:
        began = time.perf_counter()
        host = self.host
        while (due := host.next_due()) <= until:
            host.advance(due)
            for record in host.take_events():
                self.events.write(*record)
        self.now = until
        self.busy_seconds += time.perf_counter() - began
        return until

    def elapsed(self) -> float:
        return self.now

    def owned_log_scales(self) -> list[np.ndarray]:
        """Each owner's own log-scales; a shard that is down counts with what it restarts from."""
        owned = split_by_shard(self.specs, self.host.order, self.host.owned_log_scales())
        return [owned[spec.shard_id] for spec in self.specs]

    def checkpoints(self) -> dict[int, bytes]:
        return dict(self.host.checkpoints)

    def close(self) -> None:
        """Nothing to release."""
