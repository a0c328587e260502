"""Paired intervals and verdicts: a hand-computed case, simulated known differences, and
verdict sentences that cannot claim a difference when the interval covers 0."""

from __future__ import annotations

import math

import numpy as np
import pytest

from asyncbalance.errors import InvalidInputError
from asyncbalance.study.speed import (
    area_under_curve,
    epochs_to_threshold,
    has_flattened,
    recent_gain,
)
from asyncbalance.study.stats import (
    Interval,
    PairedTest,
    apply_holm,
    bootstrap_interval,
    diverging,
    holm,
    median_interval,
    minimal_detectable_effect,
    paired_interval,
    sentence,
    t_interval,
    t_test_p,
    verdict,
)

# Student-t quantiles t_{0.975, df} from a printed table (7 significant digits).
T975 = {2: 4.302653, 4: 2.776445}
TABLE_RTOL = 1e-6  # the table's 7 digits


def test_t_interval_by_hand() -> None:
    # d = 1..5: mean 3, sd sqrt(2.5), se sqrt(2.5 / 5) = sqrt(0.5)
    half = T975[4] * math.sqrt(0.5)
    iv = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert iv.mean == 3.0 and iv.n == 5 and iv.method == "t"
    assert iv.low == pytest.approx(3.0 - half, rel=TABLE_RTOL)
    assert iv.high == pytest.approx(3.0 + half, rel=TABLE_RTOL)


def test_paired_interval_by_hand_covers_zero() -> None:
    a, b = [0.90, 0.80, 0.70], [0.85, 0.80, 0.60]   # d = 0.05, 0, 0.1
    iv = paired_interval(a, b)
    half = T975[2] * 0.05 / math.sqrt(3)            # sd(d) = 0.05
    assert iv.mean == pytest.approx(0.05, abs=1e-15)
    assert iv.low == pytest.approx(0.05 - half, rel=TABLE_RTOL)
    assert iv.high == pytest.approx(0.05 + half, rel=TABLE_RTOL)
    assert iv.covers_zero and iv.sign == 0
    assert "no detectable difference" in verdict("x", "y", "final accuracy", iv)


def test_pairing_matters() -> None:
    # a constant per-seed gain hidden in a large between-seed spread: paired -> detected
    base = np.array([0.60, 0.70, 0.80, 0.90, 0.75])
    iv = paired_interval(base + 0.01 + np.array([0.001, -0.001, 0.0, 0.002, -0.002]), base)
    assert iv.sign == 1
    with pytest.raises(InvalidInputError):
        paired_interval([1.0, 2.0], [1.0])


def test_bootstrap_by_hand() -> None:
    assert bootstrap_interval([0.1] * 5).low == pytest.approx(0.1)
    assert bootstrap_interval([0.1] * 5).high == pytest.approx(0.1)
    # two values: resampled means are 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4,
    # so the 2.5 % and 97.5 % percentiles are 0 and 1
    iv = bootstrap_interval([0.0, 1.0], resamples=20000)
    assert (iv.low, iv.high) == (0.0, 1.0)
    assert bootstrap_interval([0.3, 0.1, 0.2]) == bootstrap_interval([0.3, 0.1, 0.2])  # seeded


def test_one_seed_gives_an_unbounded_interval() -> None:
    iv = t_interval([0.5])
    assert iv.low == -math.inf and iv.high == math.inf and iv.sign == 0


@pytest.mark.parametrize("method", ["t", "bootstrap"])
def test_simulated_known_difference(method: str) -> None:
    """Coverage of the true difference near 95 %, and the sign found when the effect is
    large against the noise."""
    rng = np.random.default_rng(1)
    true, n, sims = 0.02, 8 if method == "t" else 20, 1000 if method == "t" else 300
    covered = 0
    for _ in range(sims):
        noise_seed = rng.normal(0, 0.05, n)        # shared by both arms (the seed's luck)
        a = 0.8 + noise_seed + true + rng.normal(0, 0.01, n)
        b = 0.8 + noise_seed + rng.normal(0, 0.01, n)
        iv = paired_interval(a, b, method) if method == "t" else \
            bootstrap_interval(a - b, resamples=2000, seed=int(rng.integers(1 << 30)))
        covered += iv.low <= true <= iv.high
        assert iv.sign == 1 or iv.covers_zero  # never the wrong direction here
    rate = covered / sims
    # t is exact for normal data: 95 % within 3 binomial sd; the percentile bootstrap is
    # known to under-cover somewhat at n = 20, so its lower bound is looser
    sd = math.sqrt(0.95 * 0.05 / sims)
    low = 0.95 - 3 * sd if method == "t" else 0.88
    assert low <= rate <= 0.95 + 3 * sd
    big = paired_interval(np.full(8, 0.9) + rng.normal(0, 0.001, 8),
                          np.full(8, 0.8) + rng.normal(0, 0.001, 8), method)
    assert big.sign == 1 and "higher" in verdict("a", "b", "final accuracy", big)


