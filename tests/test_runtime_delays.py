"""Delay draws: the vectorised sampler against numpy's own distributions and the means."""

from __future__ import annotations

import numpy as np
import pytest

from asyncbalance.runtime.delays import DELAY_DISTRIBUTIONS, DelaySampler


def _means(n: int) -> np.ndarray:
    means = np.random.default_rng(3).lognormal(0.0, 0.5, n)
    means[::7] = 0.0  # links without delay draw nothing (and get 0)
    return means


def test_exponential_draws_are_numpys_bit_for_bit_and_leave_the_generator_alike() -> None:
    # The sampler scales standard draws instead of calling ``exponential(means)``: the same
    # numbers, so records made before the change stay reproducible from their seeds.
    means = _means(10_001)
    mine, numpys = np.random.default_rng(11), np.random.default_rng(11)
    got = DelaySampler("exponential").sample_many(mine, means)
    positive = means > 0
    want = np.where(positive, numpys.exponential(np.where(positive, means, 1.0)), 0.0)
    np.testing.assert_array_equal(got, want)
    assert mine.random() == numpys.random()


@pytest.mark.parametrize("kind", DELAY_DISTRIBUTIONS)
def test_every_distribution_has_the_stated_mean(kind: str) -> None:
    n = 400_000
    means = np.full(n, 2.0)
    draws = DelaySampler(kind, spread=0.5, pareto_shape=3.5).sample_many(
        np.random.default_rng(5), means)
    assert (draws >= 0).all()
    # Six standard errors of the sample mean (the Pareto's variance is finite at shape 3.5);
    # a wrong parametrisation (e.g. the scale used as the rate) misses by far more.
    assert abs(draws.mean() - 2.0) <= 6 * draws.std() / np.sqrt(n) + 1e-12


def test_zero_means_give_zero_delays_whatever_the_distribution() -> None:
    for kind in DELAY_DISTRIBUTIONS:
        draws = DelaySampler(kind).sample_many(np.random.default_rng(0), np.zeros(5))
        np.testing.assert_array_equal(draws, 0.0)
