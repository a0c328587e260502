"""The Ray backend: a few ``HostActor`` processes, each running many logical shards.

``RayBackend`` has the simulator's interface in scenario time units (wall seconds since the
start divided by ``ray.time_unit``): ``advance(until)`` lets the hosts run until then and
collects their state. Hosts default to the CPUs the cluster offers (spread over its nodes;
``ray.placement`` pins them to named nodes); shards are assigned to hosts in contiguous runs.
Scripted crashes of logical shards are played by the hosts themselves; a host whose process
or node dies is resumed from the checkpoints the driver last collected, on whichever node Ray
(or the driver) puts it. Ray is started locally unless an address is given (``--address``,
``ray.address`` or ``RAY_ADDRESS``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import ray
from ray._private import state as ray_state
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from asyncbalance.errors import InvalidInputError
from asyncbalance.graph import CostGraph
from asyncbalance.runtime.array_sim import default_step, event_level
from asyncbalance.runtime.block_host import COUNTER_NAMES as BLOCK_COUNTER_NAMES
from asyncbalance.runtime.block_host import decode_checkpoint
from asyncbalance.runtime.events import EventWriter
from asyncbalance.runtime.host import (
    COUNTER_NAMES,
    assign_hosts,
    link_means,
    settings_for,
    split_by_shard,
)
from asyncbalance.runtime.layout import count_edges
from asyncbalance.runtime.scenario import Scenario
from asyncbalance.runtime.shard import Shard, ShardSpec
from asyncbalance.runtime.simulator import MessageCounters, rule_of

from .cluster import ClusterError, check_address
from .host_actor import HostActor, log_scales_of
from .links import ASK_AT_REST, ASK_FLUSH, MonitorClient

# Measured free-running on 2 cores (the driver on them too), one host against two: 384
# neuron shards (55k links) 2.0 s against 7.0 s; 10^4 neuron shards, fan-in 4 (80k links),
# 3.6 s against 6.1 s with 4.6x the moves; fan-in 133 (2.7e6 links) 4.4-4.6 s against
# 7.4-8.8 s with 3.1x the moves; 10^5 neuron shards, fan-in 133 (2.7e7 links) 103 s against
# 150-164 s with 3.0-3.5x the moves. A second host pays in moves on stale neighbours across
# hosts more than its core gains, up to at least 2.7e7 links on 2 cores.
LINKS_PER_BLOCK_HOST = 30_000_000
BLOCK_COUNTERS = tuple(n for n in BLOCK_COUNTER_NAMES if n not in COUNTER_NAMES)
_EXTRA_COUNTERS = ("calls", "lost_calls", "call_seconds", "acked_calls", "loop_turns",
                   "monitor_polls")
# With stream links the driver samples the hosts' state over a monitor link each
# ``ray.sample_seconds`` and makes the Ray ``poll`` (events, checkpoints, crash logs, and the
# check that each host is alive) at most this often: a Ray call costs the driver 0.6 - 0.8 ms
# of CPU, which on a small machine slows the host it shares a core with.
FULL_POLL_SECONDS = 0.25
# A host whose poll is unanswered for PENDING_SECONDS but which is alive and listening is
# busy, not lost, for up to this long; the probe of its port waits at most PROBE_SECONDS.
BUSY_SECONDS = 120.0
PROBE_SECONDS = 0.5
# A lost host gets at most this long to come back; never past the run's wall budget.
RECOVERY_SECONDS = 120.0
# A host still pending after this long waits for CPUs no live node has free (its node went
# away with them): a replacement that reserves none takes it over, sharing a core.
PENDING_SECONDS = 5.0
# Even a run whose wall budget is spent gives a lost host this long, so that its last
# sample can include it when it comes back quickly.
MIN_RECOVERY_SECONDS = 2.0
# A process Ray is restarting refuses calls for a moment: ask it again after this long.
RETRY_SECONDS = 0.05


@dataclass
class _Recovery:
    """A lost host on its way back, stepped from the sampling loop and never waited on.

    ``loss`` is its entry of ``transport.host_losses``, completed when the recovery ends;
    ``setup`` the pending ``setup`` call on the restarted or replacement actor (checked with
    ``ray.wait(timeout=0)``); times are ``time.perf_counter`` seconds.
    """

    loss: dict[str, Any]
    state: dict[int, bytes | None]
    deadline: float
    window: float
    shared: bool = False  # whether the host now runs without reserved CPUs
    setup: Any = None
    issued_at: float = 0.0
    retry_at: float = 0.0
    unreachable_since: float | None = None


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


def plan_host_count(scenario: Scenario, n_shards: int, cluster_cpus: float,
                    block_links: int | None = None) -> int:
    """``ray.hosts`` when set, else one host per CPU the cluster offers (at least one), never
    more hosts than shards. Block hosts (``block_links``: the links of their layout) get at
    most one host per ``LINKS_PER_BLOCK_HOST`` links: below that, splitting costs more in
    moves on stale neighbours than a second core gains. Asking for more CPUs than the cluster
    has is an error now, not a silent wait for resources that never come."""
    cfg = scenario.ray
    wanted = cfg.hosts if cfg.hosts > 0 else max(1, int(cluster_cpus))
    if cfg.hosts <= 0 and block_links is not None:
        wanted = max(1, min(wanted, block_links // LINKS_PER_BLOCK_HOST))
    hosts = max(1, min(wanted, n_shards))
    needed = hosts * cfg.actor_cpus
    if needed > cluster_cpus + 1e-9:
        raise InvalidInputError(
            "ray.actor_cpus", f"{hosts} shard hosts x {cfg.actor_cpus:g} CPUs = {needed:g} "
            f"CPUs, but the Ray cluster offers {cluster_cpus:g}; lower ray.actor_cpus "
            "(0 shares the CPUs) or ray.hosts")
    return hosts


def _node_slots() -> list[str]:
    """Node ids of the live nodes, each once per CPU it offers, interleaved across nodes."""
    nodes = [(n["NodeID"], int(n.get("Resources", {}).get("CPU", 0))) for n in ray.nodes()
             if n.get("Alive")]
    slots: list[str] = []
    for round_ in range(max((cpus for _, cpus in nodes), default=0)):
        slots += [node for node, cpus in sorted(nodes) if cpus > round_]
    return slots


class RayBackend:
    name = "ray"

    def __init__(self, specs: Sequence[ShardSpec], scenario: Scenario, events: EventWriter,
                 address: str | None = None, graph: CostGraph | None = None):
        self.specs = list(specs)
        self.scenario = scenario
        self.events = events
        # With the global cost graph the hosts run shard blocks (array frames between
        # hosts), each building its own part of the layout; without it (training's
        # reloads) they run the per-shard reference.
        self.graph = graph
        self.graph_ref: Any = None
        self.blocks = graph is not None
        cfg = scenario.ray
        self.time_unit = cfg.time_unit
        self.owns_ray = connect_ray(address or cfg.address or None,
                                    "--address" if address else "ray.address")
        try:
            self._build(cfg)
        except BaseException:
            self.close()
            raise

    def _build(self, cfg: Any) -> None:
        scenario = self.scenario
        resources = ray.cluster_resources()
        missing = sorted({name for name in cfg.placement if name not in resources})
        if missing:
            offered = sorted(k for k in resources
                             if k not in ("CPU", "GPU", "memory", "object_store_memory")
                             and not k.startswith("node:"))
            raise InvalidInputError("ray.placement", f"no node offers the resource(s) {missing}",
                                    offered or ["(this cluster offers no custom resources)"])
        n_hosts = plan_host_count(scenario, len(self.specs), float(resources.get("CPU", 0.0)),
                                  2 * count_edges(self.graph) if self.blocks else None)
        self.node_slots = _node_slots()
        self.shard_host = assign_hosts(self.specs, n_hosts)
        self.n_hosts = max(self.shard_host) + 1
        self.members = [[s.shard_id for s in self.specs if self.shard_host[s.shard_id] == h]
                        for h in range(self.n_hosts)]
        self.rule = rule_of(scenario)
        # Block hosts draw their links' means from the layout (``link_mean_array``).
        means = {} if self.blocks else link_means(scenario, self.specs)
        paced = scenario.ray.clock == "paced"
        self.settings = [settings_for(scenario, means, members, paced)
                         for members in self.members]
        self.generation = 0
        self.actors: list[Any] = [None] * self.n_hosts
        # Only this run's hosts may deliver state over the stream links.
        self.token = secrets.token_bytes(16)
        self.plan_refs = [ray.put(self._plan(h, members))
                          for h, members in enumerate(self.members)]
        self.actors = [self._create(h) for h in range(self.n_hosts)]
        self.peers = {h: a for h, a in enumerate(self.actors)}
        replies = ray.get([a.setup.remote([ref], self.peers) for a, ref in
                           zip(self.actors, self.plan_refs, strict=True)])
        self.addresses = {h: tuple(a) for h, a in enumerate(replies) if a is not None}
        if self.addresses:
            ray.get([a.connect.remote(self.peers, self.addresses) for a in self.actors])
        self.abandoned: set[int] = set()  # lost hosts that could not be brought back
        self.recovering: dict[int, _Recovery] = {}
        # Ray polls not answered yet, with when they were made: a host that answers late is
        # taken at a later sample, one silent for PENDING_SECONDS is lost.
        self.pending_polls: dict[int, tuple[Any, float]] = {}
        self.monitors: dict[int, MonitorClient] = {}
        # Per monitor link, the log-scales its replies add up to (a reply may be a delta).
        self.monitored: dict[int, np.ndarray] = {}
        self.last_full_poll = -np.inf
        self._open_monitors()
        self.latest = [np.zeros(sum(self.specs[s].n_own for s in m)) for m in self.members]
        # When the sample in ``latest`` was asked for, per host: a Ray poll's reply that comes
        # late (asked before a monitor sample taken since) is older and is not taken.
        self.sampled_at = [-np.inf] * self.n_hosts
        self.busy_until: dict[int, float] = {}
        self.slow_polls = [0] * self.n_hosts  # polls found late but the host alive and busy
        # The driver's copy of every shard's last checkpoint: what a lost host resumes from.
        self.saved = self._zero_checkpoints()
        self.restarts = {s.shard_id: 0 for s in self.specs}
        self.crashes_per_shard = {s.shard_id: 0 for s in self.specs}
        for crash in scenario.faults.crashes:
            self.crashes_per_shard[crash.shard] += 1
        names = COUNTER_NAMES + _EXTRA_COUNTERS + BLOCK_COUNTERS
        self.current = [dict.fromkeys(names, 0) for _ in range(self.n_hosts)]
        self.retired = dict.fromkeys(names, 0)
        self.updates = [0] * self.n_hosts
        self.retired_updates = 0
        self.crash_logs: list[list[dict]] = [[] for _ in range(self.n_hosts)]
        self.retired_crash_logs: list[dict] = []
        self.host_losses: list[dict] = []  # ended recoveries (pending ones: ``recovering``)
        self._recovery_window = RECOVERY_SECONDS
        self.queue_max = [0] * self.n_hosts
        self.resident: list[int | None] = [None] * self.n_hosts
        self.nodes: list[str | None] = [None] * self.n_hosts
        self.origin = time.time()
        self.started = time.perf_counter()
        self.last_checkpoint_poll = -np.inf
        self.checkpoint_sink: Callable[[dict[int, bytes]], None] | None = None

    def _plan(self, host: int, members: list[int]) -> tuple:
        """What host ``host`` is set up with (shipped by reference)."""
        if not self.blocks:
            return ([self.specs[sid] for sid in members], self.shard_host, self.settings[host])
        if self.graph_ref is None:
            self.graph_ref = ray.put(self.graph)  # once, for every host
        scenario = self.scenario
        return ("blocks", [self.graph_ref], [spec.units for spec in self.specs],
                np.asarray(self.shard_host, dtype=np.int64), self.settings[host],
                default_step(scenario), event_level(scenario),
                (scenario.links.mean, scenario.links.heterogeneity, scenario.seed))

    def _zero_checkpoints(self) -> dict[int, bytes | None]:
        """Every shard at u = 0 with an empty view: what a host lost before its first
        checkpoint resumes from (None for a block host: it starts its shards there)."""
        if not self.blocks:
            return {s.shard_id: Shard(s, self.rule, self.scenario.links.resend_interval)
                    .checkpoint() for s in self.specs}
        return {s.shard_id: None for s in self.specs}

    def _create(self, host: int, cpus: float | None = None) -> Any:
        cfg = self.scenario.ray
        options: dict[str, Any] = {"num_cpus": cfg.actor_cpus if cpus is None else cpus,
                                   "max_restarts": cfg.max_restarts,
                                   "max_task_retries": 0, "max_concurrency": 1000}
        if cfg.placement:
            # Explicit placement: a sliver of the node's custom resource pins the host to it.
            options["resources"] = {cfg.placement[host % len(cfg.placement)]: 0.001}
        elif self.node_slots:
            # Spread over the live nodes in proportion to their CPUs. Hard affinity: Ray's
            # own placement may put them all on one node; a host whose node went away dies
            # for good and is replaced on a live node (``_replace``).
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                self.node_slots[host % len(self.node_slots)], soft=False)
        return ray.remote(HostActor).options(**options).remote(
            host, cfg.time_unit, cfg.max_in_flight, cfg.transport, self.token)

    # -- the coordinator's interface ------------------------------------------------------

    def start(self) -> None:
        # The run's clock starts when the shards start balancing, after start-up.
        self.origin = time.time()
        self.started = time.perf_counter()
        ray.get([a.start.remote(self.origin) for a in self.actors])
        # The first Ray poll (events, checkpoints, liveness) comes FULL_POLL_SECONDS and
        # checkpoint_seconds into the run, as every later one, not at its first sample: the
        # hosts have nothing to report yet, and a busy host answers a Ray call late (on 2
        # cores, 10-20 ms of a 20 ms run), which delayed the first sample behind it.
        self.last_full_poll = self.last_checkpoint_poll = time.perf_counter()

    def elapsed(self) -> float:
        """Scenario time units since the start."""
        return (time.perf_counter() - self.started) / self.time_unit

    def advance(self, until: float) -> float:
        """Let the hosts run until ``until`` time units after the start, then collect.

        Free-running hosts on stream links are sampled as soon as every one of them rests
        after moving (a monitor request at rest), at ``until`` at the latest: a run that
        converges between two samples is seen when it does, not a sample period later,
        and the waiting costs the hosts nothing."""
        if self._samples_at_rest():
            if self._ray_poll_due():
                # Events, checkpoints and liveness first, while the hosts work: a Ray poll
                # after the sample at rest would delay the run's stop by its round trip.
                self._poll(wait=self.scenario.ray.sample_seconds)
            remaining = (until - self.elapsed()) * self.time_unit
            if remaining > 0 and self._samples_at_rest() and \
                    self._fast_poll(self._active_hosts(), FULL_POLL_SECONDS, at_rest=remaining):
                for host in list(self.recovering):
                    self._step_recovery(host)
                return self.elapsed()
        remaining = (until - self.elapsed()) * self.time_unit
        if remaining > 0:
            # The driver only watches: the shards balance in their own processes meanwhile.
            time.sleep(remaining)
        # A host slower than one sampling interval is taken at a later sample: the live
        # hosts' samples keep their pace while one is lost or being brought back.
        self._poll(wait=self.scenario.ray.sample_seconds)
        return self.elapsed()

    def _active_hosts(self) -> list[int]:
        """Hosts that run: neither being brought back nor given up."""
        return [h for h in range(self.n_hosts)
                if h not in self.recovering and h not in self.abandoned]

    def _open_monitors(self) -> None:
        """A monitor link to every active host that listens and has none (stream links
        only); not to one whose Ray poll is unanswered (it may be gone: a connect to a dead
        node waits for the link's timeout)."""
        for host, address in self.addresses.items():
            if host not in self.monitors and host not in self.pending_polls and \
                    host not in self.recovering and host not in self.abandoned:
                try:
                    self.monitors[host] = MonitorClient(address, self.token)
                except OSError:
                    continue  # sampled by Ray calls until the next try

    def _close_monitor(self, host: int) -> None:
        getattr(self, "monitored", {}).pop(host, None)
        monitor = self.monitors.pop(host, None)
        if monitor is not None:
            monitor.close()

    def _samples_at_rest(self) -> bool:
        """Whether the next sample is asked at rest: free-running hosts, each active one
        with a monitor link."""
        if self.scenario.ray.clock != "free":
            return False
        active = self._active_hosts()
        return bool(active) and all(h in self.monitors for h in active)

    def _ray_poll_due(self) -> bool:
        """Whether the next sample must be a Ray poll (events, checkpoints, liveness)."""
        now = time.perf_counter()
        every = max(self.scenario.ray.checkpoint_seconds, 0.0)
        return now - self.last_checkpoint_poll >= every or \
            now - self.last_full_poll >= FULL_POLL_SECONDS

    def _fast_poll(self, hosts: list[int] | None = None, wait: float = PENDING_SECONDS,
                   at_rest: float = 0.0) -> bool:
        """Each of ``hosts``' (default: the active hosts') log-scales and counters over the
        monitor links, waiting at most ``wait`` s for the replies; True if every host answered.

        A host that has not begun to answer by then (busy, or gone) loses its link and is
        sampled by a Ray poll, which takes a late reply at a later sample: reading its link
        until the link's own timeout (seconds) would pause the sampling of every host. A host
        that answers empty (restarted: ``poll`` finds it) loses its link too. If any link
        fails, all are closed and nothing is taken. With ``at_rest`` > 0 the requests are
        answered when each host rests after moving; those not answered within ``at_rest``
        seconds are then asked to answer at once.
        """
        hosts = self._active_hosts() if hosts is None else hosts
        asked = time.perf_counter()
        try:
            if at_rest > 0:
                for host in hosts:
                    self.monitors[host].request(ASK_AT_REST)
                answering = self._monitor_answers(hosts, at_rest)
                late = [host for host in hosts if host not in answering]
                for host in late:
                    self.monitors[host].request(ASK_FLUSH)
                answering |= self._monitor_answers(late, wait)
            else:
                for host in hosts:
                    self.monitors[host].request()
                answering = self._monitor_answers(hosts, wait)
            # A reply that has begun to arrive comes at once (the host writes it in one
            # go): the rest is read at the link's pace.
            replies = {host: msgpack.unpackb(self.monitors[host].reply(), raw=False)
                       for host in answering}
        except (OSError, ValueError, msgpack.UnpackException):
            for host in list(self.monitors):
                self._close_monitor(host)
            return False
        for host in hosts:
            if host not in replies:
                self._close_monitor(host)  # its reply would come after the next request
        complete = len(replies) == len(hosts)
        for host, reply in replies.items():
            if reply.get("log_scales") is None and "delta" not in reply:
                self._close_monitor(host)
                complete = False
                continue
            if "delta" in reply:
                # Only what changed since this link's previous reply, applied to that reply.
                index, values = reply["delta"]
                state = self.monitored[host]
                state[np.frombuffer(index, dtype="<u4")] = np.frombuffer(values, dtype="<f8")
            else:
                self.monitored[host] = log_scales_of(reply)
            reply["log_scales"] = self.monitored[host].astype("<f8").tobytes()
            self._absorb_sample(host, reply, asked)
        return complete

    def _monitor_answers(self, hosts: list[int], wait: float) -> set[int]:
        """Those of ``hosts`` whose monitor reply begins to arrive within ``wait`` s."""
        waiting = {self.monitors[host].sock: host for host in hosts}
        answering: set[int] = set()
        deadline = time.perf_counter() + max(wait, 0.0)
        while waiting:
            readable, _, _ = select.select(list(waiting), [], [],
                                           max(deadline - time.perf_counter(), 0.0))
            if not readable:
                break
            answering.update(waiting.pop(sock) for sock in readable)
        return answering

    def _poll(self, wait: float) -> None:
        """Sample the active hosts (waiting at most ``wait`` s for Ray polls), then take one
        step of every recovery in progress."""
        self._sample_hosts(wait)
        for host in list(self.recovering):
            self._step_recovery(host)

    def _sample_hosts(self, wait: float) -> None:
        every = max(self.scenario.ray.checkpoint_seconds, 0.0)
        now = time.perf_counter()
        with_checkpoints = now - self.last_checkpoint_poll >= every
        active = self._active_hosts()
        # A monitor sample waits for its replies up to FULL_POLL_SECONDS (they take
        # milliseconds; a host that slow would be taken by the next Ray poll anyway): a
        # shorter wait sends busy hosts to Ray polls whose late replies are older than a
        # monitor sample taken meanwhile.
        if not with_checkpoints and now - self.last_full_poll < FULL_POLL_SECONDS and \
                all(h in self.monitors for h in active) and \
                self._fast_poll(active, max(wait, FULL_POLL_SECONDS)):
            return
        self.last_full_poll = now
        if with_checkpoints:
            self.last_checkpoint_poll = now
        for host in active:
            # One poll per host at a time (a late reply is taken, in order, when it comes).
            if host not in self.pending_polls:
                self.pending_polls[host] = (self.actors[host].poll.remote(with_checkpoints),
                                            now)
        refs = [ref for ref, _ in self.pending_polls.values()]
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=max(wait, 0.0))[0]) \
            if refs else set()
        fresh: dict[int, bytes] = {}
        for host, (ref, asked_at) in list(self.pending_polls.items()):
            if ref not in ready:
                late = time.perf_counter() - asked_at
                if late >= PENDING_SECONDS and not (late < BUSY_SECONDS and self._busy(host)):
                    # Unanswered this long: its process is being restarted where no CPU is
                    # free, or its node is gone (declared dead only after ~15 s).
                    self._lose(host)
                continue
            del self.pending_polls[host]
            try:
                reply = ray.get(ref)  # ready: returns at once
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnschedulableError):
                reply = {"log_scales": None}
            if reply["log_scales"] is None:
                # Its process or node died (or Ray already restarted it, empty): resume it.
                self._lose(host)
                continue
            fresh.update(self._absorb(host, reply, asked_at))
        if fresh and self.checkpoint_sink is not None:
            self.checkpoint_sink(fresh)
        if len(self.monitors) < len(self.addresses):
            self._open_monitors()

    def _busy(self, host: int) -> bool:
        """Whether a host whose poll is late is only busy (a window of a large block takes
        seconds): the control store holds its actor ALIVE and its link port accepts a
        connection. A dead process's port refuses at once, even before the control store
        learns of a lost node. Asked at most once per PENDING_SECONDS per host."""
        now = time.perf_counter()
        if self.busy_until.get(host, -np.inf) > now:
            return True
        try:
            info = ray_state.state.actor_table(self.actors[host]._actor_id.hex())
        except Exception:  # noqa: BLE001 - the control store unreachable: not known alive
            return False
        if not info or info.get("State") != "ALIVE":
            return False
        address = self.addresses.get(host)
        if address is not None:
            try:
                socket.create_connection(address, timeout=PROBE_SECONDS).close()
            except OSError:
                return False
        self.busy_until[host] = now + PENDING_SECONDS
        self.slow_polls[host] += 1
        return True

    def _absorb_sample(self, host: int, reply: dict[str, Any], asked_at: float) -> None:
        """The part of a reply that a monitor link and a poll both carry; not taken from a
        reply asked for before the sample already taken (its state and counters are older)."""
        if asked_at < self.sampled_at[host]:
            return
        self.sampled_at[host] = asked_at
        values = log_scales_of(reply)
        if values is not None:
            self.latest[host] = values
        self.current[host] = reply["counters"]
        self.updates[host] = reply["unit_updates"]

    def _absorb(self, host: int, reply: dict[str, Any], asked_at: float) -> dict[int, bytes]:
        self._absorb_sample(host, reply, asked_at)
        self.crash_logs[host] = reply["crash_log"]
        self.queue_max[host] = max(self.queue_max[host], reply["queue_max"])
        self.resident[host] = reply["resident_bytes"]
        self.nodes[host] = reply.get("node_id")
        for sid, count in reply["restarts"].items():
            self.restarts[int(sid)] = int(count)
        checkpoints = {int(k): v for k, v in reply["checkpoints"].items()}
        self.saved.update(checkpoints)
        unit = self.time_unit
        for record in reply["events"]:
            # Hosts stamp events in time units on the run's clock; the log is in seconds.
            record[1] = record[1] * unit
            if record[0] == "batch":
                record[2] = record[2] * unit  # the window's end, like its start
            self.events.write(*record)
        return checkpoints

    def _lose(self, host: int) -> None:
        """A host process is gone: count it and start bringing it back (``_step_recovery``).

        Until it is back its shards count with the checkpoints it resumes from, as a shard
        that is down does in the simulators; the ``crash`` events now and the ``restart``
        events when it is back say when they were down.
        """
        lost_at = self.elapsed()
        self.pending_polls.pop(host, None)
        self._close_monitor(host)
        for name, value in self.current[host].items():
            self.retired[name] += value
        self.current[host] = dict.fromkeys(self.current[host], 0)
        self.retired_updates += self.updates[host]
        self.updates[host] = 0
        self.retired_crash_logs += self.crash_logs[host]
        self.crash_logs[host] = []
        members = self.members[host]
        # Epochs above any the lost process can have used, so peers take the new state.
        for sid in members:
            self.restarts[sid] += self.crashes_per_shard[sid] + 1
        for sid in members:
            self.events.write("crash", lost_at * self.time_unit, sid)
        self._set_latest_from_saved(host)
        deadline = self._recovery_deadline()
        loss = {"host": host, "shards": len(members), "lost_at": lost_at,
                "resumed_at": None, "real_down_for": None,
                "cpus": self.scenario.ray.actor_cpus, "outcome": "pending"}
        self.recovering[host] = _Recovery(loss, {sid: self.saved[sid] for sid in members},
                                          deadline, self._recovery_window)

    def _step_recovery(self, host: int) -> None:
        """One step of bringing ``host`` back; nothing here waits on the host."""
        recovery = self.recovering[host]
        now = time.perf_counter()
        members = self.members[host]
        if recovery.setup is None and now >= recovery.retry_at and now < recovery.deadline:
            recovery.setup = self.actors[host].setup.remote(
                [self.plan_refs[host]], self.peers, self.addresses, self.origin,
                self.generation, recovery.state, {sid: self.restarts[sid] for sid in members})
            recovery.issued_at = now
        if recovery.setup is not None:
            ready, _ = ray.wait([recovery.setup], timeout=0)
            if ready:
                ref, recovery.setup = recovery.setup, None
                try:
                    address = ray.get(ref)  # ready: returns at once
                except ray.exceptions.ActorUnavailableError:
                    # Restarting a process takes a moment; setup is idempotent, so ask
                    # again. Unreachable for longer, its node is most likely gone, which
                    # the control store declares only after its health checks fail
                    # (~15 s): replace it now.
                    if recovery.unreachable_since is None:
                        recovery.unreachable_since = now
                    if now - recovery.unreachable_since < PENDING_SECONDS:
                        recovery.retry_at = now + RETRY_SECONDS
                    else:
                        recovery.unreachable_since = None
                        self._replace_lost(host, recovery)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnschedulableError):
                    # Restarts used up, or its node is gone: a fresh actor takes it over.
                    self._replace_lost(host, recovery)
                else:
                    self._resumed(host, recovery, address)
                    return
            elif now - recovery.issued_at >= PENDING_SECONDS and \
                    self.scenario.ray.actor_cpus > 0 and not recovery.shared:
                # Still pending: its restart or replacement waits for CPUs that no live
                # node has free. One that reserves none can be placed at once.
                recovery.shared = True
                recovery.setup = None
                self._replace(host, cpus=0.0)
        if now >= recovery.deadline:
            # Not back by the deadline: the run goes on without it (its shards keep their
            # checkpointed values) and the record says so; it ends at its wall budget.
            self._give_up(host, f"not resumed within {recovery.window:.0f} s "
                                "(no live node could place a replacement host)")

    def _replace_lost(self, host: int, recovery: _Recovery) -> None:
        """A fresh actor for a lost host, reserving CPUs only where one is free."""
        recovery.shared = recovery.shared or \
            not self._cpus_free(self.scenario.ray.actor_cpus)
        self._replace(host, cpus=0.0 if recovery.shared else None)

    def _resumed(self, host: int, recovery: _Recovery, address: Any) -> None:
        del self.recovering[host]
        if address is not None:
            # A restarted process listens on a new port: every host must dial it there.
            self.addresses[host] = tuple(address)
        # Every host, the resumed one included: a host replaced while it was being set up
        # (or this one's new address) is not in what the others were last told.
        self._tell_hosts(lambda a: a.connect.remote(self.peers, self.addresses))
        back_at = self.elapsed()
        for sid in self.members[host]:
            self.events.write("restart", back_at * self.time_unit, sid, "checkpoint",
                              self.restarts[sid])
        loss = recovery.loss
        loss.update(resumed_at=back_at, real_down_for=back_at - loss["lost_at"],
                    cpus=0.0 if recovery.shared else self.scenario.ray.actor_cpus,
                    outcome="resumed from checkpoints" + (
                        " on a shared CPU (no CPU was free)" if recovery.shared else ""))
        self.host_losses.append(loss)

    def _give_up(self, host: int, outcome: str) -> None:
        """``host`` stays out for the rest of the run, its shards at their checkpoints."""
        recovery = self.recovering.pop(host)
        self.abandoned.add(host)
        recovery.loss.update(outcome=outcome,
                             cpus=0.0 if recovery.shared else self.scenario.ray.actor_cpus)
        self.host_losses.append(recovery.loss)

    def _set_latest_from_saved(self, host: int) -> None:
        # Latest state of a lost host: what it resumed from.
        self.sampled_at[host] = time.perf_counter()
        if self.blocks:
            self.latest[host] = np.concatenate(
                [np.zeros(self.specs[sid].n_own) if self.saved[sid] is None
                 else decode_checkpoint(self.saved[sid])["own"] for sid in self.members[host]])
            return
        self.latest[host] = np.concatenate(
            [Shard.restore(self.specs[sid], self.rule, self.scenario.links.resend_interval, 0,
                           self.saved[sid]).log_scales for sid in self.members[host]])

    def _recovery_deadline(self) -> float:
        """When a lost host must be back: within ``RECOVERY_SECONDS``, and not past the run's
        ``stop.max_wall_seconds`` (but at least ``MIN_RECOVERY_SECONDS`` from now)."""
        now = time.perf_counter()
        run_end = self.started + self.scenario.stop.max_wall_seconds
        deadline = min(now + RECOVERY_SECONDS, max(run_end, now + MIN_RECOVERY_SECONDS))
        self._recovery_window = deadline - now
        return deadline

    def _cpus_free(self, cpus: float) -> bool:
        """Whether the cluster has ``cpus`` CPUs unreserved now (0 always fits)."""
        return cpus <= 0 or float(ray.available_resources().get("CPU", 0.0)) + 1e-9 >= cpus

    def _tell_hosts(self, call: Callable[[Any], Any], skip: int | None = None) -> None:
        """Make ``call`` on every active host, waiting at most one sampling interval: the
        answers are not needed (a host's calls run in the order made), and one that does not
        answer is found lost by its polls."""
        refs = [call(self.actors[h]) for h in self._active_hosts() if h != skip]
        with contextlib.suppress(ray.exceptions.RayError):
            ray.wait(refs, num_returns=len(refs), timeout=self.scenario.ray.sample_seconds)

    def _replace(self, host: int, cpus: float | None = None) -> None:
        """A fresh actor for ``host``; ``cpus`` overrides ``ray.actor_cpus`` (0: shared)."""
        with contextlib.suppress(ray.exceptions.RayError):
            ray.kill(self.actors[host], no_restart=True)
        # Not on the node the host was lost with: the control store may still count it alive.
        slots = _node_slots()
        self.node_slots = [n for n in slots if n != self.nodes[host]] or slots
        self.actors[host] = self._create(host, cpus)
        self.peers[host] = self.actors[host]
        self._tell_hosts(lambda a: a.connect.remote(self.peers), skip=host)

    def reload(self, specs: Sequence[ShardSpec]) -> None:
        """New costs for the same shards (training): every shard restarts at u = 0."""
        if [s.shard_id for s in specs] != [s.shard_id for s in self.specs]:
            raise ValueError("a reload must keep the shards")
        if self.blocks:
            raise ValueError("hosts running shard blocks take no reloads")
        self.specs = list(specs)
        self.generation += 1
        self.plan_refs = [ray.put(self._plan(h, members))
                          for h, members in enumerate(self.members)]
        spec_refs = [ray.put([self.specs[sid] for sid in members]) for members in self.members]
        ray.get([a.reload.remote([ref], self.generation)
                 for a, ref in zip(self.actors, spec_refs, strict=True)])
        self.latest = [np.zeros(sum(self.specs[s].n_own for s in m)) for m in self.members]
        self.sampled_at = [time.perf_counter()] * self.n_hosts  # older replies: other costs
        self.saved = self._zero_checkpoints()

    def log_scale_vector(self, n_units: int) -> np.ndarray:
        """The global log-scale vector from each host's latest sample, in one scatter per
        host."""
        if getattr(self, "member_units", None) is None:
            self.member_units = [
                np.concatenate([np.asarray(self.specs[s].units, dtype=np.int64)
                                for s in members]) if members else np.zeros(0, dtype=np.int64)
                for members in self.members]
        u = np.zeros(n_units)
        for units, latest in zip(self.member_units, self.latest, strict=True):
            u[units] = latest
        return u

    def owned_log_scales(self) -> list[np.ndarray]:
        """Each shard's own log-scales, in shard order."""
        owned: dict[int, np.ndarray] = {}
        for host, members in enumerate(self.members):
            owned.update(split_by_shard(self.specs, members, self.latest[host]))
        return [owned[spec.shard_id] for spec in self.specs]

    def message_counters(self) -> MessageCounters:
        total = {name: self.retired[name] + sum(c.get(name, 0) for c in self.current)
                 for name in self.retired}
        crashes = self.crash_records()
        return MessageCounters(
            sent=total["sent"], delivered=total["delivered"], applied=total["applied"],
            dropped=total["dropped"] + total["stale"], duplicated=total["duplicated"],
            unit_updates=self.retired_updates + sum(self.updates),
            crashes=len(crashes) + sum(loss["shards"] for loss in self._losses()),
            restarts=sum(r["restarted_at"] is not None for r in crashes)
            + sum(loss["shards"] for loss in self.host_losses
                  if loss["resumed_at"] is not None))

    def _losses(self) -> list[dict]:
        """Every host loss: ended ones, then those still being recovered (outcome
        ``pending``; only a record written while the run goes on shows one)."""
        return list(self.host_losses) + [dict(r.loss) for r in self.recovering.values()]

    def crash_records(self) -> list[dict]:
        return self.retired_crash_logs + [r for log in self.crash_logs for r in log]

    def transport(self) -> dict[str, Any]:
        """What crossed process boundaries, and how long the host queues ever grew."""
        total = {name: self.retired[name] + sum(c.get(name, 0) for c in self.current)
                 for name in ("calls", "lost_calls", "coalesced", "loop_turns", "acked_calls",
                              "monitor_polls")}
        call_seconds = self.retired["call_seconds"] + sum(c.get("call_seconds", 0.0)
                                                          for c in self.current)
        acked = total.pop("acked_calls")
        # Send to completion (the reply of a call, the ack of a frame), over completed ones.
        total["mean_call_seconds"] = call_seconds / acked if acked else None
        return {**total, "transport": self.scenario.ray.transport, "hosts": self.n_hosts,
                "host_of_shard": list(self.shard_host),
                "max_host_queue": max(self.queue_max) if self.queue_max else 0,
                "slow_polls": sum(self.slow_polls), "host_losses": self._losses()}

    def checkpoints(self) -> dict[int, bytes]:
        return dict(self.saved)

    def shard_nodes(self) -> list[str | None]:
        """The Ray node id of each shard's host at its last poll."""
        return [self.nodes[h] for h in self.shard_host]

    def resident_bytes(self) -> list[int | None]:
        """Resident memory of each host process at its last poll (None without psutil)."""
        return list(self.resident)

    def final_poll(self) -> None:
        """A Ray ``poll`` now, for the run's last sample: the events and crash logs since the
        last one come only with it, and the counters of the same moment with them, so that
        the event log and the record's counters agree. Bounded like every wait on a host;
        a recovery in progress takes one step, as at any sample. A poll asked for earlier and
        still pending is taken first (its events), then every host is polled afresh."""
        late = bool(self.pending_polls)
        # With the hosts' checkpoints: the record ends with the state the run ended in.
        self.last_full_poll = self.last_checkpoint_poll = -np.inf
        self._poll(wait=PENDING_SECONDS)
        if late:
            self.last_full_poll = self.last_checkpoint_poll = -np.inf
            self._poll(wait=PENDING_SECONDS)

    def close(self) -> None:
        """Stop the hosts; a recovery still in progress ends here, recorded as not resumed."""
        for host in list(getattr(self, "recovering", {})):
            down = (self.elapsed() - self.recovering[host].loss["lost_at"]) * self.time_unit
            self._give_up(host, f"not resumed: the run ended {down:.1f} s after the loss, "
                                "before its replacement host was back")
        actors = [a for a in getattr(self, "actors", []) if a is not None]
        # A host given up on may never have been placed: a call to it would wait in vain.
        running = [a for h, a in enumerate(getattr(self, "actors", []))
                   if a is not None and h not in getattr(self, "abandoned", ())]
        for host in list(getattr(self, "monitors", {})):
            self._close_monitor(host)
        try:
            with contextlib.suppress(ray.exceptions.RayError):
                ray.get([a.stop.remote() for a in running], timeout=10)
        finally:
            for actor in actors:
                with contextlib.suppress(ray.exceptions.RayError):
                    ray.kill(actor, no_restart=True)
            if getattr(self, "owns_ray", False):
                ray.shutdown()

