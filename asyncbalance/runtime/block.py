"""A block of logical shards as arrays: the state machine of many shards moved at once.

``ShardBlock`` is what a process holds for every logical shard it runs (single neurons or layer
slices), with the semantics of the per-shard reference ``Shard`` and none of its per-object
cost. Like ``Shard`` it is pure: no clock (times are arguments) and no I/O.

- ``wake(shards, now)`` applies the rule to the shards among ``shards`` that have news (all of
  them in one array computation, colour by colour for shards with internal edges), then
  decides which of them send: those whose state moved by more than ``send_threshold`` since
  their last send, or whose anti-entropy timer is due. It returns the senders.
- ``outgoing(senders)`` gathers what each sender's links carry: one entry per directed link
  (its version and the values of the units the receiver needs).
- ``deliver(links, versions, values, value_ptr)`` applies link deliveries in the given order
  with the reference's rule (a delivery is applied when its version is newer than every
  version seen on its link) and marks receivers whose view changed.
- ``checkpoint``/``restore`` save and reload a shard's own values, halo view and link versions.

Versions are ``epoch * 2**32 + seq``: the same order as the reference's ``(epoch, seq)`` pairs.
"""

from __future__ import annotations

import numpy as np

from .. import kernels
from . import block_loops
from .layout import BlockLayout, TermTable, expand_ranges
from .shard import Rule
from .threads import second_thread

# Links of a block up to which deliveries sort their links by radix (``_link_order``).
RADIX_MAX_LINKS = 1 << 22
# Deliveries in a batch, and terms in a window's moves (a rough count: the span of the
# moving positions' terms), from which a block with ``threads = 2`` splits the work between
# two threads (below, handing half to a thread costs more than it saves).
PARALLEL_MIN_DELIVERIES = 1 << 16
PARALLEL_MIN_TERMS = 1 << 16

SEQ_BITS = 32


def version_of(epoch: np.ndarray | int, seq: np.ndarray | int) -> np.ndarray:
    return (np.asarray(epoch, dtype=np.int64) << SEQ_BITS) + np.asarray(seq, dtype=np.int64)


