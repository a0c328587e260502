"""Local moves: the cost decrease Delta R (seed 001, eq. 14), damping, gradient flow."""

from __future__ import annotations

import numpy as np
import pytest
from test_engine_support import random_layered, random_recurrent, weight_cost, weight_flows

from asyncbalance import (
    Network,
    balance_units,
    build_cost_graph,
    exact_moves,
    gradient_flow_step,
    move_cost_decrease,
    scale_network,
    total_cost,
    unit_flows,
)
from asyncbalance.kernels import gradient

# Cost differences subtract two sums of |w|^p of size R; rounding leaves ~1e-15 R, so measured
# decreases are compared with an absolute slack of 1e-12 R plus 1e-10 relative.
DIFF_RTOL = 1e-10


def _nets() -> list[tuple[str, Network, float]]:
    rng = np.random.default_rng(11)
    return [
        ("mlp_relu_p1", random_layered(rng, [3, 5, 4, 2], True, "relu"), 1.0),
        ("mlp_relu_p2", random_layered(rng, [3, 5, 4, 2], [True, False, True], "relu"), 2.0),
        ("mlp_leaky_p0.5", random_layered(rng, [4, 3, 3, 3, 1], True, "leaky_relu:0.2"), 0.5),
        ("mlp_bipu_p2", random_layered(rng, [3, 4, 4, 2], True, "power:2"), 2.0),
        ("mlp_bipu3_p1.5", random_layered(rng, [3, 4, 2], True, "power:3"), 1.5),
        ("rnn_relu_p1", random_recurrent(rng, 2, 5, 2), 1.0),
        ("rnn_bipu_p2", random_recurrent(rng, 2, 4, 2, activation="power:2", gain=0.5), 2.0),
    ]


NETS = _nets()


def _self_loops(net: Network, p: float, u: np.ndarray) -> np.ndarray:
    """|w_kk|^p of each hidden unit's self-loop in the scaled network (0 for MLPs)."""
    if "W_rec" not in net.weights:
        return np.zeros(net.n_hidden)
    return np.abs(np.diag(scale_network(net, u).weights["W_rec"])) ** p


@pytest.mark.parametrize("name,net,p", NETS, ids=[n for n, _, _ in NETS])
def test_exact_move_decrease_matches_formula_and_measurement(name: str, net: Network,
                                                             p: float) -> None:
    graph = build_cost_graph(net, p)
    rng = np.random.default_rng(4)
    u = rng.normal(0.0, 0.7, graph.n_units)
    c = net.degrees()
    flows = unit_flows(graph, u)
    scaled = scale_network(net, u)
    base = weight_cost(scaled, p)
    # A and B from the weights themselves (self-loops excluded: a c = 1 loop never changes).
    into, out = weight_flows(scaled, p)
    loops = _self_loops(net, p, u)
    a, b = into / p - loops, out / p - loops
    for k in range(graph.n_units):
        units = np.array([k])
        move = exact_moves(graph, u, units, flows)
        claimed = move_cost_decrease(graph, u, units, move, flows)[0]
        v = u.copy()
        v[k] += move[0]
        measured = base - weight_cost(scale_network(net, v), p)
        assert claimed == pytest.approx(measured, rel=DIFF_RTOL, abs=1e-12 * base)
        assert measured >= -1e-13 * base  # an exact move never raises R
        if c[k] == 1.0:
            # seed 001, eq. 14: (sqrt A - sqrt B)^2, with A, B = sum |w|^p in and out.
            formula = (np.sqrt(a[k]) - np.sqrt(b[k])) ** 2
            # Closed form of the move: lambda* = (B / A)^(1 / 2p).
            assert move[0] == pytest.approx(np.log(b[k] / a[k]) / (2 * p), rel=1e-12,
                                            abs=1e-14)
        elif loops[k] == 0.0:
            # Degree c: the move solves A x = c B x^-c with x = e^{p d}; the cost falls from
            # A + B to (1 + 1/c) A x.
            x = (c[k] * b[k] / a[k]) ** (1.0 / (1.0 + c[k]))
            formula = a[k] + b[k] - (1.0 + 1.0 / c[k]) * a[k] * x
            assert move[0] == pytest.approx(np.log(x) / p, rel=1e-12, abs=1e-14)
        else:
            continue  # BiPU self-loop: no closed form; the measured check above covers it.
        assert measured == pytest.approx(formula, rel=DIFF_RTOL, abs=1e-12 * base)
        # After the move the unit is balanced: sum_in |w|^p = c sum_out |w|^p.
        into_v, out_v = weight_flows(scale_network(net, v), p)
        assert into_v[k] == pytest.approx(c[k] * out_v[k], rel=1e-12)


@pytest.mark.parametrize("name,net,p", NETS, ids=[n for n, _, _ in NETS])
def test_decrease_of_arbitrary_moves(name: str, net: Network, p: float) -> None:
    """move_cost_decrease is the exact R difference for any step, not only the optimal one."""
    graph = build_cost_graph(net, p)
    u = np.random.default_rng(5).normal(0.0, 0.5, graph.n_units)
    flows = unit_flows(graph, u)
    base = total_cost(graph, u, flows)
    units = np.arange(graph.n_units)
    moves = np.random.default_rng(6).normal(0.0, 0.8, graph.n_units)
    claimed = move_cost_decrease(graph, u, units, moves, flows)
    for k in units:
        v = u.copy()
        v[k] += moves[k]
        measured = base - weight_cost(scale_network(net, v), p)
        assert claimed[k] == pytest.approx(measured, rel=DIFF_RTOL, abs=1e-12 * base)


@pytest.mark.parametrize("alpha", [0.25, 0.5, 1.0])
def test_damped_moves_scale_the_exact_step(alpha: float) -> None:
    net = random_layered(np.random.default_rng(8), [3, 5, 4, 2], True, "relu")
    graph = build_cost_graph(net, 1.5)
    u = np.random.default_rng(9).normal(0.0, 0.5, graph.n_units)
    layer = np.arange(*graph.group_ranges[1])
    full = exact_moves(graph, u, layer)
    moved = balance_units(graph, u, layer, alpha)
    np.testing.assert_allclose(moved[layer] - u[layer], alpha * full, rtol=1e-13, atol=1e-15)
    others = np.setdiff1d(np.arange(graph.n_units), layer)
    assert np.array_equal(moved[others], u[others])
    # A damped move of a convex 1-D function towards its minimiser never raises R.
    assert total_cost(graph, moved) <= total_cost(graph, u) * (1 + 1e-13)


def test_gradient_flow_step_follows_minus_a_minus_cb() -> None:
    net = random_layered(np.random.default_rng(12), [3, 4, 4, 2], True, "power:2")
    p = 2.0
    graph = build_cost_graph(net, p)
    u = np.random.default_rng(13).normal(0.0, 0.3, graph.n_units)
    into, out = weight_flows(scale_network(net, u), p)
    eta = 1e-3
    step = gradient_flow_step(graph, u, eta)
    # du/dt = -eta (A - c B) with A, B = sum |w|^p (DESIGN §1; p absorbed into eta).
    np.testing.assert_allclose(step - u, -eta * (into - net.degrees() * out) / p, rtol=1e-12,
                               atol=1e-16)
    np.testing.assert_allclose(gradient(graph, u), into - net.degrees() * out, rtol=1e-12,
                               atol=1e-14)
    # Small steps lower R and shrink the imbalance.
    assert total_cost(graph, step) < total_cost(graph, u)
