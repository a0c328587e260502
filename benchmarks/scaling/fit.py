"""Fit the block-host cost model to measured points, check the largest points held out, and
extrapolate to many nodes. Pure: data in (the ``measure`` JSON), numbers out; no I/O."""

from __future__ import annotations

from typing import Any

import numpy as np

from asyncbalance.runtime.costmodel import (
    HELD_OUT_FACTOR,
    CostModel,
    extrapolate,
    fit,
    held_out_ratios,
    prediction_ratios,
    worst_factor,
)

# Held out of each fit: the largest points of each kind (by its size key).
HELD_OUT = {"memory": 2, "cpu": 2, "ray": 2, "frames": 1}

# The extrapolation's networks (hidden widths, fan_in) and clusters.
EXTRAPOLATE_NETWORKS = (((25_000,) * 4, 133), ((250_000,) * 4, 133))
EXTRAPOLATE_NODES = (1, 4, 16, 64)
CORES_PER_NODE = 8
NODE_MEMORY_BYTES = 64 * 2**30


def points_of(data: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The fit's points from the measured rows (the Ray hosts' largest resident set)."""
    ray_rows = [r for r in data.get("ray", []) if r.get("converged")]
    return {
        "memory": [{"array_bytes": r["array_bytes"], "resident_bytes": max(r["resident_bytes"]),
                    "neurons": r["neurons"], "hosts": r["hosts"]}
                   for r in ray_rows if r.get("resident_bytes")],
        "cpu": [r for r in data.get("sim", []) + data.get("pair", []) if r.get("converged")],
        "ray": [r for r in ray_rows if r["cpu_seconds"] > 0],
        "frames": [r for r in data.get("pair", []) if "exchange_cpu_seconds" in r],
    }


def activity(data: dict[str, Any]) -> dict[str, float]:
    """Moves per unit and link messages per link per time unit, and time units to 1e-8, in
    the simulator (the mean over its runs to tolerance, the largest run's time units)."""
    rows = [r for r in data.get("sim", []) if r.get("converged")]
    if rows:
        # The runs at the default window (the others vary it for the fit).
        default = float(np.median([r["step"] for r in rows]))
        rows = [r for r in rows if r["step"] == default]
    if not rows:
        return {"move": 1.0, "link": 1.0, "time_units": float("nan"), "windows": 20.0}
    moves = [r["moves"] / (r["neurons"] * r["time_units"]) for r in rows]
    links = [r["links"] / (r["counts"]["links"] * r["time_units"]) for r in rows]
    largest = max(rows, key=lambda r: r["neurons"])
    return {"move": float(np.mean(moves)), "link": float(np.mean(links)),
            "time_units": float(max(r["time_units"] for r in rows)),
            "time_units_largest": float(largest["time_units"]),
            "windows": float(np.mean([r["windows"] / r["time_units"] for r in rows]))}


def extrapolation(model: CostModel, act: dict[str, float]) -> list[dict[str, Any]]:
    table = []
    for widths, fan_in in EXTRAPOLATE_NETWORKS:
        for nodes in EXTRAPOLATE_NODES:
            row = extrapolate(model, widths, fan_in, nodes, CORES_PER_NODE, act["move"],
                              act["link"], act["windows"], act["time_units"])
            row["widths"], row["fan_in"] = list(widths), fan_in
            row["fits_node"] = row["memory_per_node"] <= NODE_MEMORY_BYTES
            row["local_fits_node"] = (CORES_PER_NODE * row["local_memory_per_host"]
                                      <= NODE_MEMORY_BYTES)
            table.append(row)
    return table


def analyse(data: dict[str, Any]) -> dict[str, Any]:
    """The model fitted on every point, its in-sample and held-out ratios, the extrapolation
    and printable lines."""
    points = points_of(data)
    model = fit(points)
    in_sample = prediction_ratios(model, points)
    held: dict[str, list[float]] = {}
    for kind, n in HELD_OUT.items():
        if len(points[kind]) > n + 1:
            held[kind] = held_out_ratios(points, kind, n)
    act = activity(data)
    table = extrapolation(model, act)
    exact = [r["array_bytes"] == r["counted_array_bytes"] for r in data.get("sim", [])]
    lines = [
        f"fitted: m_0 = {model.process_bytes / 2**20:.1f} MiB, beta = {model.memory_factor:.2f},"
        f" window {model.cpu_window * 1e6:.1f} us + {model.cpu_window_shard * 1e9:.2f} ns per "
        f"shard, move {model.cpu_move * 1e9:.0f} ns, link message {model.cpu_link * 1e9:.0f} ns,"
        f" frame entry {model.cpu_entry * 1e9:.0f} ns, frame {model.cpu_frame * 1e6:.1f} us, "
        f"Ray (free-running) x {model.ray_scale:.2f} + {model.ray_frame_seconds * 1e6:.0f} us per "
        "frame",
        f"array bytes predicted = counted on {sum(exact)} of {len(exact)} simulator layouts",
    ]
    for kind in ("memory", "frames", "cpu", "ray"):
        lines.append(f"{kind}: in-sample worst factor {worst_factor(in_sample[kind]):.2f} over "
                     f"{len(in_sample[kind])} points; held out (largest "
                     f"{HELD_OUT[kind]}): ratios "
                     + ", ".join(f"{r:.2f}" for r in held.get(kind, []))
                     + f" (bound {HELD_OUT_FACTOR:g}x)")
    for row in table:
        lines.append(
            f"extrapolation {row['neurons']:.3g} neurons, {row['synapses']:.3g} synapses, "
            f"{row['nodes']:.0f} nodes: {row['memory_per_host'] / 2**30:.2f} GiB per host as "
            f"built ({row['local_memory_per_host'] / 2**30:.2f} GiB with host-local layouts), "
            f"{row['wall_per_time_unit']:.3g} s per time unit")
    return {"model": model.as_dict(), "points": points, "in_sample": in_sample,
            "held_out": held, "activity": act, "extrapolation": table,
            "exact_array_bytes": exact, "summary_lines": lines}
