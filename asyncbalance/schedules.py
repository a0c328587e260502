"""Balancing schedules: which units move, in what order, and when to stop.

Every schedule only moves log-scales, so each keeps the network function exactly. Moves of a
group are applied together when no edge links two of its units (a layer of an MLP); a group
with internal edges (a recurrent layer) is swept unit by unit (Gauss-Seidel).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import kernels
from .errors import InvalidInputError, NonConvergenceError
from .graph import CostGraph
from .optimum import (
    check_bounded,
    check_costs_finite,
    gauge_components,
    project_gauge,
    solve_optimum,
)

METHODS = ("exact", "full", "partial", "stochastic", "alternating", "tied")
DIRECTIONS = ("forward", "backward")


@dataclass(frozen=True)
class ScheduleResult:
    log_scales: np.ndarray
    iterations: int
    max_log_imbalance: float
    cost: float
    seconds: float
    method: str
    cost_history: tuple[float, ...] = ()


def balance_units(graph: CostGraph, log_scales: np.ndarray, units: np.ndarray,
                  alpha: float = 1.0) -> np.ndarray:
    """Exact (alpha = 1) or damped moves of ``units`` evaluated together; returns new u."""
    u = log_scales.copy()
    u[units] += alpha * kernels.exact_moves(graph, log_scales, units)
    return u


def _unit_by_unit(graph: CostGraph, u: np.ndarray, units: np.ndarray, alpha: float) -> np.ndarray:
    for k in units:
        idx = np.array([k])
        u[k] += alpha * kernels.exact_moves(graph, u, idx)[0]
    return u


def sweep_group(graph: CostGraph, log_scales: np.ndarray, group: int,
                alpha: float = 1.0) -> np.ndarray:
    """Balance every unit of one group exactly (unit by unit if the group has internal edges)."""
    start, stop = graph.group_ranges[group]
    units = np.arange(start, stop)
    if graph.group_has_internal_edges(group):
        return _unit_by_unit(graph, log_scales.copy(), units, alpha)
    return balance_units(graph, log_scales, units, alpha)


def layer_sweep(graph: CostGraph, log_scales: np.ndarray, direction: str = "forward",
                alpha: float = 1.0) -> np.ndarray:
    """One pass over the groups (layers), forward or backward."""
    if direction not in DIRECTIONS:
        raise InvalidInputError("direction", f"unknown direction {direction!r}", DIRECTIONS)
    order = range(len(graph.group_ranges))
    if direction == "backward":
        order = reversed(order)
    u = log_scales
    for g in order:
        u = sweep_group(graph, u, g, alpha)
    return u


def alternating_sweep(graph: CostGraph, log_scales: np.ndarray) -> np.ndarray:
    """Odd layers (1, 3, ...) together, then even layers: in an MLP each set has no edges."""
    u = log_scales
    n_groups = len(graph.group_ranges)
    for parity in (0, 1):
        groups = [g for g in range(n_groups) if g % 2 == parity]
        if any(graph.group_has_internal_edges(g) for g in groups):
            for g in groups:
                u = sweep_group(graph, u, g)
            continue
        units = np.concatenate([np.arange(*graph.group_ranges[g]) for g in groups]) \
            if groups else np.zeros(0, dtype=np.intp)
        u = balance_units(graph, u, units)
    return u


def stochastic_sweep(graph: CostGraph, log_scales: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
    """Every unit once, one at a time, in a random order."""
    return _unit_by_unit(graph, log_scales.copy(), rng.permutation(graph.n_units), 1.0)


def gradient_flow_step(graph: CostGraph, log_scales: np.ndarray, eta: float) -> np.ndarray:
    """One Euler step of ``du/dt = -eta sum_t coef (A_t - c B_t)`` (seed 004)."""
    incoming, outgoing = kernels.unit_flows(graph, log_scales)
    drive = (graph.coefs[:, None] * (incoming - graph.degrees * outgoing)).sum(axis=0)
    return np.where(graph.dead, log_scales, log_scales - eta * drive)


def tied_move(graph: CostGraph, log_scales: np.ndarray, group: int) -> np.ndarray:
    """Shift all live units of ``group`` by one common amount that minimises R exactly."""
    start, stop = graph.group_ranges[group]
    units = np.arange(start, stop)
    live = units[~graph.dead[units]]
    if live.size == 0:
        return log_scales
    degrees = np.unique(graph.degrees[live])
    if degrees.size != 1:
        raise InvalidInputError("method", "tied balancing needs one degree per layer")
    c = float(degrees[0])
    incoming, outgoing = kernels.unit_flows(graph, log_scales)
    # Edges inside the group scale by exp(p (1 - c) d) under a common shift d.
    internal = np.zeros(graph.n_terms)
    local = live - start
    for b in graph.blocks:
        if b.dst == (start, stop) and b.src == (start, stop):
            for t, p in enumerate(graph.powers):
                u_live = log_scales[live]
                internal[t] += np.exp(p * u_live) @ (
                    b.costs[t][np.ix_(local, local)] @ np.exp(-p * c * u_live))
    a = incoming[:, live].sum(axis=1) - internal
    bo = outgoing[:, live].sum(axis=1) - internal
    p = graph.powers
    weights = np.concatenate([graph.coefs * a, graph.coefs * bo, graph.coefs * internal])[None]
    rates = np.concatenate([p, -c * p, p * (1 - c)])[None]
    shift = kernels.solve_exp_sum(np.maximum(weights, 0.0), rates)[0]
    u = log_scales.copy()
    u[live] += shift
    return u


def tied_sweep(graph: CostGraph, log_scales: np.ndarray) -> np.ndarray:
    u = log_scales
    for g in range(len(graph.group_ranges)):
        u = tied_move(graph, u, g)
    return u


def tied_imbalance(graph: CostGraph, log_scales: np.ndarray) -> float:
    """Max over groups of |log(sum_g A / (c sum_g B))| without intra-group edges (c = 1)."""
    into, out = kernels.weighted_flows(graph, kernels.unit_flows(graph, log_scales))
    gaps = [0.0]
    for start, stop in graph.group_ranges:
        live = ~graph.dead[start:stop]
        if live.any():
            a, b = into[start:stop][live].sum(), out[start:stop][live].sum()
            gaps.append(abs(float(np.log(a) - np.log(b))))
    return float(np.max(gaps))  # np.max keeps a NaN, which max() would drop


def tied_closed_form(layer_costs: np.ndarray, p: float) -> np.ndarray:
    """Per-layer multipliers ``M_i = ((prod_j a_j)^(1/N) / a_i)^(1/p)`` for a bias-free chain.

    Minimises ``sum_i M_i^p a_i`` subject to ``prod_i M_i = 1`` where ``a_i = sum |A_i|^p``.
    Seed 001's eq. 51 omits the 1/p root (for p = 2 the square root); this is the correct form.
    """
    a = np.asarray(layer_costs, dtype=np.float64)
    if np.any(a <= 0):
        raise InvalidInputError("layer_costs", "every layer needs a nonzero cost")
    geometric = np.exp(np.mean(np.log(a)))
    return (geometric / a) ** (1.0 / p)


def tied_closed_form_log_scales(graph: CostGraph, layer_costs: np.ndarray) -> np.ndarray:
    """Log-scales of the tied closed form: layer l's units get ``sum_{i<=l} log M_i``."""
    if graph.n_terms != 1:
        raise InvalidInputError("regulariser", "the tied closed form needs a single L_p term")
    multipliers = tied_closed_form(layer_costs, graph.powers[0])
    shifts = np.cumsum(np.log(multipliers))[:-1]
    u = np.zeros(graph.n_units)
    for (start, stop), shift in zip(graph.group_ranges, shifts, strict=True):
        u[start:stop] = shift
    return u


