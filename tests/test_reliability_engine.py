"""Costs |w|^p that underflow float64 are refused, not balanced as if already balanced.

Incoming weights of ~1e-170 at p = 2 have costs of ~1e-340, below the smallest float64
(4.9e-324): they become 0, the unit then looks dead or balanced at u = 0, and every schedule
used to return u = 0 as a success although the true optimum is u ~ 0.25 log(1e640) ~ 368.
"""

from __future__ import annotations

import numpy as np
import pytest

from asyncbalance.errors import InvalidInputError
from asyncbalance.graph import build_cost_graph
from asyncbalance.network import layered_network
from asyncbalance.regularisers import lp
from asyncbalance.schedules import run_schedule


def _network(scale_in: float, scale_out: float):
    rng = np.random.default_rng(0)
    return layered_network([rng.standard_normal((3, 2)) * scale_in,
                            rng.standard_normal((2, 3)) * scale_out], [None, None], "relu")


@pytest.mark.parametrize("method", ["full", "exact", "stochastic"])
def test_underflowing_costs_are_refused_naming_p(method: str) -> None:
    with pytest.raises(InvalidInputError,
                       match=r"^p: every incoming cost \|w\|\^p .* underflows to 0"):
        run_schedule(build_cost_graph(_network(1e-170, 1e150), lp(2.0)), method)


def test_the_same_weights_balance_where_the_costs_are_representable() -> None:
    # At p = 1 the costs are the weights themselves (~1e-170 in, ~1e150 out): no underflow.
    # A hidden unit balances at e^{2u} = B / A ~ 1e320, so |u| ~ 0.5 ln(1e320) ~ 368 (its
    # own weights' spread moves this by a few units, hence the bound of 300).
    result = run_schedule(build_cost_graph(_network(1e-170, 1e150), lp(1.0)), "full")
    assert result.max_log_imbalance <= 1e-10
    assert np.min(np.abs(result.log_scales)) > 300.0


def test_zero_weights_are_not_underflow() -> None:
    net = _network(1.0, 1.0)
    weights = {k: v.copy() for k, v in net.weights.items()}
    weights["W1"][0, :] = 0.0  # a dead unit: exact zeros, legitimately zero cost
    graph = build_cost_graph(layered_network([weights["W1"], weights["W2"]], [None, None],
                                             "relu"), lp(2.0))
    assert run_schedule(graph, "full").max_log_imbalance <= 1e-10
