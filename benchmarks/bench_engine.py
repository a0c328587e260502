"""Benchmark of the balancing engine: time to a certified optimum, scaling, peak memory.

Every time is also expressed as a multiple of one *pass*: computing ``|W|**p`` over all the
weights and biases of the same network (the least work any balancing method must do), measured
in the same run, so the ratios transfer between machines. The baseline is plain iterated layer
sweeps (``run_schedule(method="full")``) on the same cost graph, in the same run.

The optimum is certified independently of the solver: the per-unit sums ``sum_in |w|**p`` and
``c * sum_out |w|**p`` are recomputed from the balanced weight arrays with numpy and their
largest log ratio must be <= 1e-10.

Usage (single-threaded BLAS, so that the solver and the pass use one core alike):
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \
        .venv/bin/python benchmarks/bench_engine.py [--sweep-cap 3000] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import time
import tracemalloc
from collections.abc import Callable

import numpy as np

from asyncbalance import (
    Network,
    NonConvergenceError,
    build_cost_graph,
    layered_network,
    run_schedule,
    scale_network,
    solve_optimum,
)

TOL = 1e-10
WIDE = [784, 1024, 1024, 1024, 10]
DEEP = [784] + [256] * 32 + [10]
GOALS = {"wide": 20.0, "deep": 50.0}
# CPU time of this process: with single-threaded BLAS it measures the work done and is far less
# sensitive than wall time to other jobs sharing the machine. Use --wall to time by the clock.
CLOCK: Callable[[], float] = time.process_time


def kaiming_net(sizes: list[int], seed: int = 0) -> Network:
    """He-normal weights N(0, 2 / fan_in) and small biases N(0, 0.1^2), seeded."""
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal((sizes[i + 1], sizes[i])) * np.sqrt(2.0 / sizes[i])
               for i in range(len(sizes) - 1)]
    biases = [0.1 * rng.standard_normal(sizes[i + 1]) for i in range(len(sizes) - 1)]
    return layered_network(weights, biases, "relu")


def n_weights(net: Network) -> int:
    return sum(int(w.size) for w in net.weights.values())


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Best CPU time of ``repeats`` runs (see CLOCK)."""
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        start = CLOCK()
        fn()
        best = min(best, CLOCK() - start)
    return best


def one_pass(net: Network, p: float) -> float:
    """Seconds for one pass computing |W|**p (and its sum) over every array.

    The cheapest form is timed (|w| for p = 1, w * w for p = 2, a power otherwise), so that
    the "passes" of the solver are not flattered by a slow generic power.
    """
    arrays = list(net.weights.values())

    def power(w: np.ndarray) -> np.ndarray:
        if p == 1.0:
            return np.abs(w)
        if p == 2.0:
            return w * w
        return np.abs(w) ** p

    def run() -> float:
        return sum(float(np.sum(power(w))) for w in arrays)

    return best_time(run, 3)


def certified_imbalance(net: Network, balanced: Network, p: float) -> float:
    """max_k |log(sum_in |w|^p / (c sum_out |w|^p))| from the balanced arrays (layered nets)."""
    n_layers = int(net.meta["n_layers"])
    worst = 0.0
    for layer in range(1, n_layers):
        w_in = np.abs(balanced.weights[f"W{layer}"]) ** p
        into = w_in.sum(axis=1)
        if f"b{layer}" in balanced.weights:
            into = into + np.abs(balanced.weights[f"b{layer}"]) ** p
        out = (np.abs(balanced.weights[f"W{layer + 1}"]) ** p).sum(axis=0)
        degree = net.hidden_groups[layer - 1].degree
        worst = max(worst, float(np.max(np.abs(np.log(into) - np.log(degree * out)))))
    return worst


