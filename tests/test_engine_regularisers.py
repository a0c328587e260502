"""General additive regularisers: the elastic net alpha w^2 + beta |w| (DESIGN §1)."""

from __future__ import annotations

import numpy as np
import pytest
from test_engine_support import (
    distance_bound,
    random_layered,
    random_recurrent,
    weight_cost,
    weight_flows,
    weight_gradient,
    weight_hessian,
)
from tolerances import FUNCTION_RTOL, SCHEDULE_TOL

from asyncbalance import (
    Network,
    Regulariser,
    balance_network,
    build_cost_graph,
    elastic_net,
    exact_moves,
    move_cost_decrease,
    run_schedule,
    scale_network,
    solve_optimum,
    unit_flows,
)

ALPHA, BETA = 0.7, 0.4


def g_prime(x: np.ndarray, alpha: float = ALPHA, beta: float = BETA) -> np.ndarray:
    """g(x) = alpha x^2 + beta x for x >= 0, so g'(x) = 2 alpha x + beta."""
    return 2.0 * alpha * x + beta


def _nets() -> list[tuple[str, Network]]:
    rng = np.random.default_rng(41)
    return [
        ("mlp_relu", random_layered(rng, [4, 6, 5, 5, 2], True, "relu", spread=2.0)),
        ("mlp_nobias", random_layered(rng, [3, 5, 4, 2], False, "leaky_relu:0.3", spread=2.0)),
        ("mlp_bipu", random_layered(rng, [3, 5, 4, 2], True, "power:2")),
        ("rnn_relu", random_recurrent(rng, 2, 5, 2)),
    ]


NETS = _nets()


def _in_out(net: Network, unit: int) -> tuple[np.ndarray, np.ndarray]:
    """|w| of the edges into and out of hidden unit ``unit`` of an MLP (bias included)."""
    offsets = net.hidden_offsets()
    names = [g.name for g in net.hidden_groups]
    for layer, name in enumerate(names, start=1):
        start, stop = offsets[name]
        if start <= unit < stop:
            i = unit - start
            into = [net.weights[f"W{layer}"][i]]
            if f"b{layer}" in net.weights:
                into.append(net.weights[f"b{layer}"][i:i + 1])
            out = net.weights[f"W{layer + 1}"][:, i]
            return np.abs(np.concatenate(into)), np.abs(out)
    raise IndexError(unit)


@pytest.mark.parametrize("name,net", NETS[:3], ids=[n for n, _ in NETS[:3]])
def test_local_moves_solve_the_consistency_equation(name: str, net: Network) -> None:
    reg = elastic_net(ALPHA, BETA)
    graph = build_cost_graph(net, reg)
    u = np.random.default_rng(1).normal(0.0, 0.8, graph.n_units)
    flows = unit_flows(graph, u)
    current = scale_network(net, u)
    c = net.degrees()
    for start, stop in graph.group_ranges:
        units = np.arange(start, stop)  # no edges inside an MLP layer: moves are independent
        lam = np.exp(exact_moves(graph, u, units, flows))
        for k, lk in zip(units, lam, strict=True):
            w_in, w_out = _in_out(current, k)
            if c[k] == 1.0:
                # lambda^2 sum_in w g'(lambda w) = sum_out w g'(w / lambda)   (DESIGN §1)
                lhs = lk**2 * np.sum(w_in * g_prime(lk * w_in))
                rhs = np.sum(w_out * g_prime(w_out / lk))
            else:
                # Degree c: d/dlam [sum_in g(lam w) + sum_out g(w lam^-c)] = 0.
                lhs = lk ** (1 + c[k]) * np.sum(w_in * g_prime(lk * w_in))
                rhs = c[k] * np.sum(w_out * g_prime(w_out * lk ** -c[k]))
            # The 1-D solve stops at |step| <= 1e-15 (1 + |d|): both sides agree to ~1e-14.
            assert lhs == pytest.approx(rhs, rel=1e-12), (k, lk)
        # And the move is the exact 1-D minimiser: the measured decrease is maximal.
        moves = np.log(lam)
        best = move_cost_decrease(graph, u, units, moves, flows)
        for delta in (1e-4, -1e-4):
            assert np.all(move_cost_decrease(graph, u, units, moves + delta, flows) <= best)


@pytest.mark.parametrize("name,net", NETS, ids=[n for n, _ in NETS])
def test_exact_optimum_has_zero_gradient_and_schedules_reach_it(name: str,
                                                                net: Network) -> None:
    reg = elastic_net(ALPHA, BETA)
    graph = build_cost_graph(net, reg)
    cert = solve_optimum(graph)
    optimum = scale_network(net, cert.log_scales)
    # Gradient from the weights: sum_in |w| g'(|w|) - c sum_out |w| g'(|w|) per unit.
    g_star = weight_gradient(optimum, reg)
    hess = weight_hessian(optimum, reg)
    # Relative to the incoming flow of each unit: 1e-12 log-imbalance plus rounding.
    assert np.all(np.abs(g_star) <= 1e-11 * weight_flows(optimum, reg)[0])
    r_star = weight_cost(optimum, reg)
    assert r_star < weight_cost(net, reg)
    rng = np.random.default_rng(2)
    for method, start in (("full", None), ("stochastic", None), ("alternating", None),
                          ("exact", rng.normal(0.0, 1.5, graph.n_units))):
        result = run_schedule(graph, method, tol=SCHEDULE_TOL, initial=start, seed=4,
                              record_cost=method != "exact")
        reached = scale_network(net, result.log_scales)
        bound = distance_bound(hess, weight_gradient(reached, reg), g_star)
        assert bound <= 1e-6
        assert np.linalg.norm(result.log_scales - cert.log_scales) <= bound, method
        assert abs(result.cost - r_star) <= 1e-12 * r_star
        if result.cost_history:
            assert np.all(np.diff(result.cost_history) <= 1e-13 * result.cost_history[0])
    _, _, report = balance_network(net, reg)
    assert report.p == [[ALPHA, 2.0], [BETA, 1.0]]
    if report.function_max_rel_error is not None:
        assert report.function_max_rel_error <= FUNCTION_RTOL


def test_elastic_net_optimum_lies_between_its_pure_terms() -> None:
    """A vanishing L1 part gives the L2 optimum; the mixed optimum differs from both."""
    net = NETS[0][1]
    u2 = solve_optimum(build_cost_graph(net, 2.0)).log_scales
    u1 = solve_optimum(build_cost_graph(net, 1.0)).log_scales
    near_l2 = solve_optimum(build_cost_graph(net, elastic_net(1.0, 1e-9))).log_scales
    # The optimum moves smoothly with beta: O(1e-9) here, 1e-6 leaves room for conditioning.
    assert np.max(np.abs(near_l2 - u2)) <= 1e-6
    mixed = solve_optimum(build_cost_graph(net, elastic_net(ALPHA, BETA))).log_scales
    assert np.max(np.abs(mixed - u2)) > 1e-3 and np.max(np.abs(mixed - u1)) > 1e-3
    # A one-term Regulariser equals L_p with a positive coefficient (scale-free optimum).
    scaled = solve_optimum(build_cost_graph(net, Regulariser(((3.5, 2.0),)))).log_scales
    assert np.max(np.abs(scaled - u2)) <= 1e-9
