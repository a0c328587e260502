"""A sparse layered network in the simulator: converged, function exact, bounded memory.

The network (``towers_network`` in ``benchmarks/bench_scaling.py``) is columns of dense
layers joined to their neighbour column, so it is sparse overall; the benchmark runs it with
100 000 hidden units and reports unit-updates/s and memory, this test a 2 400-unit one.

Tolerances: convergence is judged by the optimality condition (max log-imbalance <= 1e-8)
and, here where it is affordable, against the exact optimum (max |u - u*| <= 1e-8). The
function is exact in exact arithmetic, so <= 1e-12 relative (float64 rounding ~1e-15).
Memory: the simulation's own allocations (traced after the shards are built) stay below
three copies of the weights: one scaled copy of the network for each function check, its
activations, and messages in flight, none of which grows with simulated time.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from asyncbalance.optimum import solve_optimum

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_scaling",
                                                  ROOT / "benchmarks" / "bench_scaling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _bench()


def test_towers_network_is_sparse_and_connected(bench) -> None:
    net = bench.towers_network(towers=5, depth=3, width=4)
    assert net.n_hidden == 60
    dense_equivalent = 60 * 60
    hidden_weights = sum(net.weights[c.key].size for c in net.connections
                         if c.src not in ("input", "bias") and c.dst != "output")
    assert hidden_weights == 5 * 2 * 16 + 4 * 2 * 16  # in-tower + cross-tower links
    assert hidden_weights < dense_equivalent / 5


def test_large_sparse_network_converges_exactly_in_bounded_memory(bench) -> None:
    net = bench.towers_network(towers=30, depth=4, width=20)
    result = bench.balance_large(net, units_per_shard=400)
    assert result["hidden"] == 2400 and result["shards"] == 6
    assert result["converged"], result["max_log_imbalance"]
    assert result["max_log_imbalance"] <= 1e-8
    assert result["function_max_rel_error"] <= 1e-12
    optimum = solve_optimum(result["graph"])
    assert float(np.max(np.abs(result["log_scales"] - optimum.log_scales))) <= 1e-8
    assert result["traced_peak_bytes"] <= 3 * 8 * result["weights"]
