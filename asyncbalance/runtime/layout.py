"""The index arrays of a block of logical shards: who owns which unit, who needs which value.

A ``BlockLayout`` describes many logical shards (single neurons or layer slices) as flat
arrays, built from the global cost graph in a few vectorised passes:

- **units**: the owned units, shard after shard (``unit_ptr`` is the CSR of shards over them);
- **terms**: per owned unit, its incoming terms (``K_e exp(-p c_j u_j)`` summed into A_k) and
  outgoing terms (``K_e exp(p u_i)`` summed into B_k), each reading its neighbour's value from
  one place of the block's value vector ``[own log-scales | halo slots | 0]``: the owner's own
  value when the neighbour belongs to the same shard, the shard's halo slot for it otherwise,
  and the trailing constant 0 for a dead unit that nobody owns;
- **halo slots**: one per (receiving shard, neighbour unit owned elsewhere), sorted by the
  directed link (sender shard, receiver shard) that fills them;
- **links**: the directed shard pairs that exchange state, sorted by (sender, receiver), with
  the CSR of their slots and of each sender's outgoing links.

Everything here is fixed for the run; the state lives in ``ShardBlock``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..graph import CostGraph
from . import block_loops


def expand_ranges(starts: np.ndarray, stops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The concatenation of ``arange(starts[i], stops[i])`` and the segment index of each item."""
    if block_loops.COMPILED and starts.dtype == np.int64 and stops.dtype == np.int64:
        # One compiled pass: a window calls this a few times, ~10 us each the numpy way.
        return block_loops.expand_ranges(starts, stops)
    lengths = np.maximum(stops - starts, 0)
    n = starts.shape[0]
    total = int(lengths.sum())
    if total == n and (lengths == 1).all():
        # One item per range (every neuron, every link of one neuron): no expansion.
        return starts.astype(np.int64, copy=False), np.arange(n)
    segment = np.repeat(np.arange(n), lengths)
    if total == 0:
        return np.zeros(0, dtype=np.int64), segment
    first = np.cumsum(lengths) - lengths
    index = np.arange(total, dtype=np.int64) - np.repeat(first - starts, lengths)
    return index, segment


