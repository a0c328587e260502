"""Sparse (CSR) layered networks against the same networks stored densely: drawing, costs,
kernels, the optimum and the function check.

The dense twin of a sparse net is built from ``toarray()`` of the same matrices, so both forms
describe one network and every quantity has one true value. Tolerances: costs and sums differ
only by summation order (relative 1e-13, about 500 ulps over sums of at most a few hundred
terms); optima are each certified to 1e-12 and unique, so they agree to 1e-10.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from asyncbalance import kernels
from asyncbalance.errors import InvalidInputError
from asyncbalance.forward import forward, function_rel_error, probe_inputs
from asyncbalance.graph import build_cost_graph
from asyncbalance.network import layered_network, random_sparse_layer, scale_network
from asyncbalance.optimum import gauge_components, project_gauge, solve_optimum
from asyncbalance.regularisers import elastic_net, lp
from asyncbalance.runtime.scenario import NetworkConfig, build_network, scenario_from_mapping

SMALL = NetworkConfig(kind="sparse_mlp", sizes=(12, 40, 30, 35, 4), fan_in=6, seed=3,
                      unit_spread=1.0)
REGULARISERS = {"l1": lp(1.0), "l2": lp(2.0), "elastic": elastic_net(0.5, 0.5)}


def dense_twin(network):
    n_layers = int(network.meta["n_layers"])
    w = network.weights
    return layered_network([w[f"W{i}"].toarray() for i in range(1, n_layers + 1)],
                           [w.get(f"b{i}") for i in range(1, n_layers + 1)], "relu")


def rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = float(np.max(np.abs(b))) or 1.0
    return float(np.max(np.abs(a - b))) / scale


def test_each_neuron_gets_fan_in_distinct_inputs_reproducibly() -> None:
    layer = random_sparse_layer(np.random.default_rng(0), 300, 1000, 40)
    assert layer.format == "csr" and layer.shape == (300, 1000)
    counts = np.diff(layer.indptr)
    assert np.all(counts == 40)  # 300 x 40 draws cover all 1000 inputs (each missed w.p. 6e-6)
    for row in range(300):
        cols = layer.indices[layer.indptr[row]:layer.indptr[row + 1]]
        assert np.unique(cols).size == 40
    again = random_sparse_layer(np.random.default_rng(0), 300, 1000, 40)
    assert np.array_equal(layer.indices, again.indices) and np.array_equal(layer.data,
                                                                           again.data)
    # A layer smaller than fan_in is linked in full; a dense-ish one (2 k > n_in) too works.
    assert np.all(np.diff(random_sparse_layer(np.random.default_rng(1), 5, 4, 9).indptr) == 4)
    mostly = random_sparse_layer(np.random.default_rng(1), 50, 10, 7)
    assert all(np.unique(mostly.indices[mostly.indptr[r]:mostly.indptr[r + 1]]).size == 7
               for r in range(50))
    # Std gain / sqrt(k): 12,000 draws give the sample std within 3 % (6 sigma is 3.9 %).
    assert abs(layer.data.std() * np.sqrt(40) - 1.0) < 0.05
    # A narrow layer over a wide one: every input still gets a reader, none is dead.
    narrow = random_sparse_layer(np.random.default_rng(2), 10, 5000, 20)
    assert np.array_equal(np.unique(narrow.indices), np.arange(5000))
    assert np.all(np.diff(narrow.indptr) >= 20)


def test_scenario_draws_csr_layers_from_its_seed() -> None:
    net = build_network(SMALL)
    sizes = SMALL.sizes
    for i in range(1, len(sizes)):
        w = net.weights[f"W{i}"]
        assert sp.issparse(w) and w.format == "csr" and w.shape == (sizes[i], sizes[i - 1])
        assert np.all(np.diff(w.indptr) >= min(SMALL.fan_in, sizes[i - 1]))
        assert np.array_equal(np.unique(w.indices), np.arange(sizes[i - 1]))
        assert isinstance(net.weights[f"b{i}"], np.ndarray)
    same = build_network(SMALL)
    other = build_network(NetworkConfig(**{**SMALL.__dict__, "seed": 4}))
    assert (same.weights["W2"] != net.weights["W2"]).nnz == 0
    assert (other.weights["W2"] != net.weights["W2"]).nnz > 0


@pytest.mark.parametrize(("data", "key"), [
    ({"kind": "sparse_mlp", "fan_in": 0}, "fan_in"),
    ({"kind": "sparse_mlp", "fan_in": -3}, "fan_in"),
    ({"kind": "sparse_mlp", "density": 0.5}, "density"),
    ({"kind": "sparse_mlp", "sizes": [4, 5]}, "sizes"),
    ({"kind": "sparse_mlp", "sizes": [4, 0, 3]}, "sizes"),
    ({"kind": "sparce_mlp"}, "network.kind"),
])
def test_bad_sparse_settings_name_the_key(data: dict, key: str) -> None:
    with pytest.raises(InvalidInputError) as error:
        scenario_from_mapping({"network": data})
    assert key in str(error.value)


def test_sparse_weights_are_checked_like_dense_ones() -> None:
    bad = sp.csr_array(np.array([[1.0, np.nan], [0.0, 2.0]]))
    with pytest.raises(InvalidInputError, match="W1"):
        layered_network([bad, np.ones((1, 2))])
    with pytest.raises(InvalidInputError, match="W2"):
        layered_network([sp.csr_array(np.ones((3, 2))), sp.csr_array(np.ones((1, 4)))])


@pytest.mark.parametrize("reg", sorted(REGULARISERS))
def test_sparse_graph_has_the_dense_costs(reg: str) -> None:
    net = build_network(SMALL)
    sparse_graph = build_cost_graph(net, REGULARISERS[reg])
    dense_graph = build_cost_graph(dense_twin(net), REGULARISERS[reg])
    assert sparse_graph.sparse and not dense_graph.sparse and not sparse_graph.stacks
    assert len(sparse_graph.blocks) == len(dense_graph.blocks)
    for s_block, d_block in zip(sparse_graph.blocks, dense_graph.blocks, strict=True):
        assert (s_block.dst, s_block.src) == (d_block.dst, d_block.src)
        for s_cost, d_cost in zip(s_block.costs, d_block.costs, strict=True):
            assert np.array_equal(s_cost.toarray(), d_cost)
    for name in ("visible_in", "visible_out", "self_cost", "degrees"):
        assert rel(getattr(sparse_graph, name), getattr(dense_graph, name)) <= 1e-13, name
    assert np.array_equal(sparse_graph.dead, dense_graph.dead)
    assert sparse_graph.constant_cost == pytest.approx(dense_graph.constant_cost, rel=1e-13)


@pytest.mark.parametrize("reg", sorted(REGULARISERS))
def test_kernels_agree_on_both_forms(reg: str) -> None:
    net = build_network(SMALL)
    gs = build_cost_graph(net, REGULARISERS[reg])
    gd = build_cost_graph(dense_twin(net), REGULARISERS[reg])
    rng = np.random.default_rng(7)
    u = 0.5 * rng.standard_normal(gs.n_units)
    v = rng.standard_normal(gs.n_units)
    fs, fd = kernels.unit_flows(gs, u), kernels.unit_flows(gd, u)
    assert rel(fs[0], fd[0]) <= 1e-13 and rel(fs[1], fd[1]) <= 1e-13
    assert kernels.total_cost(gs, u) == pytest.approx(kernels.total_cost(gd, u), rel=1e-13)
    assert rel(kernels.gradient(gs, u), kernels.gradient(gd, u)) <= 1e-12
    assert rel(kernels.log_imbalance(gs, u), kernels.log_imbalance(gd, u)) <= 1e-12
    assert kernels.max_log_imbalance(gs, u) == pytest.approx(kernels.max_log_imbalance(gd, u),
                                                             rel=1e-12)
    assert rel(kernels.hessian_vector_product(gs, u, v),
               kernels.hessian_vector_product(gd, u, v)) <= 1e-12
    # float32 products: both round costs and vectors to float32 (relative 6e-8 each), and
    # sum in different orders; 1e-5 is far above that and far below any wrong index.
    assert rel(kernels.hessian_vector_product(gs, u, v, None, kernels.single_precision_costs(gs)),
               kernels.hessian_vector_product(gd, u, v)) <= 1e-5
    assert rel(kernels.hessian_diagonal(gs, u, fs), kernels.hessian_diagonal(gd, u, fd)) <= 1e-13
    assert rel(kernels.group_coupling(gs, u, fs), kernels.group_coupling(gd, u, fd)) <= 1e-12
    units = np.arange(gs.n_units)
    assert rel(kernels.exact_moves(gs, u, units), kernels.exact_moves(gd, u, units)) <= 1e-10
    lo, hi = gs.group_ranges[1]
    ranged_s = kernels.unit_flows_range(gs, u, lo + 3, hi - 2)
    ranged_d = kernels.unit_flows_range(gd, u, lo + 3, hi - 2)
    assert rel(ranged_s[0], ranged_d[0]) <= 1e-13 and rel(ranged_s[1], ranged_d[1]) <= 1e-13


@pytest.mark.parametrize("reg", sorted(REGULARISERS))
def test_same_optimum_and_function_on_both_forms(reg: str) -> None:
    net = build_network(SMALL)
    twin = dense_twin(net)
    cs = solve_optimum(build_cost_graph(net, REGULARISERS[reg]))
    cd = solve_optimum(build_cost_graph(twin, REGULARISERS[reg]))
    assert cs.max_log_imbalance <= 1e-12 and cd.max_log_imbalance <= 1e-12
    assert np.max(np.abs(cs.log_scales - cd.log_scales)) <= 1e-10
    assert cs.cost == pytest.approx(cd.cost, rel=1e-12)
    balanced = scale_network(net, cs.log_scales)
    assert all(sp.issparse(balanced.weights[f"W{i}"]) for i in range(1, 5))
    x = probe_inputs(net)
    # Forward passes of one network in two storage forms: products summed in other orders.
    assert rel(forward(net, x), forward(twin, x)) <= 1e-13
    assert rel(forward(balanced, x), forward(scale_network(twin, cd.log_scales), x)) <= 1e-12
    # Rescaling keeps the function: only rounding (a few ulps per layer) remains.
    assert function_rel_error(net, balanced) <= 1e-12
    # Doubling every synapse of one layer is no rescaling: the check sees it.
    changed = dict(balanced.weights)
    changed["W2"] = balanced.weights["W2"] * 2.0
    assert function_rel_error(net, balanced.with_weights(changed)) > 1e-3


def test_gauge_components_without_biases_match() -> None:
    config = NetworkConfig(**{**SMALL.__dict__, "bias": False})
    net = build_network(config)
    gs = build_cost_graph(net, lp(2.0))
    gd = build_cost_graph(dense_twin(net), lp(2.0))
    comp_s, comp_d = gauge_components(gs), gauge_components(gd)
    assert [c.tolist() for c in comp_s] == [c.tolist() for c in comp_d]
    vector = np.arange(gs.n_units, dtype=np.float64)
    assert np.array_equal(project_gauge(vector.copy(), comp_s),
                          project_gauge(vector.copy(), comp_d))
    cs, cd = solve_optimum(gs), solve_optimum(gd)
    assert np.max(np.abs(cs.log_scales - cd.log_scales)) <= 1e-10


def test_optimum_of_a_2000_neuron_sparse_net_is_certified_from_the_weights() -> None:
    config = NetworkConfig(kind="sparse_mlp", sizes=(100, 700, 700, 600, 10), fan_in=24,
                           seed=11, unit_spread=1.0)
    net = build_network(config)
    p = 2.0
    cert = solve_optimum(build_cost_graph(net, lp(p)))
    balanced = scale_network(net, cert.log_scales)
    # Ground truth straight from the balanced weights, not through the kernels: a hidden
    # unit's incoming cost A (its row of W_i and its bias) against its outgoing cost B (its
    # column of W_{i+1}); ReLU has c = 1.
    worst = 0.0
    for i in range(1, 4):
        w_in = balanced.weights[f"W{i}"]
        w_out = balanced.weights[f"W{i + 1}"]
        incoming = np.asarray(abs(w_in).power(p).sum(axis=1)).ravel() + \
            np.abs(balanced.weights[f"b{i}"]) ** p
        outgoing = np.asarray(abs(w_out).power(p).sum(axis=0)).ravel()
        # A unit nobody reads from (no outgoing synapse) is dead: never rescaled.
        live = outgoing > 0
        assert live.mean() > 0.9
        worst = max(worst, float(np.max(np.abs(np.log(incoming[live] / outgoing[live])))))
    # The solver stops at 1e-12 in log-imbalance; the weights it implies are rounded once
    # more by the scaling, so 1e-9 is a wide margin that an unbalanced net (|log| ~ 1) misses.
    assert worst <= 1e-9
    assert function_rel_error(net, balanced) <= 1e-12
