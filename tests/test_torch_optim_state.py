"""Optimiser state across ``balance_``: for every torch optimiser, the transformed state equals
a replay (a fresh optimiser fed the rescaled model's autograd gradients at the rescaled points
of the same trajectory); what cannot be derived is refused before anything changes."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
from test_torch_support import build, state_copy
from tolerances import rel_err

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from asyncbalance import InvalidInputError  # noqa: E402
from asyncbalance.torch_bridge import balance_  # noqa: E402

STEPS = 6
# Every optimiser's eps is set far below the moments it is added to (gradients here are of
# order 1e-2..10), so the derivation is exact up to float64 rounding. The transformed state
# and the replay then differ by a few roundings per step of each running average (relative
# 1e-15 each, 6 steps) and by the eps terms (1e-14 against moments >= 1e-6 where the state
# is largest): 1e-9 relative to the largest entry of each state tensor leaves a wide margin,
# while a wrong exponent is off by a factor s or 1/s, with log-scales of order 0.1..1 here.
STATE_RTOL = 1e-9
EPS = 1e-14
# Adadelta's acc_delta cannot have a negligible eps: eps is what starts it (delta =
# sqrt(acc_delta + eps) g / sqrt(square_avg + eps)), and the same eps meets square_avg / s^2
# in the replay; elements whose gradients stay small carry a relative error of about
# eps s^2 / square_avg (measured 6e-9 here). 1e-6 still tells a wrong exponent apart: the
# issue's s^2 for acc_delta is off by 1 - s^2, i.e. 0.3..0.9 on this model.
STATE_RTOL_BY_OPTIMISER = {"Adadelta": 1e-6}


def _weights(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.ndim == 2]


# name -> (make optimiser from the model, gradients made sparse)
OPTIMISERS: dict[str, tuple[Callable[[nn.Module], torch.optim.Optimizer], bool]] = {
    "SGD": (lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), False),
    "SGD-nesterov-dampening": (lambda m: torch.optim.SGD(
        m.parameters(), lr=0.05, momentum=0.9, dampening=0.3), False),
    "Adam": (lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, eps=EPS), False),
    "Adam-amsgrad": (lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, eps=EPS,
                                                amsgrad=True), False),
    "AdamW": (lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, eps=EPS,
                                          weight_decay=0.1), False),
    "NAdam": (lambda m: torch.optim.NAdam(m.parameters(), lr=1e-2, eps=EPS), False),
    "RAdam": (lambda m: torch.optim.RAdam(m.parameters(), lr=1e-2, eps=EPS), False),
    "Adamax": (lambda m: torch.optim.Adamax(m.parameters(), lr=1e-2, eps=EPS), False),
    "Adagrad": (lambda m: torch.optim.Adagrad(m.parameters(), lr=1e-2, eps=EPS,
                                              initial_accumulator_value=0.3), False),
    "Adadelta": (lambda m: torch.optim.Adadelta(m.parameters(), lr=1.0, eps=EPS), False),
    "RMSprop": (lambda m: torch.optim.RMSprop(m.parameters(), lr=1e-3, eps=EPS), False),
    "RMSprop-momentum-centered": (lambda m: torch.optim.RMSprop(
        m.parameters(), lr=1e-3, eps=EPS, momentum=0.9, centered=True), False),
    "Rprop": (lambda m: torch.optim.Rprop(m.parameters(), lr=1e-2), False),
    # lr = 0: ASGD's own step is not scale-equivariant (w - eta g is no rescaling of itself),
    # so the iterates it averages are the trajectory points fed to it only when it does not
    # move; its averaging, ax, is then checked exactly.
    "ASGD": (lambda m: torch.optim.ASGD(m.parameters(), lr=0.0, t0=2.0), False),
    "SparseAdam": (lambda m: torch.optim.SparseAdam(m.parameters(), lr=1e-2, eps=EPS), True),
    "Muon": (lambda m: torch.optim.Muon(_weights(m), lr=1e-2, eps=EPS), False),
}


def _batch(t: int) -> torch.Tensor:
    return torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(50 + t))


def _loss(model: nn.Module, t: int) -> torch.Tensor:
    # A loss whose gradients are of order 1..10 (far above every eps).
    return 30.0 * (model(_batch(t)) - 0.5).square().mean()


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, t: int, sparse: bool) -> None:
    optimizer.zero_grad()
    _loss(model, t).backward()
    if sparse:
        for p in model.parameters():
            p.grad = p.grad.to_sparse()
    optimizer.step()


def _trained(name: str) -> tuple[nn.Module, torch.optim.Optimizer, list[dict]]:
    """The residual model trained STEPS steps; the parameters before each step (moved a
    little by hand between steps, so that even lr = 0 has a trajectory)."""
    make, sparse = OPTIMISERS[name]
    model, _ = build("residual")
    optimizer = make(model)
    generator = torch.Generator().manual_seed(99)
    trajectory = []
    for t in range(STEPS):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, dtype=p.dtype, generator=generator))
        trajectory.append({k: v.detach().clone() for k, v in model.named_parameters()})
        _step(model, optimizer, t, sparse)
    return model, optimizer, trajectory


@pytest.mark.parametrize("name", list(OPTIMISERS))
def test_state_equals_the_replay_of_the_rescaled_trajectory(name: str) -> None:
    model, optimizer, trajectory = _trained(name)
    report = balance_(model, p=2.0, example=_batch(0), optimizer=optimizer)
    factors = {k: report.factors.get(k, torch.ones_like(p, dtype=torch.float64))
               for k, p in model.named_parameters()}
    assert any(not bool(torch.all(f == 1)) for f in factors.values())
    # The replay: a fresh optimiser on a copy of the model, fed at every step the rescaled
    # model's autograd gradient at the rescaled point s * w_t of the same trajectory.
    make, sparse = OPTIMISERS[name]
    replay_model = copy.deepcopy(model)
    replay = make(replay_model)
    for t, point in enumerate(trajectory):
        with torch.no_grad():
            for k, p in replay_model.named_parameters():
                p.copy_(point[k] * factors[k])
        _step(replay_model, replay, t, sparse)
    compared = 0
    for (k, p), q in zip(model.named_parameters(), replay_model.parameters(), strict=True):
        mine, theirs = optimizer.state.get(p, {}), replay.state.get(q, {})
        assert mine.keys() == theirs.keys(), k
        for key, value in mine.items():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                expected = theirs[key].to_dense() if theirs[key].is_sparse else theirs[key]
                got = value.to_dense() if value.is_sparse else value
                bound = STATE_RTOL_BY_OPTIMISER.get(name, STATE_RTOL)
                assert rel_err(got.numpy(), expected.numpy()) <= bound, (k, key)
                compared += 1
    assert compared >= len(list(model.parameters())) // 2


def _adam_coupled_decay(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.1)


def _adam_decay_in_the_last_group(model: nn.Module) -> torch.optim.Optimizer:
    """Every parameter but the head's is derivable: a transform that divided as it went
    would have changed them before meeting the head's weight (its columns are rescaled)."""
    params = list(model.parameters())
    return torch.optim.Adam([{"params": params[:-2]},
                             {"params": params[-2:], "weight_decay": 0.1}], lr=1e-2)


