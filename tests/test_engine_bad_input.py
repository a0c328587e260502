"""Bad input is refused with a message that names the field (and the valid choices)."""

from __future__ import annotations

import numpy as np
import pytest

from asyncbalance import (
    BalanceError,
    InvalidInputError,
    NotHomogeneousError,
    balance_network,
    build_cost_graph,
    elastic_net,
    layered_network,
    lp,
    network_from_arrays,
    parse_activation,
    recurrent_network,
    run_schedule,
)
from asyncbalance.activations import ACTIVATION_CHOICES


def _mlp() -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    return ([rng.standard_normal((4, 3)), rng.standard_normal((2, 4))],
            [rng.standard_normal(4), rng.standard_normal(2)])


def _expect(exc: type[BaseException], fn, *words: str) -> BaseException:
    with pytest.raises(exc) as info:
        fn()
    text = str(info.value)
    for word in words:
        assert word in text, f"{word!r} not in {text!r}"
    return info.value


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["W1", "W2", "b1", "b2"])
def test_non_finite_weights(bad: float, where: str) -> None:
    weights, biases = _mlp()
    array = (weights if where[0] == "W" else biases)[int(where[1]) - 1]
    array.flat[1] = bad
    err = _expect(InvalidInputError, lambda: layered_network(weights, biases), where,
                  "non-finite", "(1" if array.ndim == 1 else "(0, 1)")
    assert err.field == where


@pytest.mark.parametrize("key", ["W_in", "W_rec", "W_out", "b", "b_out"])
def test_non_finite_recurrent_weights(key: str) -> None:
    rng = np.random.default_rng(1)
    arrays = {"W_in": rng.standard_normal((3, 2)), "W_rec": rng.standard_normal((3, 3)),
              "W_out": rng.standard_normal((2, 3)), "b": rng.standard_normal(3),
              "b_out": rng.standard_normal(2)}
    arrays[key].flat[0] = np.nan
    err = _expect(InvalidInputError, lambda: network_from_arrays(arrays), key, "non-finite")
    assert err.field == key


@pytest.mark.parametrize("p", [0.0, -1.0, -0.5, np.nan, np.inf, "two"])
def test_bad_p(p: object) -> None:
    weights, biases = _mlp()
    net = layered_network(weights, biases)
    for call in (lambda: lp(p), lambda: build_cost_graph(net, p),
                 lambda: balance_network(net, p)):
        err = _expect(InvalidInputError, call, "p", "> 0")
        assert err.field == "p"


def test_bad_regulariser_coefficients() -> None:
    _expect(InvalidInputError, lambda: elastic_net(-1.0, 0.5), "coef", "> 0")
    _expect(InvalidInputError, lambda: elastic_net(1.0, 0.0), "coef", "> 0")


def test_mismatched_shapes() -> None:
    weights, biases = _mlp()
    _expect(InvalidInputError, lambda: layered_network([weights[0], np.ones((2, 5))], biases),
            "W2", "5 inputs", "W1 has 4 outputs")
    _expect(InvalidInputError, lambda: layered_network(weights, [np.ones(3), biases[1]]),
            "b1", "(3,)", "(4,)")
    _expect(InvalidInputError, lambda: layered_network([np.ones(3), weights[1]]),
            "W1", "2-D")
    _expect(InvalidInputError, lambda: layered_network(weights, biases[:1]), "biases")
    _expect(InvalidInputError, lambda: recurrent_network(np.ones((3, 2)), np.ones((3, 4)),
                                                         None), "W_rec", "square")
    _expect(InvalidInputError, lambda: recurrent_network(np.ones((4, 2)), np.ones((3, 3)),
                                                         None), "W_in", "(3, n_in)")
    _expect(InvalidInputError, lambda: recurrent_network(None, np.ones((3, 3)),
                                                         np.ones((2, 4))), "W_out", "(n_out, 3)")
    _expect(InvalidInputError, lambda: recurrent_network(None, np.ones((3, 3)), np.ones((2, 3)),
                                                         b=np.ones(2)), "b", "(3,)")
    _expect(InvalidInputError, lambda: recurrent_network(None, np.ones((3, 3)), np.ones((2, 3)),
                                                         b_out=np.ones(3)), "b_out", "(2,)")


@pytest.mark.parametrize("spec", ["relux", "leaky_relu", "leaky_relu:abc", "power:-1",
                                  "power:0", "power:inf", "", "softsign"])
def test_unknown_or_malformed_activation(spec: str) -> None:
    weights, biases = _mlp()
    err = _expect(InvalidInputError, lambda: layered_network(weights, biases, spec),
                  "activation", *ACTIVATION_CHOICES)
    assert err.field == "activation" and set(ACTIVATION_CHOICES) <= set(err.choices)


@pytest.mark.parametrize("spec", ["tanh", "sigmoid", "gelu", "softmax", "TANH", "elu"])
def test_non_homogeneous_activation(spec: str) -> None:
    weights, biases = _mlp()
    err = _expect(NotHomogeneousError, lambda: layered_network(weights, biases, spec),
                  "activation", spec, "not homogeneous", "relu")
    assert isinstance(err, InvalidInputError)
    # Per hidden layer: the message names the layer's entry.
    chain = [np.ones((3, 2)), np.ones((3, 3)), np.ones((3, 3)), np.ones((1, 3))]
    _expect(NotHomogeneousError, lambda: layered_network(chain, None, ["relu", spec, "relu"]),
            "activation[1]", spec)


def test_activation_parser_accepts_every_homogeneous_choice() -> None:
    assert parse_activation("relu").degree == 1.0
    assert parse_activation("leaky_relu:0.01").neg_slope == 0.01
    assert parse_activation("linear")(np.array([-2.0]))[0] == -2.0
    assert parse_activation("abs")(np.array([-2.0]))[0] == 2.0
    assert parse_activation("power:3").degree == 3.0


@pytest.mark.parametrize("arrays,field", [
    ({"weights": np.ones((2, 2))}, "weights"),
    ({"W1": np.ones((2, 2)), "W_1": np.ones(2)}, "W_1"),
    ({"W1": np.ones((2, 2)), "bias1": np.ones(2)}, "bias1"),
    ({"W1": np.ones((2, 2)), "W3": np.ones((2, 2))}, "W2"),
    ({"b1": np.ones(2)}, "W1"),
    ({}, "W1"),
    ({"W_rec": np.ones((2, 2)), "W1": np.ones((2, 2))}, "W1"),
    ({"W1": np.array([["a", "b"]])}, "W1"),
])
def test_malformed_npz_keys(arrays: dict, field: str) -> None:
    err = _expect(InvalidInputError, lambda: network_from_arrays(arrays), field)
    assert err.field == field


def test_unknown_method_lists_choices() -> None:
    weights, biases = _mlp()
    net = layered_network(weights, biases)
    err = _expect(InvalidInputError, lambda: balance_network(net, 2.0, method="newton"),
                  "method", "newton", "exact", "full", "stochastic", "alternating", "tied")
    assert err.field == "method"
    graph = build_cost_graph(net, 2.0)
    _expect(InvalidInputError, lambda: run_schedule(graph, "full", tol=0.0), "tol")
    _expect(InvalidInputError, lambda: run_schedule(graph, "full", tol=np.nan), "tol")


def test_errors_share_one_base_class() -> None:
    for exc in (InvalidInputError, NotHomogeneousError):
        assert issubclass(exc, BalanceError)
