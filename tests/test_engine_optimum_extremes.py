"""The exact solver where float32 (or a plain Newton step) breaks down.

Ground truth is independent of the solver: rescaling a hidden layer by lambda (its incoming
weights times lambda, its outgoing ones divided by lambda^c) leaves the network function and
its unique balanced state unchanged, so a rescaled test vector must balance to the reference
balanced arrays in tests/data/testvectors. Where no reference exists (p = 1e-3, p = 200) the
balance condition is checked from the balanced weights themselves and the log-scales are
compared with plain layer sweeps (``method='full'``) run to a tight tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_engine_support import weight_flows
from tolerances import FUNCTION_RTOL, OPTIMUM_TOL, assert_rel, rel_err

from asyncbalance import (
    balance_network,
    build_cost_graph,
    forward,
    network_from_arrays,
    probe_inputs,
    run_schedule,
    scale_network,
    solve_optimum,
)
from asyncbalance.errors import BalanceError, InvalidInputError, ResultOverflowError

VECTORS_DIR = Path(__file__).resolve().parent / "data" / "testvectors"
INDEX = {entry["name"]: entry for entry in json.loads((VECTORS_DIR / "index.json").read_text())}

# As in test_engine_vectors: both optimum and reference satisfy max |log(A / cB)| <= 1e-12;
# on these 5-20 unit nets that moves a weight by < 1e-11 relative to its array's largest
# entry. 1e-10 keeps a margin and still catches a wrong optimum (off by >= 1e-3).
WEIGHT_RTOL = 1e-10


def _load(name: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str]:
    with np.load(VECTORS_DIR / f"{name}.npz") as raw:
        arrays = {k: raw[k].astype(np.float64) for k in raw.files}
    with np.load(VECTORS_DIR / f"{name}.balanced.npz") as raw:
        balanced = {k: raw[k] for k in raw.files}
    activation = INDEX[name]["activation"]
    return arrays, balanced, "power:2" if activation.startswith("power:2") else activation


def _rescale_layers(arrays: dict[str, np.ndarray], factors: dict[int, float],
                    degree: float) -> dict[str, np.ndarray]:
    """Hidden layer i (output of W_i) times ``factors[i]``: W_i, b_i times lambda, W_{i+1}
    divided by lambda^c. Written out here so the test does not rely on the engine's scaling."""
    out = dict(arrays)
    for i, lam in factors.items():
        out[f"W{i}"] = out[f"W{i}"] * lam
        if f"b{i}" in out:
            out[f"b{i}"] = out[f"b{i}"] * lam
        out[f"W{i + 1}"] = out[f"W{i + 1}"] / lam**degree
    return out


def _function_error(original: dict, balanced, activation: str) -> float:
    net = network_from_arrays(original, activation)
    x = probe_inputs(net)
    return rel_err(forward(balanced, x), forward(net, x))


# Each case puts some |w|^p far outside float32 (3.4e38) or below its smallest normal (1e-38):
# the old float32 Hessian products returned inf/0 there and Newton stalled.
OVERFLOW_CASES = [
    ("mlp_bias_p2", {1: 1e20, 2: 1e-20}),      # costs 1e40 and 1e-40 at p = 2
    ("mlp_bias_p2", {2: 1e25}),                 # one layer up, the next down: 1e50 / 1e-50
    ("mlp_bias_p1", {1: 1e30}),                 # the weights span 1e-30 .. 1e30
    ("mlp_bias_p0.7", {1: 1e-30, 2: 1e30}),
    ("mlp_power2_p2", {1: 1e12}),               # c = 2: W2 divided by 1e24, costs 1e-48
]


@pytest.mark.parametrize(("name", "factors"), OVERFLOW_CASES,
                         ids=[f"{n}-{'-'.join(f'{k}:{v:g}' for k, v in f.items())}"
                              for n, f in OVERFLOW_CASES])
