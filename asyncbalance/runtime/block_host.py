"""A block host: the shards of one process as a ``ShardBlock``, with links, faults and frames.

What ``host.ShardHost`` does with one Python object per shard and per message, done on
arrays, on a clock its caller supplies (the simulator's, or the wall clock of a Ray
process). Same model, per logical shard and per directed link: wake schedules and
event-driven wakes, a delay draw per message on each link (the link's own mean), loss,
duplication, partition windows, scripted crashes restarting from the last checkpoint or
from u = 0, anti-entropy re-sends, generations for training.

- **Sends leave once per destination host.** A shard that sends puts one entry (its version,
  send time and own log-scales) in the frame of every other host that holds a neighbour, and
  fans out locally to the links of this host's shards. The receiving host fans a frame's
  entries out the same way, through index arrays: one link message per neighbour shard,
  each with its own delay draw, loss, duplication and partition check, drawn where the
  link ends (NEST's shape: one event per source per destination process, per-synapse delays
  at the receiver). A frame not yet taken keeps only the newest entry per sender
  (coalescing).
- **Windows and a timing wheel.** Time is taken in windows of ``step`` units: the link
  messages due in a window are applied first, in order of arrival, then every shard due in
  it moves at once on the view at the window's end. Send and arrival times stay exact.
  Messages in flight wait in a timing wheel, one bucket per window, each a list of ranges
  of array chunks.
- ``paced = False`` (free-running) draws no wake intervals and no delays: a shard acts as soon
  as it has news, and link messages arrive when they are fanned out (applied there and then
  when nothing can be lost, doubled, cut or crash: ``direct``).

Nothing here knows about Ray or asyncio; records go to ``events`` (lists, taken by the
caller), ``batch`` records per window by default, per message on request.
"""

from __future__ import annotations

import heapq
import math
from concurrent.futures import Future
from dataclasses import dataclass

import msgpack
import numpy as np

from . import block_loops
from .block import ShardBlock, version_of
from .delays import DelaySampler, WakeSchedule
from .draws import DelayDraws
from .fan_out import fan_out
from .frames import Frame
from .host import EPOCH_STRIDE, CrashRecord, HostSettings
from .layout import BlockLayout, expand_ranges, shard_colours
from .threads import second_thread

CHECKPOINT_FORMAT = 2
# Messages beyond this share of a send batch (its slowest, by arrival window) are stored
# apart, so that the batch's arrays are freed once the rest has arrived; in batches of at
# least TAIL_MIN_MESSAGES only (below that the copies cost more than the memory they free:
# 124,000 small copies in a run of the quickstart at neuron granularity).
TAIL_SHARE = 0.9
TAIL_MIN_MESSAGES = 1 << 16
# The spawn key of a host's stream of exponential delay draws (``draws.DelayDraws``), and
# the link messages of a fan-out from which the next one's draws are drawn ahead (below,
# handing them to the second thread costs more than it saves).
DELAY_STREAM = 1
DRAW_AHEAD_MIN = 1 << 16
COUNTER_NAMES = ("sent", "delivered", "applied", "dropped", "duplicated", "coalesced",
                 "stale", "frames", "frame_entries")


@dataclass(frozen=True, eq=False)
class _Chunk:
    """Link messages fanned out together, sorted by arrival window; message i carries
    ``values[ptr[i]:ptr[i + 1]]``, or ``values[i]`` where ``ptr`` is empty (one value per
    message: 8 bytes less per message in flight)."""

    times: np.ndarray
    links: np.ndarray
    versions: np.ndarray
    values: np.ndarray
    ptr: np.ndarray


@dataclass(frozen=True, eq=False)
class Routes:
    """Index arrays from (sender shard, destination host) to the links it feeds there."""

    n_hosts: int
    shard_host: np.ndarray
    pair_ptr: np.ndarray    # CSR over keys sender * n_hosts + host, into ``pair_links``
    # Links sorted by (sender, host of receiver, receiver); empty where that order is the
    # links' own (one host, or hosts holding ranges of shards): entry q is link q.
    pair_links: np.ndarray
    feeds_host: np.ndarray  # (shards, hosts): the shard has a neighbour on that host

    @classmethod
    def build(cls, layout: BlockLayout, shard_host: np.ndarray) -> Routes:
        shard_host = np.asarray(shard_host, dtype=np.int64)
        n_hosts = int(shard_host.max()) + 1 if shard_host.size else 1
        keys = layout.link_src * n_hosts + shard_host[layout.link_dst]
        # Links are sorted by (sender, receiver): with keys in order already (one host, or
        # hosts holding ranges of shards) the sort is the identity, and no table is kept
        # (3 s of sorting and 0.2 GB saved at 2.7e7 links; one indirection fewer per message).
        in_order = bool((keys[1:] >= keys[:-1]).all())
        order = (np.zeros(0, dtype=np.int64) if in_order
                 else np.lexsort((layout.link_dst, keys)))
        pair_ptr = np.searchsorted(keys if in_order else keys[order],
                                   np.arange(layout.n_shards * n_hosts + 1))
        # Neighbourhood is symmetric: a receiver r of a link a -> r feeds a's host. So a
        # host's own part of the layout (links into its shards) tells where its shards send.
        feeds_host = np.zeros((layout.n_shards, n_hosts), dtype=bool)
        feeds_host[layout.link_dst, shard_host[layout.link_src]] = True
        return cls(n_hosts, shard_host, pair_ptr.astype(np.int64), order.astype(np.int64),
                   feeds_host)

    def links_to(self, senders: np.ndarray, host: int) -> tuple[np.ndarray, np.ndarray]:
        """Links from each of ``senders`` to shards of ``host``, and the sender index of each."""
        keys = senders * self.n_hosts + host
        index, entry = expand_ranges(self.pair_ptr[keys], self.pair_ptr[keys + 1])
        return (self.pair_links[index] if self.pair_links.size else index), entry

    def feeds(self, senders: np.ndarray, host: int) -> np.ndarray:
        """Whether each sender has a neighbour on ``host``."""
        return self.feeds_host[senders, host]


