"""Runtime benchmarks, measured side by side in one run, printed as ratios.

1. Simulator throughput (unit-updates per second of simulator time on one core) on a
   784-512-512-512-10 MLP in 12 layer shards, event log on.
2. Ray backend, free-running clock, same net, 4 shards on a local Ray, on the default hosts
   (one per CPU) and on one host: wall time from the start of balancing to max |u - u*| <=
   1e-8 (Ray start-up and host creation excluded) against the in-process exact engine
   (``solve_optimum``) timed in the same process right after each run; messages per unit.
3. Time to 1e-8 against the mean message delay in the simulator (same net).
4. Resident memory of each actor process against the costs its shard holds (its own rows
   and columns) and against the whole network's costs.

5. Sim against Ray with actors far outnumbering cores: the quickstart net (32-96x4-10,
   p = 1) in 4, 16 and 64 layer shards and 384 neuron shards, and a sparse 2,000-neuron net
   at neuron granularity: time units to 1e-8 (Ray/sim), messages per unit (Ray/sim), and the
   seconds a Ray run spends outside balancing (host start-up and teardown, beyond Ray's own
   start and the central optimum). Ray paces each case with a ``time_unit`` long enough for
   2 cores to keep up with the wake schedule (printed).

6. The staleness between hosts: the two hosts of [2] exchanging in lock-step in one process,
   each batch delivered 1 - 4 slices after it leaves (slices of a round, and of one shard's
   move): slices and moves per unit to 1e-8 against that lag.

7. ``--only-free-shards``: the quickstart net (``scenarios/quickstart.toml``) free-running on
   one block host in 64 layer slices of 6 units and in 384 neuron shards, sampled every 50 ms
   (the file's default) and every 2 ms: the first sample at 1e-8, the crossing interpolated
   between samples (log-linear: rough with the few samples of 50 ms), and the end of the
   host's moves from its own event log (its last window that sent news before the first
   anti-entropy re-send: an upper bound on its own time to 1e-8, as it goes on to 1e-13),
   each against the exact engine on the same net timed in the same process right after.

Usage: .venv/bin/python benchmarks/bench_runtime.py [--skip-ray] [--only-scale] [--only-free]
       [--only-lag] [--only-free-shards]
       [--free-repeats 3] [--delays 0,0.5,1,2,4,8] [--scale-cases 4,16,64,384n,2000n]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from asyncbalance import build_cost_graph, lp, solve_optimum
from asyncbalance.runtime import read_events
from asyncbalance.runtime.coordinator import prepare, run_scenario
from asyncbalance.runtime.host import (
    ShardHost,
    assign_hosts,
    link_means,
    settings_for,
    split_by_shard,
)
from asyncbalance.runtime.scenario import build_network, load_scenarios, scenario_from_mapping
from asyncbalance.runtime.shard import gather_log_scales

ROOT = Path(__file__).resolve().parents[1]
SIZES = [784, 512, 512, 512, 10]
NETWORK = {"kind": "mlp", "sizes": SIZES, "unit_spread": 0.5, "seed": 0}
P = 2.0


def scenario(name: str, **sections):
    data = {"name": name, "seed": 0, "network": NETWORK, "balance": {"p": P},
            "stop": {"tol": 1e-8, "function_check": "final", "sample_interval": 1.0,
                     "max_wall_seconds": 600.0}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return scenario_from_mapping(data)


def exact_engine_seconds(repeats: int = 3) -> float:
    graph = build_cost_graph(build_network(scenario("x").network), lp(P))
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        solve_optimum(graph)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--delays", default="0,0.5,1,2,4,8")
    parser.add_argument("--free-repeats", type=int, default=3,
                        help="runs per host count in [2]")
    parser.add_argument("--free-sample-seconds", type=float, default=0.01,
                        help="how often the driver polls the hosts in [2] (ray.sample_seconds)")
    parser.add_argument("--only-lag", action="store_true",
                        help="run only [6], work to 1e-8 against the staleness between two hosts")
    parser.add_argument("--only-free", action="store_true",
                        help="run only [2], the free-running clock against the exact engine")
    parser.add_argument("--only-scale", action="store_true",
                        help="run only [5], the sim-against-Ray scale table")
    parser.add_argument("--scale-cases", default="4,16,64,384n,2000n")
    parser.add_argument("--only-free-shards", action="store_true",
                        help="run only [7], the quickstart net's shards free-running on one "
                             "host against the exact engine")
    args = parser.parse_args()
    if args.only_free_shards:
        import ray

        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            free_shards_table(args.free_repeats)
        finally:
            ray.shutdown()
        return 0
    if args.only_scale:
        return scale_table(args.scale_cases.split(","))
    if args.only_lag:
        return lag_table()
    if args.only_free:
        import ray

        began = time.perf_counter()
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            free_running_table(args.free_repeats, time.perf_counter() - began,
                               args.free_sample_seconds)
        finally:
            ray.shutdown()
        return 0
    print(f"net {'-'.join(map(str, SIZES))}, p = {P}, tolerance max |u - u*| <= 1e-8, "
          f"{os.cpu_count()} CPUs")
    work = Path(tempfile.mkdtemp(prefix="bench-runtime-"))

    engine = exact_engine_seconds()
    print(f"\nin-process exact engine (solve_optimum, median of 3): {engine:.3f} s")

    # 1. Simulator throughput.
    sim = run_scenario(scenario("sim", partition={"shards_per_layer": 4}), work / "sim")
    print("\n[1] simulator, 12 shards, exponential delays mean 0.5, events recorded")
    print(f"    unit-updates/s: {sim['unit_updates_per_second']:.3e}   "
          f"(unit updates {sim['unit_updates']}, simulated time to 1e-8 "
          f"{sim['time_to_tol']}, converged {sim['converged']})")

    # 3. Time to tolerance against delay.
    print("\n[3] simulator: time to 1e-8 against mean delay (exponential; wake period 1)")
    print(f"    {'mean delay':>10}  {'time to 1e-8':>12}  {'ratio to delay 0':>16}  "
          f"{'messages/unit':>13}")
    first = None
    for mean in [float(d) for d in args.delays.split(",")]:
        run = run_scenario(scenario(f"delay-{mean}", record_events=False,
                                    partition={"shards_per_layer": 4},
                                    links={"mean": mean}), work / f"delay-{mean}")
        t = run["time_to_tol"]
        first = first or t
        ratio = f"{t / first:.2f}" if t and first else "-"
        print(f"    {mean:>10g}  {t if t is not None else 'not reached':>12}  {ratio:>16}  "
              f"{run['messages_per_unit']:>13.1f}")

    if args.skip_ray:
        return 0
    import ray

    began = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    startup = time.perf_counter() - began
    try:
        ray_run = free_running_table(args.free_repeats, startup, args.free_sample_seconds)
    finally:
        ray.shutdown()
    scale_table(args.scale_cases.split(","))
    lag_table()

    graph = build_cost_graph(build_network(scenario("x").network), lp(P))
    whole = sum(k.nbytes for s in graph.stacks for k in s.costs)
    print("\n[4] memory per host (resident set of the host process at its last poll)")
    print(f"    whole network's costs: {whole / 2**20:.2f} MiB")
    hosts = ray_run["transport"]["host_of_shard"]
    for i, rss in enumerate(ray_run["actor_resident_bytes"]):
        held = sum(b for b, h in zip(ray_run["shard_cost_bytes"], hosts, strict=True) if h == i)
        rss_text = "-" if rss is None else f"{rss / 2**20:.1f} MiB"
        print(f"    host {i}: resident {rss_text}; costs held {held / 2**20:.2f} MiB "
              f"= {held / whole:.2f} of the network's")
    return 0


def crossing_seconds(trace: Path, tol: float) -> float | None:
    """Wall seconds at which max |u - u*| crossed ``tol``, interpolated in log-error between
    the last sample above it and the first at or below it (the samples come every
    ``ray.sample_seconds``, so the first sample at tolerance overstates the time by up to
    one poll interval)."""
    with trace.open() as handle:
        rows = list(csv.reader(handle))[1:]
    points = [(float(r[1]), float(r[2])) for r in rows]
    for (w0, e0), (w1, e1) in itertools.pairwise(points):
        if e1 <= tol < e0:
            if e1 <= 0.0:
                return w1
            return w0 + (w1 - w0) * (math.log(e0) - math.log(tol)) / (math.log(e0) - math.log(e1))
    return None


def free_running_table(repeats: int, startup: float, sample_seconds: float = 0.01) -> dict:
    """[2]: wall time to 1e-8 on the free-running clock, on the default hosts (one per CPU)
    and on one host, each run followed by the exact engine timed in the same process."""
    print(f"\n[2] Ray, free-running clock, 4 shards (384 units each), stream links, polled "
          f"every {sample_seconds:g} s; Ray start-up {startup:.1f} s and host creation excluded")
    print("    wall to 1e-8: the first poll at the tolerance; crossing: interpolated between "
          "the polls around it")
    print(f"    {'hosts':>5}  {'wall to 1e-8':>12}  {'crossing':>8}  {'exact engine':>12}  "
          f"{'ratio':>7}  {'crossing ratio':>14}  {'messages/unit':>13}  {'batches':>7}  "
          f"{'send to ack':>11}")
    work = Path(tempfile.mkdtemp(prefix="bench-runtime-free-"))
    default_hosts_run: dict = {}
    ratios: dict[int, list[float]] = {}
    crossings: dict[int, list[float]] = {}
    walls: dict[int, list[float]] = {}
    engines: dict[int, list[float]] = {}
    for hosts in (0, 1):
        for i in range(repeats):
            run = run_scenario(
                scenario(f"free-{hosts}-{i}", backend="ray",
                         partition={"units_per_shard": 384},
                         ray={"time_unit": 0.01, "sample_seconds": sample_seconds,
                              "clock": "free", "hosts": hosts}), work / f"free-{hosts}-{i}")
            engine_now = exact_engine_seconds()
            wall = run["wall_seconds_to_tol"]
            links = run["transport"]
            if hosts == 0:
                default_hosts_run = run
            cross = crossing_seconds(work / f"free-{hosts}-{i}" / "trace.csv", 1e-8)
            engines.setdefault(links["hosts"], []).append(engine_now)
            if wall is not None:
                ratios.setdefault(links["hosts"], []).append(wall / engine_now)
                walls.setdefault(links["hosts"], []).append(wall)
            if cross is not None:
                crossings.setdefault(links["hosts"], []).append(cross / engine_now)
            ack = links["mean_call_seconds"]
            print(f"    {links['hosts']:>5}  "
                  f"{'not reached' if wall is None else f'{wall:.3f} s':>12}  "
                  f"{'-' if cross is None else f'{cross:.3f} s':>8}  "
                  f"{engine_now:>10.3f} s  "
                  f"{f'{wall / engine_now:.1f}x' if wall is not None else '-':>7}  "
                  f"{f'{cross / engine_now:.1f}x' if cross is not None else '-':>14}  "
                  f"{run['messages_per_unit']:>13.2f}  {links['calls']:>7}  "
                  f"{'-' if ack is None else f'{ack * 1e3:.1f} ms':>11}", flush=True)
    for hosts, values in sorted(ratios.items()):
        cross = crossings.get(hosts, [])
        print(f"    {hosts} host(s): median ratio {statistics.median(values):.1f}x "
              f"(range {min(values):.1f} - {max(values):.1f}x); crossing "
              + (f"{statistics.median(cross):.1f}x ({min(cross):.1f} - {max(cross):.1f}x)"
                 if cross else "-")
              + f"; median wall / median engine "
              f"{statistics.median(walls[hosts]) / statistics.median(engines[hosts]):.1f}x")
    print("    (goal: ratio <= 5x)")
    return default_hosts_run


FREE_SHARD_CASES = {
    "64 layer slices": ['partition.shards_per_layer=16'],
    "384 neuron shards": ['partition.granularity="neuron"'],
}


def last_moving_window(events: Path, before: float) -> float | None:
    """Seconds from the start to the end of the last window in which a host sent news, among
    those ending ``before`` (the first anti-entropy re-send, which sends unchanged values)."""
    ends = [e["until"] for e in read_events(events)
            if e["kind"] == "batch" and e["sent"] and e["until"] < before]
    return max(ends) if ends else None


def quickstart_engine_seconds(problem, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        solve_optimum(problem.graph)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def free_shards_table(repeats: int) -> None:
    """[7]: the quickstart net's shards free-running on one block host."""
    print("\n[7] quickstart net (32-96x4-10, p = 1), free-running, one block host; ratios to the "
          "exact engine on the same net (median of 5, timed right after each run)")
    print(f"    {'case':>18}  {'sample':>6}  {'first sample at 1e-8':>20}  {'crossing':>8}  "
          f"{'host moves end':>14}  {'exact engine':>12}  "
          f"{'ratios (first / crossing / moves)':>34}")
    work = Path(tempfile.mkdtemp(prefix="bench-runtime-shards-"))
    ratios: dict[tuple[str, float], list[tuple[float, float, float]]] = {}
    for label, overrides in FREE_SHARD_CASES.items():
        for sample in (0.05, 0.002):
            for i in range(repeats):
                point = load_scenarios(str(ROOT / "scenarios" / "quickstart.toml"), overrides + [
                    'ray.clock="free"', f"ray.sample_seconds={sample}", "ray.hosts=1"])[0]
                out = work / f"{label.split()[0]}-{sample}-{i}"
                run = run_scenario(point.scenario, out, base_dir=point.base_dir)
                engine = quickstart_engine_seconds(prepare(point.scenario, point.base_dir))
                first = run["wall_seconds_to_tol"]
                cross = crossing_seconds(out / "trace.csv", 1e-8)
                resend = point.scenario.links.resend_interval * point.scenario.ray.time_unit
                moves = last_moving_window(out / "events.msgpack", resend)
                if first is not None and cross is not None and moves is not None:
                    ratios.setdefault((label, sample), []).append(
                        (first / engine, cross / engine, moves / engine))
                shown = " / ".join("-" if v is None else f"{v / engine:.1f}x"
                                   for v in (first, cross, moves))
                print(f"    {label:>18}  {sample:>6g}  "
                      f"{'not reached' if first is None else f'{first * 1e3:.1f} ms':>20}  "
                      f"{'-' if cross is None else f'{cross * 1e3:.1f} ms':>8}  "
                      f"{'-' if moves is None else f'{moves * 1e3:.1f} ms':>14}  "
                      f"{engine * 1e3:>9.2f} ms  {shown:>34}", flush=True)
    for (label, sample), values in ratios.items():
        medians = [statistics.median(v[k] for v in values) for k in range(3)]
        print(f"    {label}, samples every {sample:g} s: median ratios first sample "
              f"{medians[0]:.1f}x, crossing {medians[1]:.1f}x, host moves end {medians[2]:.1f}x")
    print("    (goal: 64 layer shards free-running <= 10x the exact engine)")