class ShardBlock:
    """The mutable state of every shard of ``layout``; see the module docstring."""

    # Exponentials are taken per value when ratio x the window's terms >= the values.
    per_value_ratio = 2
    # Threads the compiled deliveries of a large batch (``deliver_live``) and the moves of a
    # large window (``_term_sums``) use: 1 or 2. The simulator sets 2 where the machine has
    # two cores; a Ray host, one of several processes sharing the cores, keeps 1.
    threads = 1

    def __init__(self, layout: BlockLayout, rule: Rule, resend_interval: float,
                 send_threshold: float = 0.0, epochs: np.ndarray | None = None):
        self.layout = layout
        self.rule = rule
        self.resend_interval = resend_interval
        self.send_threshold = send_threshold
        n_shards, n_own = layout.n_shards, layout.n_own
        # [own log-scales | halo slots | the constant 0 of dead neighbours]
        self.values = np.zeros(n_own + layout.n_slots + 1)
        self.link_version = np.full(layout.n_links, -1, dtype=np.int64)
        self.epoch = (np.zeros(n_shards, dtype=np.int64) if epochs is None
                      else np.asarray(epochs, dtype=np.int64).copy())
        self.seq = np.zeros(n_shards, dtype=np.int64)
        self.dirty = np.ones(n_shards, dtype=bool)
        self.last_send_time = np.full(n_shards, -np.inf)
        self.last_sent = np.full(n_own, np.nan)
        self.unit_updates = np.zeros(n_shards, dtype=np.int64)
        self._fast_exact = (layout.n_terms == 1 and not layout.self_cost.any())
        # Per table, the exponent factor of each value (every term that reads a value has
        # the same one), built on the first window with terms enough (``_rates_by_value``).
        self._value_rates: list[np.ndarray | None] = [None, None]
        self._mark_array: np.ndarray | None = None  # see ``_mark``
        # Link l fills halo slot l alone (neuron shards): the compiled delivery skips the
        # slot table.
        self.one_slot = bool(layout.n_slots == layout.n_links and
                              (np.diff(layout.link_slot_ptr) == 1).all())

    @property
    def _mark(self) -> np.ndarray:
        """Scratch of the numpy passes for finding repeated links in a batch without sorting
        it (-1 between calls). Made on first use: an int64 per link (0.2 GB at 10^5 neurons,
        fan-in 133) that the compiled loops never read."""
        if self._mark_array is None:
            self._mark_array = np.full(self.layout.n_links, -1, dtype=np.int64)
        return self._mark_array

    @property
    def own(self) -> np.ndarray:
        """The owned log-scales (a view), in layout position order."""
        return self.values[:self.layout.n_own]

    @property
    def halo(self) -> np.ndarray:
        return self.values[self.layout.n_own:self.layout.zero_index]

    # -- moves ------------------------------------------------------------------------------

    def _flows(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(A, B), each (T, len(positions)): incoming and outgoing flows on the current view."""
        lay = self.layout
        values = self.values
        n = positions.shape[0]
        u = values[positions]
        out = []
        for which, (table, visible) in enumerate(((lay.incoming, lay.visible_in),
                                                  (lay.outgoing, lay.visible_out))):
            if block_loops.COMPILED:
                sums = np.empty((lay.n_terms, n))
                rates = self._rates_by_value(which, table, positions)
                for t in range(lay.n_terms):
                    if rates is not None:
                        # One exponential per value instead of one per term: the same
                        # products and the same np.exp, so the same sums bit for bit.
                        exps = np.exp(rates[t] * values)
                        sums[t] = block_loops.gathered_sums(exps, positions, table.ptr,
                                                            table.cost[t], table.value_index,
                                                            visible[t])
                        continue
                    sums[t] = self._term_sums(positions, table, t, visible[t])
                out.append(sums)
                continue
            index, segment = expand_ranges(table.ptr[positions], table.ptr[positions + 1])
            neighbour = values[table.value_index[index]]
            sums = np.empty((lay.n_terms, n))
            for t in range(lay.n_terms):
                terms = table.cost[t, index] * np.exp(table.rate[t, index] * neighbour)
                sums[t] = visible[t, positions] + np.bincount(segment, terms, minlength=n)
            out.append(sums)
        c = lay.degrees[positions]
        p = lay.powers[:, None]
        return out[0] * np.exp(p * u[None, :]), out[1] * np.exp(-p * c[None, :] * u[None, :])

    def _term_sums(self, positions: np.ndarray, table: TermTable, t: int,
                   visible: np.ndarray) -> np.ndarray:
        """Per position, ``visible + sum(cost * exp(rate * neighbour))`` over its terms of
        cost term ``t`` (compiled gather and sums around one vectorised ``np.exp``). With
        two threads and a large window, the second half of the positions goes to the other
        thread: each position's sum is the one-thread sum, bit for bit."""
        values = self.values

        def part(chosen: np.ndarray) -> np.ndarray:
            exps = block_loops.scaled_neighbours(values, chosen, table.ptr, table.rate[t],
                                                 table.value_index)
            np.exp(exps, out=exps)  # numpy lets the other thread run meanwhile
            return block_loops.term_sums(exps, chosen, table.ptr, table.cost[t], visible)

        n = positions.shape[0]
        if self.threads < 2 or n < 2 or \
                int(table.ptr[positions[-1] + 1] - table.ptr[positions[0]]) < PARALLEL_MIN_TERMS:
            return part(positions)
        half = n // 2
        second = second_thread().submit(part, positions[half:])
        first = part(positions[:half])
        return np.concatenate([first, second.result()])

    def _rates_by_value(self, which: int, table: TermTable, positions: np.ndarray
                        ) -> np.ndarray | None:
        """(T, values) exponent factors of ``table`` by value index when the terms of
        ``positions`` are at least half as many as the values (else None: exponentials per
        term). Measured on the quickstart's layer slices: ~2.1 ns per term the one way,
        ~0.7 ns per term and ~0.8 ns per value the other."""
        ptr = table.ptr
        n_values = self.values.shape[0]
        if self.per_value_ratio * int(ptr[-1]) < n_values:
            return None  # not even every term of the table (neurons: one slot per term)
        n_window_terms = int((ptr[positions + 1] - ptr[positions]).sum())
        if self.per_value_ratio * n_window_terms < n_values:
            return None
        rates = self._value_rates[which]
        if rates is None:
            rates = np.zeros((self.layout.n_terms, self.values.shape[0]))
            rates[:, table.value_index] = table.rate
            # Terms reading the constant 0 may differ in rate (exp(rate * 0) is 1 for all);
            # any other disagreement would be a layout this path does not serve.
            read = table.value_index != self.layout.zero_index
            if not np.array_equal(rates[:, table.value_index[read]], table.rate[:, read]):
                rates = np.zeros((0, 0))
            self._value_rates[which] = rates
        return rates if rates.size else None

    def _exact_moves(self, positions: np.ndarray) -> np.ndarray:
        lay = self.layout
        incoming, outgoing = self._flows(positions)
        c = lay.degrees[positions]
        if self._fast_exact:
            return (np.log(c * outgoing[0]) - np.log(incoming[0])) / (lay.powers[0] * (1.0 + c))
        u = self.values[positions]
        p = lay.powers[:, None]
        loops = lay.self_cost[:, positions] * np.exp(p * (1.0 - c)[None, :] * u[None, :])
        has_loop = (lay.self_cost[:, positions] > 0).any(axis=0)
        closed = (lay.n_terms == 1) & (~has_loop | (c == 1.0))
        moves = np.zeros(positions.shape[0])
        if closed.any():
            a = incoming[0, closed] - loops[0, closed]
            b = outgoing[0, closed] - loops[0, closed]
            cc = c[closed]
            moves[closed] = (np.log(cc * b) - np.log(a)) / (lay.powers[0] * (1.0 + cc))
        if (~closed).any():
            sel = ~closed
            coef = lay.coefs[:, None]
            weights = np.concatenate([
                coef * np.maximum(incoming[:, sel] - loops[:, sel], 0.0),
                coef * np.maximum(outgoing[:, sel] - loops[:, sel], 0.0),
                coef * loops[:, sel]]).T
            cs = c[sel][None, :]
            shape = loops[:, sel].shape
            rates = np.concatenate([np.broadcast_to(p, shape), -cs * p, p * (1.0 - cs)]).T
            moves[sel] = kernels.solve_exp_sum(weights, rates)
        return moves

    def _move(self, shards: np.ndarray) -> None:
        lay = self.layout
        positions, owner_index = lay.shard_positions(shards)
        before = self.values[positions].copy()
        if self.rule.name == "gradient":
            incoming, outgoing = self._flows(positions)
            drive = (lay.coefs[:, None] * (incoming - lay.degrees[positions] * outgoing)
                     ).sum(axis=0)
            self.values[positions] -= self.rule.eta * drive
        else:
            alpha = 1.0 if self.rule.name == "exact" else self.rule.alpha
            colors = lay.color[positions]
            for c in range(int(colors.max()) + 1 if colors.size else 0):
                group = positions[colors == c]
                if group.size:
                    self.values[group] += alpha * self._exact_moves(group)
        np.add.at(self.unit_updates, shards[owner_index], 1)
        step = np.abs(self.values[positions] - before)
        big = np.zeros(shards.shape[0], dtype=bool)
        np.logical_or.at(big, owner_index, step > self.send_threshold)
        # After an exact move of a single colour, every owned unit is balanced against the
        # current view: nothing changes until news arrives.
        keeps_moving = (lay.n_colors[shards] > 1) | (self.rule.name != "exact")
        self.dirty[shards] = big & keeps_moving

    def wake(self, shards: np.ndarray, now: np.ndarray | float) -> np.ndarray:
        """Move the dirty ones among ``shards`` and return those that send (in input order)."""
        shards = np.asarray(shards, dtype=np.int64)
        now = np.broadcast_to(np.asarray(now, dtype=np.float64), shards.shape)
        moving = shards[self.dirty[shards]]
        if moving.size:
            self._move(moving)
        positions, owner_index = self.layout.shard_positions(shards)
        # NaN before the first send compares as changed.
        same = np.abs(self.values[positions] - self.last_sent[positions]) <= self.send_threshold
        changed = np.zeros(shards.shape[0], dtype=bool)
        np.logical_or.at(changed, owner_index, ~same)
        due = now - self.last_send_time[shards] >= self.resend_interval
        sends = changed | due
        senders = shards[sends]
        self.seq[senders] += 1
        self.last_send_time[senders] = now[sends]
        sent_positions, _ = self.layout.shard_positions(senders)
        self.last_sent[sent_positions] = self.values[sent_positions]
        return senders

    # -- messages ---------------------------------------------------------------------------

    def outgoing(self, senders: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                     np.ndarray]:
        """``(links, versions, values, value_ptr)`` of every link of ``senders``: link i
        carries ``values[value_ptr[i]:value_ptr[i+1]]`` for the slots it fills."""
        lay = self.layout
        links, owner_index = expand_ranges(lay.out_link_ptr[senders],
                                           lay.out_link_ptr[senders + 1])
        versions = version_of(self.epoch[senders], self.seq[senders])[owner_index]
        slots, _ = expand_ranges(lay.link_slot_ptr[links], lay.link_slot_ptr[links + 1])
        counts = lay.link_slot_ptr[links + 1] - lay.link_slot_ptr[links]
        value_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return links, versions, self.values[lay.slot_sender_pos[slots]], value_ptr

    def deliver(self, links: np.ndarray, versions: np.ndarray, values: np.ndarray,
                value_ptr: np.ndarray, times: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """Apply deliveries in order (of ``times`` when given, stable; else as given);
        ``(applied, changed)``: per delivery, whether it was newer than everything seen on its
        link before it, and whether it changed the receiver's view."""
        m = links.shape[0]
        if m == 0:
            empty = np.zeros(0, dtype=bool)
            return empty, empty
        if block_loops.COMPILED:
            status, changed, _ = self.deliver_live(links, versions, values, value_ptr[:-1],
                                                   times, np.zeros(0, dtype=bool), np.zeros(0),
                                                   np.zeros(0, dtype=np.int64))
            return status == 2, changed
        # Deliveries on a link that occurs once are independent of the order (the common
        # case); only the others need sorting.
        index = np.arange(m)
        mark = self._mark
        mark[links] = index
        last = mark[links]
        mark[links[::-1]] = index[::-1]
        single = mark[links] == last
        mark[links] = -1
        applied = np.zeros(m, dtype=bool)
        once = np.nonzero(single)[0]
        applied[once] = versions[once] > self.link_version[links[once]]
        winners = once[applied[once]]
        if not single.all():
            repeated = np.nonzero(~single)[0]
            won = self._running_newest(repeated, links, versions, times, applied)
            winners = np.concatenate([winners, won])
        return applied, self._write(winners, links, versions, values, value_ptr, m)

    def deliver_live(self, links: np.ndarray, versions: np.ndarray, values: np.ndarray,
                     starts: np.ndarray, times: np.ndarray | None, alive: np.ndarray,
                     first_arrival: np.ndarray, touched: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, int]:
        """``deliver`` (compiled) with delivery i's values at ``values[starts[i]:]``,
        dropping deliveries to shards not ``alive`` (empty: all live) and keeping each
        receiver's earliest applied arrival in ``first_arrival`` (empty: not kept; entries
        inf before, the receivers whose entry it sets listed in ``touched``): per delivery 0
        (dropped), 1 (delivered) or 2 (applied), whether it changed the view, and how many
        receivers were touched."""
        lay = self.layout
        times = np.zeros(0) if times is None else times
        ordered = times.shape[0] == 0
        starts = np.ascontiguousarray(starts, dtype=np.int64)
        by_link = self._link_order(links)
        m = links.shape[0]
        if self.threads < 2 or m < PARALLEL_MIN_DELIVERIES:
            return block_loops.deliver(
                links, versions, times, ordered, values, starts, lay.link_slot_ptr,
                lay.n_own, lay.link_dst, self.link_version, self.values, self.dirty, alive,
                by_link, self.one_slot, first_arrival, touched)
        # Two parts that split the links between them (the cut moved past the deliveries of
        # the link it falls in), the second on another thread: per-link state is disjoint,
        # a receiver's first arrival is kept per part and merged by min, so the results are
        # the one-thread ones exactly (measured on windows of 10^5 neurons: 15 -> 8.6 ns per
        # delivery).
        cut = m // 2
        while cut < m and links[by_link[cut]] == links[by_link[cut - 1]]:
            cut += 1
        status = np.ones(m, dtype=np.int8)
        changed = np.zeros(m, dtype=bool)
        keep_first = first_arrival.shape[0] > 0
        other_first = np.full(first_arrival.shape[0], np.inf)
        other_touched = np.zeros(touched.shape[0], dtype=np.int64)
        common = (links, versions, times, ordered, values, starts, lay.link_slot_ptr, lay.n_own,
                  lay.link_dst, self.link_version, self.values, self.dirty, alive, by_link)
        second = second_thread().submit(
            block_loops.deliver_part, *common, cut, m, self.one_slot, other_first,
            other_touched, status, changed)
        n_touched = block_loops.deliver_part(*common, 0, cut, self.one_slot, first_arrival,
                                             touched, status, changed)
        n_other = second.result()
        if keep_first:
            n_touched = block_loops.merge_first_arrivals(first_arrival, touched, n_touched,
                                                         other_first, other_touched, n_other)
        return status, changed, n_touched

    def _link_order(self, links: np.ndarray) -> np.ndarray:
        """The stable order of a batch's links. Measured per key on windows of the neuron
        nets of BENCHMARKS.md: the radix sort 5-6 ns against numpy's 8-15 ns up to 2^22
        links (2.7e6 at 10^4 neurons, fan-in 133); at 2.7e7 links (10^5 neurons) its
        buckets no longer fit the caches, 9.5 ns against numpy's 4.8 ns."""
        if self.layout.n_links <= RADIX_MAX_LINKS:
            return block_loops.stable_order(links, self.layout.n_links)
        return np.argsort(links, kind="stable")

    def _running_newest(self, subset: np.ndarray, links: np.ndarray, versions: np.ndarray,
                        times: np.ndarray | None, applied: np.ndarray) -> np.ndarray:
        """Deliveries ``subset`` (links that occur more than once): each applied iff newer
        than the link's version and every earlier delivery on the link (a running maximum in
        delivery order); fills ``applied`` and returns the last applied one of each link."""
        keys = (links[subset],) if times is None else (times[subset], links[subset])
        order = subset[np.lexsort(keys)] if times is not None else \
            subset[np.argsort(links[subset], kind="stable")]
        n = order.shape[0]
        sorted_links = links[order]
        sorted_versions = versions[order]
        start = np.ones(n, dtype=bool)
        start[1:] = sorted_links[1:] != sorted_links[:-1]
        seg = np.cumsum(start) - 1
        # Versions replaced by their ranks (order kept, small integers), each segment shifted
        # above the ones before it, so that one running maximum never crosses segments.
        base = self.link_version[sorted_links]
        _, ranks = np.unique(np.concatenate([sorted_versions, base]), return_inverse=True)
        rank_v, rank_b = ranks[:n].astype(np.int64), ranks[n:].astype(np.int64)
        offset = seg.astype(np.int64) * (2 * n + 2)
        running = np.maximum.accumulate(rank_v + offset) - offset
        previous = np.empty(n, dtype=np.int64)
        previous[start] = rank_b[start]
        previous[~start] = np.maximum(running[:-1][~start[1:]], rank_b[~start])
        applied_sorted = rank_v > previous
        applied[order] = applied_sorted
        idx_applied = np.nonzero(applied_sorted)[0]
        seg_applied = seg[idx_applied]
        is_last = np.ones(idx_applied.shape[0], dtype=bool)
        is_last[:-1] = seg_applied[1:] != seg_applied[:-1]
        return order[idx_applied[is_last]]

    def _write(self, winners: np.ndarray, links: np.ndarray, versions: np.ndarray,
               values: np.ndarray, value_ptr: np.ndarray, m: int) -> np.ndarray:
        """Write each winning delivery into its link's slots; which ones changed the view."""
        lay = self.layout
        changed = np.zeros(m, dtype=bool)
        if winners.size == 0:
            return changed
        win_links = links[winners]
        self.link_version[win_links] = versions[winners]
        slots, _ = expand_ranges(lay.link_slot_ptr[win_links], lay.link_slot_ptr[win_links + 1])
        source, _ = expand_ranges(value_ptr[winners], value_ptr[winners + 1])
        new = values[source]
        target = lay.n_own + slots
        differs = self.values[target] != new
        self.values[target] = new
        if differs.any():
            if slots.shape[0] == winners.shape[0]:
                link_changed = differs  # one slot per link (neuron shards)
            else:
                counts = lay.link_slot_ptr[win_links + 1] - lay.link_slot_ptr[win_links]
                link_changed = np.bincount(np.repeat(np.arange(winners.shape[0]), counts),
                                           differs, minlength=winners.shape[0]) > 0
            changed[winners[link_changed]] = True
            self.dirty[lay.link_dst[win_links[link_changed]]] = True
        return changed

    # -- checkpoints and restarts ---------------------------------------------------------

    def checkpoint(self, shards: np.ndarray) -> dict[str, np.ndarray]:
        """Own values, halo view and incoming link versions of ``shards`` (copies)."""
        lay = self.layout
        positions, _ = lay.shard_positions(shards)
        slots = lay.shard_slots(shards)
        links = lay.shard_in_links(shards)
        return {"positions": positions, "own": self.values[positions].copy(),
                "slots": slots, "halo": self.values[lay.n_own + slots].copy(),
                "links": links, "versions": self.link_version[links].copy()}

    def restore(self, shard: int, epoch: int, saved: dict[str, np.ndarray] | None) -> None:
        """Restart ``shard`` in ``epoch``: from ``saved`` (its checkpoint) or from u = 0 with
        an empty view, exactly like ``Shard.restore``."""
        lay = self.layout
        one = np.array([shard], dtype=np.int64)
        positions, _ = lay.shard_positions(one)
        slots = lay.shard_slots(one)
        links = lay.shard_in_links(one)
        if saved is None:
            self.values[positions] = 0.0
            self.values[lay.n_own + slots] = 0.0
            self.link_version[links] = -1
        else:
            self.values[positions] = saved["own"]
            self.values[lay.n_own + slots] = saved["halo"]
            self.link_version[links] = saved["versions"]
        self.epoch[shard] = epoch
        self.seq[shard] = 0
        self.dirty[shard] = True
        self.last_send_time[shard] = -np.inf
        self.last_sent[positions] = np.nan
        self.unit_updates[shard] = 0

    def owned_log_scales(self) -> np.ndarray:
        """Global log-scale vector from the owners' own values (unowned units stay 0)."""
        u = np.zeros(self.layout.n_units_global)
        u[self.layout.units] = self.own
        return u
