"""Sparse networks in the runtime: block layout edges, shard specs, a simulated run at neuron
granularity, and the memory estimate. The dense twin (``toarray()`` of the same CSR layers)
is the reference wherever both forms can be built."""

from __future__ import annotations

import numpy as np
import pytest

from asyncbalance import kernels
from asyncbalance.errors import InvalidInputError
from asyncbalance.graph import build_cost_graph
from asyncbalance.network import layered_network
from asyncbalance.regularisers import lp
from asyncbalance.runtime import run_scenario
from asyncbalance.runtime.block_host import BlockHost
from asyncbalance.runtime.costmodel import held_array_bytes
from asyncbalance.runtime.host import settings_for
from asyncbalance.runtime.layout import _edges, build_layout
from asyncbalance.runtime.partition import partition_units
from asyncbalance.runtime.scenario import (
    NetworkConfig,
    PartitionConfig,
    build_network,
    scenario_from_mapping,
)
from asyncbalance.runtime.shard import build_shard_specs
from asyncbalance.runtime.sparse_footprint import sparse_footprint
from asyncbalance.runtime.sparse_shard import build_sparse_shard_specs

SMALL = NetworkConfig(kind="sparse_mlp", sizes=(12, 40, 30, 35, 4), fan_in=6, seed=3,
                      unit_spread=1.0)


def graphs(config: NetworkConfig = SMALL, p: float = 1.0):
    net = build_network(config)
    n_layers = int(net.meta["n_layers"])
    twin = layered_network([net.weights[f"W{i}"].toarray() for i in range(1, n_layers + 1)],
                           [net.weights.get(f"b{i}") for i in range(1, n_layers + 1)])
    return build_cost_graph(net, lp(p)), build_cost_graph(twin, lp(p))