class BlockHost:
    """The shards ``shard_host == host_id`` of ``layout``; see the module docstring."""

    def __init__(self, host_id: int, layout: BlockLayout, shard_host: np.ndarray,
                 settings: HostSettings, link_mean: np.ndarray, step: float,
                 generation: int = 0, checkpoints: dict[int, bytes | None] | None = None,
                 restarts: dict[int, int] | None = None, now: float = 0.0,
                 level: str = "batches", catch_up: bool = False,
                 keep_checkpoints: bool = True):
        self.host_id = host_id
        # Checkpoints are read by restarts from a checkpoint and by a caller that takes them
        # (Ray's driver); a caller with neither (a simulator without such crashes) skips
        # taking them, which changes nothing else.
        self.keep_checkpoints = keep_checkpoints
        # On a wall clock a host that fell behind takes everything due up to ``now`` in one
        # window instead of replaying the windows it missed one by one.
        self.catch_up = catch_up
        self.settings = settings
        self.step = step
        self.level = level
        self.routes = Routes.build(layout, shard_host)
        self.link_mean = np.asarray(link_mean, dtype=np.float64)
        self.rng = np.random.default_rng([settings.seed, host_id, generation])
        # Exponential delays scale standard draws from a stream of their own, which the
        # second thread can draw ahead while the first sorts a window (``draws``); all else
        # draws from ``rng``, in order.
        self.delay_draws = DelayDraws(np.random.default_rng(np.random.SeedSequence(
            [settings.seed, host_id, generation], spawn_key=(DELAY_STREAM,))))
        self._drawing: Future | None = None
        self._last_fan_out = 0
        self.sampler = DelaySampler(settings.delay, settings.delay_spread,
                                    settings.pareto_shape)
        self.wake = WakeSchedule(settings.wake_kind, settings.wake_period, settings.wake_jitter)
        self.counters = dict.fromkeys(COUNTER_NAMES, 0)
        # The counters at the end of the last window: a window's batch record counts from
        # there, so link messages fanned out between windows (frames from other hosts) are
        # in the next record and the records add up to the counters.
        self._recorded = dict(self.counters)
        self.events: list[list] = []
        self.crash_log: list[CrashRecord] = []
        self.retired_updates = 0
        self._install(layout, generation, checkpoints or {}, restarts or {}, now)

    # -- set-up -----------------------------------------------------------------------------

    def _install(self, layout: BlockLayout, generation: int,
                 checkpoints: dict[int, bytes | None], restarts: dict[int, int],
                 now: float) -> None:
        s = self.settings
        self.layout = lay = layout
        self.generation = generation
        n = lay.n_shards
        self.local = self.routes.shard_host == self.host_id
        self.order = [int(sid) for sid in np.nonzero(self.local)[0]]
        self.restarts = np.zeros(n, dtype=np.int64)
        for sid, count in restarts.items():
            self.restarts[int(sid)] = int(count)
        epochs = generation * EPOCH_STRIDE + self.restarts
        self.block = ShardBlock(lay, s.rule, s.resend_interval, s.send_threshold, epochs)
        for sid, raw in checkpoints.items():
            if raw is not None and self.local[int(sid)]:
                self.block.restore(int(sid), int(epochs[int(sid)]), decode_checkpoint(raw))
        self.slot_count = np.diff(lay.link_slot_ptr)
        self.neurons = self.block.one_slot and lay.n_own == n
        # Only links into this host's shards are ever delivered here.
        self.partitions = []
        for start, stop, cut in s.partitions:
            mask = np.zeros(n, dtype=bool)
            mask[[c for c in cut if 0 <= c < n]] = True
            self.partitions.append((start, stop, mask))
        first = (now + self.wake.first_many(self.rng, n)) if s.paced else np.full(n, now)
        self.next_tick = first.copy()
        self.wake_at = np.where(self.local, first, np.inf)
        self.alive = self.local.copy()
        self.n_down = 0  # this host's shards down now (``alive`` False among ``local``)
        # Without checkpoints the copies are never read: none is made (at 10^5 neurons and
        # 2.7e7 links they would hold 0.4 GB).
        self.saved_values = (self.block.values.copy() if self.keep_checkpoints
                             else np.zeros(0))
        self.saved_versions = (self.block.link_version.copy() if self.keep_checkpoints
                               else np.zeros(0, dtype=np.int64))
        self.saved_time = np.full(n, now)
        self.fresh = self.local.copy()  # checkpoints not yet taken by the caller
        self.restore_from: dict[int, dict[str, np.ndarray] | None] = {}
        self.faults: list[tuple[float, int, int, int]] = []
        for index, crash in enumerate(s.crashes):
            if 0 <= crash.shard < n and self.local[crash.shard] and crash.at >= now:
                heapq.heappush(self.faults, (crash.at, index, crash.shard, index))
        self._fault_order = len(s.crashes)
        self.buckets: dict[int, list[tuple[_Chunk, int, int]]] = {}
        self.bucket_keys: list[int] = []
        self.in_flight = 0
        self.outbox: dict[int, list[tuple[np.ndarray, ...]]] = {}
        # Scratch of the compiled deliveries: each receiver's earliest applied arrival in a
        # batch (inf between batches) and the receivers it was set for.
        self._first_arrival = np.full(n, np.inf)
        self._touched = np.zeros(n, dtype=np.int64)
        self.windows = 0
        # Free-running, a host moves its shards colour by colour (layer parity in an MLP),
        # so that no two neighbours move at once on each other's old values: red-black
        # Gauss-Seidel instead of Jacobi sweeps, which oscillate on dense layers.
        self.colour, self.n_colours = shard_colours(lay)
        self.turn = 0
        # Free-running with nothing to lose, double, cut or crash, and no per-message log:
        # link messages are applied as they are fanned out, with no queue in between (what
        # a zero delay through the timing wheel does one window later, with the same
        # versions, halo values and wakes).
        self.direct = (not s.paced and s.loss == 0.0 and s.duplication == 0.0
                       and not s.partitions and not self.faults and self.level != "messages")
        self.fused_delay_kind = self._fused_delay_kind()

    def _fused_delay_kind(self) -> int | None:
        """How ``block_loops.fan_out_into_windows`` draws this host's delays (0: none, 1:
        the link's mean, 2: exponential), or None where the general path must fan out:
        units that are not neurons, messages that can be lost, doubled or cut, a
        per-message log, or delays it does not draw the way ``DelaySampler`` does."""
        s = self.settings
        if not (block_loops.COMPILED and self.neurons) or self.level == "messages" or \
                s.loss > 0.0 or s.duplication > 0.0 or s.partitions:
            return None
        # Means are >= 0 (the scenario checks): a zero mean gives a zero delay either way,
        # and with no positive mean ``sample_many`` draws nothing.
        if not s.paced or not (self.link_mean > 0.0).any():
            return 0
        return {"constant": 1, "exponential": 2}.get(self.sampler.distribution)

    def reload(self, layout: BlockLayout, generation: int, now: float) -> None:
        """New costs for the same shards: every shard restarts at u = 0 in ``generation``."""
        if generation <= self.generation:
            raise ValueError(f"generation {generation} is not newer than {self.generation}")
        self.retired_updates += int(self.block.unit_updates.sum())
        self._install(layout, generation, {}, {}, now)

    # -- the clock --------------------------------------------------------------------------

    def next_due(self) -> float:
        """Start of the earliest window with anything in it (inf when none)."""
        key = self._next_window()
        return key * self.step if math.isfinite(key) else math.inf

    def _next_window(self) -> float:
        key: float = math.inf
        while self.bucket_keys and self.bucket_keys[0] not in self.buckets:
            heapq.heappop(self.bucket_keys)
        if self.bucket_keys:
            key = self.bucket_keys[0]
        # A shard that is down or not this host's waits at inf (see ``_crash``).
        soonest = float(self.wake_at.min()) if self.wake_at.size else math.inf
        if math.isfinite(soonest):
            key = min(key, math.floor(soonest / self.step))
        if self.faults:
            key = min(key, math.floor(self.faults[0][0] / self.step))
        return key

    def advance(self, now: float, max_events: int | None = None) -> int:
        """Play every window up to ``now`` (at most ``max_events`` windows); the work done."""
        done = 0
        windows = 0
        while max_events is None or windows < max_events:
            key = self._next_window()
            if key * self.step > now:
                break
            limit = now if self.catch_up else min((key + 1) * self.step, now)
            work = self._window(int(key), key * self.step, limit)
            windows += 1
            done += work
            if not work and limit == now:
                break  # what is left in this window is due after ``now``
        return done

    def _window(self, k: int, start: float, limit: float) -> int:
        self.windows += 1
        before = self._recorded
        faults = 0
        while self.faults and self.faults[0][0] <= limit:
            at, _, shard, index = heapq.heappop(self.faults)
            faults += 1
            if index >= 0:
                self._crash(at, shard, index)
            else:
                self._restart(at, shard, -index - 1)
        delivered = self._deliver_due(k, limit)
        woken, senders = self._wake_due(limit)
        delays = self._send(senders)
        if self.level != "none":
            c = self.counters
            self.events.append([
                "batch", start, limit, int(woken.shape[0]),
                *(c[name] - before[name] for name in ("sent", "delivered", "applied",
                                                      "dropped", "duplicated")),
                float(delays.mean()) if delays.size else 0.0,
                float(delays.max()) if delays.size else 0.0])
        self._recorded = dict(self.counters)
        return delivered + int(woken.shape[0]) + faults

    # -- deliveries -------------------------------------------------------------------------

    def _deliver_due(self, k: int, limit: float) -> int:
        ranges = []
        keys = self.bucket_keys
        while keys and (keys[0] <= k or keys[0] * self.step < limit):
            ranges += self.buckets.pop(heapq.heappop(keys), [])
        if not ranges:
            return 0
        self._draw_ahead(sum(hi - lo for _, lo, hi in ranges))
        times = np.concatenate([c.times[lo:hi] for c, lo, hi in ranges])
        links = np.concatenate([c.links[lo:hi] for c, lo, hi in ranges])
        versions = np.concatenate([c.versions[lo:hi] for c, lo, hi in ranges])
        starts: np.ndarray | None
        if self.block.one_slot:
            # One value per message: message i carries values[i] (``starts`` None until the
            # messages are reordered or filtered).
            values = np.concatenate([c.values[lo:hi] for c, lo, hi in ranges])
            starts = None if block_loops.COMPILED else np.arange(values.shape[0],
                                                                 dtype=np.int64)
        else:
            # Each range's values are contiguous in its chunk: read just those.
            pieces = [c.values[c.ptr[lo]:c.ptr[hi]] for c, lo, hi in ranges]
            offsets = np.cumsum([0] + [p.shape[0] for p in pieces[:-1]])
            starts = np.concatenate([c.ptr[lo:hi] - c.ptr[lo] + offset for (c, lo, hi), offset
                                     in zip(ranges, offsets, strict=True)])
            values = np.concatenate(pieces)
        self.in_flight -= times.shape[0]
        later = times > limit
        if later.any():
            # The caller stops inside this window: what is due after ``limit`` waits.
            if starts is None:
                starts = np.arange(values.shape[0], dtype=np.int64)
            self._enqueue(times[later], links[later], versions[later], values, starts[later])
            due = ~later
            times, links, versions, starts = times[due], links[due], versions[due], starts[due]
        if times.size == 0:
            return 0
        if self.level == "messages":
            # The per-message log is written in the order of delivery times.
            order = np.argsort(times, kind="stable")
            times, links, versions = times[order], links[order], versions[order]
            starts = order if starts is None else starts[order]
        processed = int(times.shape[0])
        if block_loops.COMPILED:
            self._deliver_compiled(times, links, versions, values, starts)
            return processed
        lay = self.layout
        counts = self.slot_count[links]
        receivers = lay.link_dst[links]
        up = self.alive[receivers]
        if self.level == "messages":
            for i in np.nonzero(~up)[0]:
                self._message_record("drop", times[i], links[i], versions[i], "down")
        self.counters["dropped"] += int((~up).sum())
        times, links, versions, starts, counts, receivers = (
            times[up], links[up], versions[up], starts[up], counts[up], receivers[up])
        if times.size == 0:
            return processed
        index, _ = expand_ranges(starts, starts + counts)
        value_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        applied, _ = self.block.deliver(links, versions, values[index], value_ptr, times)
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

    def _draw_ahead(self, m: int) -> None:
        """Before a window's ``m`` deliveries: with two threads, the second draws the next
        fan-out's delays (as many as the last one took) while this one gathers the window's
        messages and sorts them by link (~6 ns per delivery; a draw takes ~3 ns), where
        that hides the draws (the window at least half as large as the fan-out)."""
        if self.fused_delay_kind == 2 and self.block.threads > 1 and self._drawing is None \
                and self._last_fan_out >= DRAW_AHEAD_MIN and 2 * m >= self._last_fan_out:
            self._drawing = second_thread().submit(self.delay_draws.prepare,
                                                   self._last_fan_out)

    def _deliver_compiled(self, times: np.ndarray, links: np.ndarray, versions: np.ndarray,
                          values: np.ndarray, starts: np.ndarray | None) -> None:
        """The deliveries of ``_deliver_due`` in compiled loops (same results); ``starts``
        None: message i carries ``values[i]``."""
        # A count, not a pass over every shard per window.
        alive = self.alive if self.n_down else np.zeros(0, dtype=bool)
        if starts is None:
            starts = np.zeros(0, dtype=np.int64)
        status, _, n_touched = self.block.deliver_live(links, versions, values, starts, times,
                                                       alive, self._first_arrival,
                                                       self._touched)
        dropped = int(np.count_nonzero(status == 0)) if alive.size else 0
        applied = int(np.count_nonzero(status == 2))
        self.counters["dropped"] += dropped
        self.counters["delivered"] += int(times.shape[0]) - dropped
        self.counters["applied"] += applied
        if self.level == "messages":
            for i in np.nonzero(status == 0)[0]:
                self._message_record("drop", times[i], links[i], versions[i], "down")
            for i in np.nonzero(status)[0]:
                self._message_record("deliver", times[i], links[i], versions[i],
                                     bool(status[i] == 2))
        if n_touched:
            block_loops.wake_on_news(self._first_arrival, self._touched, n_touched,
                                     self.block.dirty, self.next_tick, self.wake_at)

    # -- wakes and sends --------------------------------------------------------------------

    def _wake_due(self, limit: float) -> tuple[np.ndarray, np.ndarray]:
        ready = self.wake_at <= limit
        if not math.isfinite(limit):
            ready &= self.alive
        if not self.settings.paced and self.n_colours > 1:
            ready &= self.colour == self.turn
            self.turn = (self.turn + 1) % self.n_colours
        due = np.nonzero(ready)[0]
        if due.size == 0:
            return due, due
        now = self.wake_at[due].copy()
        block = self.block
        senders = block.wake(due, now)
        if self.keep_checkpoints:
            ripe = now - self.saved_time[due] >= self.settings.checkpoint_interval
            if ripe.any():
                self._save(due[ripe], now[ripe])
        tick = now + (self.wake.interval_many(self.rng, due.shape[0]) if self.settings.paced
                      else 0.0)
        self.next_tick[due] = tick
        resend = self.settings.resend_interval
        self.wake_at[due] = np.where(block.dirty[due], tick,
                                     np.maximum(tick, block.last_send_time[due] + resend))
        return due, senders

    def _send(self, senders: np.ndarray) -> np.ndarray:
        if senders.size == 0:
            return np.zeros(0)
        block, lay = self.block, self.layout
        versions = version_of(block.epoch[senders], block.seq[senders])
        times = block.last_send_time[senders]
        positions, _ = lay.shard_positions(senders)
        values = block.values[positions]
        routes = self.routes
        for host in range(routes.n_hosts):
            if host == self.host_id:
                continue
            feeds = routes.feeds(senders, host)
            if feeds.any():
                chosen = senders[feeds]
                self.outbox.setdefault(host, []).append(
                    (chosen, versions[feeds], times[feeds],
                     block.values[lay.shard_positions(chosen)[0]]))
        return self._fan_out(senders, versions, times, values)

    def _fan_out(self, senders: np.ndarray, versions: np.ndarray, times: np.ndarray,
                 values: np.ndarray) -> np.ndarray:
        """Link messages from each sender's entry to this host's shards; their delays."""
        lay = self.layout
        routes = self.routes
        if self.direct:
            self._apply_now(senders, versions, times, values)
            return np.zeros(0)
        if self.fused_delay_kind is not None:
            return self._fan_out_fused(senders, versions, times, values)
        if block_loops.COMPILED:
            links, entry, link_versions, sent_at = block_loops.messages_from(
                senders, versions, times, routes.pair_ptr, routes.pair_links, routes.n_hosts,
                self.host_id)
        else:
            links, entry = routes.links_to(senders, self.host_id)
            link_versions = versions[entry]
            sent_at = times[entry]
        m = links.shape[0]
        if m == 0:
            return np.zeros(0)
        self.counters["sent"] += m
        if self.level == "messages":
            for i in range(m):
                self._message_record("send", sent_at[i], links[i], link_versions[i],
                                     int(self.slot_count[links[i]]), 0)
        s = self.settings
        if not self.partitions and s.loss == 0.0 and s.duplication == 0.0:
            # Nothing to lose, double or cut: every link message leaves once, in order.
            return self._enqueue_copies(senders, links, entry, link_versions, sent_at,
                                        values, slice(None), m)
        keep = np.ones(m, dtype=bool)
        for begin, end, cut in self.partitions:
            active = (sent_at >= begin) & (sent_at < end)
            if active.any():
                down = active & (cut[lay.link_src[links]] != cut[lay.link_dst[links]])
                self._drop(down & keep, sent_at, links, link_versions, "partition")
                keep &= ~down
        if s.loss > 0.0:
            lost = keep & (self.rng.random(m) < s.loss)
            self._drop(lost, sent_at, links, link_versions, "loss")
            keep &= ~lost
        twice = np.zeros(m, dtype=bool)
        if s.duplication > 0.0:
            twice = keep & (self.rng.random(m) < s.duplication)
            self.counters["duplicated"] += int(twice.sum())
            if self.level == "messages":
                for i in np.nonzero(twice)[0]:
                    self._message_record("duplicate", sent_at[i], links[i], link_versions[i])
        if keep.all() and not twice.any():
            # Nothing lost or doubled: every link message leaves once, in order (a slice, so
            # no copies of the batch's arrays).
            copies: slice | np.ndarray = slice(None)
            n_copies = m
        else:
            copies = np.concatenate([np.nonzero(keep)[0], np.nonzero(twice)[0]])
            n_copies = copies.shape[0]
            if n_copies == 0:
                return np.zeros(0)
        return self._enqueue_copies(senders, links, entry, link_versions, sent_at, values,
                                    copies, n_copies)

    def _fan_out_fused(self, senders: np.ndarray, versions: np.ndarray, times: np.ndarray,
                       values: np.ndarray) -> np.ndarray:
        """``_fan_out`` for neurons with nothing to lose, double or cut, in one compiled
        pass (``block_loops.fan_out_into_windows``): the same link messages, draws, arrival
        times and wheel (its chunks equal to those of the general path)."""
        routes = self.routes
        keys = senders * routes.n_hosts + self.host_id
        m = int((routes.pair_ptr[keys + 1] - routes.pair_ptr[keys]).sum())
        if m == 0:
            return np.zeros(0)
        self.counters["sent"] += m
        # The draws ``DelaySampler.sample_many`` takes for exponential delays, in order.
        self._wait_for_draws()
        draws = self.delay_draws.take(m) if self.fused_delay_kind == 2 else np.zeros(0)
        self._last_fan_out = m
        window_keys, bounds, *arrays, delays = fan_out(
            senders, versions, times, values, routes.pair_ptr, routes.pair_links,
            routes.n_hosts, self.host_id, self.link_mean, draws, self.fused_delay_kind,
            self.step, self.block.threads)
        self._enqueue_sorted(_Chunk(*arrays), bounds, window_keys.tolist())
        return delays

    def _wait_for_draws(self) -> None:
        """Waits for the draws the second thread is drawing ahead, if any: the stream is
        taken by one thread at a time."""
        if self._drawing is not None:
            self._drawing.result()
            self._drawing = None

    def _enqueue_copies(self, senders: np.ndarray, links: np.ndarray, entry: np.ndarray,
                        link_versions: np.ndarray, sent_at: np.ndarray, values: np.ndarray,
                        copies: slice | np.ndarray, n_copies: int) -> np.ndarray:
        """The link messages ``copies`` (of those fanned out) into the timing wheel, each
        with its delay draw, carrying its link's slots of its sender's values; the
        delays."""
        lay = self.layout
        s = self.settings
        self._wait_for_draws()
        delays = (self.sampler.sample_many(self.rng, self.link_mean[links[copies]],
                                           self.delay_draws)
                  if s.paced else np.zeros(n_copies))
        if block_loops.COMPILED and self.neurons:
            # One unit per sender and one slot per link: a link message carries its sender's
            # only value, which is ``values[entry]``; the window sort reads it from there.
            self._enqueue(sent_at[copies] + delays, links[copies], link_versions[copies],
                          values, entry[copies])
            return delays
        counts = lay.unit_ptr[senders + 1] - lay.unit_ptr[senders]
        value_ptr = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        if block_loops.COMPILED:
            carried, starts = block_loops.link_values(
                np.zeros(0, dtype=np.int64) if isinstance(copies, slice) else copies, entry,
                senders, value_ptr, lay.link_slot_ptr, lay.slot_sender_pos, lay.unit_ptr,
                links, values)
            self._enqueue(sent_at[copies] + delays, links[copies], link_versions[copies],
                          carried, starts)
            return delays
        # Each link's slots read the sender's values at the slot's unit.
        slots, link_index = expand_ranges(lay.link_slot_ptr[links[copies]],
                                          lay.link_slot_ptr[links[copies] + 1])
        sender_of = senders[entry[copies]][link_index]
        source = value_ptr[entry[copies]][link_index] + \
            (lay.slot_sender_pos[slots] - lay.unit_ptr[sender_of])
        link_counts = self.slot_count[links[copies]]
        starts = np.concatenate([[0], np.cumsum(link_counts)[:-1]]).astype(np.int64)
        self._enqueue(sent_at[copies] + delays, links[copies], link_versions[copies],
                      values[source], starts)
        return delays

    def _apply_now(self, senders: np.ndarray, versions: np.ndarray, times: np.ndarray,
                   values: np.ndarray) -> None:
        """The link messages of ``senders`` to this host's shards, delivered as they leave
        (``direct``): each link takes a newer version, news wakes its receiver at its next
        tick."""
        lay, routes = self.layout, self.routes
        counts = lay.unit_ptr[senders + 1] - lay.unit_ptr[senders]
        value_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        block = self.block
        if block_loops.COMPILED:
            m, applied, n_touched = block_loops.apply_sent(
                senders, versions, times, values, value_ptr, routes.pair_ptr,
                routes.pair_links, routes.n_hosts, self.host_id, lay.link_slot_ptr,
                lay.slot_sender_pos, lay.unit_ptr, lay.n_own, lay.link_dst,
                block.link_version, block.values, block.dirty, self._first_arrival,
                self._touched)
            self.counters["sent"] += m
            self.counters["delivered"] += m
            self.counters["applied"] += applied
            if n_touched:
                block_loops.wake_on_news(self._first_arrival, self._touched, n_touched,
                                         block.dirty, self.next_tick, self.wake_at)
            return
        first_arrival = np.full(lay.n_shards, np.inf)
        links, entry = routes.links_to(senders, self.host_id)
        m = int(links.shape[0])
        applied = 0
        if m:
            slots, link_index = expand_ranges(lay.link_slot_ptr[links],
                                              lay.link_slot_ptr[links + 1])
            sender_of = senders[entry][link_index]
            source = value_ptr[entry][link_index] + \
                (lay.slot_sender_pos[slots] - lay.unit_ptr[sender_of])
            link_ptr = np.concatenate([[0], np.cumsum(self.slot_count[links])])
            sent_at = times[entry]
            done, _ = block.deliver(links, versions[entry], values[source],
                                    link_ptr.astype(np.int64), sent_at)
            applied = int(done.sum())
            np.minimum.at(first_arrival, lay.link_dst[links[done]], sent_at[done])
        self.counters["sent"] += m
        self.counters["delivered"] += m
        self.counters["applied"] += applied
        if not applied:
            return
        hit = np.isfinite(first_arrival) & block.dirty
        self.wake_at[hit] = np.minimum(self.wake_at[hit],
                                       np.maximum(first_arrival[hit], self.next_tick[hit]))

    # -- frames between hosts ---------------------------------------------------------------

    def pending_hosts(self) -> list[int]:
        return [dst for dst, entries in self.outbox.items() if entries]

    def take_frame(self, dst_host: int) -> Frame:
        """The entries waiting for ``dst_host``, newest per sender only (coalesced)."""
        parts = self.outbox.pop(dst_host, [])
        if not parts:
            return Frame(self.host_id, self.generation, np.zeros(0, dtype=np.int64),
                         np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0))
        senders = np.concatenate([p[0] for p in parts])
        versions = np.concatenate([p[1] for p in parts])
        times = np.concatenate([p[2] for p in parts])
        values = np.concatenate([p[3] for p in parts])
        lay = self.layout
        counts = lay.unit_ptr[senders + 1] - lay.unit_ptr[senders]
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        # The last entry of each sender is its newest (entries are appended in time order).
        _, last = np.unique(senders[::-1], return_index=True)
        keep = np.sort(senders.shape[0] - 1 - last)
        self.counters["coalesced"] += int(senders.shape[0] - keep.shape[0])
        index, _ = expand_ranges(starts[keep], starts[keep] + counts[keep])
        self.counters["frames"] += 1
        self.counters["frame_entries"] += int(keep.shape[0])
        return Frame(self.host_id, self.generation, senders[keep], versions[keep], times[keep],
                     values[index])

    def receive_frame(self, frame: Frame, now: float) -> None:
        """Entries from another host: fanned out to this host's links (their delays drawn
        here, counted from the send time: a frame later than its delay is due at once)."""
        if frame.generation < self.generation:
            self.counters["stale"] += frame.n_entries
            return
        if frame.n_entries == 0:
            return
        del now  # delivery times follow from the send times; the window clock does the rest
        self._fan_out(frame.senders, frame.versions, frame.times, frame.values)

    # -- the queue --------------------------------------------------------------------------

    def _enqueue(self, times: np.ndarray, links: np.ndarray, versions: np.ndarray,
                 values: np.ndarray, starts: np.ndarray) -> None:
        if block_loops.COMPILED:
            window_keys, bounds, *arrays = block_loops.sort_into_windows(
                times, links, versions, values, np.ascontiguousarray(starts, dtype=np.int64),
                self.slot_count, self.step, self.block.one_slot)
            chunk = _Chunk(*arrays)
            first_keys = window_keys.tolist()
        else:
            chunk, bounds, first_keys = self._sort_into_windows(times, links, versions,
                                                                values, starts)
        self._enqueue_sorted(chunk, bounds, first_keys)

    def _enqueue_sorted(self, chunk: _Chunk, bounds: np.ndarray, first_keys: list[int]
                        ) -> None:
        """A chunk sorted by arrival window into the wheel: window i's messages are
        ``bounds[i]:bounds[i + 1]``, its key ``first_keys[i]``."""
        buckets = self.buckets
        # A chunk lives until its last range is taken. The tail of a delay distribution (the
        # last tenth of the messages, over many windows) would keep whole chunks alive for
        # its longest delay: those ranges get chunks of their own.
        n = int(bounds[-1])
        tail = (int(np.searchsorted(bounds, TAIL_SHARE * n)) if n >= TAIL_MIN_MESSAGES
                else len(first_keys))
        for i, (lo, hi) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist(),
                                         strict=True)):
            key = first_keys[i]
            if i >= tail and i > 0:
                part = slice(lo, hi)
                rows = chunk.ptr.size > 0
                chunk_of = _Chunk(chunk.times[part].copy(), chunk.links[part].copy(),
                                  chunk.versions[part].copy(),
                                  chunk.values[chunk.ptr[lo]:chunk.ptr[hi]].copy() if rows
                                  else chunk.values[part].copy(),
                                  chunk.ptr[lo:hi + 1] - chunk.ptr[lo] if rows else chunk.ptr)
                lo, hi = 0, hi - lo
            else:
                chunk_of = chunk
            entry = buckets.get(key)
            if entry is None:
                buckets[key] = [(chunk_of, lo, hi)]
                heapq.heappush(self.bucket_keys, key)  # one heap entry per bucket
            else:
                entry.append((chunk_of, lo, hi))
        self.in_flight += n

    def _sort_into_windows(self, times: np.ndarray, links: np.ndarray, versions: np.ndarray,
                           values: np.ndarray, starts: np.ndarray
                           ) -> tuple[_Chunk, np.ndarray, list[int]]:
        """``block_loops.sort_into_windows`` in numpy passes."""
        keys = np.floor(times / self.step).astype(np.int64)
        base = int(keys.min())
        span = int(keys.max()) - base
        # Window keys span a narrow range: as 16-bit integers they sort by radix, in O(n).
        order = (np.argsort((keys - base).astype(np.uint16), kind="stable")
                 if span < 65_536 else np.argsort(keys, kind="stable"))
        keys = keys[order]
        links = links[order]
        counts = self.slot_count[links]
        index, _ = expand_ranges(starts[order], starts[order] + counts)
        ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        chunk = _Chunk(times[order], links, versions[order], values[index], ptr)
        bounds = np.concatenate([[0], np.nonzero(np.diff(keys))[0] + 1, [keys.shape[0]]])
        return chunk, bounds, keys[bounds[:-1]].tolist()

    def queue_length(self) -> int:
        return self.in_flight + sum(len(p[0]) for parts in self.outbox.values() for p in parts)

    # -- faults and checkpoints -------------------------------------------------------------

    def _drop(self, mask: np.ndarray, sent_at: np.ndarray, links: np.ndarray,
              versions: np.ndarray, reason: str) -> None:
        self.counters["dropped"] += int(mask.sum())
        if self.level == "messages":
            for i in np.nonzero(mask)[0]:
                self._message_record("drop", sent_at[i], links[i], versions[i], reason)

    def _save(self, shards: np.ndarray, now: np.ndarray) -> None:
        if not self.keep_checkpoints:
            return  # nothing reads them, and there are no copies to write them to
        lay = self.layout
        self.saved_time[shards] = now
        self.fresh[shards] = True
        if block_loops.COMPILED:
            block_loops.save_shards(shards, lay.unit_ptr, lay.in_link_ptr, lay.in_links,
                                    lay.link_slot_ptr, lay.n_own, self.block.values,
                                    self.block.link_version, self.saved_values,
                                    self.saved_versions)
            return
        positions, _ = lay.shard_positions(shards)
        slots = lay.n_own + lay.shard_slots(shards)
        links = lay.shard_in_links(shards)
        values = self.block.values
        self.saved_values[positions] = values[positions]
        self.saved_values[slots] = values[slots]
        self.saved_versions[links] = self.block.link_version[links]

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
        crash = self.settings.crashes[index]
        if not self.alive[shard]:
            return
        self.retired_updates += int(self.block.unit_updates[shard])
        self.alive[shard] = False
        self.n_down += 1
        self.wake_at[shard] = np.inf  # a down shard never wakes; news to it is dropped
        self.restore_from[shard] = (self._saved(shard) if crash.restore == "checkpoint"
                                    else None)
        self.crash_log.append(CrashRecord(shard, crash.at, crash.down_for, crash.restore, now))
        if self.level != "none":
            self.events.append(["crash", now, shard])
        self._fault_order += 1
        heapq.heappush(self.faults, (crash.at + crash.down_for, self._fault_order, shard,
                                     -len(self.crash_log)))

    def _restart(self, now: float, shard: int, record_index: int) -> None:
        record = self.crash_log[record_index]
        self.restarts[shard] += 1
        epoch = self.generation * EPOCH_STRIDE + int(self.restarts[shard])
        self.block.restore(shard, epoch, self.restore_from.pop(shard, None))
        self._save(np.array([shard]), np.array([now]))
        record.restarted_at = now
        if self.level != "none":
            self.events.append(["restart", now, shard, record.restore, epoch])
        tick = now + (float(self.wake.interval_many(self.rng, 1)[0]) if self.settings.paced
                      else 0.0)
        self.next_tick[shard] = tick
        self.wake_at[shard] = tick
        self.alive[shard] = True
        self.n_down -= 1

    def _message_record(self, kind: str, at: float, link: int, version: int,
                        *extra: object) -> None:
        lay = self.layout
        epoch, seq = int(version) >> 32, int(version) & 0xFFFFFFFF
        self.events.append([kind, float(at), int(lay.link_src[link]), int(lay.link_dst[link]),
                            epoch, seq, *extra])

    # -- what the caller reads ----------------------------------------------------------------

    def owned_log_scales(self) -> np.ndarray:
        """Own log-scales of this host's shards in ``order`` (a down shard: what it restarts
        from)."""
        lay = self.layout
        own = self.block.own.copy()
        for shard, saved in self.restore_from.items():
            lo, hi = lay.unit_ptr[shard], lay.unit_ptr[shard + 1]
            own[lo:hi] = 0.0 if saved is None else saved["own"]
        positions, _ = lay.shard_positions(np.array(self.order, dtype=np.int64))
        return own[positions]

    def unit_updates(self) -> int:
        return self.retired_updates + int(self.block.unit_updates[self.local].sum())

    def epochs(self) -> dict[int, int]:
        return {sid: int(self.restarts[sid]) for sid in self.order}

    def take_events(self) -> list[list]:
        events, self.events = self.events, []
        return events

    def take_checkpoints(self) -> dict[int, bytes]:
        """Checkpoints taken since the last call, one msgpack payload per shard."""
        fresh = np.nonzero(self.fresh)[0].tolist()
        self.fresh[:] = False
        out = {}
        for sid in fresh:
            saved = self._saved(sid)
            out[sid] = encode_checkpoint(sid, int(self.block.epoch[sid]), saved)
        return out


