"""Quantities watched during training: conservation laws and feedback alignment angles.

Backprop gradient flow with ReLU units and no regulariser conserves, for every hidden unit,
``||in_k||^2 - ||out_k||^2`` (bias in "in"). FA gradient flow conserves, per hidden unit of
layer l, ``<W_{l+1}[:, k], B_{l+1}[:, k]> - 1/2 ||in_k||^2`` (seed 003; bias in "in"), and
the layer sums. For DFA the same law holds for the last hidden layer with ``B_L[k, :]`` in
place of ``B_{l+1}[:, k]``. Discrete steps break them by O(lr^2) per step.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .models import MLP
from .rules import Backprop, FeedbackRule, Rule


def _in_norms(layer: nn.Linear) -> torch.Tensor:
    total = layer.weight.double().pow(2).sum(dim=1)
    if layer.bias is not None:
        total = total + layer.bias.double().pow(2)
    return total


@torch.no_grad()
def bp_quantity(model: MLP) -> np.ndarray:
    """Per hidden unit ``||in||^2 - ||out||^2`` (bias counted in "in")."""
    parts = []
    for layer, nxt in zip(model.layers[:-1], model.layers[1:], strict=True):
        parts.append(_in_norms(layer) - nxt.weight.double().pow(2).sum(dim=0))
    return torch.cat(parts).cpu().numpy()


@torch.no_grad()
def fa_quantity(model: MLP, rule: FeedbackRule) -> np.ndarray:
    """Per hidden unit ``<W_{l+1}[:, k], B[:, k]> - 1/2 ||in_k||^2``: all hidden layers for FA,
    the last hidden layer for DFA."""
    parts = []
    if rule.name == "fa":
        for layer, nxt, b in zip(model.layers[:-1], model.layers[1:], rule.feedback,
                                 strict=True):
            parts.append((nxt.weight.double() * b.double()).sum(dim=0) - 0.5 * _in_norms(layer))
    else:
        b = rule.feedback[-1].double()
        parts.append((model.layers[-1].weight.double() * b.T).sum(dim=0)
                     - 0.5 * _in_norms(model.layers[-2]))
    return torch.cat(parts).cpu().numpy()


@torch.no_grad()
def unit_norms(model: MLP) -> tuple[np.ndarray, np.ndarray]:
    """Per hidden unit L2 norms of the incoming (with bias) and outgoing weights."""
    ins, outs = [], []
    for layer, nxt in zip(model.layers[:-1], model.layers[1:], strict=True):
        ins.append(_in_norms(layer).sqrt())
        outs.append(nxt.weight.double().pow(2).sum(dim=0).sqrt())
    return torch.cat(ins).cpu().numpy(), torch.cat(outs).cpu().numpy()


def drift(current: np.ndarray, reference: np.ndarray, scale: float) -> float:
    """``max_k |q_k - q_k(0)| / scale``."""
    if current.size == 0:
        return 0.0
    return float(np.max(np.abs(current - reference)) / scale) if scale > 0 else float("nan")


def law_scale(model: MLP) -> float:
    """Mean over hidden units of ``||in||^2 + ||out||^2`` at the reference time."""
    ins, outs = unit_norms(model)
    return float(np.mean(ins**2 + outs**2)) if ins.size else 1.0


@torch.no_grad()
def feedback_cosines(model: MLP, rule: FeedbackRule) -> list[float]:
    """Cosine between each feedback matrix and the forward weights it stands in for (seed
    003's alignment): FA ``cos(W_{l+1}, B_{l+1})`` per layer; DFA ``cos(W_L, B_L^T)`` for the
    last hidden layer (the only DFA matrix with a forward counterpart)."""
    if rule.name == "fa":
        pairs = [(layer.weight, b) for layer, b in zip(model.layers[1:], rule.feedback,
                                                       strict=True)]
    else:
        pairs = [(model.layers[-1].weight, rule.feedback[-1].T)]
    out = []
    for w, b in pairs:
        w64, b64 = w.double().flatten(), b.double().flatten()
        denom = float(w64.norm() * b64.norm())
        out.append(float(w64 @ b64) / denom if denom > 0 else float("nan"))
    return out


def alignment_angles(model: nn.Module, rule: Rule, x: torch.Tensor, y: torch.Tensor
                     ) -> list[float]:
    """Angle in degrees between the rule's update and the backprop gradient, per hidden
    layer (weights and bias together); empty for backprop."""
    if isinstance(rule, Backprop) or not isinstance(rule, FeedbackRule):
        return []
    saved = {name: (None if p.grad is None else p.grad.clone())
             for name, p in model.named_parameters()}
    Backprop(model).compute(x, y)
    true = [torch.cat([layer.weight.grad.flatten()]
                      + ([layer.bias.grad] if layer.bias is not None else []))
            for layer in model.layers[:-1]]
    rule.compute(x, y)
    approx = [torch.cat([layer.weight.grad.flatten()]
                        + ([layer.bias.grad] if layer.bias is not None else []))
              for layer in model.layers[:-1]]
    for name, p in model.named_parameters():
        p.grad = saved[name]
    angles = []
    for a, b in zip(true, approx, strict=True):
        denom = float(a.norm() * b.norm())
        cosine = float((a.double() @ b.double()) / denom) if denom > 0 else float("nan")
        angles.append(math.degrees(math.acos(max(-1.0, min(1.0, cosine))))
                      if math.isfinite(cosine) else float("nan"))
    return angles
