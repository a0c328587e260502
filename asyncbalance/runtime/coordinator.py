"""The coordinator: builds the problem, runs a backend, samples convergence, writes the record.

The run directory is built in a hidden temporary sibling and renamed into place only when
the run has finished, so a failed or interrupted run leaves nothing behind under its name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from threadpoolctl import threadpool_limits

from .. import kernels
from ..errors import InvalidInputError, ResultOverflowError
from ..forward import function_rel_error, probe_inputs
from ..graph import CostGraph, build_cost_graph
from ..io import atomic_write, write_json
from ..network import Network, scale_network
from ..optimum import Certificate, gauge_components, project_gauge, solve_optimum
from ..provenance import provenance, utc_now
from ..regularisers import lp
from .array_sim import ArraySimulator, uses_blocks
from .backends import Backend, backend_factory
from .events import EventWriter
from .partition import UnitShard, partition_units, runs_as_blocks
from .record import Sample, plot_convergence, plot_sweep, write_summary, write_trace_csv
from .scenario import Scenario, ScenarioPoint, build_network
from .shard import ShardSpec, build_shard_specs, gather_log_scales
from .simulator import MessageCounters, Simulator
from .sparse_shard import build_sparse_shard_specs

# Function preservation is exact in exact arithmetic; in float64 the scaled forward pass
# differs by rounding only (a few ulps per layer), far below this bound.
FUNCTION_TOL = 1e-12
# The run's shard checkpoints (Ray) go to checkpoints.msgpack at most this often, and at the
# end: a crash of the driver loses at most this much of them.
CHECKPOINT_WRITE_SECONDS = 30.0


def current_log_scales(runtime: Any, n_units: int, specs: Sequence[ShardSpec]) -> np.ndarray:
    """The global log-scale vector of a runtime: in one scatter where the runtime offers it
    (``log_scale_vector``: 10^5 neuron shards take ~65 ms per sample through per-shard
    arrays), else gathered from each shard's own values."""
    vector = getattr(runtime, "log_scale_vector", None)
    if vector is not None:
        return vector(n_units)
    return gather_log_scales(n_units, specs, runtime.owned_log_scales())


@dataclass(frozen=True, eq=False)
class Problem:
    """Everything derived from a scenario before any backend starts."""

    scenario: Scenario
    network: Network
    graph: CostGraph
    optimum: Certificate
    specs: list[ShardSpec]
    probe: np.ndarray | None


def prepare(scenario: Scenario, base_dir: Path | None = None) -> Problem:
    """Network, cost graph, the exact optimum (ground truth) and the shard specs."""
    network = build_network(scenario.network, base_dir)
    graph = build_cost_graph(network, lp(scenario.balance.p))
    optimum = solve_optimum(graph)
    try:
        # The run checks the function at the optimum's scales: they must fit float64 (a tiny
        # p sends them beyond it), which is known now, before the record is begun.
        scale_network(network, optimum.log_scales)
    except ResultOverflowError as exc:
        raise InvalidInputError("balance.p", f"at p = {scenario.balance.p:g} "
                                f"{str(exc).split(': ', 1)[-1]}; use a larger balance.p"
                                ) from None
    part = scenario.partition
    shards = partition_units(graph, part.granularity, part.shards_per_layer,
                             part.units_per_shard)
    if not shards:
        raise InvalidInputError("network", "has no hidden unit that can be balanced")
    _check_fault_targets(scenario, len(shards))
    if runs_as_blocks(shards):
        # Block runs build their layout from the graph: shards are their units only.
        specs = [UnitShard(sid, units) for sid, units in enumerate(shards)]
    else:
        specs = (build_sparse_shard_specs if graph.sparse else build_shard_specs)(graph, shards)
    has_output = not (network.kind == "recurrent" and "W_out" not in network.weights)
    probe = probe_inputs(network) if has_output else None
    return Problem(scenario, network, graph, optimum, specs, probe)


def _check_fault_targets(scenario: Scenario, n_shards: int) -> None:
    valid = f"0 .. {n_shards - 1} ({n_shards} shards)"
    for i, crash in enumerate(scenario.faults.crashes):
        if not 0 <= crash.shard < n_shards:
            raise InvalidInputError(f"faults.crashes[{i}].shard",
                                    f"no shard {crash.shard}; valid shards are {valid}")
    for i, window in enumerate(scenario.faults.partitions):
        bad = [s for s in window.shards if not 0 <= s < n_shards]
        if bad:
            raise InvalidInputError(f"faults.partitions[{i}].shards",
                                    f"no shard {bad[0]}; valid shards are {valid}")


