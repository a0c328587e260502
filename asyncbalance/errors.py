"""Exceptions raised by asyncbalance. Every message names the offending field."""

from __future__ import annotations


class BalanceError(Exception):
    """Base class for all asyncbalance errors."""


class InvalidInputError(BalanceError, ValueError):
    """A user-supplied value (weights, option, file) is invalid.

    ``field`` names the offending argument or key, ``choices`` lists valid values when finite.
    """

    def __init__(self, field: str, message: str,
                 choices: list[str] | tuple[str, ...] | None = None):
        self.field = field
        self.choices = tuple(choices) if choices is not None else None
        text = f"{field}: {message}"
        if choices:
            text += f" (valid choices: {', '.join(choices)})"
        super().__init__(text)


class NotHomogeneousError(InvalidInputError):
    """A unit whose activation is not homogeneous was asked to be balanced."""


class ResultOverflowError(BalanceError, ArithmeticError):
    """The balanced network exists but some of its weights exceed the float64 range."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class NonConvergenceError(BalanceError, RuntimeError):
    """An iterative schedule hit its iteration cap before reaching the tolerance."""

    def __init__(self, method: str, iterations: int, max_log_imbalance: float, tol: float):
        self.method = method
        self.iterations = iterations
        self.max_log_imbalance = max_log_imbalance
        self.tol = tol
        super().__init__(
            f"method {method!r} did not converge: max log-imbalance {max_log_imbalance:.3e} "
            f"> tol {tol:.1e} after {iterations} iterations"
            + (" (raise max_iterations, loosen tol, or use method='exact')"
               if method != "exact" else " (check the weights for extreme magnitudes)")
        )
