"""Soak: many neuron shards on local Ray for a long time; memory and queues must stay flat.

A sparse MLP with about 1,000 live neurons at neuron granularity runs on the default shard
hosts (one per CPU) for ``--minutes``. Every ``--every`` seconds it prints the distance to
the optimum, each host's resident memory, the largest host queue seen so far and the message
counters. After convergence the system must stay converged and quiet (anti-entropy only),
and nothing may grow with the length of the run: the verdict lines compare the second half
of the run with the first.

With ``--fan-in F`` the net is a sparse MLP of ``--sizes`` (each neuron reading F random
neurons of the layer below: ``--sizes 1000,25000,25000,25000,25000,10 --fan-in 133`` is
10^5 neurons and 1.3 * 10^7 synapses). Neuron shards run as block hosts (array frames).

Usage: .venv/bin/python benchmarks/soak_runtime.py [--minutes 10] [--every 15]
       [--time-unit 0.3] [--sizes 64,300,300,300,300,10 --fan-in 12] [--clock paced|free]
       [--hosts N]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from asyncbalance.runtime.backends import backend_factory
from asyncbalance.runtime.coordinator import prepare
from asyncbalance.runtime.events import EventWriter
from asyncbalance.runtime.scenario import scenario_from_mapping
from asyncbalance.runtime.shard import gather_log_scales

NETWORK = {"kind": "mlp", "sizes": [64, 300, 300, 300, 300, 10], "density": 0.04,
           "unit_spread": 1.0, "seed": 0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--every", type=float, default=15.0)
    parser.add_argument("--time-unit", type=float, default=0.3)
    parser.add_argument("--sizes", default="")
    parser.add_argument("--fan-in", type=int, default=0)
    parser.add_argument("--clock", choices=("paced", "free"), default="paced")
    parser.add_argument("--hosts", type=int, default=0,
                        help="shard host processes (ray.hosts; 0: the default)")
    args = parser.parse_args()
    network = dict(NETWORK)
    if args.fan_in:
        network = {"kind": "sparse_mlp", "sizes": [int(n) for n in args.sizes.split(",")],
                   "fan_in": args.fan_in, "unit_spread": 1.0, "seed": 0}
    scenario = scenario_from_mapping({
        "name": "soak", "seed": 0, "backend": "ray", "record_events": False,
        "network": network, "balance": {"p": 1.0}, "partition": {"granularity": "neuron"},
        "links": {"delay": "exponential", "mean": 0.5, "resend_interval": 5.0},
        "ray": {"time_unit": args.time_unit, "clock": args.clock, "hosts": args.hosts}})
    problem = prepare(scenario)
    u_star = problem.optimum.log_scales
    runtime = backend_factory("ray")(problem.specs, scenario, EventWriter(None),
                                     graph=problem.graph)
    print(f"{len(problem.specs)} neuron shards on {runtime.n_hosts} hosts, "
          f"time unit {args.time_unit} s, {args.minutes} min", flush=True)
    print(f"{'t (s)':>7} {'max|u-u*|':>10} {'rss MiB per host':>22} {'max queue':>9} "
          f"{'sent':>10} {'sent/s':>8}", flush=True)
    rows = []
    try:
        runtime.start()
        began = time.perf_counter()
        last_sent, last_t = 0, 0.0
        while (now := time.perf_counter() - began) < args.minutes * 60:
            runtime.advance(runtime.elapsed() + args.every / args.time_unit)
            now = time.perf_counter() - began
            u = gather_log_scales(problem.graph.n_units, problem.specs,
                                  runtime.owned_log_scales())
            error = float(np.max(np.abs(u - u_star)))
            rss = [r / 2**20 for r in runtime.resident_bytes() if r is not None]
            sent = runtime.message_counters().sent
            rate = (sent - last_sent) / max(now - last_t, 1e-9)
            last_sent, last_t = sent, now
            queue = runtime.transport()["max_host_queue"]
            rows.append((now, error, rss, queue, rate))
            print(f"{now:>7.0f} {error:>10.2e} {' '.join(f'{r:6.1f}' for r in rss):>22} "
                  f"{queue:>9} {sent:>10} {rate:>8.0f}", flush=True)
    finally:
        runtime.close()
    half = len(rows) // 2
    first, second = rows[1:half], rows[half:]
    if not first or not second:
        print("too short for a verdict")
        return 0
    rss_first = max(max(r[2]) for r in first)
    rss_second = max(max(r[2]) for r in second)
    converged_at = next((r[0] for r in rows if r[1] <= 1e-8), None)
    stayed = converged_at is not None and all(r[1] <= 1e-8 for r in rows if r[0] >= converged_at)
    print(f"converged to 1e-8 after {converged_at} s; stayed there: {stayed}")
    print(f"peak host RSS: first half {rss_first:.1f} MiB, second half {rss_second:.1f} MiB "
          f"(ratio {rss_second / rss_first:.3f})")
    print(f"messages/s: first half {np.mean([r[4] for r in first]):.0f}, "
          f"second half {np.mean([r[4] for r in second]):.0f}")
    print(f"largest host queue: {rows[-1][3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
