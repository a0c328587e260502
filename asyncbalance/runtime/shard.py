"""The shard: a pure state machine that balances the hidden units it owns.

A shard owns some hidden units. It holds only the aggregated costs of the edges that touch
them (their incoming rows and outgoing columns), its own log-scales and a *view* of the
log-scales of the neighbouring units owned by other shards. ``on_wake(now)`` applies the local
rule to the owned units and returns state messages for the neighbour shards;
``on_message(msg)`` updates the view. There is no clock and no I/O here: the simulator and the
Ray actors are the two hosts.

The shard's costs form a small ``CostGraph`` over the local index space ``[own | halo]``, so
the rules call the engine's kernels unchanged: halo units are marked dead there (they are
moved by their owners, never here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
import numpy as np

from .. import kernels
from ..graph import Block, CostGraph, stack_blocks
from ..schedules import gradient_flow_step
from .messages import StateMessage

RULES = ("exact", "damped", "gradient")
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class Rule:
    """The local rule: exact move, damped exact move (alpha) or gradient flow (eta)."""

    name: str = "exact"
    alpha: float = 1.0
    eta: float = 0.05

    def __post_init__(self) -> None:
        if self.name not in RULES:
            raise ValueError(f"unknown rule {self.name!r}")


@dataclass(frozen=True, eq=False)
class ShardSpec:
    """What one shard knows about the network, fixed for the whole run.

    Attributes:
        shard_id: index of the shard.
        units: global ids of the owned units (sorted); local indices ``0 .. n_own``.
        halo: global ids (sorted) of neighbour units owned elsewhere (local ``n_own ..``).
        halo_owner: shard id of each halo unit (-1 for a dead unit, which nobody owns).
        graph: the local cost graph over ``[own | halo]``.
        colors: local indices of owned units in groups with no edge inside a group; the exact
            move of a group is exact for all its members at once (Gauss-Seidel across groups).
        send_units: per neighbour shard, the local indices of owned units it needs.
    """

    shard_id: int
    units: np.ndarray
    halo: np.ndarray
    halo_owner: np.ndarray
    graph: CostGraph
    colors: tuple[np.ndarray, ...]
    send_units: dict[int, np.ndarray]

    @property
    def n_own(self) -> int:
        return int(self.units.shape[0])

    @property
    def neighbours(self) -> tuple[int, ...]:
        return tuple(sorted(self.send_units))

    @property
    def cost_bytes(self) -> int:
        """Bytes of the costs this shard holds: its units' rows and columns, per term (the
        CSR arrays of a sparse graph's blocks)."""
        if self.graph.sparse:
            return sum(k.data.nbytes + k.indices.nbytes + k.indptr.nbytes
                       for block in self.graph.blocks for k in block.costs)
        return sum(k.nbytes for s in self.graph.stacks for k in s.costs)


def build_shard_specs(graph: CostGraph, partition: Sequence[np.ndarray]) -> list[ShardSpec]:
    """One spec per shard of ``partition`` (disjoint sorted arrays of global unit ids)."""
    owner = np.full(graph.n_units, -1, dtype=np.int64)
    for sid, units in enumerate(partition):
        owner[units] = sid
    return [_build_spec(graph, sid, np.asarray(units, dtype=np.int64), owner)
            for sid, units in enumerate(partition)]


def _in_range(ids: np.ndarray, bounds: tuple[int, int]) -> np.ndarray:
    return ids[(ids >= bounds[0]) & (ids < bounds[1])]