def lag_table(lags: tuple[int, ...] = (1, 2, 3, 4)) -> int:
    """[6]: work to 1e-8 when the two default hosts of [2] exchange in lock-step in one
    process, their batches delivered ``lag`` slices after they leave (free-running hosts,
    no Ray): what each slice of staleness between hosts costs, for slices of a whole round
    and of one shard's move (what the Ray host takes between two exchanges). First row: all
    four shards on one host, nothing to exchange."""
    net = scenario("lag", backend="ray", partition={"units_per_shard": 384},
                   ray={"clock": "free"})
    problem = prepare(net)
    specs = problem.specs
    means = link_means(net, specs)
    print("\n[6] free-running hosts in lock-step in one process (4 shards, as [2]): work to "
          "1e-8 against the slices a batch takes to arrive")
    print(f"    {'hosts':>5}  {'slice':>5}  {'lag':>3}  {'slices':>6}  {'moves per unit':>14}")
    cases = [(1, "round", 20_000, 1)] + [(2, name, events, lag)
                                         for name, events in (("round", 20_000), ("move", 1))
                                         for lag in lags]
    for n_hosts, slice_name, slice_events, lag in cases:
        owner = assign_hosts(specs, n_hosts)
        hosts = []
        for h in range(max(owner) + 1):
            members = [s.shard_id for s in specs if owner[s.shard_id] == h]
            hosts.append(ShardHost(h, [specs[sid] for sid in members], owner,
                                   settings_for(net, means, members, paced=False)))
        in_transit: list[list] = []
        steps, error = 0, math.inf
        while error > 1e-8 and steps < 5000:
            steps += 1
            for host in hosts:
                host.advance(float(steps), max_events=slice_events)
            in_transit.append([(dst, host.take_outbox(dst)) for host in hosts
                               for dst in host.pending_hosts()])
            if len(in_transit) >= lag:
                for dst, batch in in_transit.pop(0):
                    hosts[dst].receive(batch, float(steps))
            owned: dict[int, np.ndarray] = {}
            for host in hosts:
                owned.update(split_by_shard(specs, host.order, host.owned_log_scales()))
            u = gather_log_scales(problem.graph.n_units, specs,
                                  [owned[s.shard_id] for s in specs])
            error = float(np.max(np.abs(u - problem.optimum.log_scales)))
        moves = sum(h.unit_updates() for h in hosts) / problem.graph.n_units
        print(f"    {n_hosts:>5}  {slice_name:>5}  {lag if n_hosts > 1 else '-':>3}  "
              f"{steps:>6}  {moves:>14.1f}")
    return 0


