"""The memory a ``sparse_mlp`` scenario needs, estimated from its keys before anything is built.

A pure function of the network keys and the partition: it counts the arrays that
``build_network`` (CSR layers), ``build_cost_graph`` (one float64 cost per link and term, the
index arrays shared with the weights), ``solve_optimum`` (float32 copies for the Hessian
products, and vectors of one float per neuron) and the shards keep.

At neuron granularity the shards run as one shard block per host, whose arrays the cost
model counts exactly (``costmodel.array_bytes``); the part is that count for one host
holding the whole layout without checkpoint copies (the simulator), a floor for Ray hosts
too (their host-local layouts add up to at least the whole one, and they keep checkpoints).
Layer slices run as per-shard specs, calibrated on a measurement (fan_in 133, 10^4 neurons
in the per-shard design: 547 bytes per hidden link, tracemalloc): every link sits in the
specs of both its ends.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import InvalidInputError
from .costmodel import array_bytes, sparse_mlp_counts
from .scenario import NetworkConfig, PartitionConfig

__all__ = ["SparseFootprint", "expected_links", "sparse_footprint"]

FLOAT, FLOAT32, INDEX = 8, 4, 4
# Float64 vectors of one entry per hidden unit the Newton solver holds at once (flows, the
# gradient, CG and line-search vectors), counted generously.
SOLVER_VECTORS = 40
# Per hidden link, in each of the two specs it is in: the local CSR entry (value + index),
# the end's share of the padded per-unit arrays and halo ids (measured total below).
LINK_IN_SPEC = 50
# Per (shard, neighbour shard) pair: a small index array and its dict entry.
PEER_ENTRY = 200
SHARD_OVERHEAD = 2500  # bytes of Python objects per shard


@dataclass(frozen=True)
class SparseFootprint:
    """Estimated bytes by part; ``drawing`` is the transient peak while a layer is drawn."""

    links: int
    network: int
    cost_graph: int
    optimum: int
    shards: int
    drawing: int

    @property
    def total(self) -> int:
        return self.network + self.cost_graph + self.optimum + self.shards + self.drawing


def expected_links(n_out: int, n_in: int, fan_in: int) -> float:
    """Links of ``random_sparse_layer``: ``min(fan_in, n_in)`` per row plus the inputs no
    row drew (each missed with probability ``(1 - k / n_in) ** n_out``)."""
    k = min(fan_in, n_in)
    return n_out * k + n_in * (1.0 - k / n_in) ** n_out


def sparse_footprint(config: NetworkConfig, partition: PartitionConfig | None = None,
                     n_terms: int = 1) -> SparseFootprint:
    """The estimate for a ``sparse_mlp`` network (see the module doc)."""
    if config.kind != "sparse_mlp":
        raise InvalidInputError("network.kind", f"the sparse estimate is for 'sparse_mlp', "
                                f"got {config.kind!r}", ["sparse_mlp"])
    partition = partition if partition is not None else PartitionConfig()
    sizes = [int(s) for s in config.sizes]
    shapes = list(zip(sizes[1:], sizes[:-1], strict=True))
    links = [expected_links(o, i, config.fan_in) for o, i in shapes]
    hidden_links = sum(links[1:-1])
    n_hidden = sum(sizes[1:-1])
    biases = sum(sizes[1:]) if config.bias else 0
    network = sum(lk * (FLOAT + INDEX) + (o + 1) * INDEX
                  for lk, (o, _) in zip(links, shapes, strict=True)) + FLOAT * biases
    cost_graph = n_terms * FLOAT * hidden_links + 3 * n_terms * FLOAT * n_hidden
    optimum = n_terms * hidden_links * (FLOAT32 + INDEX) + SOLVER_VECTORS * FLOAT * n_hidden
    if partition.granularity == "neuron":
        counts = replace(sparse_mlp_counts(sizes[1:-1], config.fan_in), cost_terms=n_terms)
        shards = array_bytes(counts, checkpoints=False)
    else:
        n_shards = (-(-n_hidden // partition.units_per_shard) if partition.units_per_shard
                    else partition.shards_per_layer * (len(sizes) - 2))
        # A slice of a layer talks to the slices of the layers above and below.
        peer_pairs = min(2 * hidden_links, 2 * n_shards * max(partition.shards_per_layer, 1))
        shards = 2 * hidden_links * LINK_IN_SPEC + peer_pairs * PEER_ENTRY + \
            SHARD_OVERHEAD * n_shards
    # Drawing the largest layer: int64 rows and columns, float64 values, the COO -> CSR
    # conversion and the float64 copy ``layered_network`` makes (about 48 bytes per link).
    drawing = 48 * max(links)
    return SparseFootprint(int(sum(links)), int(network), int(cost_graph), int(optimum),
                           int(shards), int(drawing))
