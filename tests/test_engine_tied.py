"""Tied layer balancing: closed form (with the root seed 001's eq. 51 omits) vs iteration."""

from __future__ import annotations

import numpy as np
import pytest
from test_engine_support import random_layered

from asyncbalance import (
    Network,
    build_cost_graph,
    layered_network,
    run_schedule,
    scale_network,
    tied_closed_form,
    tied_closed_form_log_scales,
    total_cost,
)

# The iteration stops at a per-layer log-imbalance of 1e-13; a per-layer shift then differs
# from the fixed point by about that times the chain's (small) condition number.
TIED_ATOL = 1e-10


def _chain(seed: int, sizes: list[int]) -> Network:
    """A bias-free chain with layer norms spread over a factor e^4, far from tied balance."""
    rng = np.random.default_rng(seed)
    mats = [rng.standard_normal((sizes[i + 1], sizes[i])) * np.exp(rng.uniform(-2, 2))
            for i in range(len(sizes) - 1)]
    return layered_network(mats, None, "relu")


def _layer_costs(net: Network, p: float) -> np.ndarray:
    n = int(net.meta["n_layers"])
    return np.array([np.sum(np.abs(net.weights[f"W{i}"]) ** p) for i in range(1, n + 1)])


def _iterated_multipliers(net: Network, p: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer factors M_i of iterated tied balancing, read off the balanced weights."""
    graph = build_cost_graph(net, p)
    result = run_schedule(graph, method="tied", tol=1e-13)
    balanced = scale_network(net, result.log_scales)
    n = int(net.meta["n_layers"])
    ratios = np.array([balanced.weights[f"W{i}"].ravel()[0] / net.weights[f"W{i}"].ravel()[0]
                       for i in range(1, n + 1)])
    return ratios, result.log_scales


CHAINS = [(2.0, 0, [4, 6, 5, 3]), (2.0, 1, [3, 4, 4, 4, 4, 2]), (3.0, 2, [4, 5, 5, 2]),
          (0.5, 3, [3, 6, 4, 4, 2]), (1.0, 4, [5, 3, 4, 2])]


@pytest.mark.parametrize("p,seed,sizes", CHAINS)
def test_closed_form_equals_iterated_tied_balancing(p: float, seed: int,
                                                   sizes: list[int]) -> None:
    net = _chain(seed, sizes)
    a = _layer_costs(net, p)
    closed = tied_closed_form(a, p)
    iterated, u = _iterated_multipliers(net, p)
    np.testing.assert_allclose(np.log(iterated), np.log(closed), atol=TIED_ATOL)
    # Constraint and optimality, from the definition: prod M_i = 1 and M_i^p a_i all equal.
    assert abs(np.sum(np.log(closed))) <= 1e-13
    layer_cost = closed**p * a
    np.testing.assert_allclose(layer_cost, layer_cost.mean(), rtol=1e-12)
    # The log-scale form: every unit of hidden layer l is shifted by sum_{i <= l} log M_i.
    graph = build_cost_graph(net, p)
    np.testing.assert_allclose(tied_closed_form_log_scales(graph, a), u, atol=TIED_ATOL)
    # Each layer's units share one shift.
    for start, stop in graph.group_ranges:
        assert np.ptp(u[start:stop]) <= 1e-15


@pytest.mark.parametrize("p,seed,sizes", [c for c in CHAINS if c[0] != 1.0])
def test_uncorrected_formula_does_not_match(p: float, seed: int, sizes: list[int]) -> None:
    """Seed 001's eq. 51 prints M_i = (prod_j a_j)^(1/N) / a_i (no square / 1/p root)."""
    net = _chain(seed, sizes)
    a = _layer_costs(net, p)
    uncorrected = np.exp(np.mean(np.log(a))) / a
    iterated, _ = _iterated_multipliers(net, p)
    # It is off by a factor p in the logarithm; with layer costs spread over e^(4p) that is
    # far beyond any tolerance.
    assert np.max(np.abs(np.log(uncorrected) - np.log(iterated))) > 0.1
    np.testing.assert_allclose(np.log(uncorrected), p * np.log(tied_closed_form(a, p)),
                               rtol=1e-12, atol=1e-12)


def test_tied_optimum_costs_no_less_than_the_global_one() -> None:
    net = random_layered(np.random.default_rng(5), [4, 6, 5, 3], False, spread=2.0)
    graph = build_cost_graph(net, 2.0)
    tied = run_schedule(graph, "tied", tol=1e-13)
    exact = run_schedule(graph, "exact", tol=1e-12)
    assert exact.cost <= tied.cost * (1 + 1e-13)
    assert tied.cost < total_cost(graph, np.zeros(graph.n_units))
    # Per-unit balance generally fails for the tied state on a random net.
    assert tied.max_log_imbalance > 1e-3


def test_closed_form_refuses_zero_layer() -> None:
    with pytest.raises(ValueError, match="layer_costs"):
        tied_closed_form(np.array([1.0, 0.0, 2.0]), 2.0)