def test_layout_edges_are_read_from_the_csr_pattern() -> None:
    sparse_graph, dense_graph = graphs()
    for got, want in zip(_edges(sparse_graph), _edges(dense_graph), strict=True):
        assert np.array_equal(got, want)
    part = partition_units(sparse_graph, "neuron")
    a, b = build_layout(sparse_graph, part), build_layout(dense_graph, part)
    for name in ("units", "slot_sender_pos", "link_src", "link_dst", "link_slot_ptr"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    for side in ("incoming", "outgoing"):
        ta, tb = getattr(a, side), getattr(b, side)
        assert np.array_equal(ta.ptr, tb.ptr) and np.array_equal(ta.value_index, tb.value_index)
        assert np.array_equal(ta.cost, tb.cost)


@pytest.mark.parametrize(("granularity", "units_per_shard"),
                         [("neuron", 0), ("shard", 0), ("shard", 17)])
def test_sparse_shard_specs_equal_the_dense_ones(granularity: str, units_per_shard: int) -> None:
    sparse_graph, dense_graph = graphs()
    part = partition_units(sparse_graph, granularity, 2, units_per_shard)
    got, want = build_sparse_shard_specs(sparse_graph, part), build_shard_specs(dense_graph,
                                                                                part)
    rng = np.random.default_rng(5)
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(a.units, b.units) and np.array_equal(a.halo, b.halo)
        assert np.array_equal(a.halo_owner, b.halo_owner)
        assert [c.tolist() for c in a.colors] == [c.tolist() for c in b.colors]
        assert sorted(a.send_units) == sorted(b.send_units)
        for peer in a.send_units:
            assert np.array_equal(a.send_units[peer], b.send_units[peer])
        assert np.array_equal(a.graph.dead, b.graph.dead)
        # The local graphs give the owned units the same flows and exact moves.
        u = rng.standard_normal(a.graph.n_units)
        n_own = a.n_own
        fa = kernels.unit_flows_range(a.graph, u, 0, n_own)
        fb = kernels.unit_flows_range(b.graph, u, 0, n_own)
        # Sums of the same few terms in other orders: relative 1e-13.
        assert np.allclose(fa[0], fb[0], rtol=1e-13, atol=0)
        assert np.allclose(fa[1], fb[1], rtol=1e-13, atol=0)
        own = np.arange(n_own)
        assert np.allclose(kernels.exact_moves(a.graph, u, own, fa),
                           kernels.exact_moves(b.graph, u, own, fb), rtol=1e-10, atol=1e-12)


def test_a_sparse_net_at_neuron_granularity_converges_in_the_simulator(tmp_path) -> None:
    scenario = scenario_from_mapping({
        "name": "sparse", "seed": 2,
        "network": {"kind": "sparse_mlp", "sizes": [40, 1000, 1000, 1000, 10], "fan_in": 12,
                    "unit_spread": 1.0, "seed": 5},
        "partition": {"granularity": "neuron"},
        "links": {"delay": "exponential", "mean": 0.5},
        "stop": {"tol": 1e-8, "max_time": 2000.0, "function_check": "final"},
    })
    summary = run_scenario(scenario, tmp_path / "run")
    assert summary["n_shards"] >= 2900  # one per live neuron of the 3,000
    assert summary["converged"] and summary["stop_reason"] == "tolerance"
    # Judged against the exact optimum of the sparse graph (itself equal to the dense twin's,
    # see test_sparse_network): the distance, not the function check, shows convergence.
    assert summary["max_abs_log_scale_error"] <= 1e-8
    assert summary["function_checks"] >= 1 and summary["function_max_rel_error"] <= 1e-12


def test_memory_estimate_counts_the_arrays_that_are_built() -> None:
    config = NetworkConfig(kind="sparse_mlp", sizes=(300, 2000, 2000, 10), fan_in=30, seed=1)
    estimate = sparse_footprint(config)
    net = build_network(config)
    graph = build_cost_graph(net, lp(1.0))
    links = sum(w.nnz for k, w in net.weights.items() if k.startswith("W"))
    network_bytes = sum(w.data.nbytes + w.indices.nbytes + w.indptr.nbytes
                        if hasattr(w, "indptr") else w.nbytes for w in net.weights.values())
    graph_bytes = sum(k.data.nbytes for b in graph.blocks for k in b.costs) + sum(
        getattr(graph, name).nbytes for name in ("visible_in", "visible_out", "self_cost"))
    # The count of unread inputs is an expectation: links within 1 %, bytes within 2 %.
    assert abs(estimate.links - links) <= 0.01 * links
    assert abs(estimate.network - network_bytes) <= 0.02 * network_bytes
    assert abs(estimate.cost_graph - graph_bytes) <= 0.02 * graph_bytes
    # Neuron shards run as a shard block: the estimate is the arrays of a simulator's host,
    # counted here on the built layout and host (within 1 %: the estimate takes every unit
    # as live and every row's fan_in as drawn).
    neurons = sparse_footprint(config, PartitionConfig(granularity="neuron"))
    layout = build_layout(graph, partition_units(graph, "neuron"))
    host = BlockHost(0, layout, np.zeros(layout.n_shards, dtype=np.int64),
                     settings_for(scenario_from_mapping({}), {}),
                     np.ones(layout.n_links), 0.1, level="none", keep_checkpoints=False)
    held = held_array_bytes(layout, host)
    assert abs(neurons.shards - held) <= 0.01 * held
    assert neurons.shards > estimate.shards
    big = NetworkConfig(kind="sparse_mlp", sizes=(1000, 25000, 25000, 25000, 25000, 10),
                        fan_in=133)
    assert 1.3e7 <= sparse_footprint(big).links <= 1.35e7
    with pytest.raises(InvalidInputError, match="network.kind"):
        sparse_footprint(NetworkConfig(kind="mlp"))


def test_run_refuses_a_sparse_scenario_that_cannot_fit() -> None:
    from asyncbalance.runtime.memory_estimate import check_scenario_memory, scenario_footprint

    base = {"network": {"kind": "sparse_mlp", "fan_in": 133,
                        "sizes": [1000, 25000, 25000, 25000, 25000, 10]},
            "partition": {"granularity": "neuron"}}
    fits = scenario_from_mapping(base)
    # Measured for this scenario: 4.10 GiB peak in the simulator (BENCHMARKS.md); the
    # estimate is a floor for what backends add (in-flight messages, Python, libraries).
    assert 2e9 <= scenario_footprint(fits).total <= 4.10 * 2**30
    check_scenario_memory(fits, available=16 * 10**9)
    wide = scenario_from_mapping({**base, "network": {**base["network"], "sizes": [
        1000, 250000, 250000, 250000, 250000, 10]}})
    with pytest.raises(InvalidInputError, match="partition.granularity"):
        check_scenario_memory(wide, available=16 * 10**9)
