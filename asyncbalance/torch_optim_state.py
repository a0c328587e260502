"""A torch optimiser's state across ``balance_``, derived from each optimiser's update rule.

``balance_`` replaces a parameter ``w`` by ``s * w`` (``s > 0`` elementwise) without changing
the model's function, so the rescaled model's gradient at the rescaled point is ``g / s``.
The state a parameter should carry afterwards is the one a fresh optimiser would hold had it
been fed the rescaled model's gradients all along, at the rescaled points ``s * w_t`` (the
*replay*; ``tests/test_torch_optim_state.py`` runs it for every optimiser below). Each state
entry then equals the old one times ``s**k``, with ``k`` read off the update rule:

* running sums or averages of ``g`` (momentum, ``exp_avg``, RMSprop's ``grad_avg``, Rprop's
  ``prev``, Adamax's ``exp_inf`` = max of decayed ``|g|``): ``k = -1``;
* of ``g**2`` (``exp_avg_sq``, ``max_exp_avg_sq``, ``square_avg``, Adagrad's ``sum`` above its
  initial value): ``k = -2``;
* averages of the parameter itself (ASGD's ``ax``): ``k = +1``;
* quantities built from scale-free ratios only: ``k = 0``. RMSprop's momentum buffer sums
  ``g / sqrt(v)``; Adadelta's ``acc_delta`` sums ``delta**2`` with
  ``delta = sqrt(acc_delta + eps) * g / sqrt(square_avg)``, whose ``g / sqrt(square_avg)`` is
  scale-free, so the replay rebuilds the same ``acc_delta``; Rprop's ``step_size`` changes by
  sign agreements of successive gradients only. Step counters and learning-rate bookkeeping
  (``step``, ``eta``, ``mu``, ``mu_product``) are scale-free too.

The eps terms (``sqrt(v) + eps``, ``|g| + eps``) are the only approximation: the rule is
exact when eps is small next to the moments it is added to, as it is meant to be.

What the rule cannot give is refused (``InvalidInputError``) before anything changes: an
optimiser class not listed here (subclasses included: they may change the rule), a state key
the rule does not know, an L2 ``weight_decay`` added to the gradient (the state then mixes
``g / s`` with ``wd * s * w`` terms it no longer separates), LBFGS (flat histories of steps
and gradient differences) and Adafactor (row and column means of ``g**2`` that a per-weight
rescaling does not map onto row and column means).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .errors import InvalidInputError
from .optim_state import OPTIMIZER_STATE_MODES, check_mode

# Exponent k of s per state key (state' = state * s**k), by optimiser class name.
_ADAM = {"step": 0, "exp_avg": -1, "exp_avg_sq": -2, "max_exp_avg_sq": -2}
STATE_EXPONENTS: dict[str, dict[str, int]] = {
    "SGD": {"momentum_buffer": -1},
    "Adam": _ADAM,
    "AdamW": _ADAM,
    "SparseAdam": {"step": 0, "exp_avg": -1, "exp_avg_sq": -2},
    "NAdam": {"step": 0, "mu_product": 0, "exp_avg": -1, "exp_avg_sq": -2},
    "RAdam": {"step": 0, "exp_avg": -1, "exp_avg_sq": -2},
    "Adamax": {"step": 0, "exp_avg": -1, "exp_inf": -1},
    "Adagrad": {"step": 0, "sum": -2},
    "Adadelta": {"step": 0, "square_avg": -2, "acc_delta": 0},
    "RMSprop": {"step": 0, "square_avg": -2, "grad_avg": -1, "momentum_buffer": 0},
    "Rprop": {"step": 0, "prev": -1, "step_size": 0},
    "ASGD": {"step": 0, "eta": 0, "mu": 0, "ax": 1},
    "Muon": {"momentum_buffer": -1},
}
# Step counters and learning-rate bookkeeping: independent of the gradients' scale.
_SCALARS = ("step", "eta", "mu", "mu_product")
# Optimisers that add weight_decay * w to the gradient before it enters the state (unless
# their group says the decay is decoupled).
_COUPLED_DECAY = ("SGD", "Adam", "NAdam", "RAdam", "Adamax", "Adagrad", "Adadelta", "RMSprop")
_REFUSED = {
    "LBFGS": "its state is a flat history of steps and gradient differences whose curvature "
             "model does not follow a per-weight rescaling",
    "Adafactor": "its factored second moments (row and column means of g^2) do not map onto "
                 "row and column means after a per-weight rescaling",
}


@dataclass(frozen=True, eq=False)
class StatePlan:
    """New state values computed before anything changes; ``apply`` swaps them in."""

    optimizer: torch.optim.Optimizer | None
    updates: tuple[tuple[dict, str, torch.Tensor], ...]
    dropped: tuple[torch.nn.Parameter, ...]

    def apply(self) -> None:
        """Swap the planned values in (no arithmetic left, nothing that can fail half-way)."""
        if self.optimizer is None:
            return
        for state, key, value in self.updates:
            state[key] = value
        for param in self.dropped:
            self.optimizer.state.pop(param, None)


def _group_of(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}


def _refusal(optimizer: torch.optim.Optimizer, why: str) -> InvalidInputError:
    return InvalidInputError("optimizer_state", f"cannot transform the state of "
                             f"{type(optimizer).__name__}: {why}; use keep or reset",
                             OPTIMIZER_STATE_MODES)


def plan_state_transform(optimizer: torch.optim.Optimizer | None,
                         scales: Mapping[torch.nn.Parameter, torch.Tensor],
                         mode: str = "transform") -> StatePlan:
    """The state ``optimizer`` should hold after ``param <- scales[param] * param``.

    Nothing is changed; every refusal happens here. Parameters without state (no step yet)
    and parameters the optimiser does not hold are left alone.
    """
    check_mode(mode)
    if optimizer is None or mode == "keep":
        return StatePlan(optimizer, (), ())
    groups = _group_of(optimizer)
    held = [(p, f) for p, f in scales.items() if id(p) in groups]
    if mode == "reset":
        return StatePlan(optimizer, (), tuple(p for p, _ in held))
    name = type(optimizer).__name__
    known = getattr(torch.optim, name, None) is type(optimizer)
    if held and name in _REFUSED and known and any(optimizer.state.values()):
        raise _refusal(optimizer, _REFUSED[name])
    updates: list[tuple[dict, str, torch.Tensor]] = []
    for param, factor in held:
        state = optimizer.state.get(param)
        if not state:
            continue
        if not known or name not in STATE_EXPONENTS:
            raise _refusal(optimizer, "its update rule is not one of torch's optimisers "
                           f"({', '.join(STATE_EXPONENTS)})")
        group = groups[id(param)]
        coupled_decay = name in _COUPLED_DECAY and group.get("weight_decay", 0) != 0 and \
            not group.get("decoupled_weight_decay", False)
        exponents = STATE_EXPONENTS[name]
        s = factor.to(device=param.device, dtype=torch.float64)
        for key, value in state.items():
            if key not in exponents:
                raise _refusal(optimizer, f"state entry {key!r} has no derived scaling")
            k = exponents[key]
            if not isinstance(value, torch.Tensor) or (k == 0 and key in _SCALARS):
                continue
            if coupled_decay:
                raise _refusal(optimizer, f"weight_decay={group['weight_decay']} is added to "
                               f"the gradient, so {key!r} mixes g / s with wd * s * w terms")
            if k == 0:
                continue
            if value.shape != param.shape:
                raise _refusal(optimizer, f"state entry {key!r} has shape "
                               f"{tuple(value.shape)}, not its parameter's")
            old = value.to(torch.float64)
            if name == "Adagrad":
                # sum = initial_accumulator_value + sum of g**2: only the sum scales.
                base = float(group.get("initial_accumulator_value", 0.0))
                new = base + (old - base) * s.pow(k)
            else:
                new = old * s.pow(k)
            updates.append((state, key, new.to(value.dtype)))
    return StatePlan(optimizer, tuple(updates), ())
