"""The coordinator: builds the problem, runs a backend, samples convergence, writes the record.

The run directory is built in a hidden temporary sibling and renamed into place only when
the run has finished, so a failed or interrupted run leaves nothing behind under its name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .. import kernels
from ..errors import InvalidInputError
from ..forward import function_rel_error, probe_inputs
from ..graph import CostGraph, build_cost_graph
from ..io import write_json
from ..network import Network, scale_network
from ..optimum import Certificate, solve_optimum
from ..regularisers import lp
from .events import EventWriter
from .partition import partition_units
from .record import Sample, plot_convergence, plot_sweep, write_summary, write_trace_csv
from .scenario import Scenario, ScenarioPoint, build_network
from .shard import ShardSpec, build_shard_specs, gather_log_scales
from .simulator import MessageCounters, Simulator

# Function preservation is exact in exact arithmetic; in float64 the scaled forward pass
# differs by rounding only (a few ulps per layer), far below this bound.
FUNCTION_TOL = 1e-12


class Backend(Protocol):
    name: str

    def start(self) -> None: ...
    def advance(self, until: float) -> float: ...
    def owned_log_scales(self) -> list[np.ndarray]: ...
    def message_counters(self) -> MessageCounters: ...
    def close(self) -> None: ...


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
    part = scenario.partition
    shards = partition_units(graph, part.granularity, part.shards_per_layer,
                             part.units_per_shard)
    if not shards:
        raise InvalidInputError("network", "has no hidden unit that can be balanced")
    _check_fault_targets(scenario, len(shards))
    specs = build_shard_specs(graph, shards)
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
    if backend == "sim":
        return Simulator(problem.specs, problem.scenario, events)
    if backend == "ray":
        # Imported only here: the runtime package itself never imports Ray.
        module = importlib.import_module("actors.backend")
        return module.RayBackend(problem.specs, problem.scenario, events, address)
    raise InvalidInputError("backend", f"unknown backend {backend!r}", ("sim", "ray"))


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
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


ProgressCallback = Callable[[Sample, Scenario], None]


def run_scenario(scenario: Scenario, out_dir: str | Path, *, backend: str | None = None,
                 address: str | None = None, base_dir: Path | None = None,
                 progress: ProgressCallback | None = None,
                 sweep: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one scenario and write its record to ``out_dir`` (which must not exist yet)."""
    out = Path(out_dir)
    with _building(out) as tmp:
        return _run_into(tmp, scenario, backend or scenario.backend, address, base_dir,
                         progress, sweep or {})


