"""Learning rules against hand-written formulas, and backprop against autograd."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asyncbalance.errors import InvalidInputError
from asyncbalance.training.config import TrainerConfig
from asyncbalance.training.models import MLP, build_model
from asyncbalance.training.monitors import alignment_angles
from asyncbalance.training.rules import Backprop, FeedbackRule, make_optimizer, make_rule

# Float64 throughout: the rules and the formulas differ only by summation order (~1e-15).
TOL = 1e-12


def tiny(seed: int = 0, activation: str = "relu") -> tuple[MLP, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = MLP([4, 5, 3, 2], activation).double()
    x = torch.randn(7, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    return model, x, y


def numpy_forward(model: MLP, x: np.ndarray, slope: float = 0.0):
    ws = [m.weight.detach().numpy() for m in model.layers]
    bs = [m.bias.detach().numpy() for m in model.layers]
    hs, pre = [x], []
    for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
        a = hs[-1] @ w.T + b
        if i < len(ws) - 1:
            pre.append(a)
            hs.append(np.where(a > 0, a, slope * a))
        else:
            logits = a
    return ws, bs, hs, pre, logits


def output_error(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1
    return p / len(y)


@pytest.mark.parametrize("activation,slope", [("relu", 0.0), ("leaky_relu:0.1", 0.1)])
def test_dfa_update_equals_formula(activation: str, slope: float) -> None:
    model, x, y = tiny(1, activation)
    rule = make_rule(model, TrainerConfig(rule="dfa"), seed=3)
    assert [tuple(b.shape) for b in rule.feedback] == [(5, 2), (3, 2)]
    rule.compute(x, y)
    ws, bs, hs, pre, logits = numpy_forward(model, x.numpy(), slope)
    e = output_error(logits, y.numpy())
    fb = [b.numpy() for b in rule.feedback]
    deltas = [(e @ b.T) * np.where(a > 0, 1.0, slope) for a, b in zip(pre, fb, strict=True)]
    deltas.append(e)  # the output layer uses its true gradient
    for layer, d, h in zip(model.layers, deltas, hs, strict=True):
        np.testing.assert_allclose(layer.weight.grad.numpy(), d.T @ h, rtol=0, atol=TOL)
        np.testing.assert_allclose(layer.bias.grad.numpy(), d.sum(axis=0), rtol=0, atol=TOL)


def test_fa_update_equals_formula() -> None:
    model, x, y = tiny(2)
    rule = make_rule(model, TrainerConfig(rule="fa", feedback_scale=0.5), seed=4)
    assert [tuple(b.shape) for b in rule.feedback] == [(3, 5), (2, 3)]
    rule.compute(x, y)
    ws, bs, hs, pre, logits = numpy_forward(model, x.numpy())
    e = output_error(logits, y.numpy())
    b2, b3 = (b.numpy() for b in rule.feedback)
    d2 = (e @ b3) * (pre[1] > 0)
    d1 = (d2 @ b2) * (pre[0] > 0)
    for layer, d, h in zip(model.layers, [d1, d2, e], hs, strict=True):
        np.testing.assert_allclose(layer.weight.grad.numpy(), d.T @ h, rtol=0, atol=TOL)
        np.testing.assert_allclose(layer.bias.grad.numpy(), d.sum(axis=0), rtol=0, atol=TOL)


@pytest.mark.parametrize("rule_name,fans", [("dfa", [40, 40]), ("fa", [300, 200])])
def test_feedback_scale_uses_the_documented_fan(rule_name: str, fans: list[int]) -> None:
    """Entries uniform in [-s, s], s = feedback_scale / sqrt(fan): fan = n_out for DFA, the
    layer's input width for FA. With thousands of seeded entries the largest |b| lies within
    1 % of s (P(max < 0.99 s) = 0.99^6000 ~ 1e-26), so a wrong fan (another width) fails."""
    torch.manual_seed(0)
    model = MLP([4, 300, 200, 40], "relu").double()
    rule = make_rule(model, TrainerConfig(rule=rule_name, feedback_scale=0.5), seed=1)
    for b, fan in zip(rule.feedback, fans, strict=True):
        bound = 0.5 / np.sqrt(fan)
        largest = float(b.abs().max())
        assert 0.99 * bound <= largest <= bound
        # Uniform on [-s, s] has standard deviation s / sqrt(3); 3 % covers the sampling error
        # of >= 8000 entries (relative standard error ~ 1 %).
        assert abs(float(b.std()) / (bound / np.sqrt(3)) - 1) < 0.03


def test_feedback_is_seeded_and_fixed() -> None:
    model, x, y = tiny(0)
    a = make_rule(model, TrainerConfig(rule="dfa"), seed=5)
    b = make_rule(model, TrainerConfig(rule="dfa"), seed=5)
    c = make_rule(model, TrainerConfig(rule="dfa"), seed=6)
    assert all(torch.equal(p, q) for p, q in zip(a.feedback, b.feedback, strict=True))
    assert not torch.equal(a.feedback[0], c.feedback[0])
    before = [f.clone() for f in a.feedback]
    opt = make_optimizer(list(model.parameters()), "sgd", 0.1, 0.0)
    a.compute(x, y)
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(before, a.feedback, strict=True))


def test_backprop_equals_autograd_and_fa_with_true_weights() -> None:
    model, x, y = tiny(3)
    Backprop(model).compute(x, y)
    bp = [p.grad.clone() for p in model.parameters()]
    params = list(model.parameters())

    def loss_fn(*ps: torch.Tensor) -> torch.Tensor:
        h = x
        for i in range(3):
            h = h @ ps[2 * i].T + ps[2 * i + 1]
            if i < 2:
                h = torch.relu(h)
        return torch.nn.functional.cross_entropy(h, y)

    auto = torch.autograd.grad(loss_fn(*params), params)
    for g, a in zip(bp, auto, strict=True):
        torch.testing.assert_close(g, a, rtol=0, atol=TOL)
    # FA whose feedback equals the forward weights is backprop: checks the delta machinery.
    fa = make_rule(model, TrainerConfig(rule="fa"), seed=0)
    fa.feedback = [layer.weight.detach().clone() for layer in model.layers[1:]]
    fa.compute(x, y)
    for g, p in zip(bp, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=TOL)
    assert alignment_angles(model, fa, x, y) == pytest.approx([0.0, 0.0], abs=1e-5)


def test_alignment_angle_of_random_feedback_is_between_0_and_180() -> None:
    model, x, y = tiny(4)
    rule = make_rule(model, TrainerConfig(rule="dfa"), seed=0)
    angles = alignment_angles(model, rule, x, y)
    assert len(angles) == 2 and all(0.0 < a < 180.0 for a in angles)
    assert alignment_angles(model, Backprop(model), x, y) == []


def test_unknown_rule_and_optimiser_are_refused() -> None:
    model, _, _ = tiny()
    with pytest.raises(InvalidInputError, match="trainer.rule.*valid choices: backprop, dfa, fa"):
        make_rule(model, _bad_trainer(), 0)
    with pytest.raises(InvalidInputError, match="optimizer.name.*sgd, adam"):
        make_optimizer(list(model.parameters()), "rmsprop", 0.1, 0.0)


def _bad_trainer() -> TrainerConfig:
    config = TrainerConfig()
    object.__setattr__(config, "rule", "hebb")
    return config


def test_feedback_rules_need_an_mlp() -> None:
    from asyncbalance.training.config import ModelConfig
    from asyncbalance.training.data import Dataset
    data = Dataset(np.zeros((4, 16), np.float32), np.zeros(4, np.int64),
                   np.zeros((2, 16), np.float32), np.zeros(2, np.int64), (1, 4, 4), 2, "t")
    rnn = build_model(ModelConfig(kind="rnn", hidden=4), data)
    with pytest.raises(InvalidInputError, match="trainer.rule: dfa is defined for MLPs"):
        FeedbackRule(rnn, "dfa", 0)