QUICKSTART = {"kind": "mlp", "sizes": [32, 96, 96, 96, 96, 10], "unit_spread": 1.0, "seed": 0}
SPARSE_2000 = {"kind": "mlp", "sizes": [64, 400, 400, 400, 400, 400, 10], "density": 0.02,
               "unit_spread": 1.0, "seed": 0}
# name -> (network, partition, seconds per time unit on Ray)
SCALE_CASES = {
    "4": (QUICKSTART, {"granularity": "shard", "shards_per_layer": 1}, 0.01),
    "16": (QUICKSTART, {"granularity": "shard", "shards_per_layer": 4}, 0.02),
    "64": (QUICKSTART, {"granularity": "shard", "shards_per_layer": 16}, 0.05),
    "384n": (QUICKSTART, {"granularity": "neuron"}, 1.5),
    "2000n": (SPARSE_2000, {"granularity": "neuron"}, 0.8),
}


def scale_case(name: str, backend: str, work: Path) -> dict:
    network, partition, unit = SCALE_CASES[name]
    data = {"name": f"{backend}-{name}", "seed": 0, "backend": backend,
            "record_events": False, "network": network, "balance": {"p": 1.0},
            "partition": partition, "wake": {"kind": "periodic", "period": 1.0, "jitter": 0.2},
            "links": {"delay": "exponential", "mean": 0.5, "heterogeneity": 0.3},
            "stop": {"tol": 1e-8, "function_check": "final", "max_wall_seconds": 900.0,
                     "max_time": 5000.0, "sample_interval": 1.0},
            "ray": {"time_unit": unit, "sample_seconds": max(0.05, 2 * unit)}}
    return run_scenario(scenario_from_mapping(data), work / f"{backend}-{name}")


