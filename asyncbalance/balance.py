"""One-call balancing of a numpy network, with a report a researcher can check."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from . import kernels
from .forward import function_rel_error
from .graph import build_cost_graph
from .network import Network, scale_network
from .optimum import gauge_components
from .regularisers import Regulariser, as_regulariser
from .schedules import run_schedule


@dataclass(frozen=True)
class BalanceReport:
    """What a balancing run did; ``to_dict`` is the REPORT.json of the CLI."""

    method: str
    p: float | list[list[float]]
    cost_before: float
    cost_after: float
    max_log_imbalance: float
    iterations: int
    seconds: float
    function_max_rel_error: float | None
    n_units: int
    dead_units: list[int]
    # The same units by hidden group (layer) and index in it: ``{"group": name, "unit": i}``.
    dead_units_named: list[dict]
    gauge: str
    gauge_components: list[list[int]]
    optimum_max_abs_log_scale_error: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def balance_network(
    network: Network,
    p: float | Regulariser = 2.0,
    method: str = "exact",
    tol: float = 1e-10,
    seed: int = 0,
    max_iterations: int = 100_000,
    check_function: bool = True,
    compare_to_optimum: bool = False,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[Network, np.ndarray, BalanceReport]:
    """Balance ``network`` under the L_p (or given) regulariser with a schedule.

    Returns the balanced network (float64), its log-scales and a report. The function check
    compares outputs on a seeded probe batch; ``compare_to_optimum`` also solves the exact
    optimum and reports ``max |u - u*|``.
    """
    reg = as_regulariser(p)
    start = time.perf_counter()
    graph = build_cost_graph(network, reg)
    zero = np.zeros(graph.n_units)
    cost_before = kernels.total_cost(graph, zero)
    result = run_schedule(graph, method=method, tol=tol, max_iterations=max_iterations,
                          seed=seed, progress=progress)
    balanced = scale_network(network, result.log_scales)
    seconds = time.perf_counter() - start
    error = None
    if check_function and network.kind in ("layered", "recurrent") and not (
            network.kind == "recurrent" and "W_out" not in network.weights):
        error = function_rel_error(network, balanced)
    distance = None
    if compare_to_optimum:
        optimum = run_schedule(graph, method="exact", tol=min(tol, 1e-12)).log_scales
        distance = float(np.max(np.abs(result.log_scales - optimum), initial=0.0))
    components = gauge_components(graph)
    p_value: float | list[list[float]] = (
        reg.powers[0] if reg.is_single_power else [list(t) for t in reg.terms])
    report = BalanceReport(
        method=method, p=p_value, cost_before=cost_before, cost_after=result.cost,
        max_log_imbalance=result.max_log_imbalance, iterations=result.iterations,
        seconds=seconds, function_max_rel_error=error, n_units=graph.n_units,
        dead_units=[int(i) for i in np.nonzero(graph.dead)[0]],
        dead_units_named=_named_units(graph, np.nonzero(graph.dead)[0]),
        gauge=("mean log-scale of each listed component fixed at 0 (R is flat along it)"
               if components else "none needed: every unit is tied to a visible unit"),
        gauge_components=[[int(i) for i in m] for m in components],
        optimum_max_abs_log_scale_error=distance)
    return balanced, result.log_scales, report


def _named_units(graph, units: np.ndarray) -> list[dict]:
    """Flat hidden-unit indices as (hidden group name, index within the group)."""
    named = []
    for unit in units.tolist():
        g = graph.group_of(int(unit))
        named.append({"group": graph.group_names[g], "unit": int(unit) -
                      graph.group_ranges[g][0]})
    return named
