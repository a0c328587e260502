"""A shard host: many logical shards in one process, with their links and faults.

One host runs any number of ``Shard`` state machines (a neuron or a layer slice each, the
logic unchanged) on a clock that its caller supplies in scenario time units: the Ray actor
reads the wall clock, a test can step it by hand. Nothing here knows about Ray or asyncio.

What the host models, per logical shard and per directed link, exactly as the simulator
does: the wake schedule, per-link delay distributions and means, loss, duplication,
partition windows, and scripted crashes with a restart from the last checkpoint or from
u = 0. On top of that it decides *when* shards act and *what* leaves the process:

- **Event-driven wakes.** A shard has at most one pending wake. News (a message that changed
  its view) schedules one a wake-schedule draw later; otherwise only its anti-entropy timer
  (``resend_interval`` after its last send) is pending. A quiet, converged host therefore
  only re-sends on those timers.
- **Coalesced outboxes.** Messages carry absolute state, so a message to another host that
  has not left yet is replaced by a newer one on the same link (``coalesced``). The caller
  takes each destination host's outbox as one batch when its transport has room.
- **Generations.** ``reload`` replaces every shard's costs (training: new weights) and starts
  them at u = 0 in a new generation; messages of an older generation are dropped on arrival.

``paced = False`` (free-running) removes the modelled delays and wake draws: a shard acts as
soon as it has news, messages to other hosts leave at once and messages within the host are
applied at once (a shard that wakes later in the same round sees them); loss, duplication,
partitions, crashes and anti-entropy still apply on the caller's clock.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .delays import DelaySampler, WakeSchedule, link_mean_factors
from .messages import StateMessage
from .scenario import Scenario
from .shard import Rule, Shard, ShardSpec

# Epochs of one generation lie in [generation * EPOCH_STRIDE, (generation + 1) * EPOCH_STRIDE):
# restarts within a generation never reach the next one.
EPOCH_STRIDE = 1 << 20

_WAKE, _DELIVER, _RELEASE, _CRASH, _RESTART = range(5)
COUNTER_NAMES = ("sent", "delivered", "applied", "dropped", "duplicated", "coalesced",
                 "stale", "superseded")


@dataclass(frozen=True)
class HostCrash:
    """A scripted crash of one logical shard (times in scenario units)."""

    shard: int
    at: float
    down_for: float
    restore: str  # "checkpoint" or "zero"


@dataclass(frozen=True)
class HostSettings:
    """Everything a host needs from the scenario, as plain values (cheap to ship)."""

    seed: int
    rule: Rule
    resend_interval: float
    wake_kind: str
    wake_period: float
    wake_jitter: float
    delay: str
    delay_spread: float
    pareto_shape: float
    loss: float
    duplication: float
    partitions: tuple[tuple[float, float, frozenset[int]], ...]
    checkpoint_interval: float
    paced: bool = True
    record_events: bool = True
    # Log-scale moves this small wait for the anti-entropy timer (see Shard): far below any
    # tolerance a run can ask for (1e-8 by default), far above float64 rounding of O(1) values.
    send_threshold: float = 1e-13
    link_mean: Mapping[tuple[int, int], float] = field(default_factory=dict)
    crashes: tuple[HostCrash, ...] = ()


@dataclass
class CrashRecord:
    """A crash as scripted and as it happened on the host's clock."""

    shard: int
    scripted_at: float
    scripted_down_for: float
    restore: str
    crashed_at: float | None = None
    restarted_at: float | None = None

    def as_dict(self) -> dict:
        real = (None if self.crashed_at is None or self.restarted_at is None
                else self.restarted_at - self.crashed_at)
        return {"shard": self.shard, "scripted_at": self.scripted_at,
                "scripted_down_for": self.scripted_down_for, "restore": self.restore,
                "crashed_at": self.crashed_at, "restarted_at": self.restarted_at,
                "real_down_for": real}


