"""The Ray backend: one ``ShardActor`` per shard, driven by the runtime's coordinator.

``RayBackend`` has the same interface as the simulator: ``advance(until)`` lets the actors
run until ``until`` wall seconds after start, injects the scenario's crashes on the way, and
collects each actor's state, counters, events and checkpoint. Ray is started locally unless
an address is given (``--address``, ``ray.address`` or ``RAY_ADDRESS``); actors are spread
over the cluster's nodes.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray

from asyncbalance.errors import InvalidInputError
from asyncbalance.runtime.delays import link_mean_factors
from asyncbalance.runtime.events import EventWriter
from asyncbalance.runtime.scenario import Scenario
from asyncbalance.runtime.shard import Shard, ShardSpec
from asyncbalance.runtime.simulator import MessageCounters, rule_of

from .cluster import ClusterError, check_address
from .shard_actor import ActorSettings, ShardActor

_COUNTER_NAMES = ("sent", "delivered", "applied", "dropped", "duplicated")


def connect_ray(address: str | None, field: str = "--address") -> bool:
    """Initialise Ray unless it already is; True when this call started it (and owns it).

    An explicit ``HOST:PORT`` (or ``ray://HOST:PORT``) is probed first with a bounded TCP
    connect: ``ray.init`` itself retries an unreachable cluster for minutes.
    """
    if ray.is_initialized():
        current = ray.get_runtime_context().gcs_address
        if address and address not in ("auto", "local") and \
                address.removeprefix("ray://") != current:
            raise InvalidInputError(field, f"this process is already connected to the Ray "
                                    f"cluster at {current}; cannot also use {address}")
        return False
    target = address or os.environ.get("RAY_ADDRESS") or None
    if not address and target:
        field = "RAY_ADDRESS"
    if target and target not in ("auto", "local"):
        try:
            check_address(target.removeprefix("ray://"))
        except ClusterError as exc:
            raise InvalidInputError(field, str(exc).removeprefix("address: ")) from None
    ray.init(address=target, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    return True


class RayBackend:
    name = "ray"

    def __init__(self, specs: Sequence[ShardSpec], scenario: Scenario, events: EventWriter,
                 address: str | None = None):
        self.specs = list(specs)
        self.scenario = scenario
        self.events = events
        self.time_unit = scenario.ray.time_unit
        self.owns_ray = connect_ray(address or scenario.ray.address or None,
                                    "--address" if address else "ray.address")
        if len(self.specs) > scenario.ray.max_actors_warning:
            print(f"warning: {len(self.specs)} shard actors (each a process); use "
                  "partition.granularity = 'shard' with shards_per_layer or units_per_shard "
                  "for networks this large", file=sys.stderr)
        missing = sorted({name for name in scenario.ray.placement
                          if name not in ray.cluster_resources()})
        if missing:
            offered = sorted(k for k in ray.cluster_resources()
                             if k not in ("CPU", "GPU", "memory", "object_store_memory")
                             and not k.startswith("node:"))
            raise InvalidInputError("ray.placement", f"no node offers the resource(s) {missing}",
                                    offered or ["(this cluster offers no custom resources)"])
        self.rule = rule_of(scenario)
        rng = np.random.default_rng(scenario.seed)
        pairs = [(s.shard_id, n) for s in self.specs for n in s.neighbours]
        factors = link_mean_factors(rng, pairs, scenario.links.heterogeneity)
        self.origin = time.time()
        self.started = time.perf_counter()
        # Ray restarts a dead actor (an injected crash, or a node that went away) up to
        # max_restarts times, on any node; the driver then resumes it from its checkpoint.
        self.remote = ray.remote(ShardActor).options(
            num_cpus=scenario.ray.actor_cpus, max_restarts=scenario.ray.max_restarts,
            max_task_retries=0, scheduling_strategy="SPREAD")
        self.spec_refs = [ray.put(spec) for spec in self.specs]
        self.settings = [self._settings(spec, factors) for spec in self.specs]
        self.actors = [self._create(sid) for sid in range(len(self.specs))]
        self.peers = [{n: self.actors[n] for n in spec.neighbours} for spec in self.specs]
        ray.get([a.setup.remote([ref], p) for a, ref, p in
                 zip(self.actors, self.spec_refs, self.peers, strict=True)])
        n = len(self.specs)
        self.latest = [np.zeros(s.n_own) for s in self.specs]
        self.checkpoints: list[bytes | None] = [
            Shard(s, self.rule, scenario.links.resend_interval).checkpoint() for s in self.specs]
        self.current = [dict.fromkeys(_COUNTER_NAMES, 0) for _ in range(n)]
        self.retired = [dict.fromkeys(_COUNTER_NAMES, 0) for _ in range(n)]
        self.updates = [0] * n
        self.retired_updates = [0] * n
        self.epochs = [0] * n
        self.down: dict[int, tuple[float, Any]] = {}
        self.pending_crashes = sorted(enumerate(scenario.faults.crashes),
                                      key=lambda item: item[1].at)
        self.crashes = 0
        self.restarts = 0
        self.resident: list[int | None] = [None] * n
        self.nodes: list[str | None] = [None] * n

    def _create(self, sid: int) -> Any:
        placement = self.scenario.ray.placement
        if not placement:
            return self.remote.remote(sid, self.settings[sid], self.origin)
        # Explicit placement: a sliver of the node's custom resource pins the actor to it.
        pinned = ray.remote(ShardActor).options(
            num_cpus=self.scenario.ray.actor_cpus, max_restarts=self.scenario.ray.max_restarts,
            max_task_retries=0, resources={placement[sid % len(placement)]: 0.001})
        return pinned.remote(sid, self.settings[sid], self.origin)

    def _settings(self, spec: ShardSpec, factors: dict[tuple[int, int], float]) -> ActorSettings:
        s = self.scenario
        return ActorSettings(
            seed=s.seed, rule=self.rule, resend_interval=s.links.resend_interval,
            time_unit=s.ray.time_unit, wake_kind=s.wake.kind, wake_period=s.wake.period,
            wake_jitter=s.wake.jitter, delay=s.links.delay, delay_spread=s.links.spread,
            pareto_shape=s.links.pareto_shape, loss=s.links.loss,
            duplication=s.links.duplication,
            link_mean={n: s.links.mean * factors[(spec.shard_id, n)] for n in spec.neighbours},
            partitions=tuple((w.start, w.stop, frozenset(w.shards))
                             for w in s.faults.partitions),
            checkpoint_interval=s.faults.checkpoint_interval)

    def start(self) -> None:
        # The coordinator's clock starts when the shards start balancing, after start-up.
        self.started = time.perf_counter()
        self.origin = time.time()
        ray.get([a.start.remote(self.origin) for a in self.actors])

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def advance(self, until: float) -> float:
        """Let the actors run until ``until`` seconds after start, then collect their state."""
        while True:
            self._faults()
            remaining = until - self.elapsed()
            if remaining <= 0:
                break
            # The driver only watches: the shards balance in their own processes meanwhile.
            time.sleep(min(remaining, self.time_unit * 10, 0.05))
        self._poll()
        return self.elapsed()

    def _faults(self) -> None:
        now_units = self.elapsed() / self.time_unit
        while self.pending_crashes and self.pending_crashes[0][1].at <= now_units:
            _, crash = self.pending_crashes.pop(0)
            sid = crash.shard
            if sid in self.down:
                continue
            try:
                self._absorb(sid, ray.get(self.actors[sid].poll.remote()))
            except ray.exceptions.RayActorError:
                pass  # already gone: it crashes from where the last poll left it
            restore = self.checkpoints[sid] if crash.restore == "checkpoint" else None
            ray.kill(self.actors[sid], no_restart=False)
            self._mark_down(sid, crash.at + crash.down_for, restore)
        for sid, (back_at, restore) in list(self.down.items()):
            if back_at <= now_units:
                self.epochs[sid] += 1
                self._resume(sid, restore)
                del self.down[sid]
                self.restarts += 1

    def _mark_down(self, sid: int, back_at: float, restore: bytes | None) -> None:
        """Count a crash; until ``back_at`` the shard counts with what it will restart from."""
        for name in _COUNTER_NAMES:
            self.retired[sid][name] += self.current[sid][name]
        self.current[sid] = dict.fromkeys(_COUNTER_NAMES, 0)
        self.retired_updates[sid] += self.updates[sid]
        self.updates[sid] = 0
        self.crashes += 1
        self.events.write("crash", self.elapsed(), sid)
        self.down[sid] = (back_at, restore)
        self.latest[sid] = Shard.restore(self.specs[sid], self.rule,
                                         self.scenario.links.resend_interval, 0,
                                         restore).log_scales

    def _resume(self, sid: int, restore: bytes | None) -> None:
        """Hand the restarted actor its checkpoint, replacing it if Ray could not restart it."""
        deadline = time.perf_counter() + 120.0
        while True:
            try:
                ray.get(self.actors[sid].resume.remote([self.spec_refs[sid]], self.peers[sid],
                                                       restore, self.epochs[sid]))
                return
            except ray.exceptions.ActorUnavailableError:
                # Restarting a process takes a moment; resume is idempotent, so ask again.
                if time.perf_counter() > deadline:
                    raise
                time.sleep(0.05)
            except ray.exceptions.RayActorError:
                # Restarts used up: a fresh actor takes the shard over.
                if time.perf_counter() > deadline:
                    raise
                self._replace(sid)

    def _replace(self, sid: int) -> None:
        with contextlib.suppress(ray.exceptions.RayError):
            ray.kill(self.actors[sid], no_restart=True)
        self.actors[sid] = self._create(sid)
        for peers in self.peers:
            if sid in peers:
                peers[sid] = self.actors[sid]
        ray.get([self.actors[n].connect.remote(self.peers[n])
                 for n in self.specs[sid].neighbours if n not in self.down])

    def _poll(self) -> None:
        live = [sid for sid in range(len(self.actors)) if sid not in self.down]
        pending = [(sid, self.actors[sid].poll.remote()) for sid in live]
        for sid, ref in pending:
            try:
                reply = ray.get(ref)
            except ray.exceptions.RayActorError:
                # Not an injected crash: its process or node died. It comes back from its
                # last checkpoint at once, on whichever node Ray (or the driver) puts it.
                self._mark_down(sid, 0.0, self.checkpoints[sid])
                continue
            if reply["log_scales"] is None:
                # Ray already restarted this actor (its node died between two polls): the
                # new process holds no shard until it is resumed from the checkpoint.
                self._mark_down(sid, 0.0, self.checkpoints[sid])
                continue
            self._absorb(sid, reply)

    def _absorb(self, sid: int, reply: dict[str, Any]) -> None:
        if reply["log_scales"] is not None:
            self.latest[sid] = np.frombuffer(reply["log_scales"], dtype=np.float64).copy()
        self.current[sid] = reply["counters"]
        self.updates[sid] = reply["unit_updates"]
        if reply["checkpoint"] is not None:
            self.checkpoints[sid] = reply["checkpoint"]
        self.resident[sid] = reply["resident_bytes"]
        self.nodes[sid] = reply.get("node_id")
        for record in reply["events"]:
            self.events.write(*record)

    def owned_log_scales(self) -> list[np.ndarray]:
        return [values.copy() for values in self.latest]

    def message_counters(self) -> MessageCounters:
        total = {name: sum(r[name] + c[name] for r, c in
                           zip(self.retired, self.current, strict=True))
                 for name in _COUNTER_NAMES}
        return MessageCounters(
            sent=total["sent"], delivered=total["delivered"], applied=total["applied"],
            dropped=total["dropped"], duplicated=total["duplicated"],
            unit_updates=sum(self.retired_updates) + sum(self.updates),
            crashes=self.crashes, restarts=self.restarts)

    def shard_nodes(self) -> list[str | None]:
        """The Ray node id each shard's actor reported at its last poll."""
        return list(self.nodes)

    def resident_bytes(self) -> list[int | None]:
        """Resident memory of each actor process at its last poll (None without psutil)."""
        return list(self.resident)

    def close(self) -> None:
        try:
            for actor in self.actors:
                try:
                    ray.get(actor.stop.remote(), timeout=10)
                except ray.exceptions.RayError:
                    pass  # crashed or restarting: killing it below is all that is left
        finally:
            for actor in self.actors:
                ray.kill(actor, no_restart=True)
            if self.owns_ray:
                ray.shutdown()
