"""The deterministic discrete-event simulator: shards, links and faults in simulated time.

Everything random (wake phases and intervals, delays, per-link means, losses, duplicates)
is drawn from one generator seeded by the scenario, in event order; ties between events at
the same time are broken by insertion order. The same seed therefore gives the same event
log, byte for byte. Messages travel encoded, so the wire format is exercised too.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .delays import DelaySampler, WakeSchedule, link_mean_factors
from .events import EventWriter
from .messages import StateMessage, decode_message, encode_message
from .scenario import Scenario
from .shard import Rule, Shard, ShardSpec

_WAKE, _DELIVER, _CRASH, _RESTART = 0, 1, 2, 3


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


class Simulator:
    """Runs shards in simulated time; ``advance(until)`` processes every event up to ``until``."""

    name = "sim"

    def __init__(self, specs: Sequence[ShardSpec], scenario: Scenario, events: EventWriter):
        self.specs = list(specs)
        self.scenario = scenario
        self.events = events
        self.rng = np.random.default_rng(scenario.seed)
        self.rule = rule_of(scenario)
        links = scenario.links
        self.resend = links.resend_interval
        self.shards: list[Shard | None] = [Shard(s, self.rule, self.resend) for s in self.specs]
        self.epochs = [0] * len(self.specs)
        self.checkpoints = [s.checkpoint() for s in self.shards]
        self.checkpoint_times = [0.0] * len(self.specs)
        self.restore_from: list[bytes | None] = list(self.checkpoints)
        pairs = [(s.shard_id, n) for s in self.specs for n in s.neighbours]
        self.link_mean = {k: links.mean * v for k, v in
                          link_mean_factors(self.rng, pairs, links.heterogeneity).items()}
        self.sampler = DelaySampler(links.delay, links.spread, links.pareto_shape)
        self.wake = WakeSchedule(scenario.wake.kind, scenario.wake.period, scenario.wake.jitter)
        self.partitions = [(w.start, w.stop, frozenset(w.shards))
                           for w in scenario.faults.partitions]
        self.counters = MessageCounters()
        self.retired_updates = 0
        self.queue: list[tuple[float, int, int, int, bytes | None]] = []
        self.order = 0
        self.now = 0.0
        self.busy_seconds = 0.0
        for spec in self.specs:
            self._push(self.wake.first(self.rng), _WAKE, spec.shard_id)
        for index, crash in enumerate(scenario.faults.crashes):
            self._push(crash.at, _CRASH, index)

    def _push(self, at: float, kind: int, target: int, payload: bytes | None = None) -> None:
        self.order += 1
        heapq.heappush(self.queue, (at, self.order, kind, target, payload))

    def start(self) -> None:
        """Nothing to start: the simulator runs inside ``advance``."""

    def advance(self, until: float) -> float:
        began = time.perf_counter()
        queue = self.queue
        while queue and queue[0][0] <= until:
            at, _, kind, target, payload = heapq.heappop(queue)
            if kind == _WAKE:
                self._wake(at, target)
            elif kind == _DELIVER:
                self._deliver(at, target, payload)
            elif kind == _CRASH:
                self._crash(at, target)
            else:
                self._restart(at, target)
        self.now = until
        self.busy_seconds += time.perf_counter() - began
        return until

    def _wake(self, at: float, sid: int) -> None:
        shard = self.shards[sid]
        if shard is None:
            return  # down; the restart schedules the next wake
        for message in shard.on_wake(at):
            self._send(at, message)
        if at - self.checkpoint_times[sid] >= self.scenario.faults.checkpoint_interval:
            self.checkpoints[sid] = shard.checkpoint()
            self.checkpoint_times[sid] = at
        self._push(at + self.wake.interval(self.rng), _WAKE, sid)

    def _link_down(self, src: int, dst: int, at: float) -> bool:
        return any(start <= at < stop and ((src in cut) != (dst in cut))
                   for start, stop, cut in self.partitions)

    def _send(self, at: float, message: StateMessage) -> None:
        payload = encode_message(message)
        src, dst = message.sender, message.receiver
        ids = (src, dst, message.epoch, message.seq)
        counters = self.counters
        counters.sent += 1
        self.events.write("send", at, *ids, int(message.units.shape[0]), len(payload))
        links = self.scenario.links
        if self.partitions and self._link_down(src, dst, at):
            counters.dropped += 1
            self.events.write("drop", at, *ids, "partition")
            return
        if links.loss > 0.0 and self.rng.random() < links.loss:
            counters.dropped += 1
            self.events.write("drop", at, *ids, "loss")
            return
        mean = self.link_mean[(src, dst)]
        self._push(at + self.sampler.sample(self.rng, mean), _DELIVER, dst, payload)
        if links.duplication > 0.0 and self.rng.random() < links.duplication:
            counters.duplicated += 1
            self.events.write("duplicate", at, *ids)
            self._push(at + self.sampler.sample(self.rng, mean), _DELIVER, dst, payload)

    def _deliver(self, at: float, dst: int, payload: bytes | None) -> None:
        message = decode_message(payload or b"")
        ids = (message.sender, dst, message.epoch, message.seq)
        shard = self.shards[dst]
        if shard is None:
            self.counters.dropped += 1
            self.events.write("drop", at, *ids, "down")
            return
        applied = shard.on_message(message)
        self.counters.delivered += 1
        self.counters.applied += int(applied)
        self.events.write("deliver", at, *ids, applied)

    def _crash(self, at: float, index: int) -> None:
        crash = self.scenario.faults.crashes[index]
        sid = crash.shard
        shard = self.shards[sid]
        if shard is None:
            return
        self.retired_updates += shard.unit_updates
        self.shards[sid] = None
        # What the shard will come back with; also what the gathered state uses meanwhile.
        self.restore_from[sid] = self.checkpoints[sid] if crash.restore == "checkpoint" else None
        self.counters.crashes += 1
        self.events.write("crash", at, sid)
        self._push(at + crash.down_for, _RESTART, index)

    def _restart(self, at: float, index: int) -> None:
        crash = self.scenario.faults.crashes[index]
        sid = crash.shard
        self.epochs[sid] += 1
        shard = Shard.restore(self.specs[sid], self.rule, self.resend, self.epochs[sid],
                              self.restore_from[sid])
        self.shards[sid] = shard
        self.checkpoints[sid] = shard.checkpoint()
        self.checkpoint_times[sid] = at
        self.counters.restarts += 1
        self.events.write("restart", at, sid, crash.restore, self.epochs[sid])
        self._push(at + self.wake.interval(self.rng), _WAKE, sid)

    def owned_log_scales(self) -> list[np.ndarray]:
        """Each owner's own log-scales; a shard that is down counts with what it restarts from."""
        values = []
        for spec, shard, saved in zip(self.specs, self.shards, self.restore_from, strict=True):
            if shard is not None:
                values.append(shard.log_scales)
            else:
                restored = Shard.restore(spec, self.rule, self.resend, 0, saved)
                values.append(restored.log_scales)
        return values

    def message_counters(self) -> MessageCounters:
        live = sum(s.unit_updates for s in self.shards if s is not None)
        self.counters.unit_updates = self.retired_updates + live
        return self.counters

    def close(self) -> None:
        """Nothing to release."""
