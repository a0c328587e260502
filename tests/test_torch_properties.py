"""Properties of ``balance_`` over random compositions of the supported modules, and the
negative test: a wrong tie must break the function check."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_torch_support import BasicBlock, build, outputs, param_cost, state_copy
from test_torch_support import unbalance_ as spread_
from tolerances import FUNCTION_RTOL, assert_rel

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from asyncbalance.torch_bridge import FunctionChangeError, PowerReLU, balance_  # noqa: E402
from asyncbalance.torch_symmetry import _Discovery  # noqa: E402


def _untied_add(self: _Discovery, n, value, path: str, op: str) -> torch.Tensor:  # noqa: ANN001
    """A wrong rule for additions: the sum takes the first operand's units and the second
    operand's units are left free, so the two branches get different scales."""
    return self.arg_label(n.args[0]).expand(value.shape).clone()


def test_wrong_tie_is_refused_and_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = build("resnet")
    reference = state_copy(model)
    right = balance_(model, p=2.0, example=x)
    assert right.function_change_float64 <= FUNCTION_RTOL
    model.load_state_dict(reference)
    optimizer = torch.optim.Adam(model.parameters())
    model(x).square().sum().backward()
    optimizer.step()
    model.load_state_dict(reference)
    adam_state = {k: v.clone() for k, v in optimizer.state[model.stem.weight].items()}
    monkeypatch.setattr(_Discovery, "add", _untied_add)
    # Untied, the residual stream's two branches are scaled independently: the float64
    # check sees the function change and balance_ refuses before writing anything.
    with pytest.raises(FunctionChangeError, match=r"would change the float64 outputs by"):
        balance_(model, p=2.0, example=x, optimizer=optimizer)
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]), key
    for key, value in optimizer.state[model.stem.weight].items():
        assert torch.equal(value, adam_state[key]), key
    # With the bound lifted the change is carried out and shown: far more than rounding.
    wrong = balance_(model, p=2.0, example=x, function_tol=math.inf)
    assert len(wrong.groups) > len(right.groups)
    assert wrong.function_change_float64 > 1e-3
    assert wrong.function_change > 1e-3


class Composed(nn.Module):
    """A random stack of the supported pieces on (C, 6, 6) images, then a Linear head."""

    def __init__(self, pieces: list[str], widths: list[int]) -> None:
        super().__init__()
        self.pieces = list(pieces)
        layers: list[nn.Module] = []
        c, size = 3, 6
        for piece, width in zip(pieces, widths, strict=True):
            if piece == "conv":
                layers.append(nn.Conv2d(c, width, 3, padding=1))
                c = width
            elif piece == "conv_bn_relu":
                layers.append(nn.Sequential(nn.Conv2d(c, width, 3, padding=1, bias=False),
                                            nn.BatchNorm2d(width), nn.ReLU()))
                c = width
            elif piece == "depthwise":
                layers.append(nn.Conv2d(c, c, 3, padding=1, groups=c))
            elif piece == "relu":
                layers.append(nn.ReLU())
            elif piece == "leaky":
                layers.append(nn.LeakyReLU(0.1))
            elif piece == "power":
                layers.append(PowerReLU(2.0))
            elif piece == "tanh":
                layers.append(nn.Tanh())
            elif piece == "dropout":
                layers.append(nn.Dropout(0.3))
            elif piece == "maxpool" and size >= 2:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
                size = (size + 1) // 2
            elif piece == "avgpool":
                layers.append(nn.AvgPool2d(3, 1, 1))
            elif piece == "block":
                layers.append(BasicBlock(c, c))
            elif piece == "concat":
                layers.append(_Concat(c, width))
                c = c + width
            else:
                layers.append(nn.Identity())
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c * size * size, 5), nn.ReLU(),
                                  nn.Linear(5, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class _Concat(nn.Module):
    """``cat([x, relu(conv(x))])`` along channels: a dense-net style skip."""

    def __init__(self, c: int, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, torch.relu(self.conv(x))], dim=1)


PIECES = ["conv", "conv_bn_relu", "depthwise", "relu", "leaky", "power", "tanh", "dropout",
          "maxpool", "avgpool", "block", "concat", "identity"]


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(pieces=st.lists(st.sampled_from(PIECES), min_size=1, max_size=6),
       widths=st.lists(st.integers(2, 5), min_size=6, max_size=6),
       seed=st.integers(0, 2**16), p=st.sampled_from([2.0, 1.0, 0.7]))
def test_random_compositions(pieces: list[str], widths: list[int], seed: int,
                             p: float) -> None:
    torch.manual_seed(seed)
    model = spread_(Composed(pieces, widths[:len(pieces)]).double(), seed, spread=1.0)
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    original = state_copy(model)
    before_out, before_cost = outputs(model, x), param_cost(model, p)
    report = balance_(model, p=p, example=x)
    # Function kept (float64), cost never raised (the optimum's cost is at most R(0); the
    # slack is rounding of the two sums, see tolerances.MONOTONE_RTOL), undo exact.
    assert_rel(outputs(model, x), before_out, FUNCTION_RTOL, f"outputs of {pieces}")
    assert report.cost_after <= report.cost_before * (1 + 1e-13)
    assert param_cost(model, p) <= before_cost * (1 + 1e-13)
    report.undo(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key
    assert np.array_equal(outputs(model, x), before_out)
