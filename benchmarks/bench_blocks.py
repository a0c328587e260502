"""The array simulator against the per-message simulator, side by side in one run.

1. Neuron granularity on the quickstart net (32-96x4-10, 384 neuron shards, p = 1, the
   quickstart's delays): time units and wall seconds to max |u - u*| <= 1e-8 on both engines;
   delivered neighbour updates and unit moves per second of simulator time.
2. Layer shards on the same net (4 shards): the same figures.
3. The delay sweep of 784-512x3-10 (3 layer shards, p = 2): time units to 1e-8 against the
   mean delay on both engines (the behaviour the array engine must keep).
4. The same sweep at neuron granularity on a 16-48x3-4 MLP (144 neuron shards, p = 1).
5. The array engine's window: time units to 1e-8 on the quickstart net at neuron granularity
   with windows of 1/2 to 1/20 of the shorter of wake period and mean delay (default 1/5).
6. The array engine's compiled loops (``block_loops``, numba) against its numpy passes on
   10^4 neurons (``scenarios/neurons_100k.toml`` at a tenth of the width: fan-in 133,
   1.3e6 synapses), where the deliveries are the work, and on 10^5 neurons at fan-in 4
   (4e5 synapses), where the moves are: wall seconds, seconds in the engine ("busy"), and
   delivered neighbour updates and unit moves per second of it, same records.
7. ``--seeds N`` (alone): the delay sweeps of 3 and 4 over N seeds (scenario and network
   seed s = 0 .. N-1, sampled every time unit): mean time units to 1e-8 on each engine and
   their ratio with a 95 % interval (bootstrap over the seeds, each seed's pair kept
   together), so that one seed's draw is not taken for a change of behaviour.

The per-message engine is ``simulator.Simulator`` (the reference ``ShardHost``, event by
event); the array engine is ``array_sim.ArraySimulator``. The ``sim`` backend runs the array
engine for shards of fewer than 8 units on average (neurons) and the per-message engine for
larger ones (``array_sim.uses_blocks``): cases 2 and 3 show why. The wall ratio is
per-message over array (above 1: the array engine is faster).

Usage: .venv/bin/python benchmarks/bench_blocks.py [--skip-reference-neuron]
       [--delays 0,1,2,4,8] [--only-loops] [--seeds N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from asyncbalance.runtime import block_loops
from asyncbalance.runtime.array_sim import STEP_FRACTION, ArraySimulator, default_step
from asyncbalance.runtime.coordinator import current_log_scales, prepare
from asyncbalance.runtime.events import EventWriter
from asyncbalance.runtime.scenario import load_scenarios, scenario_from_mapping
from asyncbalance.runtime.shard import build_shard_specs
from asyncbalance.runtime.simulator import Simulator

TOL = 1e-8
SAMPLE = 2.0


def to_tolerance(problem, engine: str, max_time: float = 5_000.0,
                 step: float | None = None, sample: float = SAMPLE,
                 threads: int | None = None) -> dict:
    """Run ``engine`` on ``problem`` sampling every ``sample`` units (2, as the coordinator
    does by default); ``threads``: the array engine's (default: the simulator's own choice,
    2 on a machine with two cores)."""
    s = problem.scenario
    events = EventWriter(None)
    sim = (ArraySimulator(problem.specs, s, events, problem.graph, step=step)
           if engine == "array" else Simulator(
               build_shard_specs(problem.graph, [spec.units for spec in problem.specs]), s,
               events))
    if threads is not None and engine == "array":
        sim.host.block.threads = threads
    target = problem.optimum.log_scales
    began = time.perf_counter()
    clock = 0.0
    error = np.inf
    while clock < max_time:
        clock += sample
        sim.advance(clock)
        u = current_log_scales(sim, problem.graph.n_units, problem.specs)
        error = float(np.abs(u - target).max())
        if error <= TOL:
            break
    wall = time.perf_counter() - began
    counters = sim.message_counters()
    return {"time": clock, "wall": wall, "error": error, "sent": counters.sent,
            "delivered": counters.delivered, "moves": counters.unit_updates,
            "busy": sim.busy_seconds}


def row(label: str, ref: dict | None, arr: dict) -> str:
    def cell(r: dict | None) -> str:
        if r is None:
            return "not run | | "
        return (f"{r['time']:.0f} | {r['wall']:.2f} | "
                f"{r['delivered'] / r['busy']:.3g} / {r['moves'] / r['busy']:.3g}")
    speed = f"{ref['wall'] / arr['wall']:.3g}x" if ref else "n/a"
    units = f"{arr['time'] / ref['time']:.2f}" if ref else "n/a"
    return f"| {label} | {cell(ref)} | {cell(arr)} | {speed} | {units} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-reference-neuron", action="store_true",
                        help="skip the per-message engine at neuron granularity (~2 min)")
    parser.add_argument("--delays", default="0,1,2,4,8")
    parser.add_argument("--only-loops", action="store_true",
                        help="run only case 6 (compiled loops against numpy passes, at "
                             "fan-in 133 and at fan-in 4)")
    parser.add_argument("--seeds", type=int, default=0,
                        help="run only case 7: the delay sweeps over this many seeds")
    args = parser.parse_args()
    if args.only_loops:
        compare_loops()
        return
    if args.seeds:
        compare_over_seeds(args.seeds, [float(d) for d in args.delays.split(",")])
        return
    print("| case | per-message: units | wall s | delivered/s / moves/s "
          "| array: units | wall s | delivered/s / moves/s | wall ratio | units ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for granularity in ("neuron", "shard"):
        point = load_scenarios("scenarios/quickstart.toml",
                               [f"partition.granularity=\"{granularity}\"",
                                "backend=\"sim\""])[0]
        problem = prepare(point.scenario, point.base_dir)
        arr = to_tolerance(problem, "array")
        ref = None if (granularity == "neuron" and args.skip_reference_neuron) \
            else to_tolerance(problem, "reference")
        print(row(f"quickstart, {granularity} ({len(problem.specs)} shards)", ref, arr),
              flush=True)
    for mean in [float(d) for d in args.delays.split(",")]:
        problem = prepare(layer_sweep(mean, 0))
        arr = to_tolerance(problem, "array")
        ref = to_tolerance(problem, "reference")
        print(row(f"784-512x3-10, 3 shards, mean delay {mean:g}", ref, arr), flush=True)
    for mean in [float(d) for d in args.delays.split(",")]:
        problem = prepare(neuron_sweep(mean, 0))
        arr = to_tolerance(problem, "array")
        ref = to_tolerance(problem, "reference")
        print(row(f"16-48x3-4, 144 neurons, mean delay {mean:g}", ref, arr), flush=True)
    point = load_scenarios("scenarios/quickstart.toml",
                           ["partition.granularity=\"neuron\"", "backend=\"sim\""])[0]
    problem = prepare(point.scenario, point.base_dir)
    base = default_step(point.scenario) / STEP_FRACTION
    print("\n| window (fraction of min(period, mean delay)) | time units to 1e-8 | wall s |")
    print("|---|---|---|")
    for fraction in (1 / 2, 1 / 3, 1 / 5, 1 / 10, 1 / 20):
        r = to_tolerance(problem, "array", step=fraction * base)
        print(f"| 1/{round(1 / fraction)} | {r['time']:.0f} | {r['wall']:.2f} |", flush=True)

    compare_loops()


def layer_sweep(mean: float, seed: int):
    """Case 3's scenario: 784-512x3-10 in 3 layer shards, p = 2, exponential delays."""
    return scenario_from_mapping({
        "name": "sweep", "seed": seed,
        "network": {"kind": "mlp", "sizes": [784, 512, 512, 512, 10], "unit_spread": 0.5,
                    "seed": seed},
        "balance": {"p": 2.0},
        "links": {"delay": "exponential", "mean": mean}})