def scale_table(names: list[str]) -> int:
    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-runtime-scale-"))
    began = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray_start = time.perf_counter() - began
    print(f"\n[5] sim vs Ray, {os.cpu_count()} CPUs; Ray's own start {ray_start:.1f} s "
          "(excluded below)")
    print(f"    {'case':>6} {'shards':>6} {'hosts':>5} {'unit':>6}  {'sim units':>9} "
          f"{'ray units':>9} {'ratio':>6}  {'sim msg/u':>9} {'ray msg/u':>9} {'ratio':>6}  "
          f"{'overhead s':>10}")
    try:
        for name in names:
            sim = scale_case(name, "sim", work)
            real = scale_case(name, "ray", work)
            unit = SCALE_CASES[name][2]
            overhead = real["wall_seconds"] - real["run_seconds"] - real["optimum_seconds"]
            t_sim, t_ray = sim["time_to_tol"], real["time_to_tol"]
            ratio_t = f"{t_ray / t_sim:.2f}" if t_sim and t_ray else "-"
            ratio_m = real["messages_per_unit"] / sim["messages_per_unit"]
            print(f"    {name:>6} {real['n_shards']:>6} {real['transport']['hosts']:>5} "
                  f"{unit:>6g}  {t_sim if t_sim is not None else 'n/r':>9} "
                  f"{f'{t_ray:.1f}' if t_ray is not None else 'n/r':>9} {ratio_t:>6}  "
                  f"{sim['messages_per_unit']:>9.1f} {real['messages_per_unit']:>9.1f} "
                  f"{ratio_m:>6.2f}  {overhead:>10.1f}", flush=True)
            print(f"           sim wall {sim['run_seconds']:.1f} s, ray wall "
                  f"{real['run_seconds']:.1f} s, ray max host queue "
                  f"{real['transport']['max_host_queue']}, calls {real['transport']['calls']}, "
                  f"coalesced {real['transport']['coalesced']}", flush=True)
    finally:
        ray.shutdown()
    print("    (goals: time ratio <= 1.5 at 4 shards, <= 2 at 64 shards and at neuron "
          "granularity; messages ratio <= 2; overhead <= 5 s at 64 shards)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