def time_optimum(net: Network, p: float, repeats: int) -> dict:
    """Build the cost graph and solve to TOL, ``repeats`` times, each right after timing a
    pass (best of 3), so every ratio compares two measurements taken side by side under the
    same machine load; report medians and the range of the ratios. Certify the answer."""
    passes, totals, solves = [], [], []
    cert = graph = None
    for _ in range(repeats):
        passes.append(one_pass(net, p))
        gc.collect()
        start = CLOCK()
        graph = build_cost_graph(net, p)
        built = CLOCK()
        cert = solve_optimum(graph, tol=TOL)
        done = CLOCK()
        totals.append(done - start)
        solves.append(done - built)
    ratio = np.array(totals) / np.array(passes)
    balanced = scale_network(net, cert.log_scales)
    return {"pass": float(np.median(passes)), "total": float(np.median(totals)),
            "solve": float(np.median(solves)), "passes": float(np.median(ratio)),
            "passes_range": (float(ratio.min()), float(ratio.max())),
            "solve_passes": float(np.median(np.array(solves) / np.array(passes))),
            "cert": cert, "graph": graph,
            "certified": certified_imbalance(net, balanced, p)}


def time_sweeps(graph, cap: int) -> dict:
    start = CLOCK()
    try:
        res = run_schedule(graph, method="full", tol=TOL, max_iterations=cap)
        return {"seconds": CLOCK() - start, "sweeps": res.iterations,
                "capped": False, "imbalance": res.max_log_imbalance}
    except NonConvergenceError as exc:
        return {"seconds": CLOCK() - start, "sweeps": exc.iterations,
                "capped": True, "imbalance": exc.max_log_imbalance}


def peak_memory(net: Network, p: float) -> dict:
    """tracemalloc peaks (bytes) of solve_optimum alone and of build + solve."""
    gc.collect()
    tracemalloc.start()
    graph = build_cost_graph(net, p)
    _, build_peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    solve_optimum(graph, tol=TOL)
    _, solve_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"solve": solve_peak - base, "build_and_solve": max(build_peak, solve_peak)}


def headline(cap: int, repeats: int, nets: dict[str, list[int]]) -> list[dict]:
    rows = []
    for label, sizes in nets.items():
        net = kaiming_net(sizes)
        for p in (1.0, 2.0):
            opt = time_optimum(net, p, repeats)
            sweeps = time_sweeps(opt["graph"], cap)
            rows.append({"net": label, "p": p, "weights": n_weights(net), **opt,
                         "sweeps": sweeps})
            cert = opt["cert"]
            flag = " (CAPPED)" if sweeps["capped"] else ""
            print(f"  {label} p={p:g}: pass {opt['pass'] * 1e3:.2f} ms, "
                  f"optimum {opt['total']:.3f} s "
                  f"(Newton {cert.iterations}, CG {cert.inner_iterations}), sweeps "
                  f"{sweeps['sweeps']}{flag} in {sweeps['seconds']:.2f} s", flush=True)
    return rows


