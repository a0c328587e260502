"""Compiled loops for the hot paths of shard blocks and block hosts (numba).

At neuron granularity every window moves thousands of units and carries millions of link
messages; done as chains of numpy passes, each message costs ~200 ns of temporaries and
gathers. These loops do the same work in fewer passes, with the same results, bit for bit:

- ``expand_ranges``: the items of many index ranges, and the range of each;
- ``deliver``: link deliveries with the reference's version rule (in order of arrival when
  a link occurs more than once), writing the winners' values into the halo;
  ``deliver_part`` the same over whole links of a batch, so that two parts can run at once,
  and ``merge_first_arrivals`` what joins their receivers' first arrivals;
- ``wake_on_news``: the wake times of receivers whose view changed;
- ``stable_order``: the stable order of a batch's links (a two-pass radix sort);
- ``messages_from``, ``link_values``: the link messages of a batch of sends and the values
  each carries, gathered from its sender's entry;
- ``apply_sent``: free-running without faults, the link messages of a batch of sends
  applied as they leave, without message arrays;
- ``sort_into_windows`` (with ``window_order``, ``gather_runs``): a stable counting sort of
  link messages by arrival window, into the arrays of a chunk of the timing wheel;
  ``fan_out_into_windows`` the same for neurons straight from a batch of sends, delays
  included, without the intermediate per-message arrays, in passes (``fanned_delays``,
  ``count_windows``, ``window_places``, ``store_into_windows``) that two threads can share;
- ``save_shards``: checkpoints (own values, halo slots and incoming link versions) of many
  shards, copied range by range;
- ``scaled_neighbours`` and ``term_sums``: the exponential sums of a move, split around one
  vectorised ``np.exp`` (measured, a compiled loop around a scalar ``exp`` was slower than
  numpy's vectorised one, so the loops gather and sum and numpy takes the exponentials);
  ``gathered_sums`` the same sums when the exponentials were taken once per value (a window
  with terms at least half as many as the values, e.g. layer slices that all move).

They are pure functions on arrays (no clock, no I/O). Set ``ASYNCBALANCE_NO_JIT=1`` (or run
without numba) to use the numpy passes of ``block`` and ``block_host`` instead: the tests run
both and compare them.
"""

from __future__ import annotations

import os

import numpy as np

from .prefetch import prefetch, prefetch_write

try:
    import numba
except ImportError:  # the numpy passes take over
    numba = None

COMPILED = numba is not None and os.environ.get("ASYNCBALANCE_NO_JIT", "") not in ("1", "true")

# How far ahead the loops that read arrays of every link request their memory (``prefetch``).
# Measured at 10^5 neurons, fan-in 133: a delivery 37 ns with no requests, 20 ns with those
# of its link 16 to 64 deliveries ahead, 18 ns with its carried value and its receiver's
# entry too; a move's neighbour read 16 ns with none, 10, 7.3 and 6.0 ns 16, 32 and 64
# terms ahead. Below PREFETCH_MIN_ENTRIES entries (2 MiB of float64, a core's L2 here) the
# arrays stay in cache and requests would only cost instructions: none are made.
# The fan-out's stores into its windows: 11 ns per link message with no requests, 7.5 ns
# with each window's lines requested 16 messages ahead.
DELIVERY_AHEAD = 32
TERMS_AHEAD = 64
WRITE_AHEAD = 16
PREFETCH_MIN_ENTRIES = 1 << 18
# Windows a batch's arrivals may span for the counting sort by window (beyond: a stable
# sort).
WINDOW_SPAN_MAX = 1 << 20


def _jit(function):
    if numba is None:
        return function
    return numba.njit(cache=True, nogil=True)(function)


@_jit
def expand_ranges(starts, stops):  # pragma: no cover
    """``layout.expand_ranges`` in one pass: the concatenation of ``arange(starts[i],
    stops[i])`` and the segment index of each item (empty ranges where stop <= start)."""
    n = starts.shape[0]
    total = 0
    for i in range(n):
        if stops[i] > starts[i]:
            total += stops[i] - starts[i]
    index = np.empty(total, dtype=np.int64)
    segment = np.empty(total, dtype=np.int64)
    at = 0
    for i in range(n):
        for v in range(starts[i], stops[i]):
            index[at] = v
            segment[at] = i
            at += 1
    return index, segment