class ShardHost:
    """Logical shards ``specs`` of one host; ``shard_host[s]`` is the host of every shard s."""

    def __init__(self, host_id: int, specs: Sequence[ShardSpec], shard_host: Sequence[int],
                 settings: HostSettings, generation: int = 0,
                 checkpoints: Mapping[int, bytes | None] | None = None,
                 restarts: Mapping[int, int] | None = None, now: float = 0.0):
        self.host_id = host_id
        self.settings = settings
        self.shard_host = np.asarray(shard_host, dtype=np.int64)
        self.rng = np.random.default_rng([settings.seed, host_id, generation])
        self.sampler = DelaySampler(settings.delay, settings.delay_spread,
                                    settings.pareto_shape)
        self.wake = WakeSchedule(settings.wake_kind, settings.wake_period, settings.wake_jitter)
        self.counters = dict.fromkeys(COUNTER_NAMES, 0)
        self.retired_updates = 0
        self.events: list[list] = []
        self.crash_log: list[CrashRecord] = []
        self.outbox: dict[int, dict[tuple[int, int], StateMessage]] = {}
        self._install(specs, generation, checkpoints or {}, restarts or {}, now)

    # -- set-up and reload ----------------------------------------------------------------

    def _install(self, specs: Sequence[ShardSpec], generation: int,
                 checkpoints: Mapping[int, bytes | None], restarts: Mapping[int, int],
                 now: float) -> None:
        s = self.settings
        self.generation = generation
        self.specs = {spec.shard_id: spec for spec in specs}
        self.order = [spec.shard_id for spec in specs]
        self.restarts = {sid: int(restarts.get(sid, 0)) for sid in self.order}
        self.shards: dict[int, Shard | None] = {}
        for sid in self.order:
            epoch = generation * EPOCH_STRIDE + self.restarts[sid]
            self.shards[sid] = Shard.restore(self.specs[sid], s.rule, s.resend_interval, epoch,
                                             checkpoints.get(sid), s.send_threshold)
        self.checkpoints = {sid: self.shards[sid].checkpoint() for sid in self.order}
        self.checkpoint_time = dict.fromkeys(self.order, now)
        self.fresh_checkpoints: set[int] = set(self.order)
        self.restore_from: dict[int, bytes | None] = {}
        self.queue: list[tuple[float, int, int, int, object]] = []
        self.tick = 0
        # Tick at which the open round began (None between rounds): see ``advance``.
        self.round_tick: int | None = None
        self.wake_at = dict.fromkeys(self.order, math.inf)
        self.outbox.clear()
        # A shard wakes no more often than its wake schedule: ``next_tick`` is its next
        # scheduled wake; ticks with nothing to do (no news, no re-send due) are skipped.
        self.next_tick = {sid: now + (self.wake.first(self.rng) if s.paced else 0.0)
                          for sid in self.order}
        for sid in self.order:
            self._schedule_wake(sid, self.next_tick[sid])
        for index, crash in enumerate(s.crashes):
            if crash.shard in self.specs and crash.at >= now:
                self._push(crash.at, _CRASH, crash.shard, index)

    def reload(self, specs: Sequence[ShardSpec], generation: int, now: float) -> None:
        """New costs for the same shards: every shard restarts at u = 0 in ``generation``."""
        if generation <= self.generation:
            raise ValueError(f"generation {generation} is not newer than {self.generation}")
        if [spec.shard_id for spec in specs] != self.order:
            raise ValueError("a reload must keep the host's shards")
        self.retired_updates += sum(sh.unit_updates for sh in self.shards.values()
                                    if sh is not None)
        self._install(specs, generation, {}, {}, now)

    # -- the clock --------------------------------------------------------------------------

    def _push(self, at: float, kind: int, target: int, payload: object = None) -> None:
        self.tick += 1
        heapq.heappush(self.queue, (at, self.tick, kind, target, payload))

    def _schedule_wake(self, sid: int, at: float) -> None:
        if at < self.wake_at[sid]:
            self.wake_at[sid] = at
            self._push(at, _WAKE, sid)

    def next_due(self) -> float:
        """Time of the earliest pending event (inf when none); stale wakes are discarded."""
        queue = self.queue
        while queue and queue[0][2] == _WAKE and queue[0][0] != self.wake_at.get(queue[0][3]):
            heapq.heappop(queue)
        return queue[0][0] if queue else math.inf

    def advance(self, now: float, max_events: int = 20_000) -> int:
        """Process the events due at or before ``now`` (at most ``max_events``); their count.

        Wakes scheduled during a round wait for the next round, even when already due (free
        running): in a round every shard with news moves once, and the caller exchanges
        messages between calls. A call that stops at ``max_events`` leaves its round open and
        the next call goes on with it, so a caller may take a round in slices (and exchange
        messages between them) without changing which shards move in it. Deliveries within
        the host happen in the round.
        """
        done = 0
        queue = self.queue
        last = self.tick if self.round_tick is None else self.round_tick
        deferred = []
        while queue and queue[0][0] <= now and done < max_events:
            if queue[0][1] > last and queue[0][2] == _WAKE:
                deferred.append(heapq.heappop(queue))
                continue
            at, _, kind, target, payload = heapq.heappop(queue)
            if kind == _WAKE:
                if at != self.wake_at.get(target):
                    continue  # superseded by an earlier wake
                self.wake_at[target] = math.inf
                self._wake(now, target)
            elif kind == _DELIVER:
                self._deliver(now, payload)  # type: ignore[arg-type]
            elif kind == _RELEASE:
                self._release(payload)  # type: ignore[arg-type]
            elif kind == _CRASH:
                self._crash(now, target, int(payload))  # type: ignore[arg-type]
            else:
                self._restart(now, target, int(payload))  # type: ignore[arg-type]
            done += 1
        # Stopped by the cap: the round stays open (if nothing of it is left, the next call
        # finds only deferred wakes, does nothing and closes it).
        self.round_tick = last if done >= max_events else None
        for event in deferred:
            heapq.heappush(queue, event)
        return done

    # -- shards acting ----------------------------------------------------------------------

    def _record(self, *fields: object) -> None:
        if self.settings.record_events:
            self.events.append(list(fields))

    def _wake(self, now: float, sid: int) -> None:
        shard = self.shards[sid]
        if shard is None:
            return  # down: the restart schedules its next wake
        # The host's own clock, not the scheduled time: a host that lags its schedule must
        # not set timers in the past.
        for message in shard.on_wake(now):
            self._send(now, message)
        s = self.settings
        if now - self.checkpoint_time[sid] >= s.checkpoint_interval:
            self.checkpoints[sid] = shard.checkpoint()
            self.checkpoint_time[sid] = now
            self.fresh_checkpoints.add(sid)
        tick = now + (self.wake.interval(self.rng) if s.paced else 0.0)
        self.next_tick[sid] = tick
        self._schedule_wake(sid, tick if shard.dirty
                            else max(tick, shard.last_send_time + s.resend_interval))

    def _link_down(self, src: int, dst: int, now: float) -> bool:
        return any(start <= now < stop and ((src in cut) != (dst in cut))
                   for start, stop, cut in self.settings.partitions)

    def _send(self, now: float, message: StateMessage) -> None:
        s = self.settings
        src, dst = message.sender, message.receiver
        ids = (src, dst, message.epoch, message.seq)
        self.counters["sent"] += 1
        if s.record_events:
            self._record("send", now, *ids, int(message.units.shape[0]), 0)
        if s.partitions and self._link_down(src, dst, now):
            self.counters["dropped"] += 1
            self._record("drop", now, *ids, "partition")
            return
        if s.loss > 0.0 and self.rng.random() < s.loss:
            self.counters["dropped"] += 1
            self._record("drop", now, *ids, "loss")
            return
        copies = 1
        if s.duplication > 0.0 and self.rng.random() < s.duplication:
            copies = 2
            self.counters["duplicated"] += 1
            self._record("duplicate", now, *ids)
        local = int(self.shard_host[dst]) == self.host_id
        for _ in range(copies):
            delay = self.sampler.sample(self.rng, s.link_mean.get((src, dst), 0.0)) \
                if s.paced else 0.0
            if local and not s.paced:
                # Free-running: a message between shards of one process arrives at once, so
                # a shard that wakes later in the same round already sees it (Gauss-Seidel
                # within the host; measured: 51 -> 28 rounds to 1e-8 for 4 shards on one
                # host).
                self._deliver(now, message)
            elif local:
                self._push(now + delay, _DELIVER, dst, message)
            elif delay > 0.0:
                self._push(now + delay, _RELEASE, dst, message)
            else:
                self._release(message)

    def _release(self, message: StateMessage) -> None:
        """The modelled delay is over: the message waits in its host's outbox (coalesced)."""
        box = self.outbox.setdefault(int(self.shard_host[message.receiver]), {})
        link = (message.sender, message.receiver)
        older = box.get(link)
        if older is not None:
            if older.version >= message.version:
                # A duplicate, or overtaken by a newer state already waiting: counted, so
                # that sent + duplicated = delivered + dropped + coalesced + superseded
                # plus what is still on its way.
                self.counters["superseded"] += 1
                return
            self.counters["coalesced"] += 1
        box[link] = message

    def receive(self, messages: Iterable[StateMessage], now: float) -> None:
        """Messages from other hosts, applied at once (their delay was modelled at the sender)."""
        for message in messages:
            self._deliver(now, message)

    def _deliver(self, now: float, message: StateMessage) -> None:
        dst = message.receiver
        ids = (message.sender, dst, message.epoch, message.seq)
        shard = self.shards.get(dst)
        if message.epoch < self.generation * EPOCH_STRIDE:
            self.counters["stale"] += 1
            self._record("drop", now, *ids, "stale")
            return
        if shard is None:
            self.counters["dropped"] += 1
            self._record("drop", now, *ids, "down")
            return
        applied = shard.on_message(message)
        self.counters["delivered"] += 1
        self.counters["applied"] += int(applied)
        if self.settings.record_events:
            self._record("deliver", now, *ids, applied)
        if applied and shard.dirty:
            self._schedule_wake(dst, max(now, self.next_tick[dst]))

    # -- scripted crashes ---------------------------------------------------------------------

    def _crash(self, now: float, sid: int, index: int) -> None:
        crash = self.settings.crashes[index]
        shard = self.shards[sid]
        if shard is None:
            return
        self.retired_updates += shard.unit_updates
        self.shards[sid] = None
        self.restore_from[sid] = self.checkpoints[sid] if crash.restore == "checkpoint" else None
        self.crash_log.append(CrashRecord(sid, crash.at, crash.down_for, crash.restore, now))
        self._record("crash", now, sid)
        self._push(crash.at + crash.down_for, _RESTART, sid, len(self.crash_log) - 1)

    def _restart(self, now: float, sid: int, record_index: int) -> None:
        s = self.settings
        record = self.crash_log[record_index]
        self.restarts[sid] += 1
        epoch = self.generation * EPOCH_STRIDE + self.restarts[sid]
        shard = Shard.restore(self.specs[sid], s.rule, s.resend_interval, epoch,
                              self.restore_from.pop(sid, None), s.send_threshold)
        self.shards[sid] = shard
        self.checkpoints[sid] = shard.checkpoint()
        self.checkpoint_time[sid] = now
        self.fresh_checkpoints.add(sid)
        record.restarted_at = now
        self._record("restart", now, sid, record.restore, epoch)
        self.next_tick[sid] = now + (self.wake.interval(self.rng) if s.paced else 0.0)
        self._schedule_wake(sid, self.next_tick[sid])

    # -- what the caller reads ----------------------------------------------------------------

    def pending_hosts(self) -> list[int]:
        return [dst for dst, box in self.outbox.items() if box]

    def take_outbox(self, dst_host: int) -> list[StateMessage]:
        box = self.outbox.pop(dst_host, {})
        return list(box.values())

    def owned_log_scales(self) -> np.ndarray:
        """Own log-scales of every shard in host order (a down shard: what it restarts from)."""
        parts = []
        for sid in self.order:
            shard = self.shards[sid]
            if shard is None:
                s = self.settings
                shard = Shard.restore(self.specs[sid], s.rule, s.resend_interval, 0,
                                      self.restore_from.get(sid))
            parts.append(shard.state[:shard.spec.n_own])
        return np.concatenate(parts) if parts else np.zeros(0)

    def unit_updates(self) -> int:
        return self.retired_updates + sum(sh.unit_updates for sh in self.shards.values()
                                          if sh is not None)

    def epochs(self) -> dict[int, int]:
        return {sid: self.restarts[sid] for sid in self.order}

    def take_checkpoints(self) -> dict[int, bytes]:
        """Checkpoints taken since the last call."""
        fresh, self.fresh_checkpoints = self.fresh_checkpoints, set()
        return {sid: self.checkpoints[sid] for sid in sorted(fresh)}

    def take_events(self) -> list[list]:
        events, self.events = self.events, []
        return events

    def queue_length(self) -> int:
        return len(self.queue) + sum(len(box) for box in self.outbox.values())


