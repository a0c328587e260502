"""Optimiser state across a function-preserving rescaling of the weights (training's entry
point; the per-optimiser rules are ``torch_optim_state``'s).

Balancing replaces a weight ``w`` by ``s * w`` (``s > 0`` elementwise, from the unit
log-scales) without changing the network's function. The loss gradient then scales
inversely: ``dL/d(s w) = (dL/dw) / s``. Running averages of past gradients should follow:
first moments (SGD momentum, Adam's ``exp_avg``) are divided by ``s`` and second moments
(Adam's ``exp_avg_sq``, ``max_exp_avg_sq``) by ``s**2``, so that the state is the one the
optimiser would hold had it always seen the rescaled parameterisation's gradients.

``mode``: ``transform`` (the above), ``keep`` (leave the state as it is) or ``reset``
(forget the state of the rescaled parameters, as if they were new).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .errors import InvalidInputError

OPTIMIZER_STATE_MODES = ("transform", "keep", "reset")


def check_mode(mode: str, field: str = "optimizer_state") -> str:
    if mode not in OPTIMIZER_STATE_MODES:
        raise InvalidInputError(field, f"unknown optimiser-state mode {mode!r}",
                                OPTIMIZER_STATE_MODES)
    return mode


def _owned(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


@torch.no_grad()
def transform_optimizer_state_(optimizer: torch.optim.Optimizer,
                               scales: Mapping[torch.nn.Parameter, torch.Tensor],
                               mode: str = "transform") -> None:
    """Update ``optimizer``'s per-parameter state in place after ``param <- scales[param] *
    param`` for every parameter in ``scales`` (elementwise factors, the parameter's shape).

    Parameters without state yet (no step taken) are left alone; a parameter the optimiser
    does not hold, a factor of the wrong shape or a non-positive factor is an error, as is
    a per-element state entry whose scaling is unknown (rather than silently keeping it).
    """
    check_mode(mode)
    if mode == "keep":
        return
    owned = _owned(optimizer)
    for param, factor in scales.items():
        if id(param) not in owned:
            raise InvalidInputError("scales", f"a parameter of shape {tuple(param.shape)} is "
                                    "not optimised by this optimiser")
        if tuple(factor.shape) != tuple(param.shape):
            raise InvalidInputError("scales", f"factor shape {tuple(factor.shape)} does not "
                                    f"match its parameter's shape {tuple(param.shape)}")
        if not bool(torch.all(factor > 0)):
            raise InvalidInputError("scales", "factors must be positive (balancing rescales "
                                    "by exp(log-scale))")
    # The rules per torch optimiser, derived from each update rule and checked against a
    # replay, live in ``torch_optim_state``; every refusal comes before any change.
    from .torch_optim_state import plan_state_transform

    plan_state_transform(optimizer, scales, mode).apply()