def _run_starts(ordered: np.ndarray) -> np.ndarray:
    """Where each run of equal values of sorted ``ordered`` begins."""
    starts = np.ones(ordered.shape[0], dtype=bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    return starts


def _unique_inverse(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(keys, return_inverse=True)`` by one argsort: the sorted distinct keys and,
    per key, its index among them (equal keys share it whatever order the sort leaves them
    in, so the sort need not be stable). Measured on 5.3e7 int64 keys in random order: 4.6 s,
    where a sort and a binary search per key took 89 s."""
    order = np.argsort(keys)
    ordered = keys[order]
    starts = _run_starts(ordered)
    distinct = ordered[starts]
    del ordered
    inverse = np.empty(keys.shape[0], dtype=np.int64)
    ranks = np.cumsum(starts, dtype=np.int64)
    del starts
    ranks -= 1
    inverse[order] = ranks
    return distinct, inverse


def _csr(keys: np.ndarray, n: int) -> np.ndarray:
    """Row pointers of sorted ``keys`` over ``0 .. n - 1``."""
    return np.searchsorted(keys, np.arange(n + 1)).astype(np.int64)


@dataclass(frozen=True, eq=False)
class TermTable:
    """Incoming or outgoing terms of the owned units, CSR over unit positions."""

    ptr: np.ndarray        # (n_own + 1,)
    cost: np.ndarray       # (T, n_terms): K_e per regulariser term
    rate: np.ndarray       # (T, n_terms): exponent factor of the neighbour's value
    value_index: np.ndarray  # (n_terms,): where the neighbour's value is read


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """See the module docstring. Positions index the owned units; shards are 0 .. n_shards-1."""

    n_units_global: int
    units: np.ndarray          # global id of each owned position
    unit_ptr: np.ndarray       # shard s owns positions unit_ptr[s] .. unit_ptr[s+1]
    shard_of_unit: np.ndarray  # shard of each position
    degrees: np.ndarray        # c_k per position
    powers: np.ndarray         # (T,)
    coefs: np.ndarray          # (T,)
    visible_in: np.ndarray     # (T, n_own)
    visible_out: np.ndarray    # (T, n_own)
    self_cost: np.ndarray      # (T, n_own)
    incoming: TermTable
    outgoing: TermTable
    color: np.ndarray          # colour of each position within its shard
    n_colors: np.ndarray       # colours per shard
    slot_sender_pos: np.ndarray  # position whose value fills each halo slot
    link_src: np.ndarray       # sender shard of each link
    link_dst: np.ndarray       # receiver shard of each link
    link_slot_ptr: np.ndarray  # link l fills slots link_slot_ptr[l] .. [l+1]
    out_link_ptr: np.ndarray   # shard s sends on links out_link_ptr[s] .. [s+1]
    in_links: np.ndarray       # links sorted by receiver (stable)
    in_link_ptr: np.ndarray    # CSR of shards over ``in_links``
    shard_group: np.ndarray    # hidden group (layer) of each shard's first unit

    @property
    def n_shards(self) -> int:
        return int(self.unit_ptr.shape[0] - 1)

    @property
    def n_own(self) -> int:
        return int(self.units.shape[0])

    @property
    def n_slots(self) -> int:
        return int(self.slot_sender_pos.shape[0])

    @property
    def n_links(self) -> int:
        return int(self.link_src.shape[0])

    @property
    def n_terms(self) -> int:
        return int(self.powers.shape[0])

    @property
    def zero_index(self) -> int:
        """Index of the constant 0 in the value vector (a dead neighbour's log-scale)."""
        return self.n_own + self.n_slots

    @cached_property
    def one_unit_each(self) -> bool:
        """Every shard owns exactly one unit, shard s at position s (neuron shards)."""
        return self.n_own == self.n_shards and bool(
            (self.unit_ptr == np.arange(self.n_shards + 1)).all())

    def shard_positions(self, shards: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions of the units of ``shards`` and the index (into ``shards``) of each."""
        if self.one_unit_each:
            shards = np.asarray(shards)
            return shards.astype(np.int64, copy=False), np.arange(shards.shape[0])
        return expand_ranges(self.unit_ptr[shards], self.unit_ptr[shards + 1])

    def shard_slots(self, shards: np.ndarray) -> np.ndarray:
        """Halo slots of ``shards`` (every slot its incoming links fill)."""
        links = self.shard_in_links(shards)
        slots, _ = expand_ranges(self.link_slot_ptr[links], self.link_slot_ptr[links + 1])
        return slots

    def shard_in_links(self, shards: np.ndarray) -> np.ndarray:
        index, _ = expand_ranges(self.in_link_ptr[shards], self.in_link_ptr[shards + 1])
        return self.in_links[index]

    def neighbours(self, shard: int) -> tuple[int, ...]:
        lo, hi = self.out_link_ptr[shard], self.out_link_ptr[shard + 1]
        return tuple(int(d) for d in self.link_dst[lo:hi])

    def link_index(self, src: int, dst: int) -> int:
        lo, hi = int(self.out_link_ptr[src]), int(self.out_link_ptr[src + 1])
        at = lo + int(np.searchsorted(self.link_dst[lo:hi], dst))
        if at >= hi or self.link_dst[at] != dst:
            raise KeyError((src, dst))
        return at


def count_edges(graph: CostGraph) -> int:
    """Hidden-to-hidden edges with a nonzero cost (each joins two units)."""
    total = 0
    for block in graph.blocks:
        cost = sum(block.costs)
        total += int(cost.count_nonzero() if hasattr(cost, "count_nonzero")
                     else np.count_nonzero(cost))
    return total


def _edges(graph: CostGraph) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every hidden-to-hidden edge with a nonzero cost: (dst, src, cost (T, E))."""
    dst, src, cost = [], [], []
    for block in graph.blocks:
        if graph.sparse:
            # CSR costs share the weights' pattern: read the edges off its index arrays.
            first = block.costs[0]
            rows = np.repeat(np.arange(first.shape[0]), np.diff(first.indptr))
            values = np.stack([k.data for k in block.costs])
            keep = values.sum(axis=0) > 0
            dst.append(block.dst[0] + rows[keep])
            src.append(block.src[0] + first.indices[keep])
            cost.append(values[:, keep])
            continue
        total = sum(block.costs)
        ii, jj = np.nonzero(total > 0)
        dst.append(block.dst[0] + ii)
        src.append(block.src[0] + jj)
        cost.append(np.stack([k[ii, jj] for k in block.costs]))
    if not dst:
        return (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64),
                np.zeros((graph.n_terms, 0)))
    return (np.concatenate(dst).astype(np.int64), np.concatenate(src).astype(np.int64),
            np.concatenate(cost, axis=1))


def build_layout(graph: CostGraph, partition: Sequence[np.ndarray],
                 local: np.ndarray | None = None) -> BlockLayout:
    """The layout of ``partition`` (disjoint sorted arrays of live global unit ids).

    ``local`` (a mask over shards) builds a host's part only: the terms, halo slots and
    links *into* its shards, which is all a host reads (it fans incoming entries out to its
    own links) and what dominates memory; unit positions and shard ranges stay global.
    """
    n_global = graph.n_units
    n_shards = len(partition)
    units = (np.concatenate([np.asarray(p, dtype=np.int64) for p in partition])
             if n_shards else np.zeros(0, dtype=np.int64))
    sizes = np.array([len(p) for p in partition], dtype=np.int64)
    unit_ptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    shard_of_unit = np.repeat(np.arange(n_shards, dtype=np.int64), sizes)
    pos_of = np.full(n_global, -1, dtype=np.int64)
    pos_of[units] = np.arange(units.shape[0])
    owner = np.full(n_global, -1, dtype=np.int64)
    owner[units] = shard_of_unit
    dst, src, cost = _edges(graph)
    powers = graph.powers.astype(np.float64)

    # Terms: (position of the owned unit, neighbour's global id, cost) for each direction.
    kept = np.ones(n_shards, dtype=bool) if local is None else np.asarray(local, dtype=bool)

    def side(unit: np.ndarray, other: np.ndarray, cost: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keep = owner[unit] >= 0
        keep[keep] = kept[owner[unit[keep]]]
        pos, nb, k = pos_of[unit[keep]], other[keep], cost[:, keep]
        # Sorted by (position, neighbour): one int64 key per term (an edge occurs once, so
        # the keys are distinct and any sort gives lexsort's order), none when the edges
        # come in that order already (CSR rows by receiver). 2.4 s per side at 10^5 neurons
        # by lexsort.
        key = pos * max(n_global, 1) + nb
        if key.shape[0] < 2 or bool((key[1:] > key[:-1]).all()):
            return pos, nb, k
        order = np.argsort(key)
        return pos[order], nb[order], k[:, order]

    in_pos, in_nb, in_cost = side(dst, src, cost)
    out_pos, out_nb, out_cost = side(src, dst, cost)
    # The set-up's peak is its temporaries, each let go as soon as it is used up (measured at
    # 10^5 neurons: a peak of 2.75 GiB of RSS for a 1.2 GiB layout, 3.95 GiB before).
    del dst, src, cost

    # Halo slots: (receiver shard, neighbour owned by another shard), ordered by link.
    nb_all = np.concatenate([in_nb, out_nb])
    recv_all = shard_of_unit[np.concatenate([in_pos, out_pos])]
    foreign = (owner[nb_all] >= 0) & (owner[nb_all] != recv_all)
    # The halo slot each foreign term reads: incoming terms' first, then outgoing ones'.
    n_in_foreign = int(foreign[:in_nb.shape[0]].sum())
    nb_all, recv_all = nb_all[foreign], recv_all[foreign]
    del foreign
    key = (owner[nb_all] * n_shards + recv_all) * n_global + nb_all
    del nb_all, recv_all
    slot_keys, slot_of_key = _unique_inverse(key)
    del key
    foreign_slots = {True: slot_of_key[:n_in_foreign], False: slot_of_key[n_in_foreign:]}
    slot_nb = slot_keys % n_global
    slot_link_key = slot_keys // n_global
    # Sorted already (slot keys are): each new value starts a link.
    starts = _run_starts(slot_link_key)
    link_keys = slot_link_key[starts]
    slot_link = np.cumsum(starts, dtype=np.int64) - 1
    link_src = link_keys // max(n_shards, 1)
    link_dst = link_keys % max(n_shards, 1)
    n_links = link_keys.shape[0]
    link_slot_ptr = _csr(slot_link, n_links)
    out_link_ptr = _csr(link_src, n_shards)
    in_links = np.argsort(link_dst, kind="stable").astype(np.int64)
    in_link_ptr = _csr(link_dst[in_links], n_shards)
    n_own = units.shape[0]
    zero_index = n_own + slot_keys.shape[0]

    def value_index(pos: np.ndarray, nb: np.ndarray, slots: np.ndarray) -> np.ndarray:
        recv = shard_of_unit[pos]
        index = np.full(pos.shape[0], zero_index, dtype=np.int64)
        same = owner[nb] == recv
        index[same] = pos_of[nb[same]]
        index[(owner[nb] >= 0) & ~same] = n_own + slots  # the terms ``foreign`` marked
        return index

    def table(pos: np.ndarray, nb: np.ndarray, k: np.ndarray, incoming: bool,
              slots: np.ndarray) -> TermTable:
        # Incoming terms read exp(-p c_j u_j), outgoing ones exp(p u_i).
        rate = (-powers[:, None] * graph.degrees[nb][None, :] if incoming
                else np.broadcast_to(powers[:, None], k.shape).copy())
        return TermTable(_csr(pos, n_own), np.ascontiguousarray(k), rate,
                         value_index(pos, nb, slots))

    color, n_colors = _colors(in_pos, in_nb, out_pos, out_nb, pos_of, owner, shard_of_unit,
                              unit_ptr)
    incoming = table(in_pos, in_nb, in_cost, True, foreign_slots[True])
    del in_pos, in_nb, in_cost
    outgoing = table(out_pos, out_nb, out_cost, False, foreign_slots[False])
    del out_pos, out_nb, out_cost, foreign_slots, slot_of_key
    return BlockLayout(
        n_units_global=n_global, units=units, unit_ptr=unit_ptr, shard_of_unit=shard_of_unit,
        degrees=graph.degrees[units].astype(np.float64), powers=powers,
        coefs=graph.coefs.astype(np.float64),
        visible_in=np.ascontiguousarray(graph.visible_in[:, units]),
        visible_out=np.ascontiguousarray(graph.visible_out[:, units]),
        self_cost=np.ascontiguousarray(graph.self_cost[:, units]),
        incoming=incoming, outgoing=outgoing,
        color=color, n_colors=n_colors, slot_sender_pos=pos_of[slot_nb],
        link_src=link_src.astype(np.int64, copy=False),
        link_dst=link_dst.astype(np.int64, copy=False),
        link_slot_ptr=link_slot_ptr, out_link_ptr=out_link_ptr, in_links=in_links,
        in_link_ptr=in_link_ptr, shard_group=_groups(graph, units[unit_ptr[:-1]]))


def _groups(graph: CostGraph, units: np.ndarray) -> np.ndarray:
    starts = np.array([start for start, _ in graph.group_ranges], dtype=np.int64)
    return (np.searchsorted(starts, units, side="right") - 1).astype(np.int64)


COLOUR_CHECK_LINKS = 1 << 20


def shard_colours(layout: BlockLayout) -> tuple[np.ndarray, int]:
    """A proper colouring of the shard graph, if the layers give one: layer parity when no
    link joins two shards of the same parity (every MLP), else one colour."""
    parity = layout.shard_group % 2
    # In slices of links: two gathers over every link at once are 0.46 GB of fresh
    # temporaries at 10^5 neurons (1.3 s of first-touch page faults measured on the 2-core
    # machine, 0.06 s once those pages are the process's).
    for lo in range(0, layout.n_links, COLOUR_CHECK_LINKS):
        part = slice(lo, lo + COLOUR_CHECK_LINKS)
        if (parity[layout.link_src[part]] == parity[layout.link_dst[part]]).any():
            return np.zeros(layout.n_shards, dtype=np.int64), 1
    return parity, 2 if layout.n_shards and parity.any() else 1


def _colors(in_pos: np.ndarray, in_nb: np.ndarray, out_pos: np.ndarray, out_nb: np.ndarray,
            pos_of: np.ndarray, owner: np.ndarray, shard_of_unit: np.ndarray,
            unit_ptr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy colouring of each shard's units so that no internal edge joins one colour.

    The order and rule are those of the per-shard reference (``shard._color_groups``): units
    in position order, each taking the smallest colour none of its linked units has. A shard
    without internal edges (every neuron, every slice of one layer) has one colour.
    """
    n_own = shard_of_unit.shape[0]
    color = np.zeros(n_own, dtype=np.int64)
    n_shards = unit_ptr.shape[0] - 1
    n_colors = np.ones(n_shards, dtype=np.int64)
    if n_own == n_shards and bool((np.diff(unit_ptr) == 1).all()):
        return color, n_colors  # one unit per shard: no internal edge
    pos = np.concatenate([in_pos, out_pos])
    nb = np.concatenate([in_nb, out_nb])
    internal = (owner[nb] == shard_of_unit[pos]) & (pos_of[nb] != pos)
    if not internal.any():
        return color, n_colors
    a, b = pos[internal], pos_of[nb[internal]]
    linked: dict[int, list[int]] = {}
    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        linked.setdefault(x, []).append(y)
        linked.setdefault(y, []).append(x)
    for s in np.unique(shard_of_unit[a]).tolist():
        lo, hi = int(unit_ptr[s]), int(unit_ptr[s + 1])
        assigned: dict[int, int] = {}
        for k in range(lo, hi):
            taken = {assigned[j] for j in linked.get(k, ()) if j in assigned}
            c = 0
            while c in taken:
                c += 1
            assigned[k] = c
            color[k] = c
        n_colors[s] = max(assigned.values()) + 1
    return color, n_colors
