"""Balancing torch models in place, in the style of ``torch.nn.utils``.

``nn.Sequential`` of ``Linear`` layers and homogeneous activations (ReLU, LeakyReLU, Identity,
and ``PowerReLU`` for BiPU units) maps onto a layered network. Anything else between two
Linear layers is refused with the module's index and type.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .activations import Activation, parse_activation
from .balance import BalanceReport, balance_network
from .errors import InvalidInputError, NotHomogeneousError
from .network import Network, layered_network
from .regularisers import Regulariser

HOMOGENEOUS_MODULES = ("Linear", "ReLU", "LeakyReLU", "Identity", "PowerReLU", "Flatten")


class PowerReLU(nn.Module):
    """BiPU unit ``relu(x) ** degree`` (homogeneous of degree ``degree``)."""

    def __init__(self, degree: float = 2.0) -> None:
        super().__init__()
        self.degree = float(degree)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) ** self.degree


def module_activation(module: nn.Module, index: int) -> Activation:
    if isinstance(module, nn.ReLU):
        return parse_activation("relu")
    if isinstance(module, nn.LeakyReLU):
        return parse_activation(f"leaky_relu:{module.negative_slope}")
    if isinstance(module, nn.Identity):
        return parse_activation("linear")
    if isinstance(module, PowerReLU):
        return parse_activation(f"power:{module.degree}")
    raise NotHomogeneousError(
        f"model[{index}]", f"{type(module).__name__} is not a homogeneous activation, so the "
        "units before it cannot be rescaled", HOMOGENEOUS_MODULES)


def sequential_linears(model: nn.Sequential) -> tuple[list[nn.Linear], list[Activation]]:
    """The Linear layers of ``model`` and the activation after each hidden one."""
    if not isinstance(model, nn.Sequential):
        raise InvalidInputError("model", f"expected nn.Sequential, got {type(model).__name__}")
    linears: list[nn.Linear] = []
    activations: list[Activation] = []
    pending: Activation | None = None
    for index, module in enumerate(model):
        if isinstance(module, nn.Linear):
            if linears:
                activations.append(pending or parse_activation("linear"))
            linears.append(module)
            pending = None
        elif isinstance(module, nn.Flatten) and not linears:
            continue
        elif linears:
            if pending is not None:
                raise InvalidInputError(f"model[{index}]", "two activations in a row")
            pending = module_activation(module, index)
        else:
            raise InvalidInputError(f"model[{index}]", f"{type(module).__name__} before the "
                                    "first Linear layer", HOMOGENEOUS_MODULES)
    if len(linears) < 2:
        raise InvalidInputError("model", "needs at least two Linear layers (no hidden units)")
    return linears, activations


def network_from_sequential(model: nn.Sequential) -> Network:
    linears, activations = sequential_linears(model)
    with torch.no_grad():
        weights = [m.weight.detach().double().cpu().numpy() for m in linears]
        biases = [None if m.bias is None else m.bias.detach().double().cpu().numpy()
                  for m in linears]
    return layered_network(weights, biases, activations)


@torch.no_grad()
def balance_(model: nn.Sequential, p: float | Regulariser = 2.0, method: str = "exact",
             tol: float = 1e-10, seed: int = 0) -> BalanceReport:
    """Balance ``model`` in place (computed in float64, written back in the model's dtype)."""
    linears, _ = sequential_linears(model)
    network = network_from_sequential(model)
    balanced, _, report = balance_network(network, p, method=method, tol=tol, seed=seed)
    for i, module in enumerate(linears, start=1):
        module.weight.copy_(torch.from_numpy(np.ascontiguousarray(balanced.weights[f"W{i}"])))
        if module.bias is not None:
            module.bias.copy_(torch.from_numpy(np.ascontiguousarray(balanced.weights[f"b{i}"])))
    return report
