"""DFA and FA beyond homogeneous MLPs: conv nets (against an independent numpy formula), tanh
MLPs (training on the digits set), and the feedback options of ``[trainer.feedback]``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from asyncbalance.config import from_mapping
from asyncbalance.errors import InvalidInputError, NotHomogeneousError
from asyncbalance.training.config import (
    DataConfig,
    FeedbackConfig,
    ModelConfig,
    MonitorConfig,
    OptimizerConfig,
    TrainConfig,
    TrainerConfig,
)
from asyncbalance.training.data import Dataset
from asyncbalance.training.loop import train_run
from asyncbalance.training.models import MLP, SmallCNN, build_model
from asyncbalance.training.rules import FeedbackRule, HookedFeedbackRule, make_rule

# Float64 throughout: rule and formula differ only in summation order (~1e-15 relative).
TOL = 1e-12


def _tiny_cnn(seed: int) -> tuple[SmallCNN, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = SmallCNN((1, 4, 4), (2, 3), 4, 3).double()
    x = torch.randn(5, 16, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1, 0])
    return model, x, y


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """3x3 correlation with zero padding 1: out[n,o,y,x] = sum w[o,i,:,:] * window + b[o]."""
    windows = sliding_window_view(np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))), (3, 3),
                                  axis=(2, 3))  # (n, i, y, x, 3, 3)
    return np.einsum("niyxab,oiab->noyx", windows, w) + b[None, :, None, None]


def _conv_weight_grad(x: np.ndarray, delta: np.ndarray) -> np.ndarray:
    windows = sliding_window_view(np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))), (3, 3),
                                  axis=(2, 3))
    return np.einsum("niyxab,noyx->oiab", windows, delta)


def _conv_input_grad(delta: np.ndarray, w: np.ndarray) -> np.ndarray:
    """d(conv)/d(input) applied to ``delta``: scatter every output back onto its window."""
    n, _, h, wd = delta.shape
    grad = np.zeros((n, w.shape[1], h + 2, wd + 2))
    for a in range(3):
        for c in range(3):
            grad[:, :, a:a + h, c:c + wd] += np.einsum("noyx,oi->niyx", delta, w[:, :, a, c])
    return grad[:, :, 1:-1, 1:-1]


def _max_pool(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, c, hh, ww = h.shape
    blocks = h.reshape(n, c, hh // 2, 2, ww // 2, 2).transpose(0, 1, 2, 4, 3, 5)
    blocks = blocks.reshape(n, c, hh // 2, ww // 2, 4)
    return blocks.max(-1), blocks.argmax(-1)


def _max_pool_back(grad: np.ndarray, arg: np.ndarray) -> np.ndarray:
    n, c, hh, ww = grad.shape
    out = np.zeros((n, c, hh, ww, 4))
    np.put_along_axis(out, arg[..., None], grad[..., None], axis=-1)
    return out.reshape(n, c, hh, ww, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(
        n, c, 2 * hh, 2 * ww)


def _forward(model: SmallCNN, x: np.ndarray) -> dict[str, np.ndarray]:
    w = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    f = {"x": x.reshape(-1, 1, 4, 4)}
    f["a1"] = _conv(f["x"], w["conv1.weight"], w["conv1.bias"])
    f["p1"], f["arg1"] = _max_pool(np.maximum(f["a1"], 0))
    f["a2"] = _conv(f["p1"], w["conv2.weight"], w["conv2.bias"])
    h2 = np.maximum(f["a2"], 0)
    f["flat"] = h2.reshape(h2.shape[0], h2.shape[1], -1).mean(-1)  # 2x2 average pool to 1x1
    f["a3"] = f["flat"] @ w["fc.weight"].T + w["fc.bias"]
    f["h3"] = np.maximum(f["a3"], 0)
    f["logits"] = f["h3"] @ w["out.weight"].T + w["out.bias"]
    return f


def _error(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1
    return p / len(y)


def _grads_from_deltas(f: dict, d1: np.ndarray, d2: np.ndarray, d3: np.ndarray,
                       e: np.ndarray) -> dict[str, np.ndarray]:
    return {"conv1.weight": _conv_weight_grad(f["x"], d1), "conv1.bias": d1.sum((0, 2, 3)),
            "conv2.weight": _conv_weight_grad(f["p1"], d2), "conv2.bias": d2.sum((0, 2, 3)),
            "fc.weight": d3.T @ f["flat"], "fc.bias": d3.sum(0),
            "out.weight": e.T @ f["h3"], "out.bias": e.sum(0)}


def _check(model: SmallCNN, expected: dict[str, np.ndarray]) -> None:
    for name, param in model.named_parameters():
        np.testing.assert_allclose(param.grad.numpy(), expected[name], rtol=0, atol=TOL,
                                   err_msg=name)


def test_dfa_on_a_conv_net_equals_the_formula() -> None:
    model, x, y = _tiny_cnn(0)
    rule = make_rule(model, TrainerConfig(rule="dfa"), seed=2)
    assert isinstance(rule, HookedFeedbackRule)
    rule.compute(x, y)
    # One matrix per weighted layer after the first, onto that layer's input (the block
    # below's output after activation and pooling): conv2 2x2x2, fc 3, out 4; fan n_out = 3.
    assert [tuple(b.shape) for b in rule.feedback] == [(8, 3), (3, 3), (4, 3)]
    b_conv2, b_fc, b_out = (b.numpy() for b in rule.feedback)
    f = _forward(model, x.numpy())
    e = _error(f["logits"], y.numpy())
    d3 = (e @ b_out.T) * (f["a3"] > 0)
    g_h2 = np.repeat(np.repeat((e @ b_fc.T)[:, :, None, None] / 4, 2, axis=2), 2, axis=3)
    d2 = g_h2 * (f["a2"] > 0)
    g_p1 = (e @ b_conv2.T).reshape(f["p1"].shape)
    d1 = _max_pool_back(g_p1, f["arg1"]) * (f["a1"] > 0)
    _check(model, _grads_from_deltas(f, d1, d2, d3, e))


def test_fa_on_a_conv_net_equals_the_formula() -> None:
    model, x, y = _tiny_cnn(1)
    rule = make_rule(model, TrainerConfig(rule="fa", feedback_scale=0.7), seed=5)
    rule.compute(x, y)
    assert [tuple(b.shape) for b in rule.feedback] == [(3, 2, 3, 3), (4, 3), (3, 4)]
    b_conv2, b_fc, b_out = (b.numpy() for b in rule.feedback)
    f = _forward(model, x.numpy())
    e = _error(f["logits"], y.numpy())
    d3 = (e @ b_out) * (f["a3"] > 0)
    g_h2 = np.repeat(np.repeat((d3 @ b_fc)[:, :, None, None] / 4, 2, axis=2), 2, axis=3)
    d2 = g_h2 * (f["a2"] > 0)
    d1 = _max_pool_back(_conv_input_grad(d2, b_conv2), f["arg1"]) * (f["a1"] > 0)
    _check(model, _grads_from_deltas(f, d1, d2, d3, e))


def test_hooks_are_removed_after_each_step() -> None:
    model, x, y = _tiny_cnn(2)
    rule = make_rule(model, TrainerConfig(rule="fa"), seed=0)
    rule.compute(x, y)
    for module in model.modules():
        assert not module._forward_pre_hooks and not module._backward_hooks


def test_tanh_mlp_feedback_rules_equal_the_formula() -> None:
    torch.manual_seed(3)
    model = MLP([4, 5, 3, 2], "tanh").double()
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    rule = make_rule(model, TrainerConfig(rule="dfa"), seed=1)
    rule.compute(x, y)
    ws = [m.weight.detach().numpy() for m in model.layers]
    bs = [m.bias.detach().numpy() for m in model.layers]
    a1 = x.numpy() @ ws[0].T + bs[0]
    a2 = np.tanh(a1) @ ws[1].T + bs[1]
    logits = np.tanh(a2) @ ws[2].T + bs[2]
    e = _error(logits, y.numpy())
    b1, b2 = (b.numpy() for b in rule.feedback)
    d2 = (e @ b2.T) * (1 - np.tanh(a2) ** 2)
    d1 = (e @ b1.T) * (1 - np.tanh(a1) ** 2)
    for layer, d, h in zip(model.layers, [d1, d2, e], [x.numpy(), np.tanh(a1), np.tanh(a2)],
                           strict=True):
        np.testing.assert_allclose(layer.weight.grad.numpy(), d.T @ h, rtol=0, atol=TOL)
    # The same rule through autograd hooks gives the same update.
    hooked = HookedFeedbackRule(model, "dfa", 1)
    hooked.compute(x, y)
    for layer, d in zip(model.layers, [d1, d2, e], strict=True):
        np.testing.assert_allclose(layer.bias.grad.numpy(), d.sum(0), rtol=0, atol=TOL)


def test_tanh_mlp_says_it_has_no_balanceable_units() -> None:
    model = MLP([4, 5, 2], "tanh")
    with pytest.raises(NotHomogeneousError, match="model.activation: tanh units"):
        model.balance_layout()


def test_dfa_with_tanh_trains_digits_above_90_percent() -> None:
    pytest.importorskip("sklearn")
    config = TrainConfig(
        epochs=15, data=DataConfig(name="digits", batch_size=32),
        model=ModelConfig(kind="mlp", widths=(0, 128, 0), activation="tanh"),
        trainer=TrainerConfig(rule="dfa"), optimizer=OptimizerConfig(name="adam", lr=2e-3),
        monitor=MonitorConfig(optimum=False, conservation=False, alignment=False))
    result = train_run(config, seed=0, device="cpu")
    accuracy = result.rows[-1]["test_accuracy"]
    assert accuracy > 0.90, accuracy


def test_shared_feedback_is_one_matrix_sliced() -> None:
    torch.manual_seed(0)
    model = MLP([6, 9, 5, 4], "relu").double()
    config = TrainerConfig(rule="dfa", feedback=FeedbackConfig(layers="shared"))
    first, second = make_rule(model, config, seed=0).feedback
    # DFA fans are all n_out, so the scaled slices coincide exactly.
    assert first.shape == (9, 4) and second.shape == (5, 4)
    assert torch.equal(second, first[:5])
    independent = make_rule(model, TrainerConfig(rule="dfa"), seed=0).feedback
    assert not torch.equal(independent[1], independent[0][:5])


def test_normal_feedback_has_the_documented_spread() -> None:
    torch.manual_seed(0)
    model = MLP([6, 400, 300, 10], "relu").double()
    config = TrainerConfig(rule="dfa", feedback_scale=2.0,
                           feedback=FeedbackConfig(distribution="normal"))
    b = make_rule(model, config, seed=0).feedback[0]
    s = 2.0 / np.sqrt(10)
    # 4000 draws: the sample std is within 5 % of s (its standard error is 1.1 %), and a
    # normal sample that size exceeds the uniform bound s many times.
    assert abs(float(b.std()) / s - 1) < 0.05
    assert int((b.abs() > s).sum()) > 100


def test_feedback_seed_fixes_the_matrices_across_runs() -> None:
    model = MLP([6, 7, 3], "relu")
    fixed = TrainerConfig(rule="fa", feedback=FeedbackConfig(seed=11))
    a, b = make_rule(model, fixed, seed=0), make_rule(model, fixed, seed=1)
    assert torch.equal(a.feedback[0], b.feedback[0])
    c, d = (make_rule(model, TrainerConfig(rule="fa"), seed=s) for s in (0, 1))
    assert not torch.equal(c.feedback[0], d.feedback[0])


def test_feedback_section_is_read_from_the_scenario_and_validated() -> None:
    config = from_mapping(TrainConfig, {"trainer": {"rule": "dfa", "feedback": {
        "distribution": "normal", "layers": "shared", "seed": 4}}})
    assert config.trainer.feedback == FeedbackConfig("normal", "shared", 4)
    with pytest.raises(InvalidInputError, match=r"trainer.feedback.layers.*independent"):
        from_mapping(TrainConfig, {"trainer": {"feedback": {"layers": "tied"}}})


def test_recurrent_model_is_refused_for_feedback_rules() -> None:
    data = Dataset(np.zeros((4, 16), np.float32), np.zeros(4, np.int64),
                   np.zeros((2, 16), np.float32), np.zeros(2, np.int64), (1, 4, 4), 2, "t")
    rnn = build_model(ModelConfig(kind="rnn", hidden=4), data)
    with pytest.raises(InvalidInputError, match="trainer.rule"):
        make_rule(rnn, TrainerConfig(rule="dfa"), seed=0)
    with pytest.raises(InvalidInputError, match="dfa is defined for MLPs"):
        FeedbackRule(rnn, "dfa", 0)