def test_exact_reaches_the_reference_optimum_on_rescaled_vectors(name, factors):
    arrays, expected, activation = _load(name)
    degree = 2.0 if activation == "power:2" else 1.0
    scaled = _rescale_layers(arrays, factors, degree)
    network = network_from_arrays(scaled, activation)
    graph = build_cost_graph(network, INDEX[name]["p"])
    cert = solve_optimum(graph)
    assert cert.max_log_imbalance <= OPTIMUM_TOL
    balanced = scale_network(network, cert.log_scales)
    for key, ref in expected.items():
        assert_rel(balanced.weights[key], ref, WEIGHT_RTOL, f"{name} {key}")
    # The function of the (rescaled) input network is kept to the contract's 1e-12.
    assert _function_error(scaled, balanced, activation) <= FUNCTION_RTOL


@pytest.mark.parametrize("p", [1e-3, 200.0])
@pytest.mark.parametrize("factor", [1.0, 10.0])
def test_exact_matches_full_at_extreme_powers(p, factor):
    """p = 200 puts |w|^p near 1e-100 (float32 flushes it to 0) and, with a layer times 10,
    near 1e+100 (float32 overflows); p = 1e-3 makes R nearly flat in u."""
    # Equal widths keep the optimum's scales representable at p = 1e-3 (see the last test).
    rng = np.random.default_rng(7)
    arrays = {}
    for i in range(1, 5):
        arrays[f"W{i}"] = rng.standard_normal((6, 6)) * 0.3
        arrays[f"b{i}"] = rng.standard_normal(6) * 0.3
    activation = "relu"
    scaled = _rescale_layers(arrays, {1: factor}, 1.0)
    network = network_from_arrays(scaled, activation)
    graph = build_cost_graph(network, p)
    cert = solve_optimum(graph)
    assert cert.max_log_imbalance <= OPTIMUM_TOL
    # Independent certificate: sum_in |w|^p = sum_out |w|^p per unit from the balanced arrays.
    balanced = scale_network(network, cert.log_scales)
    into, out = weight_flows(balanced, p)
    assert np.max(np.abs(np.log(into) - np.log(out))) <= 10 * OPTIMUM_TOL
    sweeps = run_schedule(graph, "full", tol=1e-12, max_iterations=200_000)
    # A max log-imbalance eps leaves each log-scale within about eps / (2 p) times a
    # conditioning factor of a few units: 1e-12 / (2 p) at p = 1e-3 is 5e-10, so 1e-8 there;
    # at p = 200 the same bound is 2.5e-15 and 1e-12 leaves a margin for rounding of u ~ 1.
    bound = 1e-8 if p < 1 else 1e-12
    assert np.max(np.abs(cert.log_scales - sweeps.log_scales)) <= bound
    assert _function_error(scaled, balanced, activation) <= FUNCTION_RTOL


def test_random_wide_magnitudes_exact_succeeds_where_full_does():
    """Layers scaled by 10^U(-30, 30) at powers 1e-3 .. 200; every case where the costs fit
    float64 must balance with both methods to the same log-scales."""
    rng = np.random.default_rng(20)
    checked = 0
    for _ in range(80):
        sizes = list(rng.integers(1, 7, size=rng.integers(3, 6)))
        arrays = {}
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=False), start=1):
            arrays[f"W{i}"] = rng.standard_normal((n_out, n_in)) * 10.0 ** rng.uniform(-30, 30)
            arrays[f"b{i}"] = rng.standard_normal(n_out) * 10.0 ** rng.uniform(-30, 30)
        p = float(rng.choice([1e-3, 0.5, 1.0, 2.0, 10.0, 200.0]))
        try:
            graph = build_cost_graph(network_from_arrays(arrays), p)
        except InvalidInputError as exc:
            # Every cost on one side of a unit underflowed to 0: refused when built.
            assert "underflows to 0" in str(exc)
            continue
        costs = [graph.visible_in, graph.visible_out, *(k for s in graph.stacks for k in s.costs)]
        if not (all(np.all(np.isfinite(k)) for k in costs) and np.isfinite(graph.constant_cost)):
            with pytest.raises(InvalidInputError, match="overflow float64"):
                solve_optimum(graph)
            continue
        try:
            sweeps = run_schedule(graph, "full", tol=1e-12, max_iterations=200_000)
        except BalanceError:
            sweeps = None
        # Sweeps "finish" on a NaN imbalance (exp(p u) beyond float64): that is no success.
        if sweeps is None or not (sweeps.max_log_imbalance <= 1e-12
                                  and np.all(np.isfinite(sweeps.log_scales))):
            with pytest.raises(BalanceError):
                solve_optimum(graph)
            continue
        cert = solve_optimum(graph)
        # Same bound as above, scaled by 1/p: 1e-12 / (2 p) times a conditioning factor.
        assert np.max(np.abs(cert.log_scales - sweeps.log_scales)) <= 1e-10 / p
        checked += 1
    assert checked >= 30


