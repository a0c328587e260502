"""The exact optimum against the independent test vectors (tests/data/testvectors)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_engine_support import weight_cost, weight_flows
from tolerances import OPTIMUM_TOL, assert_rel

from asyncbalance import (
    build_cost_graph,
    network_from_arrays,
    run_schedule,
    scale_network,
    solve_optimum,
    total_cost,
)

VECTORS_DIR = Path(__file__).resolve().parent / "data" / "testvectors"
INDEX = json.loads((VECTORS_DIR / "index.json").read_text())
NAMES = [entry["name"] for entry in INDEX]

# The reference and our optimum both satisfy max |log(A / cB)| <= 1e-12. A per-unit
# imbalance eps moves a log-scale by about eps times the inverse Hessian's norm (a few units
# on these 5-20 unit nets), and a weight by the same relative amount; 1e-10 relative to the
# largest entry of each array leaves a factor 100 above that and still catches any real error
# (a wrong exponent, a missed bias, a c = 1 move on a c = 2 unit shifts weights by >= 1e-3).
WEIGHT_RTOL = 1e-10


def _activation(entry: dict) -> str:
    return "power:2" if entry["activation"].startswith("power:2") else entry["activation"]


def _load(entry: dict) -> tuple[dict, dict]:
    with np.load(VECTORS_DIR / f"{entry['name']}.npz") as raw:
        arrays = {k: raw[k] for k in raw.files}
    with np.load(VECTORS_DIR / f"{entry['name']}.balanced.npz") as raw:
        balanced = {k: raw[k] for k in raw.files}
    return arrays, balanced


def test_index_lists_every_vector() -> None:
    files = {p.name.removesuffix(".npz") for p in VECTORS_DIR.glob("*.npz")
             if not p.name.endswith(".balanced.npz")}
    assert files == set(NAMES)
    assert len(NAMES) >= 6


@pytest.mark.parametrize("entry", INDEX, ids=NAMES)
def test_exact_optimum_reproduces_vector(entry: dict) -> None:
    arrays, expected = _load(entry)
    network = network_from_arrays(arrays, _activation(entry))
    graph = build_cost_graph(network, entry["p"])
    cert = solve_optimum(graph)
    assert cert.max_log_imbalance <= OPTIMUM_TOL
    assert cert.dead_units == () and cert.gauge_components == ()
    balanced = scale_network(network, cert.log_scales)
    assert set(balanced.weights) == set(expected)
    for key, ref in expected.items():
        assert_rel(balanced.weights[key], ref, WEIGHT_RTOL, f"{entry['name']} {key}")
    # Costs: the index's figures are sums of |w|^p over every array; they were printed with
    # 17 significant digits, so 1e-13 relative allows only summation-order rounding.
    assert_rel(total_cost(graph, np.zeros(graph.n_units)), entry["cost_before"], 1e-13,
               "cost_before (kernel)")
    assert_rel(weight_cost(network, entry["p"]), entry["cost_before"], 1e-13, "cost_before")
    assert_rel(cert.cost, entry["cost_after"], 1e-13, "cost_after (certificate)")
    assert_rel(weight_cost(balanced, entry["p"]), entry["cost_after"], 1e-13, "cost_after")


@pytest.mark.parametrize("entry", INDEX, ids=NAMES)
def test_balanced_vector_satisfies_a_equals_c_b(entry: dict) -> None:
    """At the optimum sum_in |w|^p = c sum_out |w|^p for every hidden unit, computed from the
    balanced arrays themselves (the reference's and ours)."""
    arrays, expected = _load(entry)
    network = network_from_arrays(arrays, _activation(entry))
    c = network.degrees()
    ours = scale_network(network, solve_optimum(build_cost_graph(network, entry["p"])).log_scales)
    for label, net in (("reference", network.with_weights(expected)), ("ours", ours)):
        into, out = weight_flows(net, entry["p"])
        # 1e-12 imbalance plus rounding of the sums: 1e-11 relative.
        np.testing.assert_allclose(into, c * out, rtol=1e-11, err_msg=label)
    # The unbalanced input is far from it: the test would notice a no-op.
    into, out = weight_flows(network, entry["p"])
    assert np.max(np.abs(np.log(into / (c * out)))) > 0.1


@pytest.mark.parametrize("entry", INDEX, ids=NAMES)
def test_exact_schedule_from_random_start_reproduces_vector(entry: dict) -> None:
    arrays, expected = _load(entry)
    network = network_from_arrays(arrays, _activation(entry))
    graph = build_cost_graph(network, entry["p"])
    start = np.random.default_rng(7).normal(0.0, 1.5, graph.n_units)
    result = run_schedule(graph, method="exact", tol=1e-12, initial=start)
    balanced = scale_network(network, result.log_scales)
    for key, ref in expected.items():
        assert_rel(balanced.weights[key], ref, WEIGHT_RTOL, f"{entry['name']} {key}")
