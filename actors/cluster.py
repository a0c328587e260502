"""A real multi-node Ray cluster on one machine, for tests, benchmarks and demonstrations.

``LocalCluster`` starts a head node and worker nodes (each its own raylet, object store and
worker processes) with ``ray.cluster_utils.Cluster``, all on this machine (they talk over the
machine's own address, which never leaves it), in a private temporary directory. The private
directory matters on a shared machine: Ray records "the current cluster" in its temporary
directory, and a plain ``ray.init()`` anywhere else on the machine would otherwise connect to
this cluster instead of starting its own.

Use it from a process of its own (a Ray driver is connected to one cluster at a time)::

    with LocalCluster(nodes=3) as cluster:
        run_scenario(scenario, out, backend="ray", address=cluster.address)
        placement = actor_placement("HostActor")

``actor_placement`` reads from the cluster's control store (GCS) on which node each actor
was placed, dead actors included, so it also answers after a run has ended; it needs no
dashboard. ``remove_node`` kills every process of a worker node, as a machine failure would.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

NODE_RESOURCE_PREFIX = "asyncbalance_node_"


@dataclass(frozen=True)
class NodeInfo:
    """One node of the cluster: its index (0 = head), Ray node id and custom resource."""

    index: int
    node_id: str
    resource: str
    alive: bool


@dataclass(frozen=True)
class ActorPlacement:
    """Where one actor ran: Ray actor id, node id, process id and its state (ALIVE, DEAD...)."""

    actor_id: str
    class_name: str
    node_id: str
    pid: int | None
    state: str
    num_restarts: int


class ClusterError(RuntimeError):
    """The local cluster could not be started, reached or changed as asked."""


class LocalCluster:
    """``nodes`` Ray nodes on this machine (a head and ``nodes - 1`` workers).

    Args:
        nodes: number of nodes, >= 1.
        cpus_per_node: logical CPUs each node advertises (they share the machine's cores).
        object_store_mb: object store size of each node.
        start_timeout: seconds to wait for each node to register before giving up.

    Each node ``i`` also advertises one unit of the custom resource ``asyncbalance_node_i``,
    so work can be pinned to a node with ``resources={"asyncbalance_node_i": 0.001}``.
    """

    def __init__(self, nodes: int = 3, cpus_per_node: float = 1.0, object_store_mb: int = 80,
                 start_timeout: float = 60.0):
        if not isinstance(nodes, int) or nodes < 1:
            raise ValueError(f"nodes: must be an integer >= 1, got {nodes!r}")
        if not cpus_per_node > 0:
            raise ValueError(f"cpus_per_node: must be > 0, got {cpus_per_node!r}")
        if object_store_mb < 50:
            raise ValueError(f"object_store_mb: must be >= 50 (Ray's minimum), got "
                             f"{object_store_mb!r}")
        self.n_nodes = nodes
        self.cpus_per_node = cpus_per_node
        self.object_store_mb = object_store_mb
        self.start_timeout = start_timeout
        self.temp_dir: str | None = None
        self._saved_tmpdir: str | None = None
        self._cluster: Any = None
        self._nodes: dict[int, Any] = {}
        self._removed: set[int] = set()
        self.start_seconds: float | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> LocalCluster:
        began = time.perf_counter()
        # A short private directory: Ray's unix sockets live in it (their paths are limited
        # to ~107 characters) and so does its "current cluster" file (see the module doc).
        self.temp_dir = tempfile.mkdtemp(prefix="abray-", dir="/tmp")
        self._saved_tmpdir = os.environ.get("RAY_TMPDIR")
        os.environ["RAY_TMPDIR"] = self.temp_dir
        from ray.cluster_utils import Cluster

        try:
            self._cluster = Cluster(initialize_head=True, head_node_args=self._node_args(0))
            self._nodes[0] = self._cluster.head_node
            for index in range(1, self.n_nodes):
                self._nodes[index] = self._cluster.add_node(**self._node_args(index))
            self._cluster.wait_for_nodes(timeout=self.start_timeout)
        except BaseException as exc:
            self.shutdown()
            if isinstance(exc, Exception):
                raise ClusterError(f"could not start a {self.n_nodes}-node local Ray cluster: "
                                   f"{exc}") from exc
            raise
        self.start_seconds = time.perf_counter() - began
        return self

    def _node_args(self, index: int) -> dict[str, Any]:
        return {"num_cpus": self.cpus_per_node,
                "object_store_memory": self.object_store_mb * 1024 * 1024,
                "include_dashboard": False,
                "resources": {f"{NODE_RESOURCE_PREFIX}{index}": 1.0}}

    @property
    def address(self) -> str:
        """The cluster's address (GCS host:port), for ``ray.init`` or ``--address``."""
        if self._cluster is None:
            raise ClusterError("the cluster is not running")
        return str(self._cluster.address)

    def node_ids(self) -> dict[int, str]:
        """Ray node id of each node index that was started (removed ones included)."""
        return {i: node.node_id for i, node in self._nodes.items()}

    def nodes(self) -> list[NodeInfo]:
        """Every node with its liveness as the control store sees it (needs ``ray.init``)."""
        import ray

        alive = {n["NodeID"]: bool(n["Alive"]) for n in ray.nodes()}
        return [NodeInfo(i, node.node_id, f"{NODE_RESOURCE_PREFIX}{i}",
                         alive.get(node.node_id, False)) for i, node in self._nodes.items()]

    def index_of(self, node_id: str) -> int:
        for index, node in self._nodes.items():
            if node.node_id == node_id:
                return index
        raise ClusterError(f"node_id: {node_id} is not a node of this cluster")

    def remove_node(self, index: int, graceful: bool = False) -> str:
        """Kill every process of worker node ``index`` (not the head); returns its node id."""
        if index == 0:
            raise ClusterError("index: node 0 is the head node; removing it ends the cluster")
        if index not in self._nodes or index in self._removed:
            raise ClusterError(f"index: no live worker node {index} (nodes 1 .. "
                               f"{self.n_nodes - 1}, removed {sorted(self._removed)})")
        node = self._nodes[index]
        self._cluster.remove_node(node, allow_graceful=graceful)
        self._removed.add(index)
        return str(node.node_id)

    def shutdown(self) -> None:
        """Stop every node and delete the private directory; safe to call twice."""
        cluster, self._cluster = self._cluster, None
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
            if cluster is not None:
                cluster.shutdown()
        finally:
            if self._saved_tmpdir is None:
                os.environ.pop("RAY_TMPDIR", None)
            else:
                os.environ["RAY_TMPDIR"] = self._saved_tmpdir
            if self.temp_dir is not None:
                shutil.rmtree(self.temp_dir, ignore_errors=True)
                self.temp_dir = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


def actor_placement(class_name: str | None = None) -> list[ActorPlacement]:
    """Every actor the connected cluster knows of (dead ones too), with its node.

    Read from the control store (``ray._private.state``), which needs no dashboard; Ray's
    public state API (``ray.util.state.list_actors``) gives the same through the dashboard.
    """
    import ray
    from ray._private import state

    if not ray.is_initialized():
        raise ClusterError("actor_placement needs a connected Ray (ray.init)")
    table: Mapping[str, Mapping[str, Any]] = state.actors()
    placements = []
    for actor_id, info in table.items():
        name = str(info.get("ActorClassName", ""))
        if class_name is not None and name != class_name:
            continue
        address = info.get("Address") or {}
        pid = info.get("Pid")
        placements.append(ActorPlacement(
            actor_id=str(actor_id), class_name=name, node_id=str(address.get("NodeID", "")),
            pid=int(pid) if pid else None, state=str(info.get("State", "")),
            num_restarts=int(info.get("NumRestarts", 0) or 0)))
    return placements


# The HTTP/2 client preface and an empty SETTINGS frame: a Ray cluster's control store
# (and Ray Client's server) speaks gRPC over HTTP/2 and answers with its own SETTINGS frame.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_SETTINGS_FRAME = 4


def check_address(address: str, timeout: float = 10.0) -> None:
    """Fail fast, naming ``address``, when no Ray cluster answers at ``host:port``.

    A TCP connection alone is not enough (``ray.init`` then retries for minutes against
    whatever listens there): the address must answer an HTTP/2 preface with a SETTINGS
    frame, as Ray's gRPC servers do, within ``timeout``.
    """
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"address: expected HOST:PORT, got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as conn:
            conn.sendall(_HTTP2_PREFACE)
            reply = b""
            while len(reply) < 9:
                chunk = conn.recv(9 - len(reply))
                if not chunk:
                    break
                reply += chunk
    except TimeoutError:
        raise ClusterError(f"address: {address} accepts connections but is not a Ray cluster "
                           f"(no gRPC answer within {timeout:g} s)") from None
    except OSError as exc:
        raise ClusterError(f"address: no Ray cluster answers at {address} ({exc})") from None
    if len(reply) < 9 or reply[3] != _SETTINGS_FRAME:
        seen = reply[:20].decode("ascii", "replace").strip() or "nothing"
        raise ClusterError(f"address: {address} is not a Ray cluster (it answered "
                           f"{seen!r} where Ray's gRPC server answers HTTP/2)")


# -- a scenario on a fresh local cluster (used by the tests and benchmarks as a subprocess) ---

@dataclass
class NodeRemoval:
    """Remove the worker node hosting the most live shard hosts after ``after_samples``.

    ``done_at_sample``: the sample after which the removal began; ``wall_seconds``: when
    (seconds since the run began); ``declared_dead_seconds``: how long the control store
    took to declare the node dead (None if it had not within 30 s); ``error``: why the
    removal failed, if it did.
    """

    after_samples: int
    done_at_sample: int | None = None
    node_index: int | None = None
    node_id: str | None = None
    actors_on_node: int = 0
    wall_seconds: float | None = None
    declared_dead_seconds: float | None = None
    error: str | None = None


def run_on_local_cluster(scenario_path: str, out_dir: str, nodes: int = 3,
                         overrides: tuple[str, ...] = (), cpus_per_node: float = 1.0,
                         removal_after_samples: tuple[int | None, ...] = (None,)
                         ) -> dict[str, Any]:
    """Start ``nodes`` local nodes and run the scenario through the Ray backend, once per entry
    of ``removal_after_samples`` (None: undisturbed; K: the worker node hosting the most live
    shard actors is killed after K convergence samples), one after the other on the same
    cluster. Run ``i`` writes its record to ``out_dir/run-i``.

    Returns a JSON-ready report: the cluster's start-up seconds and, per run, the summary's
    main fields (or the error), every shard actor of that run with the index of the node it
    ran on, the number of distinct nodes used and the node removed, if any.
    """
    import ray

    from asyncbalance.runtime.memory_estimate import check_scenario_memory
    from asyncbalance.runtime.scenario import load_scenarios

    points = load_scenarios(scenario_path, list(overrides))
    if len(points) != 1 or points[0].sweep:
        raise ClusterError(f"scenario: {scenario_path} is a sweep of {len(points)} points; "
                           "give one scenario")
    check_scenario_memory(points[0].scenario)
    report: dict[str, Any] = {"nodes": nodes, "scenario": scenario_path,
                              "overrides": list(overrides), "runs": []}
    with LocalCluster(nodes=nodes, cpus_per_node=cpus_per_node) as cluster:
        report["cluster_start_seconds"] = cluster.start_seconds
        report["node_ids"] = cluster.node_ids()
        report["temp_dir"] = cluster.temp_dir
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        for i, after in enumerate(removal_after_samples):
            report["runs"].append(_one_run(cluster, points[0], f"{out_dir}/run-{i}", after))
    return report


def _one_run(cluster: LocalCluster, point: Any, out_dir: str,
             remove_after: int | None) -> dict[str, Any]:
    from asyncbalance.runtime.coordinator import run_scenario

    before = {p.actor_id for p in actor_placement("HostActor")}
    removal = NodeRemoval(remove_after) if remove_after is not None else None
    began = time.perf_counter()
    seen = {"samples": 0}

    remover: threading.Thread | None = None

    def progress(sample: Any, scenario: Any) -> None:
        nonlocal remover
        seen["samples"] += 1
        if removal is None or removal.done_at_sample is not None:
            return
        if seen["samples"] >= removal.after_samples:
            removal.done_at_sample = seen["samples"]
            removal.wall_seconds = time.perf_counter() - began
            # In its own thread: the run keeps sampling while the node goes away, so its
            # record shows the outage as it happened rather than a gap.
            remover = threading.Thread(target=_remove_busiest_worker, args=(cluster, removal),
                                       name="node-removal", daemon=True)
            remover.start()

    run: dict[str, Any] = {"out": out_dir}
    try:
        summary = run_scenario(point.scenario, out_dir, backend="ray", address=cluster.address,
                               base_dir=point.base_dir, progress=progress)
        run["summary"] = {k: summary.get(k) for k in (
            "converged", "stop_reason", "max_abs_log_scale_error", "function_max_rel_error",
            "function_exact", "messages_sent", "crashes", "restarts", "n_shards", "n_units",
            "run_seconds", "time_to_tol", "shard_nodes", "transport")}
        run["error"] = None
    except Exception as exc:  # reported to the caller, which decides what it means
        run["summary"] = None
        run["error"] = f"{type(exc).__name__}: {exc}"
    if remover is not None:
        remover.join(timeout=60.0)
    run["seconds"] = time.perf_counter() - began
    if removal is not None and run["error"] is None:
        if removal.done_at_sample is None:
            run["error"] = (f"the run ended after {seen['samples']} samples, before the node "
                            f"removal planned after {removal.after_samples}; nothing was "
                            "removed (lower --removal-run or tighten stop.tol)")
        elif removal.error is not None:
            run["error"] = f"the node removal failed: {removal.error}"
    index = {node_id: i for i, node_id in cluster.node_ids().items()}
    placements = [p for p in actor_placement("HostActor") if p.actor_id not in before]
    run["actors"] = [{"actor_id": p.actor_id, "node": index.get(p.node_id), "state": p.state,
                      "num_restarts": p.num_restarts} for p in placements]
    run["distinct_nodes"] = len({p.node_id for p in placements})
    run["removal"] = None if removal is None else dict(removal.__dict__)
    return run


def _remove_busiest_worker(cluster: LocalCluster, removal: NodeRemoval) -> None:
    try:
        _remove_busiest(cluster, removal)
    except Exception as exc:  # noqa: BLE001 - reported in the run's report
        removal.error = f"{type(exc).__name__}: {exc}"


def _remove_busiest(cluster: LocalCluster, removal: NodeRemoval) -> None:
    live = [p for p in actor_placement("HostActor") if p.state == "ALIVE"]
    counts: dict[int, int] = {}
    for placement in live:
        try:
            i = cluster.index_of(placement.node_id)
        except ClusterError:
            continue
        if i != 0:
            counts[i] = counts.get(i, 0) + 1
    if not counts:
        raise ClusterError("no worker node hosts a live shard actor; nothing to remove")
    index = max(counts, key=lambda i: (counts[i], -i))
    removal.node_index = index
    removal.actors_on_node = counts[index]
    removal.node_id = cluster.remove_node(index)
    # Wait (bounded) until the control store has declared the node dead, so that what the
    # run sees next is a lost node, not one whose processes are still winding down.
    import ray

    removed_at = time.monotonic()
    deadline = removed_at + 30.0
    while time.monotonic() < deadline:
        if not any(n["NodeID"] == removal.node_id and n.get("Alive") for n in ray.nodes()):
            removal.declared_dead_seconds = time.monotonic() - removed_at
            return
        time.sleep(0.1)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import sys

    from asyncbalance.errors import BalanceError

    parser = argparse.ArgumentParser(
        prog="python -m actors.cluster",
        description="Run a scenario on a fresh multi-node Ray cluster on this machine and "
                    "print a JSON report of where its shard actors ran.")
    parser.add_argument("scenario", metavar="SCENARIO.toml")
    parser.add_argument("--out", required=True, metavar="DIR", help="run directory to create")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--cpus-per-node", type=float, default=1.0)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE")
    parser.add_argument("--removal-run", type=int, action="append", default=[], metavar="K",
                        help="after the undisturbed run, run again and kill the worker node "
                             "with the most shard actors after K samples (repeatable)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the undisturbed run (only the --removal-run runs)")
    parser.add_argument("--report", metavar="FILE", help="also write the report here")
    args = parser.parse_args(argv)
    if args.no_baseline and not args.removal_run:
        parser.error("--no-baseline needs at least one --removal-run")
    # A termination ends like Ctrl-C: the cluster is torn down and its directory removed,
    # and a run in progress leaves a record marked incomplete.
    signal.signal(signal.SIGTERM, _interrupt)
    runs = tuple(args.removal_run) if args.no_baseline else (None, *args.removal_run)
    # Ray's node processes inherit stdout and log to it ("(raylet) ..."): while they run,
    # stdout is stderr, so that stdout carries the JSON report alone.
    sys.stdout.flush()
    saved_stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        report = run_on_local_cluster(args.scenario, args.out, args.nodes,
                                      tuple(args.overrides), args.cpus_per_node, runs)
    except (BalanceError, ClusterError) as exc:
        # A bad key, a scenario that cannot fit, a cluster that cannot start: one line.
        print(f"python -m actors.cluster: error: {args.scenario}: {exc}", file=sys.stderr)
        return 2
    finally:
        sys.stdout.flush()
        os.dup2(saved_stdout, 1)
        os.close(saved_stdout)
    text = json.dumps(report, indent=1, default=str)
    if args.report:
        with open(args.report, "w") as handle:
            handle.write(text)
    print(text)
    sys.stdout.flush()
    return 0 if all(run["error"] is None for run in report["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
