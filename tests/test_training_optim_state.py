"""Optimiser state across balancing: the scale factors checked through autograd, and the
transformed moments checked against an optimiser that saw the rescaled gradients all along.

Everything runs in float64. For a function-preserving rescaling ``w' = s * w`` the loss
gradient is ``g' = g / s`` exactly in real arithmetic; the only errors are roundings in the
forward and backward passes (a few hundred EPS relative on these small nets).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from asyncbalance.errors import InvalidInputError
from asyncbalance.network import scale_network
from asyncbalance.optim_state import OPTIMIZER_STATE_MODES, transform_optimizer_state_
from asyncbalance.training.bridge import layout_network, model_layout, write_network
from asyncbalance.training.models import MLP, ReluRNN, SmallCNN
from asyncbalance.training.rescaling import parameter_scale_factors
from tests.tolerances import rel_err

# Gradients of the balanced and unbalanced nets each carry a few hundred EPS of rounding;
# their ratio is compared with the predicted factor to this relative tolerance.
RATIO_RTOL = 1e-9
# Moments built from rescaled gradients vs moments divided afterwards: same values up to
# roundings of a few steps of running averages (relative to the tensor's largest entry).
STATE_RTOL = 1e-10


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(3)
    return {
        "mlp-relu": MLP((6, 7, 5, 3), "relu"),
        "mlp-bipu": MLP((6, 7, 5, 3), "power:2"),   # BiPU units: outgoing factor exp(-2u)
        "cnn": SmallCNN((1, 8, 8), (3, 4), 5, 3),    # conv channels and the flatten layout
        "rnn": ReluRNN(4, 3, 5, 3),
    }


def _inputs(name: str, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    features = {"mlp-relu": 6, "mlp-bipu": 6, "cnn": 64, "rnn": 12}[name]
    x = torch.randn(n, features, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    return x, y


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _balanced_twin(model: nn.Module, u: np.ndarray) -> nn.Module:
    twin = copy.deepcopy(model)
    write_network(model_layout(twin), scale_network(layout_network(model_layout(model)), u))
    return twin


def _log_scales(model: nn.Module, seed: int = 5) -> np.ndarray:
    n = layout_network(model_layout(model)).n_hidden
    return np.random.default_rng(seed).normal(0.0, 0.6, n)


@pytest.mark.parametrize("name", ["mlp-relu", "mlp-bipu", "cnn", "rnn"])
def test_scale_factors_match_autograd_gradient_ratios(name: str) -> None:
    model = _models()[name].double()
    x, y = _inputs(name)
    u = _log_scales(model)
    twin = _balanced_twin(model, u)
    with torch.no_grad():
        assert rel_err(twin(x).numpy(), model(x).numpy()) < 1e-12  # same function
    g_old, g_new = _grads(model, x, y), _grads(twin, x, y)
    layout = model_layout(model)
    names = {id(p): n for n, p in model.named_parameters()}
    factors = {names[id(p)]: s for p, s in parameter_scale_factors(layout, u).items()}
    kinds = {c.key: c.layout for c in layout.connections}
    assert {"dense", "bias"} <= set(kinds.values())
    checked = 0
    for key, s in factors.items():
        ratio_ok = g_new[key].abs() > 1e-8 * g_new[key].abs().max()
        # independent s: the gradient ratio, where the gradient is not (nearly) zero
        s_autograd = g_old[key][ratio_ok] / g_new[key][ratio_ok]
        assert rel_err(s[ratio_ok].numpy(), s_autograd.numpy()) < RATIO_RTOL, key
        # and the weights themselves moved by that factor
        old, new = dict(model.named_parameters())[key], dict(twin.named_parameters())[key]
        assert rel_err((s * old).detach().numpy(), new.detach().numpy()) < 1e-13, key
        checked += int(ratio_ok.sum())
    total = sum(s.numel() for s in factors.values())
    assert checked > total // 3  # enough live entries to mean something
    assert any(not torch.allclose(s, torch.ones_like(s)) for s in factors.values())


def _shadow_run(name: str, make_opt, steps: int = 3):
    """The same optimiser on the unbalanced net and, fed the balanced net's gradients at
    the matching points (``s * w_t``), on the balanced net."""
    model = _models()[name].double()
    x, y = _inputs(name)
    u = _log_scales(model)
    opt = make_opt(model.parameters())
    shadow_model = _balanced_twin(model, u)
    shadow = make_opt(shadow_model.parameters())
    for step in range(steps):
        xs, ys = x[step::steps], y[step::steps]
        twin = _balanced_twin(model, u)
        with torch.no_grad():
            for p_shadow, p_twin in zip(shadow_model.parameters(), twin.parameters(),
                                        strict=True):
                p_shadow.copy_(p_twin)
        _grads(shadow_model, xs, ys)
        shadow.step()
        _grads(model, xs, ys)
        opt.step()
    return model, opt, shadow_model, shadow, u


OPTIMISERS = {
    "sgd-momentum": (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
                     ("momentum_buffer",)),
    "adam-amsgrad": (lambda ps: torch.optim.Adam(ps, lr=0.01, amsgrad=True),
                     ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")),
}


@pytest.mark.parametrize("name", ["mlp-relu", "mlp-bipu", "cnn", "rnn"])
@pytest.mark.parametrize("opt_name", list(OPTIMISERS))
def test_transformed_state_equals_state_of_rescaled_gradients(name: str, opt_name: str
                                                              ) -> None:
    make_opt, keys = OPTIMISERS[opt_name]
    model, opt, shadow_model, shadow, u = _shadow_run(name, make_opt)
    before = {p: {k: opt.state[p][k].clone() for k in keys} for p in model.parameters()}
    transform_optimizer_state_(opt, parameter_scale_factors(model_layout(model), u))
    changed = 0
    for p, q in zip(model.parameters(), shadow_model.parameters(), strict=True):
        for key in keys:
            mine, expected = opt.state[p][key], shadow.state[q][key]
            assert rel_err(mine.numpy(), expected.numpy()) < STATE_RTOL, key
            changed += int(not torch.allclose(mine, before[p][key], rtol=1e-6))
        if "step" in shadow.state[q]:
            assert float(opt.state[p]["step"]) == float(shadow.state[q]["step"])
    assert changed > 0
    # "keep" would leave the state unscaled, which the shadow shows to be wrong here
    assert any(rel_err(before[p][k].numpy(), shadow.state[q][k].numpy()) > 1e-3
               for p, q in zip(model.parameters(), shadow_model.parameters(), strict=True)
               for k in keys)


def test_keep_and_reset_modes() -> None:
    make_opt, keys = OPTIMISERS["adam-amsgrad"]
    model, opt, _, _, u = _shadow_run("mlp-relu", make_opt, steps=2)
    factors = parameter_scale_factors(model_layout(model), u)
    before = {p: {k: opt.state[p][k].clone() for k in keys} for p in model.parameters()}
    transform_optimizer_state_(opt, factors, "keep")
    for p in model.parameters():
        for k in keys:
            assert torch.equal(opt.state[p][k], before[p][k])
    transform_optimizer_state_(opt, factors, "reset")
    for p in model.parameters():
        assert (p in factors) == (p not in opt.state or not opt.state[p])
    # a reset parameter starts afresh: Adam's next step is a signed lr step
    _grads(model, *_inputs("mlp-relu"))
    opt.step()
    assert all(float(opt.state[p]["step"]) == 1.0 for p in factors)


def test_bad_mode_and_bad_factors_name_the_choices() -> None:
    model = MLP((3, 4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    w = model.layers[0].weight
    with pytest.raises(InvalidInputError, match="valid choices: transform, keep, reset"):
        transform_optimizer_state_(opt, {w: torch.ones_like(w)}, "rescale")
    with pytest.raises(InvalidInputError, match="shape"):
        transform_optimizer_state_(opt, {w: torch.ones(3)})
    with pytest.raises(InvalidInputError, match="positive"):
        transform_optimizer_state_(opt, {w: torch.zeros_like(w)})
    stranger = nn.Parameter(torch.ones(2))
    with pytest.raises(InvalidInputError, match="not optimised"):
        transform_optimizer_state_(opt, {stranger: torch.ones(2)})
    assert OPTIMIZER_STATE_MODES == ("transform", "keep", "reset")


def test_unknown_per_element_state_is_refused() -> None:
    # A subclass may change the update rule, so its state has no derived scaling.
    class Custom(torch.optim.Adam):
        pass

    model = MLP((3, 4, 2))
    opt = Custom(model.parameters(), lr=0.01)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
    _grads(model, x, y)
    opt.step()
    w = model.layers[0].weight
    before = opt.state[w]["exp_avg"].clone()
    with pytest.raises(InvalidInputError, match="not one of torch's optimisers"):
        transform_optimizer_state_(opt, {w: torch.full_like(w, 2.0)})
    assert torch.equal(opt.state[w]["exp_avg"], before)


def test_training_uses_the_rules_derived_per_optimiser() -> None:
    # RMSprop's momentum buffer sums g / sqrt(v), which a rescaling leaves as it is (its
    # square_avg scales by 1/s^2); Rprop's prev scales by 1/s and its step sizes stay.
    model = MLP((3, 4, 2))
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
    w = model.layers[0].weight
    rms = torch.optim.RMSprop(model.parameters(), lr=0.01, momentum=0.9)
    rprop = torch.optim.Rprop(model.parameters(), lr=0.01)
    _grads(model, x, y)
    rms.step()
    rprop.step()
    momentum = rms.state[w]["momentum_buffer"].clone()
    square = rms.state[w]["square_avg"].clone()
    prev, steps = rprop.state[w]["prev"].clone(), rprop.state[w]["step_size"].clone()
    transform_optimizer_state_(rms, {w: torch.full_like(w, 2.0)})
    transform_optimizer_state_(rprop, {w: torch.full_like(w, 2.0)})
    assert torch.equal(rms.state[w]["momentum_buffer"], momentum)
    torch.testing.assert_close(rms.state[w]["square_avg"], square / 4, rtol=1e-6, atol=0)
    torch.testing.assert_close(rprop.state[w]["prev"], prev / 2, rtol=1e-6, atol=0)
    assert torch.equal(rprop.state[w]["step_size"], steps)
