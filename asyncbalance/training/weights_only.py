"""Balancing of the weights only, ignoring the biases (what the papers' code does).

The papers' ``neuralBalance`` rescales a hidden unit's incoming weight row by ``lambda`` and
its outgoing weight column by ``1 / lambda`` but leaves the unit's bias alone, so for a biased
ReLU network the function changes. Offered as an explicit arm to measure what exact function
preservation is worth: the balancing cost ignores the biases, the biases are not written, and
the monitors' ``function_rel_error`` reports the function change this causes.
"""

from __future__ import annotations

import torch
from torch import nn

from .models import BalanceLayout


class WeightsOnlyView(nn.Module):
    """The wrapped model with a balance layout that leaves out every bias connection."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def balance_layout(self) -> BalanceLayout:
        full: BalanceLayout = self.model.balance_layout()
        connections = tuple(c for c in full.connections if c.layout != "bias")
        keys = {c.key for c in connections}
        groups = tuple(g for g in full.groups if g.name != "bias")
        params = {key: param for key, param in full.params.items() if key in keys}
        return BalanceLayout(groups, connections, params)