def test_verdict_never_claims_a_difference_when_the_interval_covers_zero() -> None:
    rng = np.random.default_rng(7)
    for _ in range(500):
        low, high = -rng.exponential(0.05), rng.exponential(0.05)
        mean = rng.uniform(low, high)                # the mean may be far from 0
        text = verdict("l1_nb", "plain", "final accuracy",
                       Interval(mean, low, high, 5, 0.95, "t"))
        assert "no detectable difference" in text
        assert " higher " not in text and " lower " not in text
    above = verdict("a", "b", "q", Interval(0.03, 0.01, 0.05, 5, 0.95, "t"))
    below = verdict("a", "b", "q", Interval(-0.03, -0.05, -0.01, 5, 0.95, "t"))
    assert ": higher (" in above and ": lower (" in below
    edge = verdict("a", "b", "q", Interval(0.02, 0.0, 0.04, 5, 0.95, "t"))
    assert "no detectable difference" in edge   # an endpoint at 0 still covers 0


def test_speed_metrics_by_hand() -> None:
    epochs = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    linear = [e / 10 for e in epochs]
    assert area_under_curve(epochs, linear) == pytest.approx(0.5)
    assert epochs_to_threshold(epochs, linear, 0.35) == 4.0
    assert epochs_to_threshold(epochs, linear, 1.5) is None
    assert epochs_to_threshold([0, 1], [0.9, 0.1], 0.5) is None  # epoch 0 does not count
    assert not has_flattened(epochs, linear)               # +0.5 over the last 5 epochs
    flat = [0.5] * 8 + [0.501, 0.502, 0.503]
    assert has_flattened(epochs, flat)
    gain, span = recent_gain(epochs, flat)
    # the window: 20 % of 10 epochs is 2, raised to the minimum of 5 epochs: 0.503 - 0.5
    assert gain == pytest.approx(0.003) and span == 5.0
    falling = [0.5] * 8 + [0.49, 0.45, 0.40]
    assert not has_flattened(epochs, falling)             # -0.09: not settled either
    # a run shorter than twice the minimum window never settles, however flat
    assert not has_flattened(list(range(6)), [0.5] * 6)
    assert has_flattened(list(range(11)), [0.5] * 11)
    # 100 epochs: the window is 20 epochs; +0.4 points over them is settled, +0.6 is not
    long = list(range(101))
    assert has_flattened(long, [0.5] * 80 + list(np.linspace(0.5, 0.504, 21)))
    assert not has_flattened(long, [0.5] * 80 + list(np.linspace(0.5, 0.506, 21)))
    # a steady rise of 0.15 points per epoch whose last window happens to end on a dip: the
    # window's change is +0.35 points, the trend over the last half projects +0.66 over the
    # 5-epoch window (slope 0.0015 - 0.004 * 5 / 110 from the dip)
    rising = [0.5 + 0.0015 * e for e in range(21)]
    rising[-1] -= 0.004
    assert abs(recent_gain(list(range(21)), rising)[0]) < 0.005
    assert not has_flattened(list(range(21)), rising)
    assert epochs_to_threshold(epochs, [None] * 11, 0.1) is None


# t_{0.80, df} from a printed table (3 decimals): df 4 -> 0.941, df 9 -> 0.883
T80 = {4: 0.941, 9: 0.883}
T80_RTOL = 1e-3   # the printed table's 3 decimals