def _build_spec(graph: CostGraph, sid: int, own: np.ndarray, owner: np.ndarray) -> ShardSpec:
    n_terms = graph.n_terms
    n_own = own.shape[0]
    is_own = np.zeros(graph.n_units, dtype=bool)
    is_own[own] = True
    # The halo: every unit joined to an owned unit by a nonzero cost, in either direction.
    linked = np.zeros(graph.n_units, dtype=bool)
    for block in graph.blocks:
        total = sum(block.costs)
        rows = _in_range(own, block.dst) - block.dst[0]
        if rows.size:
            linked[block.src[0] + np.nonzero(total[rows].any(axis=0))[0]] = True
        cols = _in_range(own, block.src) - block.src[0]
        if cols.size:
            linked[block.dst[0] + np.nonzero(total[:, cols].any(axis=1))[0]] = True
    halo = np.nonzero(linked & ~is_own)[0].astype(np.int64)
    local_ids = np.concatenate([own, halo])
    n_local = local_ids.shape[0]
    local_of = np.full(graph.n_units, -1, dtype=np.int64)
    local_of[local_ids] = np.arange(n_local)
    # Owned and halo units are each sorted by global id, so the part of a layer-to-layer
    # block that touches owned units splits into at most three contiguous local blocks:
    # owned <- owned, owned <- halo (the owned units' rows) and halo <- owned (their columns).
    blocks: list[Block] = []
    internal = np.zeros((n_own, n_own))
    send: dict[int, np.ndarray] = {}
    empty = np.zeros(0, dtype=np.int64)
    for block in graph.blocks:
        own_dst, halo_dst = _in_range(own, block.dst), _in_range(halo, block.dst)
        own_src, halo_src = _in_range(own, block.src), _in_range(halo, block.src)
        for dst, src in ((own_dst, own_src), (own_dst, halo_src), (halo_dst, own_src)):
            if not (dst.size and src.size):
                continue
            index = np.ix_(dst - block.dst[0], src - block.src[0])
            costs = tuple(np.ascontiguousarray(k[index]) for k in block.costs)
            nonzero = sum(costs) > 0
            if not nonzero.any():
                continue
            blocks.append(Block((int(local_of[dst[0]]), int(local_of[dst[-1]]) + 1),
                                (int(local_of[src[0]]), int(local_of[src[-1]]) + 1), costs))
            if dst is own_dst and src is own_src:
                internal[np.ix_(local_of[dst], local_of[src])] += sum(costs)
                continue
            # The owner of each halo unit needs the owned units it is joined to.
            mine, theirs, links = ((dst, src, nonzero) if dst is own_dst
                                   else (src, dst, nonzero.T))
            for peer in np.unique(owner[theirs]):
                if peer < 0:
                    continue  # a dead unit: nobody owns it, its log-scale stays 0
                needed = mine[links[:, owner[theirs] == peer].any(axis=1)]
                send[int(peer)] = np.union1d(send.get(int(peer), empty), local_of[needed])
    views, stacks = stack_blocks(blocks, n_terms)

    def pad(values: np.ndarray) -> np.ndarray:
        padded = np.zeros((n_terms, n_local))
        padded[:, :n_own] = values[:, own]
        return padded

    dead = np.ones(n_local, dtype=bool)
    dead[:n_own] = graph.dead[own]
    local_graph = CostGraph(
        coefs=graph.coefs, powers=graph.powers, degrees=graph.degrees[local_ids],
        group_names=("own", "halo"), group_ranges=((0, n_own), (n_own, n_local)),
        visible_in=pad(graph.visible_in), visible_out=pad(graph.visible_out),
        self_cost=pad(graph.self_cost), blocks=tuple(views), stacks=tuple(stacks),
        constant_cost=0.0, dead=dead)
    colors = _color_groups(internal, graph.dead[own])
    return ShardSpec(sid, own, halo, owner[halo], local_graph, colors,
                     {peer: idx.astype(np.int64) for peer, idx in send.items()})


def _color_groups(internal: np.ndarray, dead: np.ndarray) -> tuple[np.ndarray, ...]:
    """Greedy colouring of the live owned units so that no edge joins two of the same colour."""
    n = internal.shape[0]
    linked = (internal > 0) | (internal.T > 0)
    np.fill_diagonal(linked, False)
    live = np.nonzero(~dead)[0]
    if not linked[np.ix_(live, live)].any():
        return (live,) if live.size else ()
    color = np.full(n, -1)
    for k in live:
        taken = set(color[linked[k]].tolist())
        c = 0
        while c in taken:
            c += 1
        color[k] = c
    return tuple(np.nonzero(color == c)[0] for c in range(color.max() + 1))


