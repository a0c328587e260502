"""Partitioning hidden units into shards: one neuron per shard, or slices of layers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidInputError
from ..graph import CostGraph

GRANULARITIES = ("neuron", "shard")


def partition_units(graph: CostGraph, granularity: str = "shard", shards_per_layer: int = 1,
                    units_per_shard: int = 0) -> list[np.ndarray]:
    """Disjoint sorted arrays of global unit ids, one per shard.

    Dead units (no incoming or no outgoing cost) never move, so no shard owns them; their
    log-scale stays 0 and neighbours read that value from their initial view.

    - ``neuron``: one shard per live unit.
    - ``shard`` with ``units_per_shard > 0``: consecutive chunks of that many live units in
      layer order (a chunk may straddle two layers).
    - ``shard`` otherwise: each layer (hidden group) cut into ``shards_per_layer`` near-equal
      contiguous slices.
    """
    if granularity not in GRANULARITIES:
        raise InvalidInputError("partition.granularity", f"unknown value {granularity!r}",
                                GRANULARITIES)
    if shards_per_layer < 1:
        raise InvalidInputError("partition.shards_per_layer",
                                f"must be >= 1, got {shards_per_layer}")
    if units_per_shard < 0:
        raise InvalidInputError("partition.units_per_shard",
                                f"must be >= 0 (0 = use shards_per_layer), got {units_per_shard}")
    live = np.nonzero(graph.free)[0]
    if granularity == "neuron":
        return [np.array([k]) for k in live]
    if units_per_shard > 0:
        return [chunk for chunk in np.array_split(live, -(-live.size // units_per_shard))
                if chunk.size]
    shards = []
    for start, stop in graph.group_ranges:
        layer = live[(live >= start) & (live < stop)]
        shards += [piece for piece in np.array_split(layer, min(shards_per_layer, layer.size))
                   if piece.size] if layer.size else []
    return shards


# Shards of fewer units than this on average run as shard blocks; larger ones (layer slices
# of dense layers) run the per-shard engine, whose dense block products are faster there
# (benchmarks/bench_blocks.py: 0.03 s against 0.3-2.8 s for 3-4 layer shards).
BLOCK_UNITS_PER_SHARD = 8


def runs_as_blocks(partition: Sequence[np.ndarray]) -> bool:
    """Whether a partition runs as shard blocks: shards of a few units each (neurons)."""
    units = sum(len(p) for p in partition)
    return bool(len(partition)) and units < BLOCK_UNITS_PER_SHARD * len(partition)


@dataclass(frozen=True, eq=False)
class UnitShard:
    """A shard known by its units only: all a block run needs (the block layout holds the
    costs), so that 10^5 neuron shards cost no per-shard cost graphs."""

    shard_id: int
    units: np.ndarray

    @property
    def n_own(self) -> int:
        return int(self.units.shape[0])

    @property
    def cost_bytes(self) -> None:
        return None