def test_minimal_detectable_effect_by_hand() -> None:
    # d = 1..5: sd = sqrt(2.5), n = 5: (t_{0.975,4} + t_{0.80,4}) * sqrt(2.5) / sqrt(5)
    hand = (T975[4] + T80[4]) * math.sqrt(0.5)          # 3.7174 * 0.70711 = 2.6286
    assert minimal_detectable_effect(math.sqrt(2.5), 5) == pytest.approx(hand, rel=T80_RTOL)
    test = PairedTest("", "a", "b", "q", (1.0, 2.0, 3.0, 4.0, 5.0), 1.0, "")
    assert test.mde == pytest.approx(hand, rel=T80_RTOL)
    # 10 seeds, sd 1: (2.262 + 0.883) / sqrt(10)
    assert minimal_detectable_effect(1.0, 10) == pytest.approx((2.262157 + T80[9])
                                                               / math.sqrt(10), rel=T80_RTOL)
    assert minimal_detectable_effect(1.0, 1) == math.inf
    # the sentence of a "no detectable difference" carries it (d in accuracy, shown in points)
    same = PairedTest("[p] ", "a", "b", "final accuracy", (0.01, -0.02, 0.03, 0.0, -0.01),
                      paper_effect=1.1)
    sd = float(np.std([0.01, -0.02, 0.03, 0.0, -0.01], ddof=1))
    mde_points = 100 * (T975[4] + T80[4]) * sd / math.sqrt(5)      # 2.30 points
    text = sentence(same)
    assert "no detectable difference" in text
    assert f"minimal detectable effect ±{mde_points:.2f} points" in text
    assert "the paper's +1.10 points below it: these seeds cannot test it" in text


def test_holm_by_hand() -> None:
    # sorted 0.01, 0.03, 0.04 -> 3 * 0.01, 2 * 0.03, max(0.06, 1 * 0.04): 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])       # capped at 1
    assert holm([0.2]) == [0.2]


def test_a_verdict_that_survives_uncorrected_but_not_corrected() -> None:
    # p = 0.01 survives both; the weaker one (p about 0.02 uncorrected) does not survive x3
    strong = PairedTest("", "s", "base", "q", (0.050, 0.052, 0.049, 0.051, 0.050))
    weak = PairedTest("", "w", "base", "q", (0.01, 0.03, 0.002, 0.02, 0.015))
    null = PairedTest("", "n", "base", "q", (0.01, -0.01, 0.02, -0.02, 0.0))
    assert weak.p < 0.05 and weak.iv.sign == 1           # uncorrected: a direction
    apply_holm([strong, weak, null])
    assert weak.p_holm == pytest.approx(min(1.0, 2 * weak.p))  # second smallest of 3: x2
    assert weak.p_holm >= 0.05 and not weak.survives
    assert strong.survives and strong.short() == "higher"
    assert weak.short() == "higher uncorrected only (not after Holm)"
    text = sentence(weak)
    assert "higher uncorrected only, not after Holm's correction" in text
    assert "over the claim's 3 tests" in text
    assert sentence(strong).startswith("s vs base, q: higher (")
    assert "no detectable difference" in sentence(null)


def test_t_test_p_matches_the_interval() -> None:
    rng = np.random.default_rng(5)
    for _ in range(200):
        d = rng.normal(rng.uniform(-1, 1), 1.0, 5)
        assert (t_test_p(d) < 0.05) == (t_interval(d).sign != 0)
    assert t_test_p([0.0, 0.0, 0.0]) == 1.0 and t_test_p([0.1, 0.1]) == 0.0


def test_robust_companion_for_a_diverging_seed() -> None:
    d = [-0.509, 0.071, 0.025, 0.062, -0.025]            # one collapsed seed, as in table 3
    assert diverging(d) == [0]
    assert diverging([0.01, 0.012, 0.011, 0.013, 0.009]) == []
    med = median_interval(d)
    # sorted: -0.509, -0.025, 0.025, 0.062, 0.071; n = 5 -> [min, max] at 1 - 2/32
    assert med.median == 0.025 and (med.low, med.high) == (-0.509, 0.071)
    assert med.coverage == pytest.approx(1 - 2 / 32)
    ten = median_interval(list(range(10)))               # k = 2: 1 - 2 * 11/1024
    assert (ten.low, ten.high) == (1, 8) and ten.coverage == pytest.approx(1 - 22 / 1024)
    text = sentence(PairedTest("", "a", "b", "q", tuple(d), seeds=(0, 1, 2, 3, 4)))
    assert "seed 0 lies apart (paired difference -50.90)" in text
    assert "median of the paired differences +2.50 [-50.90, +7.10]" in text
    assert "93.8 % coverage" in text
    # without the diverging seed, by hand: d = 7.1, 2.5, 6.2, -2.5 points, mean 3.325, sd
    # sqrt(57.1275 / 3) = 4.3638, half-width t_{0.975,3} * sd / 2 = 3.182446 * 2.1819 = 6.944
    rest = text.split("without it: ")[1]
    low, high = (float(x) for x in rest.split("[")[1].split("]")[0].split(", "))
    assert low == pytest.approx(3.325 - 6.944, abs=0.006)   # printed to 2 decimals
    assert high == pytest.approx(3.325 + 6.944, abs=0.006)
    assert "4 seeds" in rest
