"""Runtime benchmarks, measured side by side in one run, printed as ratios.

1. Simulator throughput (unit-updates per second of simulator time on one core) on a
   784-512-512-512-10 MLP in 12 layer shards, event log on.
2. Ray backend, same net, 4 shards on a local Ray: wall time from the start of balancing to
   max |u - u*| <= 1e-8 (Ray start-up and actor creation excluded) against the in-process
   exact engine (``solve_optimum``) timed in the same process; messages per unit.
3. Time to 1e-8 against the mean message delay in the simulator (same net).
4. Resident memory of each actor process against the costs its shard holds (its own rows
   and columns) and against the whole network's costs.

Usage: .venv/bin/python benchmarks/bench_runtime.py [--skip-ray] [--delays 0,0.5,1,2,4,8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from asyncbalance import build_cost_graph, lp, solve_optimum
from asyncbalance.runtime.coordinator import run_scenario
from asyncbalance.runtime.scenario import build_network, scenario_from_mapping

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
    parser.add_argument("--ray-time-units", default="0.005,0.01,0.02",
                        help="seconds per scenario time unit on Ray (the wake period is 1 unit)")
    args = parser.parse_args()
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
    print(f"\n[2] Ray, 4 local shard actors (384 units each); Ray start-up {startup:.1f} s and "
          "actor creation excluded")
    print(f"    {'time unit':>9}  {'wall to 1e-8':>12}  {'exact engine':>12}  {'ratio':>7}  "
          f"{'messages/unit':>13}")
    ray_run = None
    try:
        for unit in [float(u) for u in args.ray_time_units.split(",")]:
            ray_run = run_scenario(
                scenario(f"ray-{unit}", backend="ray", partition={"units_per_shard": 384},
                         ray={"time_unit": unit, "sample_seconds": 0.02}),
                work / f"ray-{unit}")
            engine_now = exact_engine_seconds()
            wall = ray_run["time_to_tol"]
            ratio = f"{wall / engine_now:.1f}x" if wall is not None else "-"
            print(f"    {unit * 1e3:>7g}ms  "
                  f"{'not reached' if wall is None else f'{wall:.3f} s':>12}  "
                  f"{engine_now:>10.3f} s  {ratio:>7}  {ray_run['messages_per_unit']:>13.2f}")
    finally:
        ray.shutdown()
    print("    (goal: ratio <= 5x)")

    graph = build_cost_graph(build_network(scenario("x").network), lp(P))
    whole = sum(k.nbytes for s in graph.stacks for k in s.costs)
    print("\n[4] memory per actor (resident set of the actor process at its last poll)")
    print(f"    whole network's costs: {whole / 2**20:.2f} MiB")
    for i, (rss, held) in enumerate(zip(ray_run["actor_resident_bytes"],
                                        ray_run["shard_cost_bytes"], strict=True)):
        rss_text = "-" if rss is None else f"{rss / 2**20:.1f} MiB"
        print(f"    actor {i}: resident {rss_text}; costs held {held / 2**20:.2f} MiB "
              f"= {held / whole:.2f} of the network's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
