"""The memory a scenario needs, estimated from its keys before anything is built.

A run holds the network's weights (and a scaled copy for the function check), the cost graph
(one cost per hidden-to-hidden weight, plus a transient array as large as the largest
layer while costs are powered), and each shard's set-up: a dense ``n_own x n_own`` matrix of
its own units' costs and the rows and columns of its neighbours' costs (together about twice
the hidden-to-hidden weights), plus ~2.5 KB of bookkeeping per shard. Backends add their own
state on top (the estimate is a floor for them), so a scenario refused here could never run.
Measured for ``sizes = [10, 3000, 3000, 10]`` in one shard per layer: 650 MB estimated,
424 MB peak resident to build the problem (the shards' dense matrices are zeros that are not
all touched). A ``sparse_mlp`` is estimated by ``sparse_footprint`` (CSR arrays, no dense
matrix anywhere).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..memory import check_fits, format_bytes
from .scenario import Scenario
from .sparse_footprint import sparse_footprint

__all__ = ["Footprint", "check_scenario_memory", "scenario_footprint"]

FLOAT = 8
SHARD_OVERHEAD = 2500  # bytes of Python objects per shard (measured: neuron granularity)


@dataclass(frozen=True)
class Footprint:
    """Estimated bytes by part; ``field`` is the key that drives the largest part."""

    network: float
    cost_graph: float
    shards: float
    field: str
    advice: str

    @property
    def total(self) -> float:
        return self.network + self.cost_graph + self.shards

    def parts(self) -> str:
        return (f"network {format_bytes(self.network)}, cost graph "
                f"{format_bytes(self.cost_graph)}, shards {format_bytes(self.shards)}")


def _layers(scenario: Scenario) -> tuple[list[tuple[int, int]], list[int], list[bool]] | None:
    """(n_out, n_in) per weight matrix, the hidden widths, and whether each matrix joins two
    hidden groups; None for a network read from a file (its size is the file's)."""
    net = scenario.network
    if net.kind == "mlp":
        sizes = [int(s) for s in net.sizes]
        pairs = list(zip(sizes[1:], sizes[:-1], strict=True))
        inner = [0 < i < len(pairs) - 1 for i in range(len(pairs))]
        return pairs, sizes[1:-1], inner
    if net.kind == "recurrent":
        n = int(net.hidden)
        return ([(n, int(net.inputs)), (n, n), (int(net.outputs), n)], [n],
                [False, True, False])
    return None


def _shard_sizes(scenario: Scenario, hidden: list[int]) -> list[int]:
    part = scenario.partition
    total = sum(hidden)
    if part.granularity == "neuron":
        return [1] * total
    if part.units_per_shard > 0:
        full, rest = divmod(total, part.units_per_shard)
        return [part.units_per_shard] * full + ([rest] if rest else [])
    sizes = []
    for width in hidden:
        k = min(part.shards_per_layer, width)
        base, extra = divmod(width, k)
        sizes += [base + 1] * extra + [base] * (k - extra)
    return sizes


def scenario_footprint(scenario: Scenario) -> Footprint | None:
    """The estimate (see the module doc); None for a network read from a file."""
    if scenario.network.kind == "sparse_mlp":
        return _sparse_footprint(scenario)
    layers = _layers(scenario)
    if layers is None:
        return None
    pairs, hidden, inner = layers
    counts = [o * i for o, i in pairs]
    weights = sum(counts) + sum(o for o, _ in pairs)
    largest = max(counts)
    hidden_hidden = sum(c for c, joins in zip(counts, inner, strict=True) if joins)
    transient = largest * (2.125 if scenario.network.density < 1.0 else 1.0)
    network = FLOAT * (2 * weights + transient)
    cost_graph = FLOAT * (hidden_hidden + largest + 2 * sum(hidden))
    own = _shard_sizes(scenario, hidden)
    dense = FLOAT * sum(float(n) ** 2 for n in own)
    shards = dense + FLOAT * 2 * hidden_hidden + SHARD_OVERHEAD * len(own)
    size_key = "network.sizes" if scenario.network.kind == "mlp" else "network.hidden"
    if dense >= max(network, cost_graph):
        field = "partition.shards_per_layer" if scenario.partition.granularity == "shard" \
            and scenario.partition.units_per_shard == 0 else "partition.units_per_shard"
        advice = (f"cut the layers into more, smaller shards ({field}) or use smaller "
                  f"layers ({size_key})")
    else:
        field = size_key
        advice = f"use smaller layers ({size_key})"
    return Footprint(network, cost_graph, shards, field, advice)


def _sparse_footprint(scenario: Scenario) -> Footprint:
    """A ``sparse_mlp``: CSR weights, costs and shard specs (``sparse_footprint``)."""
    part = sparse_footprint(scenario.network, scenario.partition)
    # The weights twice (the function check's scaled copy) and the drawing's transient peak.
    network = 2 * part.network + part.drawing
    cost_graph = part.cost_graph + part.optimum
    if part.shards >= max(network, cost_graph) and scenario.partition.granularity == "neuron":
        field = "partition.granularity"
        advice = ("balance slices of layers instead of single neurons (partition.granularity "
                  "= 'shard') or use a smaller network.sizes or network.fan_in")
    else:
        field = "network.sizes"
        advice = "use smaller layers (network.sizes) or fewer inputs per neuron (network.fan_in)"
    return Footprint(network, cost_graph, part.shards, field, advice)


def check_scenario_memory(scenario: Scenario, available: int | None = None) -> None:
    """Refuse a scenario whose estimated footprint exceeds the memory available."""
    footprint = scenario_footprint(scenario)
    if footprint is not None:
        check_fits(footprint.field, footprint.total, footprint.parts(), footprint.advice,
                   available)
