"""Function preservation for every schedule, gauge fixing, dead units, report contents."""

from __future__ import annotations

import numpy as np
import pytest
from test_engine_support import random_layered, random_recurrent, weight_flows
from tolerances import FUNCTION_RTOL, SCHEDULE_TOL

from asyncbalance import (
    METHODS,
    BalanceError,
    InvalidInputError,
    Network,
    NonConvergenceError,
    balance_network,
    build_cost_graph,
    forward,
    function_rel_error,
    layered_network,
    recurrent_network,
    run_schedule,
    scale_network,
    solve_optimum,
)


def _nets() -> list[tuple[str, Network]]:
    rng = np.random.default_rng(21)
    return [
        ("mlp_relu", random_layered(rng, [5, 8, 6, 6, 3], True, "relu", spread=2.0)),
        ("mlp_leaky_nobias", random_layered(rng, [4, 6, 6, 2], False, "leaky_relu:0.1")),
        ("mlp_abs_mixedbias", random_layered(rng, [4, 6, 5, 2], [True, False, True], "abs")),
        ("mlp_bipu", random_layered(rng, [4, 6, 5, 2], True, "power:2")),
        ("rnn_relu", random_recurrent(rng, 3, 7, 2)),
        ("rnn_linear_nobias", random_recurrent(rng, 2, 5, 2, False, False, "linear")),
        ("rnn_bipu", random_recurrent(rng, 2, 5, 2, activation="power:2", gain=0.5)),
    ]


NETS = _nets()


def _inputs(net: Network) -> np.ndarray:
    rng = np.random.default_rng(0)
    n_in = net.group("input").size
    if net.kind == "recurrent":
        return rng.standard_normal((32, 8, n_in))  # 8 recurrence steps
    return rng.standard_normal((32, n_in))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name,net", NETS, ids=[n for n, _ in NETS])
def test_every_schedule_preserves_function(name: str, net: Network, method: str) -> None:
    balanced, u, report = balance_network(net, 1.3, method=method, tol=SCHEDULE_TOL, seed=2)
    x = _inputs(net)
    reference = forward(net, x)
    assert np.max(np.abs(reference)) > 1e-3  # a live function, not all zeros
    err = function_rel_error(net, balanced, x)
    assert err <= FUNCTION_RTOL, f"{method}: {err:.2e}"
    assert report.function_max_rel_error is not None
    assert report.function_max_rel_error <= FUNCTION_RTOL
    # The schedule did something: the weights moved.
    moved = max(np.max(np.abs(balanced.weights[k] - net.weights[k])) for k in net.weights)
    assert moved > 1e-6
    assert np.max(np.abs(u)) > 1e-6
    for key, w in balanced.weights.items():
        assert w.dtype == np.float64 and w.shape == net.weights[key].shape
    if method not in ("partial", "tied"):
        into, out = weight_flows(balanced, 1.3)
        imbalance = np.max(np.abs(np.log(into / (net.degrees() * out))))
        assert imbalance <= 10 * SCHEDULE_TOL  # measured from the weights (rounding slack)


@pytest.mark.parametrize("name,net", NETS, ids=[n for n, _ in NETS])
def test_scale_network_with_random_log_scales_preserves_function(name: str,
                                                                 net: Network) -> None:
    rng = np.random.default_rng(3)
    x = _inputs(net)
    c = net.degrees()
    for _ in range(5):
        u = rng.normal(0.0, 2.0, net.n_hidden)
        scaled = scale_network(net, u)
        assert function_rel_error(net, scaled, x) <= FUNCTION_RTOL
        # The effective weights are w0 * exp(u_i - c_j u_j): check one edge per array.
        offsets = net.hidden_offsets()
        for conn in net.connections:
            dst, src = net.group(conn.dst), net.group(conn.src)
            ui = u[offsets[dst.name][0]] if dst.hidden else 0.0
            uj = c[offsets[src.name][0]] * u[offsets[src.name][0]] if src.hidden else 0.0
            w0, w = net.weights[conn.key], scaled.weights[conn.key]
            if conn.layout == "bias":
                assert w[0] == pytest.approx(w0[0] * np.exp(ui), rel=1e-14)
            else:
                assert w[0, 0] == pytest.approx(w0[0, 0] * np.exp(ui - uj), rel=1e-14)


def test_scale_network_rejects_wrong_length() -> None:
    net = NETS[0][1]
    with pytest.raises(InvalidInputError, match="log_scales"):
        scale_network(net, np.zeros(net.n_hidden + 1))


def _gauge_net(seed: int, n: int = 6) -> Network:
    w_rec = np.random.default_rng(seed).standard_normal((n, n))
    return recurrent_network(None, w_rec, None)


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_gauge_component_is_found_and_solver_converges(p: float) -> None:
    for seed in range(5):
        net = _gauge_net(seed)
        graph = build_cost_graph(net, p)
        cert = solve_optimum(graph)
        assert cert.gauge_components == (tuple(range(6)),)
        assert cert.max_log_imbalance <= 1e-12
        assert cert.dead_units == ()
        into, out = weight_flows(scale_network(net, cert.log_scales), p)
        np.testing.assert_allclose(into, out, rtol=1e-11)
        # Any schedule reaches the same point up to the common shift of the component.
        for method in ("full", "stochastic"):
            u = run_schedule(graph, method, tol=SCHEDULE_TOL, seed=seed).log_scales
            np.testing.assert_allclose(u - u.mean(), cert.log_scales - cert.log_scales.mean(),
                                       atol=1e-9)
        _, _, report = balance_network(net, p)
        assert report.gauge_components == [list(range(6))]
        assert "mean" in report.gauge


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_gauge_mean_log_scale_is_zero(p: float) -> None:
    for seed in range(5):
        u = solve_optimum(build_cost_graph(_gauge_net(seed), p)).log_scales
        # A mean of 6 numbers of size <= 1 has rounding below 1e-15; 1e-13 allows a few
        # Newton updates' worth of accumulated rounding, not a drifting gauge.
        assert abs(u.mean()) <= 1e-13 * (1 + np.max(np.abs(u))), (seed, u.mean())