class MyAdam(torch.optim.Adam):
    """A subclass: its update rule may differ from Adam's, so it is not assumed to follow."""


REFUSED = {
    "LBFGS": lambda m: torch.optim.LBFGS(m.parameters(), lr=0.1),
    "Adafactor": lambda m: torch.optim.Adafactor(m.parameters(), lr=1e-2),
    "Adam-coupled-weight-decay": _adam_coupled_decay,
    "Adam-decay-in-the-last-group": _adam_decay_in_the_last_group,
    "SGD-coupled-weight-decay": lambda m: torch.optim.SGD(m.parameters(), lr=0.05,
                                                          momentum=0.9, weight_decay=1e-3),
    "Adam-subclass": lambda m: MyAdam(m.parameters(), lr=1e-2),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_underivable_state_is_refused_before_anything_changes(name: str) -> None:
    model, _ = build("residual")
    optimizer = REFUSED[name](model)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = _loss(model, 0)
        loss.backward()
        return loss

    for _ in range(3):
        optimizer.step(closure)
    weights = state_copy(model)
    state = {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                     for k, v in s.items()} for p, s in optimizer.state.items()}
    with pytest.raises(InvalidInputError, match=r"^optimizer_state: cannot transform the "
                                                r"state of .*; use keep or reset"):
        balance_(model, p=2.0, example=_batch(0), optimizer=optimizer)
    # All or nothing: not one weight written, not one state entry divided.
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    for p, s in optimizer.state.items():
        for key, value in s.items():
            old = state[id(p)][key]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, old), key
    # keep and reset are always possible.
    report = balance_(model, p=2.0, example=_batch(0), optimizer=optimizer,
                      optimizer_state="reset")
    assert report.n_units > 0


def test_undo_is_refused_before_anything_changes_too() -> None:
    model, _ = build("residual")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    report = balance_(model, p=2.0, example=_batch(0), optimizer=optimizer)
    optimizer.param_groups[0]["weight_decay"] = 0.1  # now underivable
    _step(model, optimizer, 0, False)
    balanced = state_copy(model)
    # force: the step changed the weights on purpose; the state is what is refused here.
    with pytest.raises(InvalidInputError, match="weight_decay=0.1"):
        report.undo(model, optimizer, force=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, balanced[key]), key


def test_reset_forgets_and_keep_leaves_the_state() -> None:
    for mode in ("keep", "reset"):
        model, optimizer, _ = _trained("Adam")
        before = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
        report = balance_(model, p=2.0, example=_batch(0), optimizer=optimizer,
                          optimizer_state=mode)
        rescaled = {id(model.get_parameter(k)) for k in report.factors}
        for p in model.parameters():
            if mode == "reset" and id(p) in rescaled:
                assert p not in optimizer.state
            else:
                assert all(torch.equal(v, before[id(p)][k])
                           for k, v in optimizer.state[p].items())