@_jit
def deliver(links, versions, times, ordered, values, starts, link_slot_ptr, n_own,
            link_dst, link_version, state, dirty, alive, by_link, one_slot,
            first_arrival, touched):  # pragma: no cover
    """Apply link deliveries; per delivery 0 (its receiver is down: dropped), 1 (delivered,
    not newer) or 2 (applied), and whether it changed the receiver's view.

    Delivery i carries ``values[starts[i]:starts[i] + slots of its link]``; with ``starts``
    empty, ``values[i]`` alone (links of one slot: a window of neurons' messages as the
    timing wheel gives it, with no array of starts to read). It is applied when its
    version is newer than every version seen on its link before it, in order of ``times``
    (stable) unless ``ordered`` says the input order is the delivery order. Only
    the last applied delivery of a link writes the halo; a changed view marks the receiver
    ``dirty``. ``alive`` (per shard; empty: all) drops deliveries to down receivers.
    ``by_link`` is the stable order of ``links``: links are independent, so they are taken
    in that order (memory in address order, a link's deliveries side by side);
    ``one_slot`` says link l fills slot l only. ``first_arrival`` (per shard; empty: not
    kept) takes the earliest time of an applied delivery to each receiver; each receiver
    whose entry leaves inf is listed in ``touched``, and their count is returned third
    (``wake_on_news`` reads and resets just those).
    """
    m = links.shape[0]
    status = np.ones(m, dtype=np.int8)
    changed = np.zeros(m, dtype=np.bool_)
    n_touched = deliver_part(links, versions, times, ordered, values, starts, link_slot_ptr,
                             n_own, link_dst, link_version, state, dirty, alive, by_link, 0, m,
                             one_slot, first_arrival, touched, status, changed)
    return status, changed, n_touched