class Shard:
    """One shard's mutable state; see the module docstring.

    ``resend_interval``: anti-entropy period; an unchanged state is still re-sent to every
    neighbour after this much time, which repairs lost messages.
    ``send_threshold``: a state that moved by no more than this (max abs, in log-scale) since
    the last send waits for the anti-entropy timer; at a converged state, rounding would
    otherwise keep neighbours re-balancing each other's last bits for ever.
    """

    def __init__(self, spec: ShardSpec, rule: Rule, resend_interval: float, epoch: int = 0,
                 send_threshold: float = 0.0):
        self.spec = spec
        self.rule = rule
        self.resend_interval = resend_interval
        self.send_threshold = send_threshold
        self.epoch = epoch
        self.seq = 0
        n_local = spec.n_own + spec.halo.shape[0]
        self.state = np.zeros(n_local)
        self.versions: dict[int, tuple[int, int]] = {}
        self.dirty = True
        self.last_send_time = -np.inf
        self.last_sent = np.full(spec.n_own, np.nan)
        self.unit_updates = 0
        self._slot_cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray | None,
                                          np.ndarray]] = {}
        self._group_spans = [(int(g.min()), int(g.max()) + 1) if g.size else (0, 0)
                             for g in spec.colors]
        # Per neighbour: the local indices and the (read-only) global ids it is sent.
        self._outgoing = []
        for peer, idx in sorted(spec.send_units.items()):
            units = spec.units[idx]
            units.setflags(write=False)
            self._outgoing.append((peer, idx, units))

    @property
    def log_scales(self) -> np.ndarray:
        """The owned units' log-scales (a copy), in the order of ``spec.units``."""
        return self.state[:self.spec.n_own].copy()

    def on_message(self, message: StateMessage) -> bool:
        """Apply a neighbour's state if it is newer than what the view holds; True if applied."""
        if message.receiver != self.spec.shard_id:
            raise ValueError(f"message for shard {message.receiver} given to shard "
                             f"{self.spec.shard_id}")
        if message.version <= self.versions.get(message.sender, (-1, -1)):
            return False
        self.versions[message.sender] = message.version
        slots, known = self._slots(message.sender, message.units)
        values = message.log_scales if known is None else message.log_scales[known]
        if (self.state[slots] != values).any():
            self.state[slots] = values
            self.dirty = True
        return True

    def _slots(self, sender: int, units: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """View slots of ``units`` (and which of them are in the halo, None if all are).

        A sender sends the same unit ids every time, so the lookup is cached per sender.
        """
        cached = self._slot_cache.get(sender)
        # In one process a sender passes the same read-only array every time: identity is
        # enough; a decoded message has a new array, compared by value.
        if cached is not None and (cached[3] is units or (
                cached[0].shape == units.shape and (cached[0] == units).all())):
            return cached[1], cached[2]
        halo = self.spec.halo
        if halo.shape[0] == 0:
            slots, known = np.zeros(0, dtype=np.int64), np.zeros(units.shape[0], dtype=bool)
        else:
            pos = np.minimum(np.searchsorted(halo, units), halo.shape[0] - 1)
            known = halo[pos] == units
            slots = self.spec.n_own + pos[known]
        mask = None if known.all() else known
        self._slot_cache[sender] = (units.copy(), slots, mask, units)
        return slots, mask

    def on_wake(self, now: float) -> list[StateMessage]:
        """Apply the rule (when there is anything to do) and return the messages to send."""
        if self.dirty:
            self._move()
        own = self.state[:self.spec.n_own]
        # NaN before the first send compares as changed.
        changed = not bool((np.abs(own - self.last_sent) <= self.send_threshold).all())
        if not changed and now - self.last_send_time < self.resend_interval:
            return []
        self.seq += 1
        self.last_send_time = now
        self.last_sent = own.copy()
        return [StateMessage(self.spec.shard_id, peer, self.epoch, self.seq, units, own[idx])
                for peer, idx, units in self._outgoing]

    def _move(self) -> None:
        graph = self.spec.graph
        before = self.state[:self.spec.n_own].copy()
        if self.rule.name == "gradient":
            self.state = gradient_flow_step(graph, self.state, self.rule.eta)
            self.unit_updates += sum(c.shape[0] for c in self.spec.colors)
        else:
            alpha = 1.0 if self.rule.name == "exact" else self.rule.alpha
            for group, (lo, hi) in zip(self.spec.colors, self._group_spans, strict=True):
                # Only the flows of the group's span of owned units: the halo's and the
                # other groups' are never needed for this move (a layer slice's groups are
                # its layers, so this halves the work of a shard that spans two layers).
                flows = kernels.unit_flows_range(graph, self.state, lo, hi)
                self.state[group] += alpha * kernels.exact_moves(graph, self.state, group, flows)
                self.unit_updates += group.shape[0]
        step = np.abs(self.state[:self.spec.n_own] - before)
        moved = bool(step.size) and not bool((step <= self.send_threshold).all())
        # After an exact move of a single colour group, every owned unit is balanced against
        # the current view: nothing changes until new information arrives.
        self.dirty = moved and (self.rule.name != "exact" or len(self.spec.colors) > 1)

    def checkpoint(self) -> bytes:
        """Own log-scales, view and versions, msgpack-encoded."""
        versions = [[s, e, q] for s, (e, q) in sorted(self.versions.items())]
        return msgpack.packb([CHECKPOINT_VERSION, self.spec.shard_id, self.epoch, self.seq,
                              self.state.astype("<f8").tobytes(), versions], use_bin_type=True)

    @classmethod
    def restore(cls, spec: ShardSpec, rule: Rule, resend_interval: float, epoch: int,
                checkpoint: bytes | None, send_threshold: float = 0.0) -> Shard:
        """A restarted shard in ``epoch`` (> every earlier epoch): from a checkpoint or u = 0."""
        shard = cls(spec, rule, resend_interval, epoch, send_threshold)
        if checkpoint is None:
            return shard
        version, sid, _, _, state, versions = msgpack.unpackb(checkpoint, raw=False)
        if version != CHECKPOINT_VERSION or sid != spec.shard_id:
            raise ValueError(f"checkpoint of shard {sid} (format {version}) does not fit shard "
                             f"{spec.shard_id}")
        shard.state = np.frombuffer(state, dtype="<f8").astype(np.float64)
        shard.versions = {int(s): (int(e), int(q)) for s, e, q in versions}
        return shard


def gather_log_scales(n_units: int, specs: Sequence[ShardSpec],
                      owned: Sequence[np.ndarray]) -> np.ndarray:
    """The global log-scale vector from each owner's own values (unowned units stay 0)."""
    u = np.zeros(n_units)
    for spec, values in zip(specs, owned, strict=True):
        u[spec.units] = values
    return u