def scaling(repeats: int, widths: list[int], depths: list[int]) -> list[dict]:
    rows = []
    cases = [("width", w, [784, w, w, w, 10]) for w in widths]
    cases += [("depth", d, [784] + [256] * d + [10]) for d in depths]
    for axis, value, sizes in cases:
        net = kaiming_net(sizes, seed=1)
        for p in (1.0, 2.0):
            opt = time_optimum(net, p, repeats)
            rows.append({"axis": axis, "value": value, "p": p, "weights": n_weights(net),
                         **opt})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep-cap", type=int, default=3000,
                        help="maximum layer sweeps of the baseline (default 3000)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="solver runs, each paired with a pass timing (median reported)")
    parser.add_argument("--quick", action="store_true", help="smaller nets (smoke test)")
    parser.add_argument("--only", choices=["wide", "deep"], help="headline net to run")
    parser.add_argument("--headline-only", action="store_true",
                        help="skip the scaling and memory tables")
    parser.add_argument("--wall", action="store_true",
                        help="time by the wall clock instead of CPU time")
    args = parser.parse_args()
    global CLOCK
    if args.wall:
        CLOCK = time.perf_counter
    if args.quick:
        nets = {"wide": [784, 256, 256, 256, 10], "deep": [784] + [64] * 8 + [10]}
        widths, depths = [128, 256], [4, 8]
    else:
        nets = {"wide": WIDE, "deep": DEEP}
        widths, depths = [256, 512, 1024, 2048], [4, 8, 16, 32]
    if args.only:
        nets = {args.only: nets[args.only]}
    threads = ",".join(f"{k}={os.environ.get(k, 'unset')}" for k in
                       ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"))
    print(f"# bench_engine: numpy {np.__version__}, python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, {threads}, tol {TOL:g}, "
          f"sweep cap {args.sweep_cap}, median of {args.repeats} paired runs, "
          f"clock: {'wall' if args.wall else 'process CPU time'}")
    print("\n## Time to a certified optimum (max imbalance <= 1e-10, biases), in passes of |W|^p")
    rows = headline(args.sweep_cap, args.repeats, nets)
    print()
    print("| net | p | weights | pass ms | optimum s | passes (build+solve) [range] | passes "
          "(solve) | certified imbalance | Newton/CG | sweeps | sweeps s | sweeps / optimum "
          "| goal (median) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        passes = r["passes"]
        lo, hi = r["passes_range"]
        goal = GOALS.get(r["net"])
        met = "n/a" if goal is None else (f"<= {goal:g}: {'met' if passes <= goal else 'NOT met'}")
        sw = r["sweeps"]
        sweeps = f"{sw['sweeps']}" + (" (capped)" if sw["capped"] else "")
        ratio = sw["seconds"] / r["total"]
        ratio_text = f"{'>= ' if sw['capped'] else ''}{ratio:.1f}x"
        print(f"| {r['net']} | {r['p']:g} | {r['weights']:,} | {r['pass'] * 1e3:.2f} | "
              f"{r['total']:.3f} | {passes:.1f} [{lo:.1f}-{hi:.1f}] | {r['solve_passes']:.1f} | "
              f"{r['certified']:.1e} | {r['cert'].iterations}/{r['cert'].inner_iterations} | "
              f"{sweeps} | {sw['seconds']:.2f} | {ratio_text} | {met} |")
    if args.headline_only:
        return
    print("\n## Scaling with width (784-W-W-W-10) and depth (784-256xD-10)")
    print("| axis | value | p | weights | optimum s | passes [range] | ns / weight | Newton/CG |")
    print("|---|---|---|---|---|---|---|---|")
    for r in scaling(args.repeats, widths, depths):
        print(f"| {r['axis']} | {r['value']} | {r['p']:g} | {r['weights']:,} | "
              f"{r['total']:.3f} | {r['passes']:.1f} [{r['passes_range'][0]:.1f}-"
              f"{r['passes_range'][1]:.1f}] | "
              f"{r['total'] / r['weights'] * 1e9:.1f} | "
              f"{r['cert'].iterations}/{r['cert'].inner_iterations} |")
    print("\n## Peak memory (tracemalloc) vs the weights (float64)")
    print("| net | p | weights MB | solve peak MB | x weights | build+solve peak MB | x weights "
          "| goal <= 3x (solve) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, sizes in nets.items():
        net = kaiming_net(sizes)
        weight_bytes = sum(w.nbytes for w in net.weights.values())
        for p in (1.0, 2.0):
            mem = peak_memory(net, p)
            solve, total = mem["solve"] / weight_bytes, mem["build_and_solve"] / weight_bytes
            print(f"| {label} | {p:g} | {weight_bytes / 2**20:.1f} | {mem['solve'] / 2**20:.1f} "
                  f"| {solve:.2f} | {mem['build_and_solve'] / 2**20:.1f} | {total:.2f} | "
                  f"{'met' if solve <= 3 else 'NOT met'} |")


if __name__ == "__main__":
    main()
