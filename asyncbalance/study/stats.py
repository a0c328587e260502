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


# ---------------------------------------------------------------------------------------------
# Tests over many comparisons: p-values, Holm's correction, what a cell could have detected,
# and a robust companion when one seed's difference lies far from the others.

#: Significance level of every verdict (two-sided) and the power the minimal detectable
#: effect is quoted at.
ALPHA = 0.05
POWER = 0.80
#: A seed "diverges" when its paired difference lies more than this many sds of the other
#: seeds' differences from their mean (for 5 normal seeds a false alarm per cell has a
#: probability of about 3 %: |t_3| > 8 / sqrt(1 + 1/4)).
DIVERGE_SDS = 8.0


def t_test_p(d: Sequence[float]) -> float:
    """Two-sided p-value of the one-sample t test of mean(d) = 0 (the test whose 95 %
    interval is :func:`t_interval`: p < 0.05 exactly when that interval excludes 0).
    One value, or no spread around a zero mean, tests nothing (p = 1); no spread around a
    non-zero mean is p = 0."""
    x = np.asarray(d, dtype=float)
    if x.size < 2:
        return 1.0
    sd = float(x.std(ddof=1))
    mean = float(x.mean())
    if sd == 0.0:
        return 0.0 if mean != 0.0 else 1.0
    t = mean / (sd / math.sqrt(x.size))
    return float(2.0 * scipy_stats.t.sf(abs(t), x.size - 1))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error rate), in the input order:
    sorted ascending, p_(i) is multiplied by (m - i + 1), made monotone, capped at 1."""
    p = np.asarray(pvalues, dtype=float)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p[index])))
        adjusted[index] = running
    return [float(v) for v in adjusted]


def minimal_detectable_effect(sd: float, n: int, alpha: float = ALPHA,
                              power: float = POWER) -> float:
    """The smallest true mean paired difference a two-sided paired t test at ``alpha``
    detects with probability ``power``, given the differences' sd and n seeds:
    ``(t_{1-alpha/2, n-1} + t_{power, n-1}) * sd / sqrt(n)`` (the usual approximation of the
    noncentral t; inf with fewer than 2 seeds)."""
    if n < 2 or not math.isfinite(sd):
        return math.inf
    quantiles = (float(scipy_stats.t.ppf(1 - alpha / 2, n - 1))
                 + float(scipy_stats.t.ppf(power, n - 1)))
    return quantiles * sd / math.sqrt(n)


def diverging(d: Sequence[float], sds: float = DIVERGE_SDS) -> list[int]:
    """Indices of the differences more than ``sds`` standard deviations of the others from
    the others' mean (leave one out; 4 values at least; when the others agree exactly, any
    value off them diverges)."""
    x = np.asarray(d, dtype=float)
    if x.size < 4:
        return []
    out = []
    for i in range(x.size):
        others = np.delete(x, i)
        dev = abs(float(x[i]) - float(others.mean()))
        if dev > sds * float(others.std(ddof=1)) and dev > 1e-12:
            out.append(i)
    return out


@dataclass(frozen=True)
class MedianInterval:
    """Median of the paired differences with the distribution-free (sign test) interval
    between order statistics ``k`` and ``n + 1 - k``; ``coverage`` is its exact level."""

    median: float
    low: float
    high: float
    n: int
    coverage: float


def median_interval(d: Sequence[float], confidence: float = 0.95) -> MedianInterval:
    """The widest k with 2 P(Bin(n, 1/2) <= k - 1) <= 1 - confidence, or k = 1 when none
    qualifies (n < 6: then the interval is [min, max] at its exact, lower, coverage)."""
    x = np.sort(np.asarray(d, dtype=float))
    n = int(x.size)
    if n == 0:
        raise InvalidInputError("paired", "no paired values")
    k = 1
    while k + 1 <= (n + 1) // 2 and 2 * scipy_stats.binom.cdf(k, n, 0.5) <= 1 - confidence:
        k += 1
    coverage = 1.0 - 2.0 * float(scipy_stats.binom.cdf(k - 1, n, 0.5))
    return MedianInterval(float(np.median(x)), float(x[k - 1]), float(x[n - k]), n, coverage)


@dataclass
class PairedTest:
    """One paired comparison of a claim: the differences, their interval and p-value, and
    (once the claim's tests are collected) the Holm-adjusted p-value."""

    tag: str
    subject: str
    against: str
    quantity: str
    d: tuple[float, ...]
    scale: float = 100.0
    unit: str = " points"
    seeds: tuple[int, ...] = ()
    paper_effect: float | None = None   # in the shown unit (points), when the paper gives one
    p_holm: float = math.nan
    family: int = 0

    @property
    def iv(self) -> Interval:
        return t_interval(self.d)

    @property
    def p(self) -> float:
        return t_test_p(self.d)

    @property
    def mde(self) -> float:
        x = np.asarray(self.d, dtype=float)
        sd = float(x.std(ddof=1)) if x.size > 1 else math.inf
        return minimal_detectable_effect(sd, int(x.size))

    @property
    def direction(self) -> int:
        """+1 / -1 when the uncorrected 95 % interval excludes 0, else 0."""
        return self.iv.sign

    @property
    def survives(self) -> bool:
        """A direction that survives Holm's correction within the claim."""
        return self.direction != 0 and self.p_holm < ALPHA

    def short(self) -> str:
        if self.direction == 0:
            return "no detectable difference"
        word = "higher" if self.direction > 0 else "lower"
        return word if self.survives else f"{word} uncorrected only (not after Holm)"


def apply_holm(tests: Sequence[PairedTest]) -> None:
    """Holm's correction over one claim's tests (the family), written into each test."""
    adjusted = holm([t.p for t in tests])
    for test, value in zip(tests, adjusted, strict=True):
        test.p_holm = value
        test.family = len(tests)


def _num(value: float, scale: float, digits: int = 2) -> str:
    return f"{scale * value:.{digits}g}" if abs(scale * value) < 0.01 else \
        f"{scale * value:.{digits}f}"


def sentence(test: PairedTest) -> str:
    """The verdict sentence: a direction only when the interval excludes 0, marked when it
    does not survive Holm's correction; every "no detectable difference" carries the
    minimal detectable effect; a diverging seed brings the median with its interval."""
    iv = test.iv
    shown = format_interval(iv, test.scale, test.unit)
    holm_text = (f"Holm-adjusted p = {test.p_holm:.2g} over the claim's {test.family} tests"
                 if test.family else f"p = {test.p:.2g}, uncorrected")
    head = f"{test.tag}{test.subject} vs {test.against}, {test.quantity}: "
    if test.direction == 0:
        body = (f"no detectable difference ({shown}; minimal detectable effect "
                f"±{_num(test.mde, test.scale)}{test.unit} at 80 % power"
                + (f", the paper's {test.paper_effect:+.2f}{test.unit} "
                   + ("within reach" if abs(test.paper_effect) >= test.scale * test.mde
                      else "below it: these seeds cannot test it")
                   if test.paper_effect is not None else "") + ")")
    else:
        word = "higher" if test.direction > 0 else "lower"
        if test.survives:
            body = f"{word} ({shown}; {holm_text})"
        else:
            body = (f"{word} uncorrected only, not after Holm's correction ({shown}; "
                    f"{holm_text}): no detectable difference once the claim's tests are "
                    "corrected")
    text = head + body
    outliers = diverging(test.d)
    if outliers:
        med = median_interval(test.d)
        names = ", ".join(str(test.seeds[i]) if test.seeds else str(i) for i in outliers)
        # "lies apart", not "diverges": a diverged run has no value to pair at all
        text += (f"; seed{'s' if len(outliers) > 1 else ''} {names} "
                 f"lie{'' if len(outliers) > 1 else 's'} apart (paired difference "
                 + ", ".join(f"{test.scale * test.d[i]:+.2f}" for i in outliers)
                 + f"): median of the paired differences {test.scale * med.median:+.2f} "
                 f"[{test.scale * med.low:+.2f}, {test.scale * med.high:+.2f}] (sign-test "
                 f"interval, {100 * med.coverage:.1f} % coverage)")
        rest = [v for i, v in enumerate(test.d) if i not in outliers]
        if len(rest) >= 2:
            text += ("; without " + ("it" if len(outliers) == 1 else "them") + ": "
                     + format_interval(t_interval(rest), test.scale, test.unit))
    return text + "."
