"""Additive regularisers ``sum_w g(|w|)`` with ``g`` a positive combination of powers.

``g(x) = sum_m coef_m * x**power_m``. L_p is one term; the elastic net
``alpha*w**2 + beta*|w|`` is two. Every such regulariser makes the balancing cost a convex sum
of exponentials in the log-scales, so the unique optimum and all local moves stay exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InvalidInputError


@dataclass(frozen=True)
class Regulariser:
    """``g(x) = sum(coef * x**power for coef, power in terms)``, every coef > 0, power > 0."""

    terms: tuple[tuple[float, float], ...]
    name: str = "custom"

    def __post_init__(self) -> None:
        if not self.terms:
            raise InvalidInputError("regulariser.terms", "needs at least one (coef, power) term")
        for coef, power in self.terms:
            if not (np.isfinite(power) and power > 0):
                raise InvalidInputError("p", f"must be a finite number > 0, got {power!r}")
            if not (np.isfinite(coef) and coef > 0):
                raise InvalidInputError("regulariser.coef",
                                        f"must be a finite number > 0, got {coef!r}")

    @property
    def powers(self) -> tuple[float, ...]:
        return tuple(p for _, p in self.terms)

    @property
    def coefs(self) -> tuple[float, ...]:
        return tuple(c for c, _ in self.terms)

    @property
    def is_single_power(self) -> bool:
        return len(self.terms) == 1

    def cost(self, weights: np.ndarray) -> float:
        magnitude = np.abs(weights)
        return float(sum(c * np.sum(magnitude**p) for c, p in self.terms))


def lp(p: float) -> Regulariser:
    """The L_p regulariser ``sum |w|**p`` for any p > 0."""
    try:
        value = float(p)
    except (TypeError, ValueError):
        raise InvalidInputError("p", f"must be a number > 0, got {p!r}") from None
    if not (np.isfinite(value) and value > 0):
        raise InvalidInputError("p", f"must be a finite number > 0, got {p!r}")
    return Regulariser(((1.0, value),), name=f"L{value:g}")


def elastic_net(alpha: float, beta: float) -> Regulariser:
    """``alpha*w**2 + beta*|w|``; both coefficients must be > 0 (use lp() for a pure term)."""
    return Regulariser(((float(alpha), 2.0), (float(beta), 1.0)), name="elastic_net")


def as_regulariser(reg: float | Regulariser) -> Regulariser:
    return reg if isinstance(reg, Regulariser) else lp(reg)
