"""Tolerances of the engine tests, in one place, each with the reason it has that size.

Float64 has a unit roundoff of ``EPS = 2.2e-16``. The defaults are tight; an assertion that
needs more room loosens one explicitly and says why at the call site.
"""

from __future__ import annotations

import numpy as np

EPS = float(np.finfo(np.float64).eps)

#: Relative tolerance of function preservation (float64): the issue's contract.
FUNCTION_RTOL = 1e-12

#: The exact solver is asked for max |log(A / cB)| <= 1e-12 (its default); quantities derived
#: from the balanced weights (per-unit sums of |w|^p) agree to that plus a few roundings.
OPTIMUM_TOL = 1e-12

#: Schedules run to this max log-imbalance in the comparisons with the optimum.
SCHEDULE_TOL = 1e-11

#: Relative slack when checking that R never increases: R is a sum of at most a few hundred
#: positive terms, each exp(...) * |w|^p evaluated with a relative error of a few EPS, so two
#: evaluations of the same R differ by at most ~ n_terms * EPS relatively; 1e-13 (~450 EPS)
#: covers every network in these tests with room to spare, and is far below any real step
#: (an exact move of an unbalanced unit lowers R by (sqrt A - sqrt B)^2).
MONOTONE_RTOL = 1e-13


def rel_err(actual: np.ndarray | float, expected: np.ndarray | float) -> float:
    """``max |actual - expected| / max |expected|`` (0 for two empty or all-zero arrays)."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    scale = float(np.max(np.abs(e), initial=0.0))
    diff = float(np.max(np.abs(a - e), initial=0.0))
    if scale == 0.0:
        return diff
    return diff / scale


def assert_rel(actual: np.ndarray | float, expected: np.ndarray | float,
               rtol: float = OPTIMUM_TOL, what: str = "") -> None:
    """Assert ``rel_err(actual, expected) <= rtol`` with a message that shows both."""
    err = rel_err(actual, expected)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"


def assert_monotone(history: tuple[float, ...] | list[float],
                    rtol: float = MONOTONE_RTOL, what: str = "cost") -> None:
    """Assert that no entry exceeds its predecessor by more than ``rtol`` relatively."""
    values = np.asarray(history, dtype=np.float64)
    assert values.size >= 2, f"{what}: no history recorded"
    rises = values[1:] - values[:-1] * (1.0 + rtol)
    worst = int(np.argmax(rises))
    assert rises[worst] <= 0.0, (
        f"{what} increased at step {worst + 1}: {values[worst]!r} -> {values[worst + 1]!r}")
