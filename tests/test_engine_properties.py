"""Hypothesis: every converging schedule reaches the exact optimum; R never increases.

Networks are small random MLPs and recurrent nets (biases on or off, BiLU c = 1 or BiPU
c = 2), p drawn from (0.3, 4). The optimum of ``solve_optimum`` is checked independently (its
gradient and Hessian are rebuilt from the balanced weights), and each schedule's answer must lie
within the distance that its own remaining gradient allows (``distance_bound``).
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_engine_support import (
    C1_ACTIVATIONS,
    distance_bound,
    random_layered,
    random_recurrent,
    weight_cost,
    weight_flows,
    weight_gradient,
    weight_hessian,
)
from tolerances import FUNCTION_RTOL, MONOTONE_RTOL, SCHEDULE_TOL, assert_monotone

from asyncbalance import (
    Network,
    build_cost_graph,
    forward,
    function_rel_error,
    probe_inputs,
    run_schedule,
    scale_network,
    solve_optimum,
    total_cost,
)

PROPERTY_SETTINGS = settings(max_examples=40, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])


@st.composite
def networks(draw: st.DrawFn) -> tuple[Network, float]:
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    degree = draw(st.sampled_from([1, 2]))
    activation = draw(st.sampled_from(C1_ACTIVATIONS)) if degree == 1 else "power:2"
    p = draw(st.floats(0.3, 4.0))
    if draw(st.booleans()):
        depth = draw(st.integers(1, 4))
        sizes = draw(st.lists(st.integers(1, 5), min_size=depth + 2, max_size=depth + 2))
        biases = draw(st.lists(st.booleans(), min_size=depth + 1, max_size=depth + 1))
        net = random_layered(rng, sizes, biases, activation)
    else:
        net = random_recurrent(rng, draw(st.integers(1, 3)), draw(st.integers(1, 6)),
                               draw(st.integers(1, 3)), draw(st.booleans()),
                               draw(st.booleans()), activation,
                               gain=0.9 if degree == 1 else 0.5)
    return net, p


def _check_function(net: Network, log_scales: np.ndarray) -> None:
    x = probe_inputs(net, batch=16, steps=5)
    assert np.all(np.isfinite(forward(net, x)))
    err = function_rel_error(net, scale_network(net, log_scales), x)
    # Outputs go through <= 5 layers or 5 recurrence steps of float64 products; 1e-12 is the
    # contract (about 4500 EPS), and BiPU squares relative errors at most 2x per step.
    assert err <= FUNCTION_RTOL, err


@PROPERTY_SETTINGS
@given(networks())
def test_schedules_reach_the_exact_optimum(case: tuple[Network, float]) -> None:
    net, p = case
    graph = build_cost_graph(net, p)
    assert not graph.dead.any()
    cert = solve_optimum(graph)
    assert cert.max_log_imbalance <= 1e-12
    assert cert.gauge_components == ()
    optimum_net = scale_network(net, cert.log_scales)
    # Independent check of the optimum: per unit, the weight-level gradient p (A - cB) is at
    # most 1e-11 of the incoming flow p A (the certificate's 1e-12 log-imbalance plus the
    # rounding of the sums of |w|^p), and R is no larger than at u = 0.
    g_star = weight_gradient(optimum_net, p)
    into, _ = weight_flows(optimum_net, p)
    assert np.all(np.abs(g_star) <= 1e-11 * into)
    hess = weight_hessian(optimum_net, p)
    r_star = weight_cost(optimum_net, p)
    assert r_star <= weight_cost(net, p) * (1 + MONOTONE_RTOL)
    assert abs(cert.cost - r_star) <= 1e-13 * r_star

    rng = np.random.default_rng(1)
    starts = {"full": None, "stochastic": None, "alternating": None,
              "exact": rng.normal(0.0, 2.0, graph.n_units)}
    bounds = []
    for method, start in starts.items():
        result = run_schedule(graph, method=method, tol=SCHEDULE_TOL, initial=start, seed=5)
        assert result.max_log_imbalance <= SCHEDULE_TOL
        reached = scale_network(net, result.log_scales)
        bound = distance_bound(hess, weight_gradient(reached, p), g_star)
        distance = float(np.linalg.norm(result.log_scales - cert.log_scales))
        # The bound is the distance the remaining gradients allow.
        assert distance <= bound, f"{method}: |u - u*| = {distance:.3e} > {bound:.3e}"
        bounds.append(bound)
        # R at a point of gradient g exceeds R* by about g^T H^-1 g / 2: far below rounding.
        assert abs(result.cost - r_star) <= 1e-12 * r_star, method
        _check_function(net, result.log_scales)
    # On most of these small nets the bound is below 1e-6, so the check is tight. A nearly
    # flat direction of R (e.g. 1-3-1 BiPU at p = 4: bound 3e-6) still has to meet it above,
    # but does not count as an example of a tight check.
    assume(max(bounds) <= 1e-6)


@PROPERTY_SETTINGS
@given(networks(), st.sampled_from(["forward", "backward"]))
def test_cost_never_increases_along_any_schedule(case: tuple[Network, float],
                                                 direction: str) -> None:
    net, p = case
    graph = build_cost_graph(net, p)
    start = np.random.default_rng(2).normal(0.0, 1.0, graph.n_units)
    for method in ("full", "partial", "stochastic", "alternating", "tied"):
        result = run_schedule(graph, method=method, tol=SCHEDULE_TOL, initial=start,
                              direction=direction, seed=3, record_cost=True)
        history = result.cost_history
        assert len(history) == result.iterations + 1
        assert history[0] == total_cost(graph, start)
        assert_monotone(history, MONOTONE_RTOL, f"{method} cost")
        # The recorded cost is the cost of the weights it describes.
        reached = scale_network(net, result.log_scales)
        assert abs(history[-1] - weight_cost(reached, p)) <= 1e-13 * history[-1]
        _check_function(net, result.log_scales)