def neuron_sweep(mean: float, seed: int):
    """Case 4's scenario: 16-48x3-4 at neuron granularity (144 shards), p = 1."""
    return scenario_from_mapping({
        "name": "sweep", "seed": seed,
        "network": {"kind": "mlp", "sizes": [16, 48, 48, 48, 4], "unit_spread": 1.0,
                    "seed": seed},
        "partition": {"granularity": "neuron"},
        "links": {"delay": "exponential", "mean": mean}})


def ratio_interval(array_units: np.ndarray, reference_units: np.ndarray,
                   resamples: int = 4000) -> tuple[float, float, float]:
    """Mean array units over mean per-message units, and a 95 % percentile bootstrap
    interval resampling the seeds (a seed's two runs stay together)."""
    rng = np.random.default_rng(0)
    picks = rng.integers(0, array_units.shape[0], (resamples, array_units.shape[0]))
    ratios = array_units[picks].mean(axis=1) / reference_units[picks].mean(axis=1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(array_units.mean() / reference_units.mean()), float(low), float(high)


def compare_over_seeds(n_seeds: int, delays: list[float]) -> None:
    print(f"\n| case ({n_seeds} seeds, sampled every unit) | per-message: units, mean ± sd | "
          "array: units, mean ± sd | ratio of means [95 % interval] | within 10 % |")
    print("|---|---|---|---|---|")
    for label, make in (("784-512x3-10, 3 shards", layer_sweep),
                        ("16-48x3-4, 144 neurons", neuron_sweep)):
        for mean in delays:
            runs = {"array": [], "reference": []}
            for seed in range(n_seeds):
                problem = prepare(make(mean, seed))
                for engine in runs:
                    runs[engine].append(to_tolerance(problem, engine, sample=1.0)["time"])
            arr, ref = np.array(runs["array"]), np.array(runs["reference"])
            ratio, low, high = ratio_interval(arr, ref)
            inside = "yes" if 0.9 <= low and high <= 1.1 else (
                "no" if high < 0.9 or low > 1.1 else "undecided")
            print(f"| {label}, mean delay {mean:g} | {ref.mean():.1f} ± {ref.std(ddof=1):.1f} | "
                  f"{arr.mean():.1f} ± {arr.std(ddof=1):.1f} | {ratio:.3f} [{low:.3f}, "
                  f"{high:.3f}] | {inside} |", flush=True)


# The two throughputs of the array engine at neuron granularity, each on a net where it is
# the work: deliveries at fan-in 133 (a move sends ~266 link messages), moves at fan-in 4.
LOOP_CASES = (
    ("10^4 neurons, fan-in 133", ["network.sizes=[100,2500,2500,2500,2500,10]"]),
    ("10^5 neurons, fan-in 4", ["network.sizes=[100,25000,25000,25000,25000,10]",
                                "network.fan_in=4"]),
)


def compare_loops() -> None:
    saved = block_loops.COMPILED
    # Compiling (or loading from numba's cache) is set-up, paid once per process: not in the
    # engine's seconds below.
    block_loops.warm_up()
    for label, overrides in LOOP_CASES:
        point = load_scenarios("scenarios/neurons_100k.toml",
                               overrides + ["record_events=false"])[0]
        problem = prepare(point.scenario, point.base_dir)
        print(f"\n| {label}, array engine | units to 1e-8 | wall s | busy s | "
              "delivered/s / moves/s |")
        print("|---|---|---|---|---|")
        results = {}
        try:
            # One thread each (the throughputs per core), then the compiled loops with the
            # second core the simulator uses by default.
            runs = ((False, 1), (True, 1), (True, 2)) if saved else ((False, 1),)
            for compiled, threads in runs:
                block_loops.COMPILED = compiled
                r = to_tolerance(problem, "array", threads=threads)
                if threads == 1:
                    results[compiled] = r
                name = ("compiled loops" if compiled else "numpy passes") + \
                    (", two threads" if threads == 2 else "")
                print(f"| {name} | {r['time']:.0f} | "
                      f"{r['wall']:.2f} | {r['busy']:.2f} | {r['delivered'] / r['busy']:.3g} / "
                      f"{r['moves'] / r['busy']:.3g} |", flush=True)
        finally:
            block_loops.COMPILED = saved
        if len(results) == 2:
            same = results[True]["delivered"] == results[False]["delivered"] and \
                results[True]["error"] == results[False]["error"]
            ratio = results[False]["wall"] / results[True]["wall"]
            print(f"\ncompiled loops (one thread) {ratio:.2f}x the numpy passes' speed; same "
                  f"deliveries and final error: {same}")


if __name__ == "__main__":
    main()