def make_backend(problem: Problem, events: EventWriter, backend: str,
                 address: str | None) -> Backend:
    """The named backend (the simulator, or one registered by entry point such as Ray)."""
    blocks = uses_blocks(problem.specs)
    if backend == "sim":
        if address:
            raise InvalidInputError("--address", "applies to the Ray backend only, not to "
                                    "'sim'")
        if blocks:
            return ArraySimulator(problem.specs, problem.scenario, events, problem.graph)
        return Simulator(problem.specs, problem.scenario, events)
    # Ray hosts run shard blocks (built from the global graph) for small shards.
    extra = {"graph": problem.graph} if backend == "ray" and blocks else {}
    return backend_factory(backend)(problem.specs, problem.scenario, events, address=address,
                                    **extra)


def _fresh_dir(out_dir: Path) -> Path:
    if out_dir.exists():
        raise InvalidInputError("--out", f"{out_dir} already exists; choose a new directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))


@contextlib.contextmanager
def _building(out_dir: Path):
    """Yield a temporary directory that becomes ``out_dir`` on success and vanishes otherwise."""
    tmp = _fresh_dir(out_dir)
    try:
        yield tmp
        # Refused if another run took the name meanwhile (rename would replace an empty
        # directory, so look first; a non-empty one makes the rename itself fail).
        if out_dir.exists():
            _taken(out_dir)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            _taken(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _taken(out_dir: Path) -> None:
    raise InvalidInputError("--out", f"{out_dir} was created by another run meanwhile; "
                            "choose a new directory")


def _claim_dir(out_dir: Path) -> Path:
    """Create ``out_dir`` itself, exclusively: a second run into the same place is refused."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(out_dir)
    except FileExistsError:
        raise InvalidInputError("--out", f"{out_dir} already exists; choose a new "
                                "directory") from None
    return out_dir


ProgressCallback = Callable[[Sample, Scenario], None]

def run_scenario(scenario: Scenario, out_dir: str | Path, *, backend: str | None = None,
                 address: str | None = None, base_dir: Path | None = None,
                 progress: ProgressCallback | None = None,
                 sweep: dict[str, Any] | None = None,
                 command_line: list[str] | None = None) -> dict[str, Any]:
    """Run one scenario and write its record to ``out_dir`` (which must not exist yet).

    Everything is validated (and the backend started) before the record counts as begun: bad
    input leaves nothing behind. From the start of balancing on, the record is written as the
    run goes (events, checkpoints, a ``running`` summary), so an interrupted run leaves a
    record marked ``incomplete`` rather than nothing. The summary's ``status`` is ``running``
    while the run goes, ``complete`` when a stop condition ended it, ``incomplete`` when it
    was interrupted or failed part-way.
    """
    out = Path(out_dir)
    backend_name = backend or scenario.backend
    problem = prepare(scenario, base_dir)
    directory = _claim_dir(out)
    began = time.perf_counter()
    try:
        events_handle = open(directory / "events.msgpack", "wb")  # noqa: SIM115
    except OSError:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    events = EventWriter(events_handle if scenario.record_events else None)
    events.header(backend_name, problem.graph.n_units, len(problem.specs), scenario.seed)
    if backend_name != "sim":
        single_threaded_blas()  # before the hosts start: see there
    try:
        runtime = make_backend(problem, events, backend_name, address)
    except BaseException:
        events_handle.close()
        shutil.rmtree(directory, ignore_errors=True)
        raise
    run = _Run(problem, directory, backend_name, runtime, events, sweep or {}, began,
               provenance(command_line))
    try:
        with events_handle:
            summary = run.execute(progress)
    except BaseException as exc:
        run.abandon(exc)
        raise
    return summary


_BLAS_LIMIT: list[Any] = []


def single_threaded_blas() -> None:
    """Keep this process's BLAS to one thread from now on (once per process).

    A driver of hosts in other processes shares the machine's cores with them: a BLAS call
    of its samples split over two threads waits for a core a host holds (measured on 2
    cores: a 1 ms sample took 21 ms). Set before the hosts start, and not lifted after the
    run: a change of the limit leaves BLAS threads spinning on a core for a while (measured:
    the start of the hosts took ~100 ms instead of ~4 ms right after one)."""
    if not _BLAS_LIMIT:
        _BLAS_LIMIT.append(threadpool_limits(limits=1, user_api="blas"))


class _Run:
    """One run in progress: samples convergence, keeps the record on disk up to date."""

    def __init__(self, problem: Problem, directory: Path, backend_name: str, runtime: Backend,
                 events: EventWriter, sweep: dict[str, Any], began: float,
                 origin: dict[str, Any]):
        self.problem = problem
        self.directory = directory
        self.backend_name = backend_name
        self.runtime = runtime
        self.events = events
        self.sweep = sweep
        self.began = began
        self.samples: list[Sample] = []
        self.function_errors: list[float] = []
        self.gauge = gauge_components(problem.graph)
        self.run_seconds = 0.0
        self.provenance = origin
        self.closed = False
        self.checkpoints: dict[int, bytes] = {}
        self.checkpoints_pending = False
        self.checkpoints_written = -math.inf
        if hasattr(runtime, "checkpoint_sink"):
            runtime.checkpoint_sink = self._save_checkpoints  # type: ignore[attr-defined]

    # -- the record on disk -------------------------------------------------------------

    def _save_checkpoints(self, fresh: dict[int, bytes]) -> None:
        """Merge ``fresh`` shard checkpoints into the run's; ``checkpoints.msgpack`` follows
        at most every ``CHECKPOINT_WRITE_SECONDS`` and when the run ends. (Merging into the
        file at every poll read, unpacked and rewrote it each second: 322 MB each time at
        10^5 neurons, in the driver that shares the cores with the hosts.)"""
        self.checkpoints.update(fresh)
        self.checkpoints_pending = True
        if time.perf_counter() - self.checkpoints_written >= CHECKPOINT_WRITE_SECONDS:
            self._write_checkpoints()

    def _write_checkpoints(self) -> None:
        if not self.checkpoints_pending:
            return
        with atomic_write(self.directory / "checkpoints.msgpack", "wb") as handle:
            handle.write(msgpack.packb(self.checkpoints, use_bin_type=True))
        self.checkpoints_pending = False
        self.checkpoints_written = time.perf_counter()

    def _write_progress(self, status: str, stop_reason: str) -> None:
        summary = self._summary(status, stop_reason)
        if status == "running":
            # Rewritten every 2 s: without the lists of one entry per shard, which the record
            # of a finished or abandoned run has (6 MB of node ids at 10^5 neuron shards).
            summary.pop("shard_nodes", None)
            if isinstance(summary.get("transport"), dict):
                summary["transport"] = {k: v for k, v in summary["transport"].items()
                                        if k != "host_of_shard"}
        write_summary(self.directory / "summary.json", summary)
        if self.samples:
            write_trace_csv(self.directory / "trace.csv", self.samples)

    def abandon(self, exc: BaseException) -> None:
        """Mark the record incomplete (a Ctrl-C or a failure after the start)."""
        with contextlib.suppress(Exception):
            self._close_runtime()
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else \
            f"failed: {type(exc).__name__}: {exc}"
        try:
            self._write_progress("incomplete", reason)
        except Exception:  # noqa: BLE001 - e.g. a full disk: no room for a new file
            with contextlib.suppress(Exception):
                self._mark_in_place(reason)

    def _mark_in_place(self, reason: str) -> None:
        """Rewrite ``summary.json`` in the space it already holds (a full disk has no room
        for the usual atomic replacement): compact, and without its largest parts if need
        be, so that the record still says it is incomplete and why."""
        path = self.directory / "summary.json"
        room = path.stat().st_size
        summary = self._summary("incomplete", reason)
        for bulky in ("", "scenario", "crash_records", "transport", "shard_cost_bytes",
                      "gauge_components", "provenance", "actor_resident_bytes", "shard_nodes"):
            summary.pop(bulky, None)
            text = json.dumps(summary, separators=(",", ":"), default=str).encode()
            if len(text) <= room:
                break
        with open(path, "r+b") as handle:
            handle.write(text)
            handle.truncate()

    def _close_runtime(self) -> None:
        """Close the backend (its last poll may bring checkpoints), then write the run's
        checkpoints that are not on disk yet."""
        if not self.closed:
            self.closed = True
            try:
                self.runtime.close()
            finally:
                self._write_checkpoints()

    # -- the run ------------------------------------------------------------------------

    def error_of(self, u: np.ndarray) -> float:
        """max |u - u*| with each gauge component's mean removed (u* has mean 0 there)."""
        if not u.size:
            return 0.0
        projected = project_gauge(u.copy(), self.gauge) if self.gauge else u
        return float(np.max(np.abs(projected - self.problem.optimum.log_scales)))

    def execute(self, progress: ProgressCallback | None) -> dict[str, Any]:
        problem, runtime = self.problem, self.runtime
        scenario = problem.scenario
        stop = scenario.stop
        cost_star = problem.optimum.cost
        self.runtime.start()
        run_began = time.perf_counter()
        # One clock in scenario time units on every backend (Ray: wall / ray.time_unit).
        interval = stop.sample_interval if self.backend_name == "sim" else \
            scenario.ray.sample_seconds / scenario.ray.time_unit
        horizon = stop.max_time
        # Faults are part of the experiment: tolerance ends a run only after they played out.
        faults_end = max([c.at + c.down_for for c in scenario.faults.crashes]
                         + [w.stop for w in scenario.faults.partitions] + [0.0])
        clock = 0.0
        index = 0
        last_flush = time.perf_counter()
        self._write_progress("running", "")
        while True:
            wall = time.perf_counter() - run_began
            counters = runtime.message_counters()
            u = current_log_scales(runtime, problem.graph.n_units, problem.specs)
            error = self.error_of(u)
            if not np.isfinite(error):
                # A step too large for the gradient-flow rule (or too little damping).
                stop_reason = "diverged"
            elif error <= stop.tol and clock >= faults_end:
                stop_reason = "tolerance"
            elif clock >= horizon:
                stop_reason = "max_time"
            elif wall >= stop.max_wall_seconds:
                stop_reason = "max_wall_seconds"
            elif counters.sent >= stop.max_messages:
                stop_reason = "max_messages"
            else:
                stop_reason = ""
            final_poll = getattr(runtime, "final_poll", None)
            if stop_reason and final_poll is not None:
                # A backend that collects events and counters less often than the state
                # brings them up to date, so the last sample, the log and the record agree.
                final_poll()
                counters = runtime.message_counters()
            sample = self._sample(u, error, clock, wall, counters, cost_star,
                                  check_function=(stop.function_check == "every_sample"
                                                  or bool(stop_reason)))
            if sample.function_rel_error is not None:
                self.function_errors.append(sample.function_rel_error)
            self.samples.append(sample)
            self.events.write("sample", clock, sample.max_abs_error, sample.relative_cost_gap,
                              sample.messages_sent, sample.messages_delivered,
                              sample.messages_dropped, sample.function_rel_error)
            if progress is not None:
                progress(sample, scenario)
            if stop_reason:
                break
            if time.perf_counter() - last_flush >= 2.0:
                # The record on disk follows the run: a crash of this process loses little.
                last_flush = time.perf_counter()
                if self.events.handle is not None:
                    self.events.handle.flush()
                self._write_progress("running", "")
            index += 1
            clock = runtime.advance(min(index * interval, horizon))
        self.run_seconds = time.perf_counter() - run_began
        self._close_runtime()
        summary = self._summary("complete", stop_reason)
        directory = self.directory
        if not scenario.record_events:
            (directory / "events.msgpack").unlink()
        write_trace_csv(directory / "trace.csv", self.samples)
        label = "simulated time units" if self.backend_name == "sim" else \
            f"time units (wall seconds / {scenario.ray.time_unit:g})"
        plot_convergence(directory / "convergence.png", self.samples, stop.tol, label,
                         f"{scenario.name} ({self.backend_name}, {scenario.balance.rule})")
        write_summary(directory / "summary.json", summary)
        return summary

    def _summary(self, status: str, stop_reason: str) -> dict[str, Any]:
        problem, runtime, scenario = self.problem, self.runtime, self.problem.scenario
        stop = scenario.stop
        counters = runtime.message_counters()
        final = self.samples[-1] if self.samples else None
        converged = stop_reason == "tolerance"
        errors = self.function_errors
        ray_clock = self.backend_name != "sim"
        summary: dict[str, Any] = {
            "name": scenario.name,
            "status": status,
            "converged": converged,
            "stop_reason": stop_reason,
            "tol": stop.tol,
            "max_abs_log_scale_error": final.max_abs_error if final else None,
            "distance_measure": ("max |u - u*| after removing each gauge component's mean"
                                 if self.gauge else "max |u - u*|"),
            "gauge_components": [[int(i) for i in c] for c in self.gauge],
            "relative_cost_gap": final.relative_cost_gap if final else None,
            "max_log_imbalance": final.max_log_imbalance if final else None,
            "function_max_rel_error": max(errors) if errors else None,
            "function_checks": len(errors),
            "function_tol": FUNCTION_TOL,
            "function_exact": all(e <= FUNCTION_TOL for e in errors) if errors else None,
            "messages_sent": counters.sent,
            "messages_delivered": counters.delivered,
            "messages_dropped": counters.dropped,
            "messages_duplicated": counters.duplicated,
            "messages_per_unit": counters.sent / max(problem.graph.n_units, 1),
            "unit_updates": counters.unit_updates,
            "crashes": counters.crashes,
            "restarts": counters.restarts,
            "wall_seconds": time.perf_counter() - self.began,
            "run_seconds": self.run_seconds,
            "sim_time": final.time if final and not ray_clock else None,
            "time_to_tol": final.time if converged and final else None,
            "wall_seconds_to_tol": final.wall_seconds if converged and final else None,
            "time_unit": ("simulated time units" if not ray_clock else
                          f"time units of {scenario.ray.time_unit:g} wall seconds"),
            "backend": self.backend_name,
            "clock": "simulated" if not ray_clock else scenario.ray.clock,
            "rule": scenario.balance.rule,
            "p": scenario.balance.p,
            "n_units": problem.graph.n_units,
            "n_shards": len(problem.specs),
            "seed": scenario.seed,
            "samples": len(self.samples),
            "events": self.events.count,
            "optimum_cost": problem.optimum.cost,
            "optimum_seconds": problem.optimum.seconds,
            "sweep": self.sweep,
            "scenario": dataclasses.asdict(scenario),
            "provenance": {**self.provenance, "finished_utc": utc_now()},
        }
        if not ray_clock:
            busy = getattr(runtime, "busy_seconds", 0.0)
            summary["unit_updates_per_second"] = counters.unit_updates / busy if busy else None
        summary["shard_cost_bytes"] = (None if runs_as_blocks([s.units for s in problem.specs])
                                       else [spec.cost_bytes for spec in problem.specs])
        for key, method in (("actor_resident_bytes", "resident_bytes"),
                            ("shard_nodes", "shard_nodes"), ("transport", "transport"),
                            ("crash_records", "crash_records")):
            getter = getattr(runtime, method, None)
            summary[key] = getter() if getter is not None else None
        return summary

    def _sample(self, u: np.ndarray, error: float, clock: float, wall: float,
                counters: MessageCounters, cost_star: float, check_function: bool) -> Sample:
        problem = self.problem
        graph = problem.graph
        flows = kernels.unit_flows(graph, u)
        cost = kernels.total_cost(graph, u, flows)
        function_error = None
        if check_function and problem.probe is not None:
            function_error = function_rel_error(problem.network,
                                                scale_network(problem.network, u),
                                                problem.probe)
        return Sample(
            time=float(clock), wall_seconds=float(wall), max_abs_error=error,
            relative_cost_gap=(cost - cost_star) / cost_star if cost_star else 0.0,
            max_log_imbalance=kernels.max_log_imbalance(graph, u, flows),
            messages_sent=counters.sent, messages_delivered=counters.delivered,
            messages_dropped=counters.dropped, unit_updates=counters.unit_updates,
            function_rel_error=function_error)


def run_points(points: Sequence[ScenarioPoint], out_dir: str | Path, *,
               backend: str | None = None, address: str | None = None,
               progress: ProgressCallback | None = None,
               command_line: list[str] | None = None) -> dict[str, Any]:
    """Run a scenario file's points: one run directory, or a sweep directory of runs.

    A sweep directory holds ``point-NNN/`` run records, ``sweep.json`` (one row per point)
    and ``sweep.png`` (time to tolerance against the first numeric swept key).
    """
    out = Path(out_dir)
    if len(points) == 1 and not points[0].sweep:
        point = points[0]
        return run_scenario(point.scenario, out, backend=backend, address=address,
                            base_dir=point.base_dir, progress=progress,
                            command_line=command_line)
    with _building(out) as tmp:
        rows = []
        for i, point in enumerate(points):
            summary = run_scenario(point.scenario, tmp / f"point-{i:03d}", backend=backend,
                                   address=address, base_dir=point.base_dir,
                                   progress=progress, sweep=point.sweep,
                                   command_line=command_line)
            rows.append({"point": f"point-{i:03d}", "sweep": point.sweep,
                         **{k: summary[k] for k in (
                             "converged", "time_to_tol", "max_abs_log_scale_error",
                             "function_max_rel_error", "messages_sent", "messages_delivered",
                             "messages_dropped", "wall_seconds", "sim_time", "backend",
                             "n_units", "n_shards", "seed", "time_unit")}})
        keys = list(points[0].sweep)
        numeric = [k for k in keys if all(isinstance(p.sweep[k], int | float)
                                          and not isinstance(p.sweep[k], bool) for p in points)]
        sweep = {"name": points[0].scenario.name, "points": rows, "keys": keys}
        write_json(tmp / "sweep.json", sweep)
        if numeric:
            x_key = numeric[0]
            times = [r["time_to_tol"] for r in rows if r["time_to_tol"] is not None]
            if times and all(math.isfinite(t) for t in times):
                plot_sweep(tmp / "sweep.png", rows, x_key, [k for k in keys if k != x_key],
                           rows[0]["time_unit"])
        return sweep
