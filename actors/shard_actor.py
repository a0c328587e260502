"""The Ray shard actor: a thin async shell around ``asyncbalance.runtime.shard.Shard``.

The balancing loop wakes on the scenario's schedule (in real time, ``time_unit`` seconds per
scenario time unit) and yields to the event loop between wakes, so incoming messages are
applied as they arrive. Delays, losses, duplicates and partitions are injected on the send
path with the same distributions as the simulator: a delayed message is handed to Ray only
when its delay has elapsed.

A crashed actor is restarted by Ray (``max_restarts``) and re-runs ``__init__``; it then
stays silent, dropping what it receives, until the driver calls ``resume`` with its spec, its
last checkpoint (or none, for a restart from u = 0) and a new epoch.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from asyncbalance.runtime.delays import DelaySampler, WakeSchedule
from asyncbalance.runtime.messages import StateMessage, decode_message, encode_message
from asyncbalance.runtime.shard import Rule, Shard, ShardSpec


@dataclass(frozen=True)
class ActorSettings:
    """What an actor needs from the scenario (plain values, cheap to ship)."""

    seed: int
    rule: Rule
    resend_interval: float
    time_unit: float
    wake_kind: str
    wake_period: float
    wake_jitter: float
    delay: str
    delay_spread: float
    pareto_shape: float
    loss: float
    duplication: float
    link_mean: dict[int, float]
    partitions: tuple[tuple[float, float, frozenset[int]], ...]
    checkpoint_interval: float


class ShardActor:
    """Constructed with small arguments only; the spec arrives by reference in ``setup`` (and
    again in ``resume`` after a restart), so Ray can restart the actor on any node."""

    def __init__(self, shard_id: int, settings: ActorSettings, clock_origin: float):
        self.shard_id = shard_id
        self.settings = settings
        self.origin = clock_origin
        self.rng = np.random.default_rng([settings.seed, shard_id])
        self.sampler = DelaySampler(settings.delay, settings.delay_spread, settings.pareto_shape)
        self.wake = WakeSchedule(settings.wake_kind, settings.wake_period, settings.wake_jitter)
        self.spec: ShardSpec | None = None
        self.shard: Shard | None = None
        self.peers: dict[int, Any] = {}
        self.counters = {"sent": 0, "delivered": 0, "applied": 0, "dropped": 0,
                         "duplicated": 0}
        self.events: list[list[Any]] = []
        self.checkpoint: bytes | None = None
        self.checkpoint_time = 0.0
        self.task: asyncio.Task | None = None

    def _seconds(self) -> float:
        return time.time() - self.origin

    async def _fetch(self, spec_box: list) -> ShardSpec:
        if self.spec is None:
            self.spec = await spec_box[0]
        return self.spec

    async def setup(self, spec_box: list, peers: dict[int, Any]) -> int:
        """Receive the spec (``[ObjectRef]``) and the neighbours' handles; start at u = 0."""
        spec = await self._fetch(spec_box)
        self.peers = peers
        if self.shard is None:
            self.shard = Shard(spec, self.settings.rule, self.settings.resend_interval)
        return self.shard_id

    async def connect(self, peers: dict[int, Any]) -> int:
        self.peers = peers
        return self.shard_id

    async def start(self, clock_origin: float | None = None) -> bool:
        if clock_origin is not None:
            self.origin = clock_origin
        if self.shard is not None and self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._loop())
        return self.shard is not None

    async def resume(self, spec_box: list, peers: dict[int, Any], checkpoint: bytes | None,
                     epoch: int) -> bool:
        """Come back after a crash in ``epoch``, from ``checkpoint`` (None: from u = 0)."""
        spec = await self._fetch(spec_box)
        self.peers = peers
        if self.task is not None:
            self.task.cancel()
            self.task = None
        self.shard = Shard.restore(spec, self.settings.rule, self.settings.resend_interval,
                                   epoch, checkpoint)
        self.events.append(["restart", self._seconds(), self.shard_id,
                            "checkpoint" if checkpoint is not None else "zero", epoch])
        return await self.start()

    async def _loop(self) -> None:
        unit = self.settings.time_unit
        loop = asyncio.get_running_loop()
        await asyncio.sleep(self.wake.first(self.rng) * unit)
        while self.shard is not None:
            now = self._seconds() / unit
            for message in self.shard.on_wake(now):
                self._send(loop, now, message)
            if now - self.checkpoint_time >= self.settings.checkpoint_interval:
                self.checkpoint = self.shard.checkpoint()
                self.checkpoint_time = now
            # The wake schedule itself; messages are applied while this coroutine waits.
            await asyncio.sleep(self.wake.interval(self.rng) * unit)

    def _send(self, loop: asyncio.AbstractEventLoop, now: float, message: StateMessage) -> None:
        settings = self.settings
        payload = encode_message(message)
        ids = [message.sender, message.receiver, message.epoch, message.seq]
        stamp = now * settings.time_unit
        self.counters["sent"] += 1
        self.events.append(["send", stamp, *ids, int(message.units.shape[0]), len(payload)])
        dst = message.receiver
        me = self.shard_id
        if any(start <= now < stop and ((me in cut) != (dst in cut))
               for start, stop, cut in settings.partitions):
            self.counters["dropped"] += 1
            self.events.append(["drop", stamp, *ids, "partition"])
            return
        if settings.loss > 0.0 and self.rng.random() < settings.loss:
            self.counters["dropped"] += 1
            self.events.append(["drop", stamp, *ids, "loss"])
            return
        copies = 1
        if settings.duplication > 0.0 and self.rng.random() < settings.duplication:
            copies = 2
            self.counters["duplicated"] += 1
            self.events.append(["duplicate", stamp, *ids])
        for _ in range(copies):
            delay = self.sampler.sample(self.rng, settings.link_mean[dst]) * settings.time_unit
            loop.call_later(delay, self._hand_over, dst, payload)

    def _hand_over(self, dst: int, payload: bytes) -> None:
        peer = self.peers.get(dst)
        if peer is not None:
            peer.receive.remote(payload)

    async def receive(self, payload: bytes) -> None:
        message = decode_message(payload)
        ids = [message.sender, message.receiver, message.epoch, message.seq]
        if self.shard is None:
            self.counters["dropped"] += 1
            self.events.append(["drop", self._seconds(), *ids, "down"])
            return
        applied = self.shard.on_message(message)
        self.counters["delivered"] += 1
        self.counters["applied"] += int(applied)
        self.events.append(["deliver", self._seconds(), *ids, applied])

    async def poll(self) -> dict[str, Any]:
        """Own log-scales, counters, the events since the last poll and the last checkpoint."""
        events, self.events = self.events, []
        checkpoint, self.checkpoint = self.checkpoint, None
        shard = self.shard
        return {
            "log_scales": None if shard is None else shard.log_scales.tobytes(),
            "unit_updates": 0 if shard is None else shard.unit_updates,
            "counters": dict(self.counters),
            "events": events,
            "checkpoint": checkpoint,
            "resident_bytes": _resident_bytes(),
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    async def stop(self) -> bool:
        task, self.task = self.task, None
        self.shard = None
        if task is not None:
            task.cancel()
        return True


def _resident_bytes() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)