def run_schedule(
    graph: CostGraph,
    method: str = "exact",
    tol: float = 1e-10,
    max_iterations: int = 100_000,
    seed: int = 0,
    direction: str = "forward",
    initial: np.ndarray | None = None,
    record_cost: bool = False,
    progress: Callable[[int, float], None] | None = None,
) -> ScheduleResult:
    """Run a schedule from ``initial`` (u = 0 by default).

    ``exact``: Newton to the unique optimum. ``full``: forward layer sweeps until the max
    log-imbalance is <= tol. ``partial``: one sweep. ``stochastic``: random-order unit sweeps
    until tol. ``alternating``: odd/even layer sweeps until tol. ``tied``: one shift per layer,
    iterated until the per-layer imbalance is <= tol (the tied optimum, not the global one).
    """
    if method not in METHODS:
        raise InvalidInputError("method", f"unknown method {method!r}", METHODS)
    if not (np.isfinite(tol) and tol > 0):
        raise InvalidInputError("tol", f"must be a finite number > 0, got {tol!r}")
    start = time.perf_counter()
    u = np.zeros(graph.n_units) if initial is None else np.array(initial, dtype=np.float64)
    check_costs_finite(graph)
    if method == "exact":
        cert = solve_optimum(graph, tol=tol, initial=u, progress=progress)
        return ScheduleResult(cert.log_scales, cert.iterations, cert.max_log_imbalance,
                              cert.cost, time.perf_counter() - start, method)
    rng = np.random.default_rng(seed)
    history = [kernels.total_cost(graph, u)] if record_cost else []

    def step(v: np.ndarray) -> np.ndarray:
        if method in ("full", "partial"):
            return layer_sweep(graph, v, direction)
        if method == "alternating":
            return alternating_sweep(graph, v)
        if method == "stochastic":
            return stochastic_sweep(graph, v, rng)
        return tied_sweep(graph, v)

    measure = tied_imbalance if method == "tied" else kernels.max_log_imbalance
    iterations = 0
    imbalance = measure(graph, u)
    # ``not <=``: a NaN imbalance (flows that overflowed) never counts as balanced.
    while method == "partial" and iterations < 1 or method != "partial" and \
            not imbalance <= tol:
        if not np.isfinite(imbalance) and iterations > 0:
            raise NonConvergenceError(method, iterations, imbalance, tol)
        if iterations >= max_iterations:
            check_bounded(graph)
            raise NonConvergenceError(method, iterations, imbalance, tol)
        u = step(u)
        iterations += 1
        imbalance = measure(graph, u)
        if record_cost:
            history.append(kernels.total_cost(graph, u))
        if progress is not None:
            progress(iterations, imbalance)
    if not np.isfinite(imbalance):
        raise NonConvergenceError(method, iterations, imbalance, tol)
    # The same gauge as the exact solver, so every method reports comparable log-scales.
    u = project_gauge(u, gauge_components(graph))
    return ScheduleResult(u, iterations, kernels.max_log_imbalance(graph, u),
                          kernels.total_cost(graph, u), time.perf_counter() - start, method,
                          tuple(history))
