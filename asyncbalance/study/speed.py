"""Convergence speed from accuracy curves: epochs to a threshold, area under the curve, and
whether a curve has flattened (so that its last value may be called "final")."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: A mean curve has settled when it changed by less than FLAT_TOLERANCE (accuracy, 0.5
#: points) either way over its last FLAT_WINDOW share of the epochs, that window being at
#: least MIN_WINDOW_EPOCHS epochs and at most half the run (a run of fewer than
#: 2 * MIN_WINDOW_EPOCHS epochs never settles: too short to tell a plateau from a pause).
FLAT_TOLERANCE = 0.005
FLAT_WINDOW = 0.2
MIN_WINDOW_EPOCHS = 5.0


def _arrays(epochs: Sequence[float], values: Sequence[float | None]
            ) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(float(e), float(v)) for e, v in zip(epochs, values, strict=True)
             if v is not None and np.isfinite(v)]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    e, v = np.array(pairs).T
    return e, v


def epochs_to_threshold(epochs: Sequence[float], values: Sequence[float | None],
                        threshold: float) -> float | None:
    """The first recorded epoch (>= 1) whose value reaches ``threshold``; None if never."""
    e, v = _arrays(epochs, values)
    hit = np.flatnonzero((v >= threshold) & (e >= 1))
    return float(e[hit[0]]) if hit.size else None


def area_under_curve(epochs: Sequence[float], values: Sequence[float | None]) -> float:
    """Trapezoid area under the curve from its first to its last recorded epoch, divided
    by that span: the mean value over training (1.0 = perfect from the start)."""
    e, v = _arrays(epochs, values)
    if e.size < 2 or e[-1] == e[0]:
        return float(v[-1]) if v.size else float("nan")
    return float(np.sum((v[1:] + v[:-1]) / 2 * np.diff(e)) / (e[-1] - e[0]))


def window_epochs(span: float, window: float = FLAT_WINDOW,
                  min_epochs: float = MIN_WINDOW_EPOCHS) -> float:
    """The settling window of a run spanning ``span`` epochs."""
    return max(window * span, min_epochs)


def recent_gain(epochs: Sequence[float], values: Sequence[float | None],
                window: float = FLAT_WINDOW, min_epochs: float = MIN_WINDOW_EPOCHS
                ) -> tuple[float, float]:
    """(gain, span): the value's change over the settling window (the last ``window`` share
    of the epochs, at least ``min_epochs``), and that span in epochs (the recorded row
    nearest to the window's start is the reference)."""
    e, v = _arrays(epochs, values)
    if e.size < 2:
        return float("nan"), 0.0
    start = e[-1] - window_epochs(e[-1] - e[0], window, min_epochs)
    ref = int(np.argmin(np.abs(e - start)))
    if ref == e.size - 1:
        ref -= 1
    return float(v[-1] - v[ref]), float(e[-1] - e[ref])


def trend(epochs: Sequence[float], values: Sequence[float | None]) -> float:
    """Least-squares slope per epoch of the curve over the last half of its epochs (robust to
    one noisy endpoint, which the window's change alone is not)."""
    e, v = _arrays(epochs, values)
    if e.size < 2:
        return float("nan")
    keep = e >= e[-1] - (e[-1] - e[0]) / 2
    if keep.sum() < 2:
        return float("nan")
    return float(np.polyfit(e[keep], v[keep], 1)[0])


def has_flattened(epochs: Sequence[float], values: Sequence[float | None],
                  tolerance: float = FLAT_TOLERANCE, window: float = FLAT_WINDOW,
                  min_epochs: float = MIN_WINDOW_EPOCHS) -> bool:
    """Settled: changed by less than ``tolerance`` either way over the settling window, the
    trend over the last half of the run projects less than ``tolerance`` over that window
    too, and the run is at least twice the window long (a curve still rising, or falling, or
    a run too short to show a plateau, has not settled)."""
    e, _ = _arrays(epochs, values)
    if e.size < 2:
        return False
    gain, span = recent_gain(epochs, values, window, min_epochs)
    width = window_epochs(e[-1] - e[0], window, min_epochs)
    long_enough = (e[-1] - e[0]) >= 2 * width
    slope = trend(epochs, values)
    return bool(long_enough and np.isfinite(gain) and abs(gain) < tolerance
                and np.isfinite(slope) and abs(slope) * width < tolerance)