def test_costs_that_overflow_float64_name_p_and_the_layer():
    arrays, _, activation = _load("mlp_bias_p2")
    network = network_from_arrays(_rescale_layers(arrays, {1: 1e30}, 1.0), activation)
    with pytest.raises(InvalidInputError, match=r"p: .*'h1'.*overflow float64 at p = 200"):
        solve_optimum(build_cost_graph(network, 200.0))


@pytest.mark.parametrize("method", ["full", "partial", "stochastic", "alternating", "tied"])
def test_every_schedule_refuses_costs_that_overflow_float64(method):
    # Before: the sweeps compared a NaN imbalance with the tolerance, stopped at once and
    # returned u = 0 as if balanced.
    arrays, _, activation = _load("mlp_bias_p2")
    network = network_from_arrays(_rescale_layers(arrays, {1: 1e30}, 1.0), activation)
    with pytest.raises(InvalidInputError, match=r"p: .*'h1'.*overflow float64 at p = 200"):
        run_schedule(build_cost_graph(network, 200.0), method)


def test_flows_that_overflow_at_the_start_are_repaired_by_the_sweeps():
    """Finite costs whose flows overflow at u = 0 (two hidden-to-hidden costs of 0.81 x the
    float64 limit into one unit: its incoming flow is inf) have a finite optimum; the sweeps
    must reach the exact solver's, not stop on the infinite imbalance."""
    big = np.exp(np.log(np.finfo(np.float64).max) / 2.0) * 0.9
    arrays = {"W1": np.ones((2, 1)), "b1": np.zeros(2), "W2": np.full((1, 2), big),
              "b2": np.zeros(1), "W3": np.ones((1, 1)), "b3": np.zeros(1)}
    graph = build_cost_graph(network_from_arrays(arrays), 2.0)
    with np.errstate(over="ignore", invalid="ignore"):
        result = run_schedule(graph, "full", tol=1e-12)
    exact = solve_optimum(graph)
    assert np.all(np.isfinite(result.log_scales)) and result.max_log_imbalance <= 1e-12
    # |u| ~ 118: 1e-12 relative, the rounding of the flows at this scale.
    np.testing.assert_allclose(result.log_scales, exact.log_scales, rtol=0, atol=1e-9)


@pytest.mark.parametrize("method", ["full", "stochastic", "alternating", "tied"])
def test_a_nan_imbalance_never_counts_as_converged(method):
    # Before: the loop ran while imbalance > tol, which a NaN is not, and returned at once.
    arrays, _, activation = _load("mlp_bias_p2")
    graph = build_cost_graph(network_from_arrays(arrays, activation), 2.0)
    start = np.zeros(graph.n_units)
    start[0] = np.nan
    with pytest.raises(BalanceError, match="did not converge"):
        run_schedule(graph, method, initial=start, max_iterations=20)


def test_a_balanced_result_beyond_float64_says_so_and_names_the_array():
    """At p = 1e-3 |w|^p hardly depends on |w|, so the optimum rescales a unit by about
    e^(log(fan-in / fan-out) / (2 p)): e^1500 for 400 inputs and 1 output, beyond float64."""
    rng = np.random.default_rng(3)
    arrays = {"W1": rng.standard_normal((1, 400)), "W2": rng.standard_normal((1, 1))}
    with pytest.raises(ResultOverflowError, match=r"^W\d: the balanced weights overflow float64"):
        balance_network(network_from_arrays(arrays), 1e-3)