@_jit
def deliver_part(links, versions, times, ordered, values, starts, link_slot_ptr, n_own,
                 link_dst, link_version, state, dirty, alive, by_link, begin_at, end_at,
                 one_slot, first_arrival, touched, status, changed):  # pragma: no cover
    """``deliver`` over the deliveries ``by_link[begin_at:end_at]`` only, writing their
    ``status`` and ``changed`` into the arrays given; the count of touched receivers. The
    range must hold whole links (every delivery of a link or none): two parts that split
    the links between them touch disjoint entries of every per-link array, so they may run
    at once, each with its own ``first_arrival`` and ``touched`` (``merge_first_arrivals``).
    """
    m = end_at
    check_alive = alive.shape[0] > 0
    keep_first = first_arrival.shape[0] > 0
    has_starts = starts.shape[0] > 0
    n_touched = 0
    # No requests where the arrays of every link fit in cache: the look-ahead points past
    # the batch.
    ahead = DELIVERY_AHEAD if link_version.shape[0] >= PREFETCH_MIN_ENTRIES else m
    j = begin_at
    while j < m:
        # The entries of the link one step ahead, and the message two steps ahead.
        if j + ahead < m:
            next_link = links[by_link[j + ahead]]
            prefetch(link_version, next_link)
            prefetch(link_dst, next_link)
            if one_slot:
                prefetch(state, n_own + next_link)
            else:
                prefetch(link_slot_ptr, next_link)
            if j + 2 * ahead < m:
                later = by_link[j + 2 * ahead]
                prefetch(links, later)
                prefetch(versions, later)
                if has_starts:
                    prefetch(starts, later)
                prefetch(status, later)
                if not ordered:
                    prefetch(times, later)
            # The value the message one step ahead carries, and the receiver's first
            # arrival half a step ahead (its link's receiver is in cache by then).
            carrier = by_link[j + ahead]
            prefetch(values, starts[carrier] if has_starts else carrier)
            if keep_first:
                prefetch(first_arrival, link_dst[links[by_link[j + ahead // 2]]])
        first = by_link[j]
        link = links[first]
        k = j + 1
        while k < m and links[by_link[k]] == link:
            k += 1
        if check_alive and not alive[link_dst[link]]:
            for q in range(j, k):
                status[by_link[q]] = 0
            j = k
            continue
        winner = -1
        if k - j == 1:
            if versions[first] > link_version[link]:
                status[first] = 2
                winner = first
        elif k - j == 2:
            # Nearly every repeated link (a sender's two sends arriving in one window): the
            # two in delivery order without a group array or a sort.
            a, b = by_link[j], by_link[j + 1]
            if not ordered and times[b] < times[a]:
                a, b = b, a
            if versions[a] > link_version[link]:
                status[a] = 2
                link_version[link] = versions[a]
                winner = a
            if versions[b] > link_version[link]:
                status[b] = 2
                link_version[link] = versions[b]
                winner = b
        else:
            group = by_link[j:k]  # in input order (the sort is stable)
            if not ordered:
                group = group[np.argsort(times[group], kind="mergesort")]
            # A running maximum in delivery order; the link's last applied one wins.
            for i in group:
                if versions[i] > link_version[link]:
                    status[i] = 2
                    link_version[link] = versions[i]
                    winner = i
        begin, j = j, k
        if winner < 0:
            continue
        if keep_first:
            receiver = link_dst[link]
            for q in range(begin, k):
                i = by_link[q]
                if status[i] == 2:
                    seen = first_arrival[receiver]
                    if seen == np.inf:
                        touched[n_touched] = receiver
                        n_touched += 1
                    # Without a branch on the times (which one is earlier is a coin toss).
                    first_arrival[receiver] = min(seen, times[i])
        link_version[link] = versions[winner]
        if one_slot:
            lo, hi = link, link + 1
        else:
            lo, hi = link_slot_ptr[link], link_slot_ptr[link + 1]
        source = starts[winner] if has_starts else winner
        differs = False
        for slot in range(lo, hi):
            new = values[source]
            source += 1
            if state[n_own + slot] != new:
                differs = True
                state[n_own + slot] = new
        if differs:
            changed[winner] = True
            dirty[link_dst[link]] = True
    return n_touched


@_jit
def merge_first_arrivals(first_arrival, touched, n_touched, other_first, other_touched,
                         n_other):  # pragma: no cover
    """Fold the first arrivals a second delivery part kept (``other_first``, its receivers
    ``other_touched[:n_other]``) into ``first_arrival`` by min, listing in ``touched`` the
    receivers new to it; ``other_first`` is left all inf. The new count of ``touched``."""
    for j in range(n_other):
        r = other_touched[j]
        if first_arrival[r] == np.inf:
            touched[n_touched] = r
            n_touched += 1
        first_arrival[r] = min(first_arrival[r], other_first[r])
        other_first[r] = np.inf
    return n_touched


@_jit
def stable_order(keys, n_keys):  # pragma: no cover
    """``np.argsort(keys, kind="stable")`` for integer keys in ``0 .. n_keys - 1``: a least
    significant digit radix sort in two counting passes over the key's low and high bits
    (measured on windows of link messages: 5-7 ns per key against 9-16 ns for numpy's
    stable sort, which merges the window's runs)."""
    m = keys.shape[0]
    bits = 1
    while (1 << bits) < n_keys:
        bits += 1
    low = (bits + 1) // 2
    mask = (1 << low) - 1
    count = np.zeros((1 << low) + 1, dtype=np.int64)
    for i in range(m):
        count[(keys[i] & mask) + 1] += 1
    for b in range(1 << low):
        count[b + 1] += count[b]
    by_low = np.empty(m, dtype=np.int64)
    for i in range(m):
        b = keys[i] & mask
        by_low[count[b]] = i
        count[b] += 1
    high = np.zeros((n_keys >> low) + 2, dtype=np.int64)
    for i in range(m):
        high[(keys[i] >> low) + 1] += 1
    for b in range(high.shape[0] - 1):
        high[b + 1] += high[b]
    order = np.empty(m, dtype=np.int64)
    for j in range(m):
        i = by_low[j]
        b = keys[i] >> low
        order[high[b]] = i
        high[b] += 1
    return order


@_jit
def wake_on_news(first_arrival, touched, n_touched, dirty, next_tick,
                 wake_at):  # pragma: no cover
    """News wakes its receiver at its next tick, not before the news arrived: for every
    receiver ``touched[:n_touched]`` that applied deliveries left dirty, ``wake_at =
    min(wake_at, max(first arrival, next_tick))``. Their ``first_arrival`` is reset to inf,
    so that the array serves the next batch (no pass over every shard per window)."""
    for j in range(n_touched):
        r = touched[j]
        if dirty[r]:
            wake_at[r] = min(wake_at[r], max(first_arrival[r], next_tick[r]))
        first_arrival[r] = np.inf


@_jit
def messages_from(senders, versions, times, pair_ptr, pair_links, n_hosts,
                  host):  # pragma: no cover
    """The link messages of entries ``senders`` to the shards of ``host``: their links, the
    entry of each, its version and its send time. Here and below, ``pair_links`` empty
    means that route entry q is link q (``Routes``)."""
    total = 0
    for e in range(senders.shape[0]):
        key = senders[e] * n_hosts + host
        total += pair_ptr[key + 1] - pair_ptr[key]
    links = np.empty(total, dtype=np.int64)
    entry = np.empty(total, dtype=np.int64)
    link_versions = np.empty(total, dtype=np.int64)
    sent_at = np.empty(total)
    table = pair_links.shape[0] > 0
    at = 0
    for e in range(senders.shape[0]):
        key = senders[e] * n_hosts + host
        for q in range(pair_ptr[key], pair_ptr[key + 1]):
            links[at] = pair_links[q] if table else q
            entry[at] = e
            link_versions[at] = versions[e]
            sent_at[at] = times[e]
            at += 1
    return links, entry, link_versions, sent_at


@_jit
def apply_sent(senders, versions, times, values, entry_start, pair_ptr, pair_links, n_hosts,
               host, link_slot_ptr, slot_sender_pos, unit_ptr, n_own, link_dst,
               link_version, state, dirty, first_arrival, touched):  # pragma: no cover
    """The link messages of entries ``senders`` to the shards of ``host``, applied as they
    are sent (free-running, nothing lost or delayed): ``messages_from`` and ``deliver`` in
    one pass, with no message arrays. Entry e carries version ``versions[e]``, send time
    ``times[e]`` and its sender's values from ``values[entry_start[e]]``; in entry order
    (a sender's entries are in time order), each link takes a version newer than its own,
    writes its halo slots, marks its receiver ``dirty`` when the view changed and keeps the
    receiver's earliest applied send time in ``first_arrival`` (listing in ``touched`` the
    receivers whose entry leaves inf). Returns the number of link messages, of applied ones
    and of touched receivers."""
    messages = 0
    applied = 0
    n_touched = 0
    table = pair_links.shape[0] > 0
    for e in range(senders.shape[0]):
        sender = senders[e]
        version = versions[e]
        key = sender * n_hosts + host
        offset = entry_start[e] - unit_ptr[sender]
        messages += pair_ptr[key + 1] - pair_ptr[key]
        for q in range(pair_ptr[key], pair_ptr[key + 1]):
            link = pair_links[q] if table else q
            if version <= link_version[link]:
                continue
            applied += 1
            link_version[link] = version
            receiver = link_dst[link]
            if times[e] < first_arrival[receiver]:
                if first_arrival[receiver] == np.inf:
                    touched[n_touched] = receiver
                    n_touched += 1
                first_arrival[receiver] = times[e]
            differs = False
            for slot in range(link_slot_ptr[link], link_slot_ptr[link + 1]):
                new = values[offset + slot_sender_pos[slot]]
                if state[n_own + slot] != new:
                    differs = True
                    state[n_own + slot] = new
            if differs:
                dirty[receiver] = True
    return messages, applied, n_touched


@_jit
def link_values(copies, entry, senders, entry_start, link_slot_ptr, slot_sender_pos,
                unit_ptr, links, values):  # pragma: no cover
    """The values carried by link messages ``copies`` (indices into ``links``/``entry``;
    empty: every message): each reads, per slot of its link, the sender's value at the
    slot's unit, from the sender's entry ``values[entry_start[e]:]``. Returns
    ``(carried, starts)``."""
    every = copies.shape[0] == 0
    n = links.shape[0] if every else copies.shape[0]
    starts = np.empty(n, dtype=np.int64)
    total = 0
    for j in range(n):
        starts[j] = total
        link = links[j if every else copies[j]]
        total += link_slot_ptr[link + 1] - link_slot_ptr[link]
    carried = np.empty(total)
    at = 0
    for j in range(n):
        c = j if every else copies[j]
        link = links[c]
        e = entry[c]
        first = unit_ptr[senders[e]]
        for slot in range(link_slot_ptr[link], link_slot_ptr[link + 1]):
            carried[at] = values[entry_start[e] + slot_sender_pos[slot] - first]
            at += 1
    return carried, starts


@_jit
def window_order(keys, base, span):  # pragma: no cover
    """A stable counting sort of ``keys`` (all in ``base .. base + span``): the order."""
    counts = np.zeros(span + 2, dtype=np.int64)
    for k in keys:
        counts[k - base + 1] += 1
    for b in range(1, span + 2):
        counts[b] += counts[b - 1]
    order = np.empty(keys.shape[0], dtype=np.int64)
    for i in range(keys.shape[0]):
        b = keys[i] - base
        order[counts[b]] = i
        counts[b] += 1
    return order


@_jit
def gather_runs(values, starts, counts):  # pragma: no cover
    """``concatenate([values[s:s + c] for s, c in zip(starts, counts)])`` and its row
    pointers."""
    n = starts.shape[0]
    ptr = np.empty(n + 1, dtype=np.int64)
    ptr[0] = 0
    for i in range(n):
        ptr[i + 1] = ptr[i] + counts[i]
    out = np.empty(ptr[n])
    for i in range(n):
        s = starts[i]
        for j in range(counts[i]):
            out[ptr[i] + j] = values[s + j]
    return out, ptr


@_jit
def sort_into_windows(times, links, versions, values, starts, slot_count,
                      step, one_slot):  # pragma: no cover
    """Link messages sorted (stably) by arrival window ``floor(time / step)``: their times,
    links, versions, carried values with row pointers, and the first message of each window
    with the window's key (``bounds`` ends with the message count). ``one_slot``: every
    message carries one value, and the row pointers are left empty."""
    n = times.shape[0]
    keys = np.empty(n, dtype=np.int64)
    for i in range(n):
        keys[i] = np.int64(np.floor(times[i] / step))
    base, top = keys.min(), keys.max()
    if top - base < WINDOW_SPAN_MAX:
        order = window_order(keys, base, top - base)
    else:
        order = np.argsort(keys, kind="mergesort")
    sorted_times = np.empty(n)
    sorted_links = np.empty(n, dtype=np.int64)
    sorted_versions = np.empty(n, dtype=np.int64)
    window_keys = np.empty(n, dtype=np.int64)
    bounds = np.empty(n + 1, dtype=np.int64)
    n_windows = 0
    previous = base - 1
    for j in range(n):
        o = order[j]
        sorted_times[j] = times[o]
        sorted_links[j] = links[o]
        sorted_versions[j] = versions[o]
        if keys[o] != previous:
            previous = keys[o]
            window_keys[n_windows] = previous
            bounds[n_windows] = j
            n_windows += 1
    bounds[n_windows] = n
    if one_slot:
        carried = np.empty(n)
        for j in range(n):
            carried[j] = values[starts[order[j]]]
        ptr = np.zeros(0, dtype=np.int64)  # message i carries carried[i]
    else:
        counts = np.empty(n, dtype=np.int64)
        run_starts = np.empty(n, dtype=np.int64)
        for j in range(n):
            counts[j] = slot_count[sorted_links[j]]
            run_starts[j] = starts[order[j]]
        carried, ptr = gather_runs(values, run_starts, counts)
    return (window_keys[:n_windows], bounds[:n_windows + 1], sorted_times, sorted_links,
            sorted_versions, carried, ptr)


@_jit
def fan_out_into_windows(senders, versions, times, values, pair_ptr, pair_links, n_hosts,
                         host, link_mean, draws, delay_kind, step):  # pragma: no cover
    """``messages_from``, the delays and ``sort_into_windows`` in two passes, for entries
    that carry one value each (neurons) to links that fill one slot each: no per-message
    arrays of links, entries or send times, no gathers through a sort order.

    The link messages of entries ``senders`` to ``host`` are taken in ``messages_from``'s
    order; message i's delay is 0 (``delay_kind`` 0), its link's mean (1: constant) or its
    link's mean times ``draws[i]`` (2: exponential, as ``DelaySampler.sample_many`` scales
    standard draws; means >= 0, a zero mean giving a zero delay); it arrives at send time plus
    delay. Returns ``sort_into_windows``'s arrays (stably sorted by arrival window) and the
    delays in message order. ``fanned_delays``, ``count_windows``, ``window_places`` and
    ``store_into_windows`` are its passes, which two threads can share (``fan_out``)."""
    n = senders.shape[0]
    total = 0
    for e in range(n):
        key = senders[e] * n_hosts + host
        total += pair_ptr[key + 1] - pair_ptr[key]
    delays = np.empty(total)
    keys = np.empty(total, dtype=np.int64)
    if total == 0:
        return (np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64), np.empty(0),
                np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64), np.empty(0),
                np.zeros(0, dtype=np.int64), delays)
    base, top = fanned_delays(senders, times, pair_ptr, pair_links, n_hosts, host, link_mean,
                              draws, delay_kind, step, 0, n, 0, delays, keys)
    if top - base < WINDOW_SPAN_MAX:
        counts = np.zeros(top - base + 2, dtype=np.int64)
        count_windows(keys, 0, total, base, counts)
        window_keys, bounds, place = window_places(counts, base)
        sorted_times = np.empty(total)
        sorted_links = np.empty(total, dtype=np.int64)
        sorted_versions = np.empty(total, dtype=np.int64)
        carried = np.empty(total)
        store_into_windows(senders, versions, times, values, pair_ptr, pair_links, n_hosts,
                           host, 0, n, 0, keys, delays, base, place, sorted_times,
                           sorted_links, sorted_versions, carried)
        return window_keys, bounds, sorted_times, sorted_links, sorted_versions, carried, \
            np.zeros(0, dtype=np.int64), delays
    # Windows too far apart for a count per window: the general path's stable sort.
    links, entry, link_versions, sent_at = messages_from(senders, versions, times, pair_ptr,
                                                         pair_links, n_hosts, host)
    window_keys, bounds, sorted_times, sorted_links, sorted_versions, carried, ptr = \
        sort_into_windows(sent_at + delays, links, link_versions, values, entry,
                          np.zeros(0, dtype=np.int64), step, True)
    return (window_keys, bounds, sorted_times, sorted_links, sorted_versions, carried, ptr,
            delays)


@_jit
def fanned_delays(senders, times, pair_ptr, pair_links, n_hosts, host, link_mean, draws,
                  delay_kind, step, first, last, at, delays, keys):  # pragma: no cover
    """The delays and arrival windows of the link messages of entries ``first .. last - 1``
    (``fan_out_into_windows``'s rules), written from message ``at`` on into ``delays`` and
    ``keys``; the smallest and the largest window (int64's largest and smallest without
    messages, so that the parts' bounds combine by min and max)."""
    table = pair_links.shape[0] > 0
    lowest = np.iinfo(np.int64).max
    highest = np.iinfo(np.int64).min
    for e in range(first, last):
        key = senders[e] * n_hosts + host
        sent = times[e]
        for q in range(pair_ptr[key], pair_ptr[key + 1]):
            if delay_kind == 0:
                delay = 0.0
            elif delay_kind == 1:
                delay = link_mean[pair_links[q] if table else q]
            else:
                delay = link_mean[pair_links[q] if table else q] * draws[at]
            delays[at] = delay
            window = np.int64(np.floor((sent + delay) / step))
            keys[at] = window
            lowest = min(lowest, window)
            highest = max(highest, window)
            at += 1
    return lowest, highest


@_jit
def count_windows(keys, lo, hi, base, counts):  # pragma: no cover
    """Adds the messages ``lo .. hi - 1`` of each window ``base + b`` to ``counts[b + 1]``."""
    for i in range(lo, hi):
        counts[keys[i] - base + 1] += 1


@_jit
def window_places(counts, base):  # pragma: no cover
    """From the messages per window (``counts``, window ``base + b`` at ``b + 1``): the keys
    of the windows that have messages, their bounds in a stable sort by window, and where
    each window's first message goes (per window ``base + b``, messages or not)."""
    span = counts.shape[0] - 2
    n_windows = 0
    for b in range(1, span + 2):
        if counts[b] > 0:
            n_windows += 1
    window_keys = np.empty(n_windows, dtype=np.int64)
    bounds = np.empty(n_windows + 1, dtype=np.int64)
    place = np.empty(span + 1, dtype=np.int64)
    at = 0
    w = 0
    for b in range(span + 1):
        place[b] = at
        if counts[b + 1] > 0:
            window_keys[w] = base + b
            bounds[w] = at
            w += 1
        at += counts[b + 1]
    bounds[n_windows] = at
    return window_keys, bounds, place


@_jit
def store_into_windows(senders, versions, times, values, pair_ptr, pair_links, n_hosts, host,
                       first, last, at, keys, delays, base, place, sorted_times, sorted_links,
                       sorted_versions, carried):  # pragma: no cover
    """The link messages of entries ``first .. last - 1`` (message ``at`` on, windows and
    delays from ``fanned_delays``), each stored at its window's next place (``place``, per
    window ``base + b``, advanced as it fills): a stable counting sort by window."""
    table = pair_links.shape[0] > 0
    total = sorted_times.shape[0]
    # Each window's messages are stored one after the other, a stream per window; the lines
    # two ahead of a stream are requested as it enters a new one (where the four arrays
    # together outgrow the cache).
    ahead = WRITE_AHEAD if 4 * total >= PREFETCH_MIN_ENTRIES else total
    for e in range(first, last):
        key = senders[e] * n_hosts + host
        sent = times[e]
        version = versions[e]
        value = values[e]
        for q in range(pair_ptr[key], pair_ptr[key + 1]):
            b = keys[at] - base
            j = place[b]
            place[b] = j + 1
            if (j & 7) == 0 and j + ahead < total:
                prefetch_write(sorted_times, j + ahead)
                prefetch_write(sorted_links, j + ahead)
                prefetch_write(sorted_versions, j + ahead)
                prefetch_write(carried, j + ahead)
            sorted_times[j] = sent + delays[at]
            sorted_links[j] = pair_links[q] if table else q
            sorted_versions[j] = version
            carried[j] = value
            at += 1


@_jit
def scaled_neighbours(values, positions, ptr, rate, value_index):  # pragma: no cover
    """``rate[q] * values[value_index[q]]`` for every term q of each of ``positions`` (the
    terms ``ptr[p] .. ptr[p + 1]`` of position p), position after position."""
    n = positions.shape[0]
    total = 0
    for i in range(n):
        total += ptr[positions[i] + 1] - ptr[positions[i]]
    out = np.empty(total)
    # A second cursor, TERMS_AHEAD terms ahead, requests the value its term will read: it
    # points at term ``ahead_q`` of position ``ahead_i`` (past the end: ``ahead_i == n``).
    ahead_i = 0 if values.shape[0] >= PREFETCH_MIN_ENTRIES else n  # in cache: none
    ahead_q = ptr[positions[0]] if n else 0
    for step in range(TERMS_AHEAD + 1):
        if step:
            ahead_q += 1
        while ahead_i < n and ahead_q >= ptr[positions[ahead_i] + 1]:
            ahead_i += 1
            if ahead_i < n:
                ahead_q = ptr[positions[ahead_i]]
    at = 0
    for i in range(n):
        for q in range(ptr[positions[i]], ptr[positions[i] + 1]):
            if ahead_i < n:
                prefetch(values, value_index[ahead_q])
                ahead_q += 1
                while ahead_i < n and ahead_q >= ptr[positions[ahead_i] + 1]:
                    ahead_i += 1
                    if ahead_i < n:
                        ahead_q = ptr[positions[ahead_i]]
            out[at] = rate[q] * values[value_index[q]]
            at += 1
    return out


@_jit
def term_sums(exps, positions, ptr, cost, visible):  # pragma: no cover
    """Per position, ``visible[p] + sum(cost[q] * exps[...])`` over its terms, summed in term
    order from 0 (as ``np.bincount`` does, so the sums are the numpy passes' bit for bit)."""
    n = positions.shape[0]
    out = np.empty(n)
    at = 0
    for i in range(n):
        p = positions[i]
        total = 0.0
        for q in range(ptr[p], ptr[p + 1]):
            total += cost[q] * exps[at]
            at += 1
        out[i] = visible[p] + total
    return out


@_jit
def gathered_sums(exps_by_value, positions, ptr, cost, value_index,
                  visible):  # pragma: no cover
    """``term_sums`` with each term's exponential read from ``exps_by_value`` at its value
    index (the exponentials taken once per value, not once per term), in the same order."""
    n = positions.shape[0]
    out = np.empty(n)
    for i in range(n):
        p = positions[i]
        total = 0.0
        for q in range(ptr[p], ptr[p + 1]):
            total += cost[q] * exps_by_value[value_index[q]]
        out[i] = visible[p] + total
    return out


@_jit
def save_shards(shards, unit_ptr, in_link_ptr, in_links, link_slot_ptr, n_own, values,
                link_version, saved_values, saved_versions):  # pragma: no cover
    """Copy each shard's own values, halo slots and incoming link versions into the saved
    arrays (same places)."""
    for s in shards:
        for p in range(unit_ptr[s], unit_ptr[s + 1]):
            saved_values[p] = values[p]
        for q in range(in_link_ptr[s], in_link_ptr[s + 1]):
            link = in_links[q]
            saved_versions[link] = link_version[link]
            for slot in range(n_own + link_slot_ptr[link], n_own + link_slot_ptr[link + 1]):
                saved_values[slot] = values[slot]


def warm_up() -> None:
    """Compile (or load from the cache) every loop for the argument types the engine passes,
    on tiny arrays: a process that runs block hosts on a wall clock calls this before its
    clock starts, so that no compilation stalls a running host."""
    if not COMPILED:
        return
    i8 = np.zeros(2, dtype=np.int64)
    f8 = np.zeros(2)
    expand_ranges(i8, i8)
    ptr = np.arange(3, dtype=np.int64)
    for ordered in (False, True):
        for one_slot in (False, True):
            deliver(i8, np.ones(2, dtype=np.int64), f8, ordered, f8, i8, ptr, 1, i8,
                    np.full(2, -1, dtype=np.int64), np.zeros(4), np.zeros(2, dtype=bool),
                    np.ones(2, dtype=bool), np.arange(2, dtype=np.int64), one_slot,
                    np.full(2, np.inf), np.zeros(2, dtype=np.int64))
            deliver_part(i8, np.ones(2, dtype=np.int64), f8, ordered, f8, i8, ptr, 1, i8,
                         np.full(2, -1, dtype=np.int64), np.zeros(4), np.zeros(2, dtype=bool),
                         np.ones(2, dtype=bool), np.arange(2, dtype=np.int64), 0, 2, one_slot,
                         np.full(2, np.inf), np.zeros(2, dtype=np.int64),
                         np.ones(2, dtype=np.int8), np.zeros(2, dtype=bool))
            sort_into_windows(f8, i8, i8, f8, i8, np.ones(2, dtype=np.int64), 0.1, one_slot)
    for delay_kind in (0, 1, 2):
        fan_out_into_windows(i8, i8, f8, f8, ptr, i8, 1, 0, f8, f8, delay_kind, 0.1)
        fanned_delays(i8, f8, ptr, i8, 1, 0, f8, f8, delay_kind, 0.1, 0, 2, 0, np.zeros(4),
                      np.zeros(4, dtype=np.int64))
    count_windows(i8, 0, 2, 0, np.zeros(3, dtype=np.int64))
    window_places(np.ones(3, dtype=np.int64), 0)
    store_into_windows(i8, i8, f8, f8, ptr, i8, 1, 0, 0, 2, 0, i8, f8, 0, i8[:1], f8, i8, i8,
                       f8)
    wake_on_news(np.full(2, np.inf), i8, 0, np.zeros(2, dtype=bool), f8, np.zeros(2))
    merge_first_arrivals(np.full(2, np.inf), np.zeros(2, dtype=np.int64), 0,
                         np.full(2, np.inf), np.zeros(2, dtype=np.int64), 0)
    stable_order(i8, 2)
    messages_from(i8, i8, f8, ptr, i8, 1, 0)
    apply_sent(i8, i8, f8, f8, i8, ptr, i8, 1, 0, ptr, i8, ptr, 1, i8, i8, np.zeros(4),
               np.zeros(2, dtype=bool), np.full(2, np.inf), np.zeros(2, dtype=np.int64))
    link_values(i8, i8, i8, i8, ptr, i8, ptr, i8, f8)
    term_sums(scaled_neighbours(f8, i8, ptr, f8, i8), i8, ptr, f8, f8)
    gathered_sums(f8, i8, ptr, f8, i8, f8)
    save_shards(i8, ptr, ptr, i8, ptr, 1, np.zeros(4), i8, np.zeros(4), np.zeros(2, np.int64))
