"""Per-parameter scale factors of a balancing step, and the optimiser state that follows.

Balancing with unit log-scales ``u`` replaces each weight ``w_ij`` by
``w_ij * exp(u_i - c_j u_j)`` (``scale_network``). The factors are obtained by scaling a
network of ones with the engine's own formula, so they can never disagree with the weights.
"""

from __future__ import annotations

import numpy as np
import torch

from ..network import Network, scale_network
from ..optim_state import transform_optimizer_state_
from .models import BalanceLayout


def parameter_scale_factors(layout: BalanceLayout, log_scales: np.ndarray
                            ) -> dict[torch.nn.Parameter, torch.Tensor]:
    """``{param: s}`` with ``balanced = s * old`` elementwise, for every parameter of the
    layout that touches a hidden unit (the others are never rescaled)."""
    ones = {key: np.ones(tuple(param.shape)) for key, param in layout.params.items()}
    network = Network(layout.groups, layout.connections, ones, kind="torch")
    scaled = scale_network(network, log_scales).weights
    hidden = {g.name for g in layout.groups if g.hidden}
    factors: dict[torch.nn.Parameter, torch.Tensor] = {}
    for conn in layout.connections:
        if conn.dst in hidden or conn.src in hidden:
            param = layout.params[conn.key]
            factors[param] = torch.from_numpy(np.ascontiguousarray(scaled[conn.key])).to(
                device=param.device, dtype=param.dtype)
    return factors


def rescale_optimizer_state(optimizer: torch.optim.Optimizer | None, layout: BalanceLayout,
                            log_scales: np.ndarray, mode: str) -> None:
    """Apply ``mode`` (transform / keep / reset) to the state of the rescaled parameters."""
    if optimizer is None or mode == "keep":
        return
    if not any(optimizer.state.get(param) for param in layout.params.values()):
        return  # no state yet (plain SGD has none): nothing to transform or forget
    transform_optimizer_state_(optimizer, parameter_scale_factors(layout, log_scales), mode)
