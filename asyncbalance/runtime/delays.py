"""Random message delays, wake intervals and per-link heterogeneity, shared by both backends.

All draws go through a caller-supplied ``numpy.random.Generator`` so that the simulator is
reproducible from its seed. Delays are in scenario time units (the Ray backend multiplies by
its ``time_unit`` in seconds).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .draws import DelayDraws

DELAY_DISTRIBUTIONS = ("constant", "uniform", "exponential", "lognormal", "pareto")
WAKE_KINDS = ("periodic", "poisson")


class DelaySampler:
    """Draws one delay with a given mean from the named distribution.

    ``spread`` is the half-width of ``uniform`` relative to the mean (in [0, 1]) and the sigma
    of ``lognormal``; ``pareto_shape`` (> 1, so the mean exists) is the tail index of ``pareto``.
    Every distribution is parametrised so that its mean is exactly ``mean``.
    """

    def __init__(self, distribution: str, spread: float = 0.5, pareto_shape: float = 2.5):
        if distribution not in DELAY_DISTRIBUTIONS:
            raise ValueError(f"unknown delay distribution {distribution!r}")
        self.distribution = distribution
        self.spread = spread
        self.pareto_shape = pareto_shape

    def sample(self, rng: np.random.Generator, mean: float) -> float:
        kind = self.distribution
        if mean <= 0.0 or kind == "constant":
            return max(mean, 0.0)
        if kind == "uniform":
            return float(rng.uniform(mean * (1.0 - self.spread), mean * (1.0 + self.spread)))
        if kind == "exponential":
            return float(rng.exponential(mean))
        if kind == "lognormal":
            sigma = self.spread
            return float(rng.lognormal(math.log(mean) - 0.5 * sigma * sigma, sigma))
        shape = self.pareto_shape
        scale = mean * (shape - 1.0) / shape
        return float(scale * (1.0 + rng.pareto(shape)))

    def sample_many(self, rng: np.random.Generator, means: np.ndarray,
                    exponentials: DelayDraws | None = None) -> np.ndarray:
        """One delay per entry of ``means``, drawn as one vector (same distributions);
        exponential delays scale standard draws taken from ``exponentials`` where given
        (a stream of their own), else from ``rng``."""
        means = np.asarray(means, dtype=np.float64)
        kind = self.distribution
        positive = means > 0.0
        if kind == "constant" or not positive.any():
            return np.maximum(means, 0.0)
        m = np.where(positive, means, 1.0)
        if kind == "uniform":
            draws = rng.uniform(m * (1.0 - self.spread), m * (1.0 + self.spread))
        elif kind == "exponential":
            # The same draws as ``rng.exponential(m)`` (numpy scales a standard draw), bit for
            # bit, without its per-element broadcasting: measured 4x faster.
            standard = (rng.standard_exponential(size=m.shape) if exponentials is None
                        else exponentials.take(m.size).reshape(m.shape))
            draws = m * standard
        elif kind == "lognormal":
            sigma = self.spread
            draws = rng.lognormal(np.log(m) - 0.5 * sigma * sigma, sigma)
        else:
            shape = self.pareto_shape
            draws = m * (shape - 1.0) / shape * (1.0 + rng.pareto(shape, size=m.shape))
        return draws if positive.all() else np.where(positive, draws, 0.0)


def link_mean_factors(rng: np.random.Generator, links: list[tuple[int, int]],
                      heterogeneity: float) -> dict[tuple[int, int], float]:
    """A mean-one lognormal multiplier per directed link (sigma ``heterogeneity``), in order."""
    if heterogeneity <= 0.0:
        return {link: 1.0 for link in links}
    draws = rng.lognormal(-0.5 * heterogeneity**2, heterogeneity, size=len(links))
    return {link: float(d) for link, d in zip(links, draws, strict=True)}


class WakeSchedule:
    """Intervals between a shard's wakes: periodic with relative jitter, or Poisson."""

    def __init__(self, kind: str, period: float, jitter: float = 0.0):
        if kind not in WAKE_KINDS:
            raise ValueError(f"unknown wake schedule {kind!r}")
        self.kind = kind
        self.period = period
        self.jitter = jitter

    def first(self, rng: np.random.Generator) -> float:
        """Time of the first wake: a random phase, so that shards do not move in lock-step."""
        if self.kind == "poisson":
            return float(rng.exponential(self.period))
        return float(rng.uniform(0.0, self.period))

    def first_many(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "poisson":
            return rng.exponential(self.period, size=n)
        return rng.uniform(0.0, self.period, size=n)

    def interval_many(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "poisson":
            return rng.exponential(self.period, size=n)
        if self.jitter <= 0.0:
            return np.full(n, self.period)
        return self.period * (1.0 + self.jitter * rng.uniform(-1.0, 1.0, size=n))

    def interval(self, rng: np.random.Generator) -> float:
        if self.kind == "poisson":
            return float(rng.exponential(self.period))
        if self.jitter <= 0.0:
            return self.period
        return float(self.period * (1.0 + self.jitter * rng.uniform(-1.0, 1.0)))
