"""Shard specs of a sparse cost graph, built from its edge list instead of dense blocks.

``shard.build_shard_specs`` slices dense blocks; a sparse graph (CSR blocks, see ``graph``)
gives each shard the same things from the global edge list: the owned units, the halo (every
unit joined to an owned unit by a nonzero cost), a local ``CostGraph`` over ``[own | halo]``
whose one CSR block holds the edges with an owned end, the colouring of the owned units and
what each neighbour shard needs. Work per shard is proportional to its edges, not to the
size of the network.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from ..graph import Block, CostGraph
from .layout import _edges, expand_ranges
from .shard import ShardSpec


def build_sparse_shard_specs(graph: CostGraph, partition: Sequence[np.ndarray]
                             ) -> list[ShardSpec]:
    """One spec per shard of ``partition`` (disjoint sorted arrays of global unit ids)."""
    n = graph.n_units
    owner = np.full(n, -1, dtype=np.int64)
    for sid, units in enumerate(partition):
        owner[np.asarray(units, dtype=np.int64)] = sid
    dst, src, cost = _edges(graph)
    by_dst = np.argsort(dst, kind="stable")
    by_src = np.argsort(src, kind="stable")
    dst_ptr = np.searchsorted(dst[by_dst], np.arange(n + 1))
    src_ptr = np.searchsorted(src[by_src], np.arange(n + 1))
    local_of = np.full(n, -1, dtype=np.int64)  # scratch, reset after each shard
    specs = []
    for sid, units in enumerate(partition):
        own = np.asarray(units, dtype=np.int64)
        into, _ = expand_ranges(dst_ptr[own], dst_ptr[own + 1])
        out, _ = expand_ranges(src_ptr[own], src_ptr[own + 1])
        edges = _sorted_unique(np.concatenate([by_dst[into], by_src[out]]))
        neighbours = np.concatenate([src[edges], dst[edges]])
        is_own = owner[neighbours] == sid
        halo = _sorted_unique(neighbours[~is_own])
        local_ids = np.concatenate([own, halo])
        local_of[local_ids] = np.arange(local_ids.shape[0])
        specs.append(_spec(graph, sid, own, halo, owner, local_of, dst[edges], src[edges],
                           cost[:, edges]))
        local_of[local_ids] = -1
    return specs


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """``np.unique`` by one sort (numpy's hash-based unique is several times slower here)."""
    values = np.sort(values)
    if values.size < 2:
        return values
    keep = np.empty(values.shape, dtype=bool)
    keep[0] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


def _spec(graph: CostGraph, sid: int, own: np.ndarray, halo: np.ndarray, owner: np.ndarray,
          local_of: np.ndarray, dst: np.ndarray, src: np.ndarray, cost: np.ndarray
          ) -> ShardSpec:
    n_own, n_local = own.shape[0], own.shape[0] + halo.shape[0]
    local_dst, local_src = local_of[dst], local_of[src]
    block = Block((0, n_local), (0, n_local), tuple(
        sp.csr_array((cost[t], (local_dst, local_src)), shape=(n_local, n_local))
        for t in range(graph.n_terms)))

    def pad(values: np.ndarray) -> np.ndarray:
        padded = np.zeros((graph.n_terms, n_local))
        padded[:, :n_own] = values[:, own]
        return padded

    dead = np.ones(n_local, dtype=bool)
    dead[:n_own] = graph.dead[own]
    local_graph = CostGraph(
        coefs=graph.coefs, powers=graph.powers,
        degrees=graph.degrees[np.concatenate([own, halo])],
        group_names=("own", "halo"), group_ranges=((0, n_own), (n_own, n_local)),
        visible_in=pad(graph.visible_in), visible_out=pad(graph.visible_out),
        self_cost=pad(graph.self_cost), blocks=(block,), stacks=(), constant_cost=0.0,
        dead=dead, sparse=True)
    dst_own, src_own = local_dst < n_own, local_src < n_own
    both = dst_own & src_own & (local_dst != local_src)
    colors = _color_groups(n_own, local_dst[both], local_src[both], graph.dead[own])
    # The owner of each halo unit needs the owned units it is joined to (either direction).
    mine = np.concatenate([local_dst[dst_own & ~src_own], local_src[src_own & ~dst_own]])
    theirs = np.concatenate([src[dst_own & ~src_own], dst[src_own & ~dst_own]])
    peer = owner[theirs]
    keep = peer >= 0  # a dead unit: nobody owns it, its log-scale stays 0
    # One int64 key per (peer, local unit): a plain sort, far faster than unique(axis=1).
    keys = _sorted_unique(peer[keep] * n_local + mine[keep])
    peers, units = keys // n_local, keys % n_local
    bounds = np.flatnonzero(np.diff(peers)) + 1
    send = {int(group[0]): unit_group.astype(np.int64)
            for group, unit_group in zip(np.split(peers, bounds), np.split(units, bounds),
                                         strict=True) if group.size}
    return ShardSpec(sid, own, halo, owner[halo], local_graph, colors, send)


def _color_groups(n_own: int, a: np.ndarray, b: np.ndarray,
                  dead: np.ndarray) -> tuple[np.ndarray, ...]:
    """Greedy colouring of the live owned units; no edge (a[i], b[i]) joins one colour."""
    live = np.nonzero(~dead)[0]
    links = ~dead[a] & ~dead[b]
    if not links.any():
        return (live,) if live.size else ()
    adjacency = sp.csr_array((np.ones(2 * int(links.sum())),
                              (np.concatenate([a[links], b[links]]),
                               np.concatenate([b[links], a[links]]))), shape=(n_own, n_own))
    color = np.full(n_own, -1)
    for k in live:
        taken = set(color[adjacency.indices[adjacency.indptr[k]:adjacency.indptr[k + 1]]]
                    .tolist())
        c = 0
        while c in taken:
            c += 1
        color[k] = c
    return tuple(np.nonzero(color == c)[0] for c in range(color.max() + 1))