def assign_hosts(specs: Sequence[ShardSpec], n_hosts: int) -> list[int]:
    """Host of each shard: contiguous runs of shards (neighbours in layer order stay
    together) with near-equal numbers of owned units per host."""
    if n_hosts < 1:
        raise ValueError(f"n_hosts must be >= 1, got {n_hosts}")
    sizes = np.array([spec.n_own for spec in specs], dtype=np.float64)
    if sizes.size == 0:
        return []
    n_hosts = min(n_hosts, sizes.size)
    # Cut the cumulative unit count into n_hosts equal parts, at shard boundaries.
    centre = np.cumsum(sizes) - 0.5 * sizes
    hosts = np.minimum((centre * n_hosts / sizes.sum()).astype(np.int64), n_hosts - 1)
    # Every host gets at least one shard: renumber the hosts that are used.
    _, dense = np.unique(hosts, return_inverse=True)
    return [int(h) for h in dense]


def settings_for(scenario: Scenario, link_mean: Mapping[tuple[int, int], float],
                 shards: Iterable[int] | None = None, paced: bool = True) -> HostSettings:
    """A host's settings from a scenario: the links leaving ``shards`` (all when None) and
    the scripted crashes of those shards."""
    s = scenario
    mine = None if shards is None else set(shards)
    b = s.balance
    return HostSettings(
        seed=s.seed, rule=Rule(b.rule, b.alpha, b.eta), resend_interval=s.links.resend_interval,
        wake_kind=s.wake.kind, wake_period=s.wake.period, wake_jitter=s.wake.jitter,
        delay=s.links.delay, delay_spread=s.links.spread, pareto_shape=s.links.pareto_shape,
        loss=s.links.loss, duplication=s.links.duplication,
        partitions=tuple((w.start, w.stop, frozenset(w.shards)) for w in s.faults.partitions),
        checkpoint_interval=s.faults.checkpoint_interval, paced=paced,
        record_events=s.record_events,
        link_mean={link: mean for link, mean in link_mean.items()
                   if mine is None or link[0] in mine},
        crashes=tuple(HostCrash(c.shard, c.at, c.down_for, c.restore) for c in s.faults.crashes
                      if mine is None or c.shard in mine))


def link_means(scenario: Scenario, specs: Sequence[ShardSpec]) -> dict[tuple[int, int], float]:
    """Mean delay of every directed link between neighbour shards (seeded by the scenario)."""
    rng = np.random.default_rng(scenario.seed)
    pairs = [(s.shard_id, n) for s in specs for n in s.neighbours]
    factors = link_mean_factors(rng, pairs, scenario.links.heterogeneity)
    return {link: scenario.links.mean * f for link, f in factors.items()}


def split_by_shard(specs: Sequence[ShardSpec], order: Sequence[int],
                   values: np.ndarray) -> dict[int, np.ndarray]:
    """Each shard's own log-scales from a host's concatenation in ``order``."""
    out, start = {}, 0
    for sid in order:
        n = specs[sid].n_own
        out[sid] = values[start:start + n].copy()
        start += n
    return out
