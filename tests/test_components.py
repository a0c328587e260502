"""Connected components of the hidden units: the union-find over the cost blocks against
scipy's graph search on the edge list, label for label (the numbering is part of the
contract: ``check_bounded`` reports the first failing component in label order)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncbalance import build_cost_graph
from asyncbalance import components as components_module
from asyncbalance.components import unit_components
from asyncbalance.network import layered_network, recurrent_network
from asyncbalance.regularisers import elastic_net, lp
from asyncbalance.runtime.scenario import NetworkConfig, build_network

pytest.importorskip("numba")


def _labels_both_ways(graph) -> tuple[np.ndarray, np.ndarray]:
    return unit_components(graph), components_module._scipy_components(graph)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), widths=st.lists(st.integers(1, 9), min_size=1, max_size=4),
       density=st.floats(0.0, 0.5), two_terms=st.booleans())
def test_dense_nets_number_components_as_scipy_does(seed: int, widths: list[int],
                                                    density: float, two_terms: bool) -> None:
    # Sparse masks on dense layers leave isolated units and several components per layer.
    rng = np.random.default_rng(seed)
    sizes = [3, *widths, 2]
    weights = [rng.standard_normal((o, i)) * (rng.random((o, i)) < density)
               for i, o in zip(sizes[:-1], sizes[1:], strict=True)]
    network = layered_network(weights, [np.zeros(o) for o in sizes[1:]], "relu")
    graph = build_cost_graph(network, elastic_net(0.5, 0.5) if two_terms else lp(1.0))
    got, want = _labels_both_ways(graph)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fan_in", [1, 2, 5])
def test_sparse_nets_number_components_as_scipy_does(fan_in: int) -> None:
    # Fan-in 1 leaves many small components; explicit zeros in the CSR costs (a weight set
    # to 0 after drawing) are not edges in either way.
    graph = build_cost_graph(build_network(NetworkConfig(
        kind="sparse_mlp", sizes=(4, 30, 25, 30, 3), fan_in=fan_in, seed=fan_in)), lp(1.0))
    costs = graph.blocks[0].costs[0]
    costs.data[::3] = 0.0
    got, want = _labels_both_ways(graph)
    assert got.max() >= 1 or fan_in > 1
    np.testing.assert_array_equal(got, want)


def test_a_recurrent_net_and_the_scipy_path_without_numba(
        monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(4)
    recurrent = rng.standard_normal((6, 6)) * (rng.random((6, 6)) < 0.2)
    network = recurrent_network(rng.standard_normal((6, 2)), recurrent,
                                rng.standard_normal((2, 6)), np.zeros(6), np.zeros(2), "relu")
    graph = build_cost_graph(network, lp(1.0))
    got, want = _labels_both_ways(graph)
    np.testing.assert_array_equal(got, want)
    monkeypatch.setattr(components_module, "COMPILED", False)
    np.testing.assert_array_equal(unit_components(graph), want)
