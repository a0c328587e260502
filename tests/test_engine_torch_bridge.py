"""``balance_(model, p=...)`` on torch ``nn.Sequential`` models."""

from __future__ import annotations

import numpy as np
import pytest
from test_engine_support import weight_flows
from tolerances import FUNCTION_RTOL, assert_rel

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from asyncbalance import (  # noqa: E402
    NotHomogeneousError,
    balance_network,
    layered_network,
)
from asyncbalance.torch_bridge import PowerReLU, balance_, network_from_sequential  # noqa: E402


def _model(dtype: torch.dtype, kind: str = "mixed", seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    if kind == "mixed":
        model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 9),
                              nn.LeakyReLU(0.1), nn.Linear(9, 7, bias=False), nn.Identity(),
                              nn.Linear(7, 3))
    elif kind == "bipu":
        model = nn.Sequential(nn.Linear(5, 8), PowerReLU(2.0), nn.Linear(8, 6), nn.ReLU(),
                              nn.Linear(6, 2))
    else:
        model = nn.Sequential(nn.Flatten(), nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 2))
    model = model.to(dtype)
    with torch.no_grad():  # unbalance it: layer scales over a factor e^3
        for i, layer in enumerate(m for m in model if isinstance(m, nn.Linear)):
            layer.weight.mul_(float(np.exp(1.5 * (-1) ** i)))
    return model


def _params(model: nn.Sequential) -> list[np.ndarray]:
    return [t.detach().double().numpy().copy() for t in model.parameters()]


@pytest.mark.parametrize("kind", ["mixed", "bipu"])
@pytest.mark.parametrize("p", [1.0, 2.0, 0.6])
def test_balance_in_place_float64(kind: str, p: float) -> None:
    model = _model(torch.float64, kind)
    x = torch.randn(64, model[0].in_features, dtype=torch.float64)
    with torch.no_grad():
        before_out = model(x).numpy()
    before = _params(model)
    network = network_from_sequential(model)
    report = balance_(model, p=p)
    after = _params(model)
    assert max(np.max(np.abs(a - b)) for a, b in zip(after, before, strict=True)) > 1e-3
    with torch.no_grad():
        after_out = model(x).numpy()
    assert_rel(after_out, before_out, FUNCTION_RTOL, "outputs")
    assert report.max_log_imbalance <= 1e-10 and report.p == p
    # Same answer as the numpy path on the same arrays.
    expected, _, _ = balance_network(network, p)
    got = network_from_sequential(model)
    for key, ref in expected.weights.items():
        assert_rel(got.weights[key], ref, 1e-14, key)
    # And balanced: sum_in |w|^p = c sum_out |w|^p, from the model's parameters.
    into, out = weight_flows(got, p)
    np.testing.assert_allclose(into, network.degrees() * out, rtol=1e-9)


def test_balance_in_place_float32() -> None:
    model = _model(torch.float32)
    x = torch.randn(64, 6)
    with torch.no_grad():
        before_out = model(x).double().numpy()
    balance_(model, p=2.0, method="full")
    assert all(t.dtype == torch.float32 for t in model.parameters())
    with torch.no_grad():
        after_out = model(x).double().numpy()
    # Weights are rounded back to float32 (unit roundoff 6e-8) through 4 layers.
    assert_rel(after_out, before_out, 1e-5, "float32 outputs")


def test_network_from_sequential_maps_layers() -> None:
    model = _model(torch.float64)
    net = network_from_sequential(model)
    assert [g.name for g in net.hidden_groups] == ["h1", "h2", "h3"]
    assert [g.activation.spec for g in net.hidden_groups] == ["relu", "leaky_relu:0.1",
                                                              "linear"]
    assert "b3" not in net.weights and "b4" in net.weights
    np.testing.assert_array_equal(net.weights["W2"], model[2].weight.detach().numpy())
    ref = layered_network([net.weights[f"W{i}"] for i in range(1, 5)],
                          [net.weights.get(f"b{i}") for i in range(1, 5)],
                          ["relu", "leaky_relu:0.1", "linear"])
    assert set(ref.weights) == set(net.weights)


def test_tanh_model_is_refused_and_left_untouched() -> None:
    model = _model(torch.float64, "tanh")
    before = _params(model)
    with pytest.raises(NotHomogeneousError) as info:
        balance_(model, p=2.0)
    text = str(info.value)
    # The module path inside the Sequential ("2"), its type, the reason, and what is supported.
    assert "2 (Tanh)" in text and "not positively homogeneous" in text and "ReLU" in text
    for a, b in zip(_params(model), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_p_leaves_model_untouched() -> None:
    model = _model(torch.float64)
    before = _params(model)
    with pytest.raises(ValueError, match="p"):
        balance_(model, p=-2.0)
    for a, b in zip(_params(model), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_non_sequential_and_too_short_models() -> None:
    with pytest.raises(ValueError, match="model"):
        balance_(nn.Linear(3, 2), p=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="model"):
        balance_(nn.Sequential(nn.Linear(3, 2)), p=2.0)
    # A ReLU on the input is no obstacle: the hidden units of the first Linear still balance.
    report = balance_(nn.Sequential(nn.ReLU(), nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1)),
                      p=2.0)
    assert report.n_units == 2 and report.function_change < 1e-6