def _run_into(directory: Path, scenario: Scenario, backend_name: str, address: str | None,
              base_dir: Path | None, progress: ProgressCallback | None,
              sweep: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    problem = prepare(scenario, base_dir)
    stop = scenario.stop
    u_star = problem.optimum.log_scales
    cost_star = problem.optimum.cost
    samples: list[Sample] = []
    function_errors: list[float] = []
    with open(directory / "events.msgpack", "wb") as handle:
        events = EventWriter(handle if scenario.record_events else None)
        events.header(backend_name, problem.graph.n_units, len(problem.specs), scenario.seed)
        runtime = make_backend(problem, events, backend_name, address)
        try:
            runtime.start()
            run_began = time.perf_counter()
            if backend_name == "sim":
                interval, horizon = stop.sample_interval, stop.max_time
            else:
                interval = scenario.ray.sample_seconds
                horizon = stop.max_time * scenario.ray.time_unit
            # Faults are part of the experiment: tolerance ends a run only after they played out.
            faults_end = max([c.at + c.down_for for c in scenario.faults.crashes]
                             + [w.stop for w in scenario.faults.partitions] + [0.0])
            if backend_name != "sim":
                faults_end *= scenario.ray.time_unit
            clock = 0.0
            stop_reason = "max_time"
            index = 0
            while True:
                wall = time.perf_counter() - run_began
                counters = runtime.message_counters()
                u = gather_log_scales(problem.graph.n_units, problem.specs,
                                      runtime.owned_log_scales())
                error = float(np.max(np.abs(u - u_star))) if u.size else 0.0
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
                final_check = bool(stop_reason)
                sample = _sample(problem, u, clock, wall, counters, cost_star,
                                 check_function=(stop.function_check == "every_sample"
                                                 or final_check))
                if sample.function_rel_error is not None:
                    function_errors.append(sample.function_rel_error)
                samples.append(sample)
                events.write("sample", clock, sample.max_abs_error, sample.relative_cost_gap,
                             sample.messages_sent, sample.messages_delivered,
                             sample.messages_dropped, sample.function_rel_error)
                if progress is not None:
                    progress(sample, scenario)
                if stop_reason:
                    break
                index += 1
                clock = runtime.advance(min(index * interval, horizon))
            counters = runtime.message_counters()
            run_seconds = time.perf_counter() - run_began
        finally:
            runtime.close()
    final = samples[-1]
    converged = stop_reason == "tolerance"
    time_to_tol = final.time if converged else None
    summary: dict[str, Any] = {
        "name": scenario.name,
        "converged": converged,
        "stop_reason": stop_reason,
        "tol": stop.tol,
        "max_abs_log_scale_error": final.max_abs_error,
        "relative_cost_gap": final.relative_cost_gap,
        "max_log_imbalance": final.max_log_imbalance,
        "function_max_rel_error": max(function_errors) if function_errors else None,
        "function_checks": len(function_errors),
        "function_tol": FUNCTION_TOL,
        "function_exact": (all(e <= FUNCTION_TOL for e in function_errors)
                           if function_errors else None),
        "messages_sent": counters.sent,
        "messages_delivered": counters.delivered,
        "messages_dropped": counters.dropped,
        "messages_duplicated": counters.duplicated,
        "messages_per_unit": counters.sent / max(problem.graph.n_units, 1),
        "unit_updates": counters.unit_updates,
        "crashes": counters.crashes,
        "restarts": counters.restarts,
        "wall_seconds": time.perf_counter() - started,
        "run_seconds": run_seconds,
        "sim_time": final.time if backend_name == "sim" else None,
        "time_to_tol": time_to_tol,
        "time_unit": "simulated" if backend_name == "sim" else "seconds",
        "backend": backend_name,
        "rule": scenario.balance.rule,
        "p": scenario.balance.p,
        "n_units": problem.graph.n_units,
        "n_shards": len(problem.specs),
        "seed": scenario.seed,
        "samples": len(samples),
        "events": events.count,
        "optimum_cost": cost_star,
        "optimum_seconds": problem.optimum.seconds,
        "sweep": sweep,
        "scenario": dataclasses.asdict(scenario),
    }
    if backend_name == "sim":
        busy = getattr(runtime, "busy_seconds", 0.0)
        summary["unit_updates_per_second"] = counters.unit_updates / busy if busy else None
    summary["shard_cost_bytes"] = [spec.cost_bytes for spec in problem.specs]
    resident = getattr(runtime, "resident_bytes", None)
    summary["actor_resident_bytes"] = resident() if resident is not None else None
    # Where each shard last ran (Ray node ids; a restart elsewhere shows), None in simulation.
    nodes = getattr(runtime, "shard_nodes", None)
    summary["shard_nodes"] = nodes() if nodes is not None else None
    if not scenario.record_events:
        (directory / "events.msgpack").unlink()
    write_summary(directory / "summary.json", summary)
    write_trace_csv(directory / "trace.csv", samples)
    label = "simulated time" if backend_name == "sim" else "wall seconds"
    plot_convergence(directory / "convergence.png", samples, stop.tol, label,
                     f"{scenario.name} ({backend_name}, {scenario.balance.rule})")
    return summary


def _sample(problem: Problem, u: np.ndarray, clock: float, wall: float,
            counters: MessageCounters, cost_star: float, check_function: bool) -> Sample:
    graph = problem.graph
    flows = kernels.unit_flows(graph, u)
    cost = kernels.total_cost(graph, u, flows)
    function_error = None
    if check_function and problem.probe is not None:
        function_error = function_rel_error(problem.network, scale_network(problem.network, u),
                                            problem.probe)
    return Sample(
        time=float(clock), wall_seconds=float(wall),
        max_abs_error=float(np.max(np.abs(u - problem.optimum.log_scales))) if u.size else 0.0,
        relative_cost_gap=(cost - cost_star) / cost_star if cost_star else 0.0,
        max_log_imbalance=kernels.max_log_imbalance(graph, u, flows),
        messages_sent=counters.sent, messages_delivered=counters.delivered,
        messages_dropped=counters.dropped, unit_updates=counters.unit_updates,
        function_rel_error=function_error)


def run_points(points: Sequence[ScenarioPoint], out_dir: str | Path, *,
               backend: str | None = None, address: str | None = None,
               progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Run a scenario file's points: one run directory, or a sweep directory of runs.

    A sweep directory holds ``point-NNN/`` run records, ``sweep.json`` (one row per point)
    and ``sweep.png`` (time to tolerance against the first numeric swept key).
    """
    out = Path(out_dir)
    if len(points) == 1 and not points[0].sweep:
        point = points[0]
        return run_scenario(point.scenario, out, backend=backend, address=address,
                            base_dir=point.base_dir, progress=progress)
    with _building(out) as tmp:
        rows = []
        for i, point in enumerate(points):
            summary = run_scenario(point.scenario, tmp / f"point-{i:03d}", backend=backend,
                                   address=address, base_dir=point.base_dir,
                                   progress=progress, sweep=point.sweep)
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
