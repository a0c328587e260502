"""The delay draws' own stream: the same values however they are drawn ahead and taken."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncbalance.runtime.draws import DelayDraws


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["prepare", "take"]), st.integers(0, 700)),
                max_size=25), st.integers(0, 2**32 - 1))
def test_takes_follow_one_stream_whatever_was_drawn_ahead(steps: list[tuple[str, int]],
                                                         seed: int) -> None:
    # Any interleaving of draws ahead (more or fewer than the next take, or none) and takes
    # (within one drawn block, across blocks, of none) gives the stream's next values: one
    # call of the generator with the same seed, cut at the takes.
    draws = DelayDraws(np.random.default_rng(seed))
    taken = []
    for action, n in steps:
        if action == "prepare":
            before = draws.waiting
            draws.prepare(n)
            assert draws.waiting == max(before, n)
        else:
            before = draws.waiting
            got = draws.take(n)
            assert got.shape == (n,)
            assert draws.waiting == max(before - n, 0)
            taken.append(got.copy())
    total = sum(part.shape[0] for part in taken)
    want = np.random.default_rng(seed).standard_exponential(size=total)
    got = np.concatenate(taken) if taken else np.zeros(0)
    np.testing.assert_array_equal(got, want)


def test_takes_after_a_draw_ahead_continue_the_stream() -> None:
    draws = DelayDraws(np.random.default_rng(3))
    draws.prepare(1_000)
    first = draws.take(400)
    second = draws.take(600)
    third = draws.take(5)  # drawn at once: nothing was waiting
    want = np.random.default_rng(3).standard_exponential(size=1_005)
    np.testing.assert_array_equal(np.concatenate([first, second, third]), want)
    assert draws.waiting == 0