def encode_checkpoint(shard: int, epoch: int, saved: dict[str, np.ndarray]) -> bytes:
    return msgpack.packb([CHECKPOINT_FORMAT, shard, epoch,
                          saved["own"].astype("<f8").tobytes(),
                          saved["halo"].astype("<f8").tobytes(),
                          saved["versions"].astype("<i8").tobytes()], use_bin_type=True)


def decode_checkpoint(raw: bytes) -> dict[str, np.ndarray]:
    fmt, _, _, own, halo, versions = msgpack.unpackb(raw, raw=False)
    if fmt != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint format {fmt}, expected {CHECKPOINT_FORMAT}")
    return {"own": np.frombuffer(own, dtype="<f8").copy(),
            "halo": np.frombuffer(halo, dtype="<f8").copy(),
            "versions": np.frombuffer(versions, dtype="<i8").copy()}


def zero_checkpoint(layout: BlockLayout, shard: int) -> bytes:
    """A checkpoint of ``shard`` at u = 0 with an empty view (no version seen)."""
    one = np.array([shard], dtype=np.int64)
    positions, _ = layout.shard_positions(one)
    slots = layout.shard_slots(one)
    links = layout.shard_in_links(one)
    return encode_checkpoint(shard, 0, {"own": np.zeros(positions.shape[0]),
                                        "halo": np.zeros(slots.shape[0]),
                                        "versions": np.full(links.shape[0], -1)})
