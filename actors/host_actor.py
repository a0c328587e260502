"""The Ray shard host: a thin asyncio shell around a ``BlockHost`` (shard blocks, array
frames between hosts) or, for training's reloads, the per-shard ``ShardHost``.

One actor process hosts many logical shards. Its loop runs the host's events that are due
on the scenario clock (wall seconds since the run's origin divided by ``time_unit``) in
slices, sends each destination host its coalesced outbox as one batch after every slice,
applies what the other hosts sent meanwhile, and sleeps, once nothing is due, until the next
pending event or until news arrives, whichever is first. At most ``max_in_flight`` batches
to each destination host are outstanding; a completed one frees the slot (backpressure),
and what accumulates meanwhile stays coalesced in the outbox, so no queue grows with the
length of the run.

Batches travel over ``transport``: ``stream`` (default) sends them as frames over a direct
TCP link per host pair (``links.StreamLinks``), acknowledged per frame; ``calls`` sends each
as a Ray actor call to the peer's ``receive``. Ray is the control plane either way: it
places, restarts and polls the hosts.

A host whose process dies is restarted by Ray (``max_restarts``) and re-runs ``__init__``;
it then drops what it receives until the driver calls ``resume`` with its specs, the last
checkpoints the driver saved and epochs above any the lost process used.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import ray

from asyncbalance.errors import InvalidInputError
from asyncbalance.runtime import block_loops
from asyncbalance.runtime.array_sim import link_means_of
from asyncbalance.runtime.block_host import BlockHost
from asyncbalance.runtime.frames import decode_frame, encode_frame
from asyncbalance.runtime.host import HostSettings, ShardHost
from asyncbalance.runtime.layout import build_layout
from asyncbalance.runtime.messages import decode_batch, encode_batch
from asyncbalance.runtime.shard import ShardSpec

from .links import Address, StreamLinks

TRANSPORTS = ("stream", "calls")

SWITCH_INTERVAL_S = 0.0005
BUSY_PAUSE_S = 0.0002
BUSY_SLICE_S = 0.002
CONTROL_TURN_S = 0.001
IO_TURNS = 3
# Events per slice of a host's work. Free-running over stream links: one (a shard's move),
# so that its batches leave at once and frames from other hosts are applied before the next
# shard moves (in lock-step, 38.5 moves per unit to 1e-8 against 48.8 with whole-round
# slices: bench_runtime.py --only-lag). Otherwise up to 64 events, as the event loop's
# turns between slices cost more than one event.
# Log-scale moves this small are rounding, not work (see ``HostActor._rests``).
REST_MOVE = 1e-12
FREE_SLICE_EVENTS = 1
SLICE_EVENTS = 64


class HostActor:
    """Constructed with small arguments only; specs arrive by reference in ``setup``."""

    def __init__(self, host_id: int, time_unit: float, max_in_flight: int,
                 transport: str = "stream", token: bytes = b""):
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r}")
        self.host_id = host_id
        self.links: StreamLinks | None = None
        if transport == "stream":
            self.links = StreamLinks(host_id, token, max_in_flight, self._on_frame,
                                     self._wake_up, self._monitor_state)
            self.links.rests = self._rests
        # The loop waits for news (nothing due now), and the log-scales of the last monitor
        # reply: a request at rest is answered once the host rests with log-scales that moved
        # by more than REST_MOVE since (a settled host keeps moving by a few ulps at every
        # anti-entropy re-send: measured 2e-16 - 4e-16; those moves do not count).
        self.resting = False
        self.scales_at_reply: np.ndarray | None = None
        # Frames that could not be decoded: lost batches, counted with the lost calls.
        self.bad_frames = 0
        self.time_unit = time_unit
        self.max_in_flight = max_in_flight
        self.origin = time.time()
        self.host: ShardHost | BlockHost | None = None
        self.encode: Callable[[Any, int], bytes] = _encode_batch
        self.decode: Callable[[Any, bytes, float], None] = _decode_batch
        self.peers: dict[int, Any] = {}
        self.in_flight: dict[int, int] = {}
        self.calls = 0
        self.completed_calls = 0
        self.call_seconds = 0.0
        self.loop_turns = 0
        self.lost_calls = 0
        self.dropped_down = 0
        self.news: asyncio.Event | None = None
        self.task: asyncio.Task | None = None
        self.max_queue = 0
        self.started = False
        self.pending: set[asyncio.Task] = set()
        self.last_pause = time.perf_counter()
        self.slice_events = SLICE_EVENTS
        # Ray hands incoming calls and replies to this loop from its own threads, which need
        # the GIL: a short switch interval keeps them from waiting behind a busy host.
        sys.setswitchinterval(SWITCH_INTERVAL_S)

    def _now(self) -> float:
        return (time.time() - self.origin) / self.time_unit

    async def setup(self, plan_box: list, peers: dict[int, Any],
                    addresses: dict[int, Address] | None = None, origin: float | None = None,
                    generation: int = 0, checkpoints: dict[int, bytes] | None = None,
                    restarts: dict[int, int] | None = None) -> Address | None:
        """Install the shards and the peers. ``plan_box = [ObjectRef]`` of this host's
        ``(specs, shard_host, settings)``: by reference, so that a restarted process gets
        them from the driver again rather than from its constructor's arguments.

        With ``origin`` (a resume after the loss of this host) the shards run at once on the
        run's clock; without, they wait for ``start``. Returns the address this host's
        stream links listen on (None with the ``calls`` transport).
        """
        plan = await plan_box[0]
        blocks = plan[0] == "blocks"
        if blocks:
            _, graph_box, partition, shard_host, settings, step, level, delays = plan
            # This host's part of the layout: its shards' terms, halo slots and in-links.
            graph = await graph_box[0]
            layout = build_layout(graph, partition, local=shard_host == self.host_id)
            link_mean = link_means_of(layout, *delays)
            # Compile the block loops now, not on the running clock.
            block_loops.warm_up()
        else:
            specs, shard_host, settings = plan
        self.settings: HostSettings = settings
        self.slice_events = FREE_SLICE_EVENTS if self.links is not None and \
            not settings.paced else SLICE_EVENTS
        self.peers = peers
        address = None
        if self.links is not None:
            address = await self.links.listen(ray.util.get_node_ip_address())
            self.links.set_addresses(addresses or {})
        self.started = origin is not None
        if origin is not None:
            self.origin = origin
        now = max(self._now(), 0.0) if self.started else 0.0
        if blocks:
            # Shard blocks: array frames between hosts, one entry per changed shard.
            self.host = BlockHost(self.host_id, layout, shard_host, settings, link_mean, step,
                                  generation, checkpoints, restarts, now=now, level=level,
                                  catch_up=True)
            self.encode, self.decode = _encode_frame, _decode_frame
        else:
            self.host = ShardHost(self.host_id, specs, shard_host, settings, generation,
                                  checkpoints, restarts, now=now)
            self.encode, self.decode = _encode_batch, _decode_batch
        self._ensure_loop()
        return address

    async def start(self, origin: float) -> int:
        """Start balancing on the run's clock (``origin``: wall time of time unit 0)."""
        self.origin = origin
        self.started = True
        self._wake_up()
        return self.host_id

    async def connect(self, peers: dict[int, Any],
                      addresses: dict[int, Address] | None = None) -> int:
        """New peers (a host was replaced) or new addresses (a host restarted elsewhere)."""
        self.peers = peers
        if self.links is not None and addresses:
            self.links.set_addresses(addresses)
        self._wake_up()
        return self.host_id

    async def reload(self, specs_box: list, generation: int) -> int:
        """New costs for the same shards (training): u = 0 in a new generation."""
        specs: list[ShardSpec] = await specs_box[0]
        if not isinstance(self.host, ShardHost):
            raise RuntimeError(f"host {self.host_id} has no shards to reload")
        self.host.reload(specs, generation, self._now())
        self._wake_up()
        return self.host_id

    def _ensure_loop(self) -> None:
        if self.news is None:
            self.news = asyncio.Event()
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._loop())
        self._wake_up()

    def _wake_up(self) -> None:
        if self.news is not None:
            self.news.set()

    async def _loop(self) -> None:
        assert self.news is not None
        while self.host is not None:
            host = self.host
            self.loop_turns += 1
            if self.started:
                host.advance(self._now(), max_events=self.slice_events)
            if self.links is not None:
                # What the other hosts sent meanwhile (and the acks that free slots) is
                # applied before the batches leave and the next slice begins.
                self.links.pump()
            self._flush()
            self.max_queue = max(self.max_queue, host.queue_length())
            wait = (host.next_due() - self._now()) * self.time_unit if self.started else 1.0
            if wait <= 0:
                await self._busy_turn()
                continue
            self.news.clear()
            self.resting = True
            if self.links is not None:
                self.links.answer_at_rest()
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.news.wait(), timeout=min(wait, 1.0))
            finally:
                self.resting = False

    def _rests(self) -> bool:
        """Resting with log-scales other than the last monitor reply's."""
        host = self.host
        if not (self.resting and host is not None and self.started):
            return False
        base = self.scales_at_reply
        current = host.owned_log_scales()
        return base is None or base.shape != current.shape or \
            bool(np.max(np.abs(current - base), initial=0.0) > REST_MOVE)

    async def _busy_turn(self) -> None:
        """Still work due: let the event loop in as often as the transport needs."""
        since = time.perf_counter() - self.last_pause
        if self.links is not None:
            # Frames are pumped between slices; the loop is needed only for Ray's calls
            # (polls, set-up), which can wait a millisecond.
            if since >= CONTROL_TURN_S:
                for _ in range(IO_TURNS):
                    await asyncio.sleep(0)
                self.last_pause = time.perf_counter()
            return
        if since >= BUSY_SLICE_S:
            # Ray's threads hand incoming calls and replies to this loop only when they get
            # the GIL, and a zero sleep keeps it (measured: 23 ms per call between two busy
            # hosts without the pause, 6 - 11 ms with it). Pausing after every slice
            # instead would cost a lagging host of thousands of shards its pace.
            await asyncio.sleep(BUSY_PAUSE_S)
            self.last_pause = time.perf_counter()
            return
        # Three turns of the event loop before the next slice: a reply that arrived
        # meanwhile is handed over in the first and completes its call in the next.
        for _ in range(IO_TURNS):
            await asyncio.sleep(0)

    def _flush(self) -> None:
        host = self.host
        if host is None:
            return
        if self.links is not None:
            for dst in host.pending_hosts():
                if self.links.can_send(dst):
                    self.links.send(dst, self.encode(host, dst))
            return
        for dst in host.pending_hosts():
            if self.in_flight.get(dst, 0) >= self.max_in_flight or dst not in self.peers:
                continue
            payload = self.encode(host, dst)
            self.in_flight[dst] = self.in_flight.get(dst, 0) + 1
            self.calls += 1
            ref = self.peers[dst].receive.remote(payload)
            # asyncio keeps only weak references to tasks: hold them until they finish.
            task = asyncio.get_running_loop().create_task(
                self._complete(dst, ref, time.perf_counter()))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)

    async def _complete(self, dst: int, ref: Any, sent_at: float) -> None:
        try:
            await ref
            self.call_seconds += time.perf_counter() - sent_at
            self.completed_calls += 1
        except ray.exceptions.RayError:
            # The peer is down or restarting: the batch is lost like a dropped message, and
            # anti-entropy re-sends the state once the peer is back.
            self.lost_calls += 1
        finally:
            self.in_flight[dst] -= 1
            self._wake_up()

    async def receive(self, payload: bytes) -> None:
        self._on_frame(payload)

    def _on_frame(self, payload: bytes) -> None:
        if self.host is None:
            self.dropped_down += 1
            return
        try:
            self.decode(self.host, payload, self._now())
        except InvalidInputError:
            self.bad_frames += 1
            return
        self._wake_up()

    def _transport_counters(self) -> dict[str, Any]:
        links = self.links
        if links is None:
            return {"calls": self.calls, "lost_calls": self.lost_calls + self.bad_frames,
                    "call_seconds": self.call_seconds, "acked_calls": self.completed_calls}
        return {"calls": links.frames_sent, "lost_calls": links.lost_frames + self.bad_frames,
                "call_seconds": links.ack_seconds, "acked_calls": links.acked,
                "monitor_polls": links.monitor_requests}

    def _sample(self, host: ShardHost | BlockHost,
                with_log_scales: bool = True) -> dict[str, Any]:
        """What changes from one sample to the next: own log-scales (host order), counters."""
        return {
            "log_scales": (host.owned_log_scales().astype("<f8").tobytes() if with_log_scales
                           else None),
            "generation": host.generation,
            "unit_updates": host.unit_updates(),
            "counters": {**host.counters, **self._transport_counters(),
                         "loop_turns": self.loop_turns},
        }

    def _monitor_state(self, connection: Any = None) -> bytes:
        """The driver's monitor link asks for the sample at every sample; events, checkpoints
        and the rest come with its less frequent ``poll``.

        A reply after the first on a connection carries only the log-scales that changed
        since the previous reply on it (``delta``: positions and values), or the whole array
        when more than half changed: a quiet host of millions of units answers in bytes."""
        host = self.host
        if host is None:
            return msgpack.packb({"log_scales": None}, use_bin_type=True)
        sample = self._sample(host, with_log_scales=False)
        current = host.owned_log_scales()
        self.scales_at_reply = current
        base = getattr(connection, "monitor_base", None)
        if base is not None and base.shape == current.shape:
            changed = np.nonzero(current != base)[0]
            if changed.shape[0] <= current.shape[0] // 2:
                sample["delta"] = [changed.astype("<u4").tobytes(),
                                   current[changed].astype("<f8").tobytes()]
        if "delta" not in sample:
            sample["log_scales"] = current.astype("<f8").tobytes()
        if connection is not None:
            connection.monitor_base = current
        return msgpack.packb(sample, use_bin_type=True)

    async def poll(self, with_checkpoints: bool) -> dict[str, Any]:
        """The sample, events, and fresh checkpoints if asked."""
        host = self.host
        if host is None:
            return {"log_scales": None}
        return {
            **self._sample(host),
            "restarts": host.epochs(),
            "events": host.take_events(),
            "crash_log": [record.as_dict() for record in host.crash_log],
            "checkpoints": host.take_checkpoints() if with_checkpoints else {},
            "queue_max": self.max_queue,
            "resident_bytes": _resident_bytes(),
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    async def stop(self) -> bool:
        task, self.task = self.task, None
        self.host = None
        if task is not None:
            task.cancel()
        if self.links is not None:
            self.links.close()
        return True


def _encode_batch(host: ShardHost, dst: int) -> bytes:
    return encode_batch(host.take_outbox(dst))


def _decode_batch(host: ShardHost, payload: bytes, now: float) -> None:
    host.receive(decode_batch(payload), now)


def _encode_frame(host: BlockHost, dst: int) -> bytes:
    return encode_frame(host.take_frame(dst))


def _decode_frame(host: BlockHost, payload: bytes, now: float) -> None:
    frame = decode_frame(payload)
    if (frame.senders >= host.layout.n_shards).any():
        raise InvalidInputError("frame", "a sender that is not a shard of this run")
    if frame.values.shape[0] != int((host.layout.unit_ptr[frame.senders + 1]
                                     - host.layout.unit_ptr[frame.senders]).sum()):
        raise InvalidInputError("frame", "values do not match the senders' unit counts")
    host.receive_frame(frame, now)


def _resident_bytes() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


def log_scales_of(reply: dict[str, Any]) -> np.ndarray | None:
    raw = reply.get("log_scales")
    return None if raw is None else np.frombuffer(raw, dtype="<f8").copy()
