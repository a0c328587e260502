"""Homogeneous activations (BiLU and BiPU) and their degrees.

A unit can be rescaled only when its activation is positively homogeneous:
``f(lam * x) = lam**c * f(x)`` for lam > 0. BiLU units (linear, ReLU, leaky ReLU, abs) have
degree c = 1; the BiPU ``power:C`` is ``relu(x)**C`` with degree c = C.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InvalidInputError, NotHomogeneousError

ACTIVATION_CHOICES = ("relu", "leaky_relu:A", "linear", "abs", "power:C")
NON_HOMOGENEOUS = (
    "tanh", "sigmoid", "gelu", "silu", "swish", "elu", "selu", "softplus", "softmax",
    "layernorm", "attention", "mish", "hardtanh", "relu6",
)


@dataclass(frozen=True)
class Activation:
    """A BiLU ``f(x) = neg_slope*x (x<0), pos_slope*x (x>=0)`` or a BiPU ``relu(x)**degree``."""

    name: str
    neg_slope: float = 0.0
    pos_slope: float = 1.0
    degree: float = 1.0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.degree != 1.0:
            return np.maximum(x, 0.0) ** self.degree
        return np.where(x >= 0, self.pos_slope * x, self.neg_slope * x)

    @property
    def spec(self) -> str:
        if self.name == "leaky_relu":
            return f"leaky_relu:{self.neg_slope:g}"
        if self.name == "power":
            return f"power:{self.degree:g}"
        return self.name


def parse_activation(spec: str | Activation, field: str = "activation") -> Activation:
    """Parse ``relu | leaky_relu:A | linear | abs | power:C``; refuse non-homogeneous names."""
    if isinstance(spec, Activation):
        return spec
    if not isinstance(spec, str):
        raise InvalidInputError(field, f"expected a string, got {type(spec).__name__}",
                                ACTIVATION_CHOICES)
    text = spec.strip().lower()
    name, _, arg = text.partition(":")
    if name in NON_HOMOGENEOUS:
        raise NotHomogeneousError(
            field, f"activation {spec!r} is not homogeneous, so its units cannot be rescaled",
            ACTIVATION_CHOICES)
    if name == "relu" and not arg:
        return Activation("relu", 0.0, 1.0)
    if name == "linear" and not arg:
        return Activation("linear", 1.0, 1.0)
    if name == "abs" and not arg:
        return Activation("abs", -1.0, 1.0)
    if name in ("leaky_relu", "power") and arg:
        try:
            value = float(arg)
        except ValueError:
            raise InvalidInputError(field, f"cannot parse the number in {spec!r}",
                                    ACTIVATION_CHOICES) from None
        if not np.isfinite(value):
            raise InvalidInputError(field, f"{spec!r} has a non-finite parameter",
                                    ACTIVATION_CHOICES)
        if name == "leaky_relu":
            return Activation("leaky_relu", value, 1.0)
        if value <= 0:
            raise InvalidInputError(field, f"power degree must be > 0, got {value:g}",
                                    ACTIVATION_CHOICES)
        return Activation("power", 0.0, 1.0, value)
    raise InvalidInputError(field, f"unknown activation {spec!r}", ACTIVATION_CHOICES)
