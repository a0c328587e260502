"""Paired comparisons over seeds: mean difference with a 95 % interval, and a verdict
sentence that never claims more than its interval shows.

Arms of a cell share the seed (initialisation, data subset and batch order), so the unit of
analysis is the per-seed difference ``d_s = a_s - b_s``. The t interval is
``mean(d) +- t_{n-1, 0.975} * sd(d) / sqrt(n)``; the bootstrap interval is the percentile
interval of the mean over resamples of the seeds (seeded, so reports are reproducible).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

from ..errors import InvalidInputError

METHODS = ("t", "bootstrap")


@dataclass(frozen=True)
class Interval:
    """Mean paired difference and its interval (``low <= mean <= high``)."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float
    method: str

    @property
    def covers_zero(self) -> bool:
        return self.low <= 0.0 <= self.high

    @property
    def sign(self) -> int:
        """+1 / -1 when the whole interval is above / below 0, else 0."""
        if self.covers_zero or not math.isfinite(self.low) or not math.isfinite(self.high):
            return 0
        return 1 if self.low > 0 else -1


def paired_differences(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise InvalidInputError("paired", f"needs two equal-length series, got {x.shape} and "
                                f"{y.shape}")
    return x - y


def t_interval(d: Sequence[float], confidence: float = 0.95) -> Interval:
    """Student-t interval of the mean of ``d`` (n >= 2; with n = 1 the interval is
    unbounded, since one seed says nothing about the spread)."""
    x = np.asarray(d, dtype=float)
    n = int(x.size)
    if n == 0:
        raise InvalidInputError("paired", "no paired values")
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, -math.inf, math.inf, n, confidence, "t")
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * float(x.std(ddof=1)) \
        / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, confidence, "t")


def bootstrap_interval(d: Sequence[float], confidence: float = 0.95, resamples: int = 10000,
                       seed: int = 0) -> Interval:
    """Percentile bootstrap interval of the mean of ``d`` (seeded)."""
    x = np.asarray(d, dtype=float)
    n = int(x.size)
    if n == 0:
        raise InvalidInputError("paired", "no paired values")
    if n < 2:
        return Interval(float(x.mean()), -math.inf, math.inf, n, confidence, "bootstrap")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return Interval(float(x.mean()), float(low), float(high), n, confidence, "bootstrap")


def paired_interval(a: Sequence[float], b: Sequence[float], method: str = "t",
                    confidence: float = 0.95) -> Interval:
    d = paired_differences(a, b)
    if method == "t":
        return t_interval(d, confidence)
    if method == "bootstrap":
        return bootstrap_interval(d, confidence)
    raise InvalidInputError("method", f"unknown interval method {method!r}", METHODS)


def format_interval(iv: Interval, scale: float = 100.0, unit: str = " points",
                    digits: int = 2) -> str:
    finite = [abs(scale * v) for v in (iv.mean, iv.low, iv.high) if math.isfinite(v)]
    if finite and 0 < max(finite) < 10.0 ** (1 - digits):
        digits += 2  # tiny effects: enough digits to show why the interval excludes 0

    def num(v: float) -> str:
        return f"{scale * v:+.{digits}f}" if math.isfinite(v) else ("-inf" if v < 0 else "+inf")
    return (f"{num(iv.mean)}{unit} [{num(iv.low)}, {num(iv.high)}] "
            f"({int(round(100 * iv.confidence))} % {iv.method} interval, {iv.n} seeds)")


def verdict(arm: str, against: str, quantity: str, iv: Interval, scale: float = 100.0,
            unit: str = " points") -> str:
    """One sentence, no stronger than the interval: a direction only when the interval
    excludes 0, otherwise "no detectable difference"."""
    shown = format_interval(iv, scale, unit)
    if iv.sign == 0:
        return (f"{arm} vs {against}, {quantity}: no detectable difference "
                f"({shown}).")
    direction = "higher" if iv.sign > 0 else "lower"
    return f"{arm} vs {against}, {quantity}: {direction} ({shown})."
