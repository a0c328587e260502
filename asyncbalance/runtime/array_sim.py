"""The deterministic simulator at array speed: a ``ShardBlock`` on a simulated clock.

Same scenario semantics as the per-message simulator (``simulator.Simulator``, which runs the
reference ``ShardHost`` event by event): per-shard wake schedules and event-driven wakes, a
delay draw per message on each directed link (with the link's own mean for heterogeneity),
loss, duplication, partition windows, scripted crashes with a restart from the last checkpoint
or from u = 0, anti-entropy re-sends. What changes is the bookkeeping:

- **Windows.** Time is taken in windows of ``step`` time units. In a window, the messages due
  in it are applied first (in the order of their delivery times, with the reference's
  version rule), then every shard whose wake falls in the window moves, all in one array
  computation, on the view at the window's end. Send and delivery times stay exact; only the
  order of a wake and a delivery less than ``step`` apart can differ from the event-by-event
  order. The default step is 1/10 of the shorter of the wake period and the mean delay.
- **Queue of arrays.** Messages in flight wait in a timing wheel: one bucket per window,
  each a list of array chunks (delivery times, links, versions, values), drawn as vectors from
  the scenario's seeded generator.
- **Event log.** One ``batch`` record per window (counts, time span, delay statistics); with
  ``record_events = "messages"`` also one record per message, in the reference's schema.

Everything random comes from one generator seeded by the scenario and is drawn in window
order, so the same seed gives the same record, byte for byte.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..graph import CostGraph
from .block import ShardBlock
from .delays import DelaySampler, WakeSchedule
from .events import EventWriter
from .host import CrashRecord
from .layout import BlockLayout, build_layout, expand_ranges
from .scenario import Scenario
from .shard import Rule, ShardSpec
from .simulator import MessageCounters

# Moves this small wait for the anti-entropy timer (the reference host's threshold).
SEND_THRESHOLD = 1e-13
STEP_FRACTION = 1.0 / 10.0


def default_step(scenario: Scenario) -> float:
    """1/10 of the shorter of the wake period and the mean delay (the period if no delay)."""
    period = scenario.wake.period
    mean = scenario.links.mean
    return STEP_FRACTION * (min(period, mean) if mean > 0 else period)


def event_level(scenario: Scenario) -> str:
    """``none``, ``batches`` (default) or ``messages`` from ``record_events``."""
    level = scenario.record_events
    if level is False:
        return "none"
    if level is True:
        return "batches"
    return str(level)


@dataclass(frozen=True, eq=False)
class _Chunk:
    """Messages sent together, sorted by arrival window; message i carries
    ``values[ptr[i]:ptr[i + 1]]``."""

    times: np.ndarray
    links: np.ndarray
    versions: np.ndarray
    values: np.ndarray
    ptr: np.ndarray


class ArraySimulator:
    """Runs a block of every shard in simulated time; ``advance(until)`` plays up to ``until``."""

    name = "sim"

    def __init__(self, specs: Sequence[ShardSpec], scenario: Scenario, events: EventWriter,
                 graph: CostGraph, step: float | None = None,
                 layout: BlockLayout | None = None):
        self.specs = list(specs)
        self.scenario = scenario
        self.events = events
        self.level = event_level(scenario)
        s = scenario
        b = s.balance
        self.layout = layout if layout is not None else build_layout(
            graph, [spec.units for spec in self.specs])
        lay = self.layout
        self.block = ShardBlock(lay, Rule(b.rule, b.alpha, b.eta), s.links.resend_interval,
                                SEND_THRESHOLD)
        self.step = float(step) if step is not None else default_step(s)
        self.rng = np.random.default_rng([s.seed, 0, 0])
        self.sampler = DelaySampler(s.links.delay, s.links.spread, s.links.pareto_shape)
        self.wake = WakeSchedule(s.wake.kind, s.wake.period, s.wake.jitter)
        h = s.links.heterogeneity
        factors = (np.random.default_rng(s.seed).lognormal(-0.5 * h * h, h, size=lay.n_links)
                   if h > 0 else np.ones(lay.n_links))
        self.link_mean = s.links.mean * factors
        n = lay.n_shards
        self.partitions = []
        for window in s.faults.partitions:
            cut = np.zeros(n, dtype=bool)
            cut[list(window.shards)] = True
            self.partitions.append((window.start, window.stop, cut))
        first = self.wake.first_many(self.rng, n)
        self.next_tick = first.copy()
        self.wake_at = first.copy()
        self.alive = np.ones(n, dtype=bool)
        self.restarts = np.zeros(n, dtype=np.int64)
        self.retired_updates = 0
        # Checkpoints: a copy of the value vector and link versions, refreshed per shard.
        self.saved_values = self.block.values.copy()
        self.saved_versions = self.block.link_version.copy()
        self.saved_time = np.zeros(n)
        self.restore_from: dict[int, dict[str, np.ndarray] | None] = {}
        self.crash_log: list[CrashRecord] = []
        self.faults: list[tuple[float, int, int, int]] = []  # (time, order, shard, crash index)
        for index, crash in enumerate(s.faults.crashes):
            heapq.heappush(self.faults, (crash.at, index, crash.shard, index))
        self._fault_order = len(s.faults.crashes)
        # Messages in flight: a timing wheel with one bucket per window. A batch of sends is
        # one chunk sorted by window; a bucket lists the (chunk, start, stop) ranges due in
        # it, so enqueueing copies nothing per window and a window reads only its own.
        self.buckets: dict[int, list[tuple[_Chunk, int, int]]] = {}
        self.bucket_keys: list[int] = []
        self.in_flight = 0
        self.slot_count = np.diff(self.layout.link_slot_ptr)
        self.counters = dict.fromkeys(("sent", "delivered", "applied", "dropped",
                                       "duplicated"), 0)
        self.windows = 0
        self.now = 0.0
        self.busy_seconds = 0.0

    # -- the backend interface ------------------------------------------------------------

    def start(self) -> None:
        """Nothing to start: the simulator runs inside ``advance``."""

    def advance(self, until: float) -> float:
        began = time.perf_counter()
        while True:
            key = self._next_window()
            if key * self.step > until:
                break
            limit = min((key + 1) * self.step, until)
            if not self._window(key, key * self.step, limit) and limit == until:
                break  # what is left in this window is due after ``until``
        self.now = until
        self.busy_seconds += time.perf_counter() - began
        return until

    def elapsed(self) -> float:
        return self.now

    def owned_log_scales(self) -> list[np.ndarray]:
        """Each owner's own values; a shard that is down counts with what it restarts from."""
        lay = self.layout
        own = self.block.own.copy()
        for shard, saved in self.restore_from.items():
            lo, hi = lay.unit_ptr[shard], lay.unit_ptr[shard + 1]
            own[lo:hi] = 0.0 if saved is None else saved["own"]
        return [own[lay.unit_ptr[s]:lay.unit_ptr[s + 1]].copy() for s in range(lay.n_shards)]

    def message_counters(self) -> MessageCounters:
        c = self.counters
        return MessageCounters(
            sent=c["sent"], delivered=c["delivered"], applied=c["applied"],
            dropped=c["dropped"], duplicated=c["duplicated"],
            unit_updates=self.retired_updates + int(self.block.unit_updates.sum()),
            crashes=len(self.crash_log),
            restarts=sum(r.restarted_at is not None for r in self.crash_log))

    def crash_records(self) -> list[dict]:
        return [record.as_dict() for record in self.crash_log]

    def close(self) -> None:
        """Nothing to release."""

    def queue_length(self) -> int:
        return self.in_flight

    # -- one window -----------------------------------------------------------------------

    def _next_window(self) -> float:
        """The earliest window with a message due, a wake or a scripted fault in it."""
        key = math.inf
        while self.bucket_keys and self.bucket_keys[0] not in self.buckets:
            heapq.heappop(self.bucket_keys)
        if self.bucket_keys:
            key = self.bucket_keys[0]
        if self.alive.any():
            key = min(key, math.floor(float(self.wake_at[self.alive].min()) / self.step))
        if self.faults:
            key = min(key, math.floor(self.faults[0][0] / self.step))
        return key

    def _window(self, k: int, start: float, limit: float) -> int:
        """Play window ``k`` up to ``limit``; the number of deliveries, wakes and faults."""
        self.windows += 1
        before = dict(self.counters)
        while self.faults and self.faults[0][0] <= limit:
            at, _, shard, index = heapq.heappop(self.faults)
            if index >= 0:
                self._crash(at, shard, index)
            else:
                self._restart(at, shard, -index - 1)
        faults = len(self.crash_log) + sum(r.restarted_at is not None for r in self.crash_log)
        delivered = self._deliver_due(k, limit)
        woken, senders = self._wake_due(limit)
        delays = self._send(senders, k)
        if self.level != "none":
            c = self.counters
            self.events.write(
                "batch", start, limit, int(woken.shape[0]),
                *(c[name] - before[name] for name in ("sent", "delivered", "applied",
                                                      "dropped", "duplicated")),
                float(delays.mean()) if delays.size else 0.0,
                float(delays.max()) if delays.size else 0.0)
        faults -= len(self.crash_log) + sum(r.restarted_at is not None for r in self.crash_log)
        return delivered + int(woken.shape[0]) - faults

    def _deliver_due(self, k: int, limit: float) -> int:
        ranges = self.buckets.pop(k, None)
        if not ranges:
            return 0
        times = np.concatenate([c.times[lo:hi] for c, lo, hi in ranges])
        links = np.concatenate([c.links[lo:hi] for c, lo, hi in ranges])
        versions = np.concatenate([c.versions[lo:hi] for c, lo, hi in ranges])
        # Each range's values are contiguous in its chunk: read just those.
        pieces = [c.values[c.ptr[lo]:c.ptr[hi]] for c, lo, hi in ranges]
        offsets = np.cumsum([0] + [p.shape[0] for p in pieces[:-1]])
        starts = np.concatenate([c.ptr[lo:hi] - c.ptr[lo] + offset
                                 for (c, lo, hi), offset in zip(ranges, offsets, strict=True)])
        values = np.concatenate(pieces)
        self.in_flight -= times.shape[0]
        later = times > limit
        if later.any():
            # The run stops inside this window: what is due after ``limit`` waits.
            self._enqueue(times[later], links[later], versions[later], values, starts[later])
            due = ~later
            times, links, versions, starts = times[due], links[due], versions[due], starts[due]
        if times.size == 0:
            return 0
        order = np.argsort(times, kind="stable")
        times, links, versions, starts = times[order], links[order], versions[order], \
            starts[order]
        lay = self.layout
        counts = self.slot_count[links]
        receivers = lay.link_dst[links]
        up = self.alive[receivers]
        if self.level == "messages":
            for i in np.nonzero(~up)[0]:
                self._message_record("drop", times[i], links[i], versions[i], "down")
        processed = int(times.shape[0])
        self.counters["dropped"] += int((~up).sum())
        times, links, versions, starts, counts, receivers = (
            times[up], links[up], versions[up], starts[up], counts[up], receivers[up])
        if times.size == 0:
            return processed
        index, _ = expand_ranges(starts, starts + counts)
        value_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        applied, _ = self.block.deliver(links, versions, values[index], value_ptr)
        self.counters["delivered"] += int(times.shape[0])
        self.counters["applied"] += int(applied.sum())
        if self.level == "messages":
            for i in range(times.shape[0]):
                self._message_record("deliver", times[i], links[i], versions[i],
                                     bool(applied[i]))
        # News wakes a shard at its next scheduled tick (not before the news arrived).
        woke = applied & self.block.dirty[receivers]
        if woke.any():
            first = np.full(lay.n_shards, np.inf)
            np.minimum.at(first, receivers[woke], times[woke])
            hit = np.isfinite(first)
            candidate = np.maximum(first[hit], self.next_tick[hit])
            self.wake_at[hit] = np.minimum(self.wake_at[hit], candidate)
        return processed

    def _wake_due(self, limit: float) -> tuple[np.ndarray, np.ndarray]:
        due = np.nonzero(self.alive & (self.wake_at <= limit))[0]
        if due.size == 0:
            return due, due
        now = self.wake_at[due].copy()
        block = self.block
        senders = block.wake(due, now)
        interval = self.scenario.faults.checkpoint_interval
        ripe = due[now - self.saved_time[due] >= interval]
        if ripe.size:
            self._save(ripe, now[now - self.saved_time[due] >= interval])
        tick = now + self.wake.interval_many(self.rng, due.shape[0])
        self.next_tick[due] = tick
        resend = self.scenario.links.resend_interval
        self.wake_at[due] = np.where(block.dirty[due], tick,
                                     np.maximum(tick, block.last_send_time[due] + resend))
        return due, senders

    def _send(self, senders: np.ndarray, k: int) -> np.ndarray:
        block, lay = self.block, self.layout
        if senders.size == 0:
            return np.zeros(0)
        links, versions, values, value_ptr = block.outgoing(senders)
        m = links.shape[0]
        if m == 0:
            return np.zeros(0)
        sent_at = block.last_send_time[lay.link_src[links]]
        self.counters["sent"] += m
        if self.level == "messages":
            for i in range(m):
                self._message_record("send", sent_at[i], links[i], versions[i],
                                     int(value_ptr[i + 1] - value_ptr[i]), 0)
        keep = np.ones(m, dtype=bool)
        for begin, end, cut in self.partitions:
            active = (sent_at >= begin) & (sent_at < end)
            if active.any():
                down = active & (cut[lay.link_src[links]] != cut[lay.link_dst[links]])
                self._drop(down & keep, sent_at, links, versions, "partition")
                keep &= ~down
        s = self.scenario.links
        if s.loss > 0.0:
            lost = keep & (self.rng.random(m) < s.loss)
            self._drop(lost, sent_at, links, versions, "loss")
            keep &= ~lost
        twice = np.zeros(m, dtype=bool)
        if s.duplication > 0.0:
            twice = keep & (self.rng.random(m) < s.duplication)
            self.counters["duplicated"] += int(twice.sum())
            if self.level == "messages":
                for i in np.nonzero(twice)[0]:
                    self._message_record("duplicate", sent_at[i], links[i], versions[i])
        copies = np.concatenate([np.nonzero(keep)[0], np.nonzero(twice)[0]])
        if copies.size == 0:
            return np.zeros(0)
        delays = self.sampler.sample_many(self.rng, self.link_mean[links[copies]])
        arrive = sent_at[copies] + delays
        self._enqueue(arrive, links[copies], versions[copies], values, value_ptr[copies])
        return delays

    # -- the queue --------------------------------------------------------------------------

    def _enqueue(self, times: np.ndarray, links: np.ndarray, versions: np.ndarray,
                 values: np.ndarray, starts: np.ndarray) -> None:
        """Add messages in flight; message i carries ``values[starts[i]:]`` (its link's
        slot count of them)."""
        keys = np.floor(times / self.step).astype(np.int64)
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        links = links[order]
        counts = self.slot_count[links]
        index, _ = expand_ranges(starts[order], starts[order] + counts)
        ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        chunk = _Chunk(times[order], links, versions[order], values[index], ptr)
        bounds = np.concatenate([[0], np.nonzero(np.diff(keys))[0] + 1, [keys.shape[0]]])
        buckets = self.buckets
        for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            key = int(keys[lo])
            entry = buckets.get(key)
            if entry is None:
                buckets[key] = [(chunk, lo, hi)]
                heapq.heappush(self.bucket_keys, key)
            else:
                entry.append((chunk, lo, hi))
        self.in_flight += keys.shape[0]

    # -- faults -----------------------------------------------------------------------------

    def _drop(self, mask: np.ndarray, sent_at: np.ndarray, links: np.ndarray,
              versions: np.ndarray, reason: str) -> None:
        self.counters["dropped"] += int(mask.sum())
        if self.level == "messages":
            for i in np.nonzero(mask)[0]:
                self._message_record("drop", sent_at[i], links[i], versions[i], reason)

    def _save(self, shards: np.ndarray, now: np.ndarray) -> None:
        lay = self.layout
        positions, _ = lay.shard_positions(shards)
        slots = lay.n_own + lay.shard_slots(shards)
        links = lay.shard_in_links(shards)
        values = self.block.values
        self.saved_values[positions] = values[positions]
        self.saved_values[slots] = values[slots]
        self.saved_versions[links] = self.block.link_version[links]
        self.saved_time[shards] = now

    def _saved(self, shard: int) -> dict[str, np.ndarray]:
        lay = self.layout
        one = np.array([shard])
        positions, _ = lay.shard_positions(one)
        slots = lay.shard_slots(one)
        links = lay.shard_in_links(one)
        return {"own": self.saved_values[positions].copy(),
                "halo": self.saved_values[lay.n_own + slots].copy(),
                "versions": self.saved_versions[links].copy()}

    def _crash(self, now: float, shard: int, index: int) -> None:
        crash = self.scenario.faults.crashes[index]
        if not self.alive[shard]:
            return
        self.retired_updates += int(self.block.unit_updates[shard])
        self.alive[shard] = False
        self.restore_from[shard] = (self._saved(shard) if crash.restore == "checkpoint"
                                    else None)
        self.crash_log.append(CrashRecord(shard, crash.at, crash.down_for, crash.restore, now))
        if self.level != "none":
            self.events.write("crash", now, shard)
        self._fault_order += 1
        heapq.heappush(self.faults, (crash.at + crash.down_for, self._fault_order, shard,
                                     -len(self.crash_log)))

    def _restart(self, now: float, shard: int, record_index: int) -> None:
        record = self.crash_log[record_index]
        self.restarts[shard] += 1
        epoch = int(self.restarts[shard])
        self.block.restore(shard, epoch, self.restore_from.pop(shard, None))
        self._save(np.array([shard]), np.array([now]))
        record.restarted_at = now
        if self.level != "none":
            self.events.write("restart", now, shard, record.restore, epoch)
        tick = now + float(self.wake.interval_many(self.rng, 1)[0])
        self.next_tick[shard] = tick
        self.wake_at[shard] = tick
        self.alive[shard] = True

    # -- per-message records (on request) ---------------------------------------------------

    def _message_record(self, kind: str, at: float, link: int, version: int,
                        *extra: object) -> None:
        lay = self.layout
        epoch, seq = int(version) >> 32, int(version) & 0xFFFFFFFF
        self.events.write(kind, float(at), int(lay.link_src[link]), int(lay.link_dst[link]),
                          epoch, seq, *extra)