@pytest.mark.parametrize("method", ["full", "stochastic", "alternating"])
def test_gauge_fixed_for_every_method(method: str) -> None:
    _, u, report = balance_network(_gauge_net(1), 2.0, method=method, tol=SCHEDULE_TOL)
    assert report.gauge_components == [list(range(6))]
    assert abs(u.mean()) <= 1e-12, u.mean()


@pytest.mark.parametrize("method", ["exact", "full"])
@pytest.mark.parametrize("given", ["bias", "W_in"])
def test_no_path_to_an_output_has_no_balanced_state(given: str, method: str) -> None:
    """Units fed by a bias or inputs but with no path to an output: R decreases without bound
    along the common shift, so no balanced state exists; the engine must say so, not loop."""
    rng = np.random.default_rng(0)
    w_in = rng.standard_normal((4, 2)) if given == "W_in" else None
    b = rng.standard_normal(4) if given == "bias" else None
    net = recurrent_network(w_in, rng.standard_normal((4, 4)), None, b=b)
    with pytest.raises(BalanceError) as info:
        balance_network(net, 2.0, method=method, max_iterations=2000)
    assert isinstance(info.value, InvalidInputError)
    assert "no path to an output" in str(info.value) and "W_out" in str(info.value)


def _dead_net() -> tuple[Network, list[int]]:
    rng = np.random.default_rng(31)
    w1, b1 = rng.standard_normal((5, 4)), rng.standard_normal(5)
    w2, b2 = rng.standard_normal((4, 5)), rng.standard_normal(4)
    w3, b3 = rng.standard_normal((2, 4)), rng.standard_normal(2)
    w1[1], b1[1] = 0.0, 0.0  # h1 unit 1: all-zero incoming (weights and bias)
    w2[:, 3] = 0.0  # h1 unit 3: all-zero outgoing column
    w3[:, 2] = 0.0  # h2 unit 2 (global 5 + 2 = 7): all-zero outgoing column
    return layered_network([w1, w2, w3], [b1, b2, b3], "relu"), [1, 3, 7]


@pytest.mark.parametrize("method", ["exact", "full", "stochastic", "alternating"])
@pytest.mark.parametrize("p", [1.0, 2.0])
def test_dead_units_are_left_alone_and_listed(method: str, p: float) -> None:
    net, dead = _dead_net()
    balanced, u, report = balance_network(net, p, method=method, tol=SCHEDULE_TOL)
    assert report.dead_units == dead
    # The same units by layer: h1 units 1 and 3, h2 unit 2 (built by hand above).
    groups = [g.name for g in net.hidden_groups]
    assert report.dead_units_named == [{"group": groups[0], "unit": 1},
                                       {"group": groups[0], "unit": 3},
                                       {"group": groups[1], "unit": 2}]
    assert np.all(u[dead] == 0.0)
    # A dead unit's own incoming row is only scaled by nothing (u = 0 at both ends for the
    # first layer): W1[1] and b1[1] stay zero, W1[3] and b1[3] are unchanged.
    assert np.array_equal(balanced.weights["W1"][3], net.weights["W1"][3])
    assert balanced.weights["b1"][3] == net.weights["b1"][3]
    assert not np.any(balanced.weights["W1"][1]) and balanced.weights["b1"][1] == 0.0
    live = np.setdiff1d(np.arange(net.n_hidden), dead)
    into, out = weight_flows(balanced, p)
    np.testing.assert_allclose(into[live], out[live], rtol=10 * SCHEDULE_TOL)
    x = np.random.default_rng(1).standard_normal((32, 4))
    assert function_rel_error(net, balanced, x) <= FUNCTION_RTOL
    assert report.function_max_rel_error <= FUNCTION_RTOL


def test_dead_units_in_certificate() -> None:
    net, dead = _dead_net()
    cert = solve_optimum(build_cost_graph(net, 2.0))
    assert list(cert.dead_units) == dead
    assert cert.max_log_imbalance <= 1e-12


def test_full_schedule_iteration_cap_raises() -> None:
    net = random_layered(np.random.default_rng(2), [4, 6, 6, 6, 6, 2], True, spread=2.0)
    graph = build_cost_graph(net, 2.0)
    with pytest.raises(NonConvergenceError, match="full") as info:
        run_schedule(graph, "full", tol=1e-14, max_iterations=3)
    assert info.value.iterations == 3 and info.value.max_log_imbalance > 1e-14


def test_partial_is_one_sweep_in_either_direction() -> None:
    net = random_layered(np.random.default_rng(4), [4, 5, 5, 5, 2], True, spread=2.0)
    graph = build_cost_graph(net, 2.0)
    for direction in ("forward", "backward"):
        result = run_schedule(graph, "partial", direction=direction)
        assert result.iterations == 1
        into, out = weight_flows(scale_network(net, result.log_scales), 2.0)
        # After one sweep the last layer swept is exactly balanced.
        last = graph.group_ranges[-1] if direction == "forward" else graph.group_ranges[0]
        np.testing.assert_allclose(into[slice(*last)], out[slice(*last)], rtol=1e-12)
    forward_u = run_schedule(graph, "partial", direction="forward").log_scales
    backward_u = run_schedule(graph, "partial", direction="backward").log_scales
    assert np.max(np.abs(forward_u - backward_u)) > 1e-6
    with pytest.raises(InvalidInputError, match="direction"):
        run_schedule(graph, "partial", direction="sideways")
