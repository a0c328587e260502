"""A large sparse network of dense towers for the simulator (kept for
``tests/test_scaleout_large.py``): ``towers_network``, its forward pass, ``balance_large``."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from asyncbalance.graph import build_cost_graph
from asyncbalance.regularisers import lp
from asyncbalance.runtime.scenario import scenario_from_mapping

P = 2.0


def towers_network(towers: int, depth: int, width: int, n_in: int = 16, n_out: int = 4,
                   seed: int = 0, unit_spread: float = 0.5) -> Any:
    """A sparse layered network: ``towers`` columns of ``depth`` dense layers of ``width``
    ReLU units; layer l of tower t feeds layer l + 1 of towers t and t + 1 (so the columns
    form one connected network); every tower reads the shared input and writes the shared
    output. ``towers * depth * width`` hidden units, O(towers * depth * width^2) weights.
    """
    from asyncbalance.activations import parse_activation
    from asyncbalance.network import Connection, Network, UnitGroup

    rng = np.random.default_rng(seed)
    relu = parse_activation("relu")

    def matrix(n_out_: int, n_in_: int) -> np.ndarray:
        w = rng.standard_normal((n_out_, n_in_)) / np.sqrt(n_in_)
        return w * np.exp(unit_spread * rng.standard_normal((n_out_, 1)))

    groups = [UnitGroup("input", n_in)]
    groups += [UnitGroup(f"t{t}l{l}", width, relu) for t in range(towers) for l in range(depth)]
    groups += [UnitGroup("output", n_out), UnitGroup("bias", 1)]
    conns, weights = [], {}

    def link(key: str, dst: str, src: str, w: np.ndarray, layout: str = "dense") -> None:
        conns.append(Connection(key, dst, src, layout))
        weights[key] = w

    for t in range(towers):
        for l in range(depth):
            g = f"t{t}l{l}"
            if l == 0:
                link(f"{g}.in", g, "input", matrix(width, n_in))
            else:
                link(f"{g}.up", g, f"t{t}l{l - 1}", matrix(width, width))
                if t > 0:
                    link(f"{g}.x", g, f"t{t - 1}l{l - 1}", matrix(width, width))
            link(f"{g}.b", g, "bias", 0.1 * rng.standard_normal(width), "bias")
        link(f"t{t}.out", "output", f"t{t}l{depth - 1}", matrix(n_out, width))
    link("out.b", "output", "bias", 0.1 * rng.standard_normal(n_out), "bias")
    return Network(tuple(groups), tuple(conns), weights, kind="towers",
                   meta={"towers": towers, "depth": depth, "width": width})


def dag_forward(network: Any, x: np.ndarray) -> np.ndarray:
    """Forward pass of a network of dense groups declared in topological order."""
    values: dict[str, np.ndarray] = {"input": x, "bias": np.ones((x.shape[0], 1))}
    by_dst: dict[str, list[Any]] = {}
    for conn in network.connections:
        by_dst.setdefault(conn.dst, []).append(conn)
    for group in network.groups:
        if group.name in ("input", "bias"):
            continue
        pre = np.zeros((x.shape[0], group.size))
        for conn in by_dst.get(group.name, ()):
            w = network.weights[conn.key]
            pre += values["bias"] * w if conn.layout == "bias" else values[conn.src] @ w.T
        values[group.name] = pre if group.activation is None else group.activation(pre)
    return values["output"]


def balance_large(network: Any, units_per_shard: int, tol: float = 1e-8,
                  max_time: float = 2000.0, seed: int = 0) -> dict[str, Any]:
    """Balance ``network`` in the simulator until max log-imbalance <= ``tol``.

    The exact optimum is not computed here (the central solver is the alternative being
    avoided); convergence is judged by the optimality condition itself: every unit's
    incoming and outgoing costs balance, max |log(A / (c B))| <= tol. Memory is the peak
    traced by ``tracemalloc`` during the simulation (after the shards are built) and the
    process's peak resident set size.
    """
    import resource
    import tracemalloc

    from asyncbalance import kernels
    from asyncbalance.network import scale_network
    from asyncbalance.runtime.events import EventWriter
    from asyncbalance.runtime.partition import partition_units
    from asyncbalance.runtime.shard import build_shard_specs, gather_log_scales
    from asyncbalance.runtime.simulator import Simulator

    began = time.perf_counter()
    graph = build_cost_graph(network, lp(P))
    specs = build_shard_specs(graph, partition_units(graph, "shard", 1, units_per_shard))
    setup = time.perf_counter() - began
    s = scenario_from_mapping({"name": "large", "seed": seed,
                               "links": {"delay": "exponential", "mean": 0.5}})
    sim = Simulator(specs, s, EventWriter(None))
    tracemalloc.start()
    now, imbalance, function_error = 0.0, float("inf"), 0.0
    probe = np.random.default_rng(seed).standard_normal((16, network.group("input").size))
    reference = dag_forward(network, probe)
    scale = float(np.max(np.abs(reference)))
    sim_began = time.perf_counter()
    while now < max_time:
        now = sim.advance(now + 10.0)
        u = gather_log_scales(graph.n_units, specs, sim.owned_log_scales())
        imbalance = kernels.max_log_imbalance(graph, u)
        balanced = dag_forward(scale_network(network, u), probe)
        function_error = max(function_error, float(np.max(np.abs(balanced - reference)))
                             / scale)
        if imbalance <= tol:
            break
    sim_seconds = time.perf_counter() - sim_began
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    counters = sim.message_counters()
    return {
        "hidden": graph.n_units, "weights": int(sum(w.size for w in network.weights.values())),
        "shards": len(specs), "units_per_shard": units_per_shard,
        "converged": bool(imbalance <= tol), "max_log_imbalance": float(imbalance),
        "function_max_rel_error": function_error, "sim_time": now,
        "unit_updates": counters.unit_updates, "messages": counters.sent,
        "unit_updates_per_second": counters.unit_updates / max(sim.busy_seconds, 1e-9),
        "setup_seconds": setup, "simulation_seconds": sim_seconds,
        "traced_peak_bytes": traced_peak,
        "shard_cost_bytes": int(sum(spec.cost_bytes for spec in specs)),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "graph": graph, "log_scales": u,
    }
