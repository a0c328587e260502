"""Between torch models and the balancing engine: read a model's balanceable part as a
float64 ``Network``, and write scaled weights back into the model's parameters."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import InvalidInputError
from ..network import Network
from .models import BalanceLayout


def model_layout(model: nn.Module) -> BalanceLayout:
    """The model's balance layout; models without one are refused."""
    layout_fn = getattr(model, "balance_layout", None)
    if layout_fn is None:
        raise InvalidInputError("model", f"{type(model).__name__} has no balanceable units "
                                "(no balance_layout)")
    layout = layout_fn()
    if not any(g.hidden for g in layout.groups):
        raise InvalidInputError("model", "has no balanceable (homogeneous hidden) units")
    return layout


def _host_float64(param: torch.Tensor) -> np.ndarray:
    """A float64 host copy of ``param`` (one copy: a conversion already makes a new array)."""
    value = param.detach()
    if value.dtype == torch.float64 and value.device.type == "cpu":
        return value.numpy().copy()
    return value.to("cpu", torch.float64).numpy()


@torch.no_grad()
def layout_network(layout: BalanceLayout) -> Network:
    """Float64 copies of the layout's parameters as an engine ``Network``."""
    weights = {key: _host_float64(param) for key, param in layout.params.items()}
    return Network(layout.groups, layout.connections, weights, kind="torch")


@torch.no_grad()
def write_network(layout: BalanceLayout, network: Network) -> None:
    """Copy every weight of ``network`` into the matching parameter (in its dtype/device)."""
    for key, param in layout.params.items():
        value = torch.from_numpy(np.ascontiguousarray(network.weights[key]))
        param.copy_(value.to(device=param.device, dtype=param.dtype))
