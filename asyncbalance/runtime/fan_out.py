"""A batch of neuron sends fanned out into arrival windows, in one thread or two.

``block_loops.fan_out_into_windows`` does it in one thread. With two, the entries are cut
where half of the link messages have been fanned out: each thread draws the delays and
windows of its own entries' messages, counts them per window, and stores them; the second
thread's messages go after the first's in every window. Every array is then the one-thread
one, element for element (the delays draw from the same array of standard draws, by message
index).
"""

from __future__ import annotations

import numpy as np

from . import block_loops
from .threads import second_thread

# Link messages in a batch from which two threads share its fan-out (below, handing half to
# a thread costs more than it saves).
PARALLEL_MIN_MESSAGES = 1 << 16


def fan_out(senders: np.ndarray, versions: np.ndarray, times: np.ndarray, values: np.ndarray,
            pair_ptr: np.ndarray, pair_links: np.ndarray, n_hosts: int, host: int,
            link_mean: np.ndarray, draws: np.ndarray, delay_kind: int, step: float,
            threads: int) -> tuple[np.ndarray, ...]:
    """``block_loops.fan_out_into_windows`` (same arguments, same results), on two threads
    where ``threads >= 2`` and the batch has at least ``PARALLEL_MIN_MESSAGES`` messages."""
    args = (senders, versions, times, values, pair_ptr, pair_links, n_hosts, host, link_mean,
            draws, delay_kind, step)
    n = senders.shape[0]
    if threads < 2 or n < 2:
        return block_loops.fan_out_into_windows(*args)
    keys = senders * n_hosts + host
    ends = np.cumsum(pair_ptr[keys + 1] - pair_ptr[keys])
    total = int(ends[-1])
    if total < PARALLEL_MIN_MESSAGES:
        return block_loops.fan_out_into_windows(*args)
    cut = min(int(np.searchsorted(ends, total // 2)) + 1, n - 1)
    middle = int(ends[cut - 1])
    worker = second_thread()

    delays = np.empty(total)
    windows = np.empty(total, dtype=np.int64)
    common = (senders, times, pair_ptr, pair_links, n_hosts, host, link_mean, draws,
              delay_kind, step)
    second = worker.submit(block_loops.fanned_delays, *common, cut, n, middle, delays,
                           windows)
    low, high = block_loops.fanned_delays(*common, 0, cut, 0, delays, windows)
    second_low, second_high = second.result()
    base, top = min(low, second_low), max(high, second_high)
    if top - base >= block_loops.WINDOW_SPAN_MAX:
        return block_loops.fan_out_into_windows(*args)  # the stable-sort path, rare

    span = top - base
    first_counts = np.zeros(span + 2, dtype=np.int64)
    second_counts = np.zeros(span + 2, dtype=np.int64)
    second = worker.submit(block_loops.count_windows, windows, middle, total, base,
                           second_counts)
    block_loops.count_windows(windows, 0, middle, base, first_counts)
    second.result()
    window_keys, bounds, place = block_loops.window_places(first_counts + second_counts, base)
    # The second part's messages go after the first part's in every window.
    second_place = place + first_counts[1:]

    arrays = (np.empty(total), np.empty(total, dtype=np.int64),
              np.empty(total, dtype=np.int64), np.empty(total))
    stores = (senders, versions, times, values, pair_ptr, pair_links, n_hosts, host)
    second = worker.submit(block_loops.store_into_windows, *stores, cut, n, middle, windows,
                           delays, base, second_place, *arrays)
    block_loops.store_into_windows(*stores, 0, cut, 0, windows, delays, base, place, *arrays)
    second.result()
    return (window_keys, bounds, *arrays, np.zeros(0, dtype=np.int64), delays)
