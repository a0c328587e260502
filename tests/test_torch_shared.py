"""``balance_`` on tensors reached from two places (weight tying with an Embedding, a bias
shared by two Linears, one BatchNorm on two branches, two parameters viewing one memory), the
reported costs, and the models it must refuse with one clear line."""

from __future__ import annotations

import pytest
from test_torch_support import outputs, param_cost, state_copy
from test_torch_support import unbalance_ as spread_
from tolerances import FUNCTION_RTOL, assert_rel

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402, N812

from asyncbalance import InvalidInputError, NotHomogeneousError  # noqa: E402
from asyncbalance.torch_bridge import balance_  # noqa: E402


class TiedLM(nn.Module):
    """GPT-style weight tying: the output Linear reuses the Embedding's table."""

    def __init__(self, vocab: int = 11, d: int = 6, hidden: int = 9) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.down(torch.relu(self.up(self.embed(tokens)))))
        return self.head(h)


class SharedBias(nn.Module):
    """Two branches whose Linears share one bias tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 6)
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(6, 5)
        self.b.bias = self.a.bias
        self.out = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        return self.out(torch.cat([torch.relu(self.a(h)), torch.relu(self.b(h))], dim=1))


class TwoBranchBN(nn.Module):
    """One eval BatchNorm applied to two branches of different convs."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.b = nn.Conv2d(3, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.head = nn.Conv2d(2 * c, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([torch.relu(self.bn(self.a(x))), torch.relu(self.bn(self.b(x)))], 1)
        return self.head(h)


def _seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return spread_(model.double(), seed=seed)


def test_embedding_tied_to_the_output_layer_pins_the_head() -> None:
    torch.manual_seed(0)
    model = _seeded(TiedLM())
    tokens = torch.randint(0, 11, (5, 7), generator=torch.Generator().manual_seed(1))
    table = model.embed.weight.detach().clone()
    before = outputs(model, tokens)
    report = balance_(model, p=2.0, example=tokens)
    assert_rel(outputs(model, tokens), before, FUNCTION_RTOL, "tied LM outputs")
    assert report.function_change_float64 <= FUNCTION_RTOL
    # The table feeds the embedding lookup and is the head's weight: it must not move, so
    # the head's inputs (down's units) keep scale 1 and only up's units are balanced.
    assert torch.equal(model.embed.weight.detach(), table)
    assert model.head.weight is model.embed.weight
    assert [g.name for g in report.groups] == ["up"]
    assert ("head", "Linear") in {(b.path, b.op) for b in report.boundaries}


def test_a_bias_shared_by_two_linears_pins_both() -> None:
    model = _seeded(SharedBias(), seed=2)
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    before = outputs(model, x)
    report = balance_(model, p=2.0, example=x)
    assert_rel(outputs(model, x), before, FUNCTION_RTOL, "shared-bias outputs")
    assert report.function_change_float64 <= FUNCTION_RTOL
    assert [g.name for g in report.groups] == ["stem"]
    assert {(b.path, b.op) for b in report.boundaries} == {("a", "Linear"), ("b", "Linear")}


def test_one_batchnorm_on_two_branches_ties_their_channels() -> None:
    model = _seeded(TwoBranchBN(), seed=4)
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    before = outputs(model, x)
    mean = model.bn.running_mean.clone()
    report = balance_(model, p=2.0, example=x)
    assert_rel(outputs(model, x), before, FUNCTION_RTOL, "two-branch BN outputs")
    assert report.function_change_float64 <= FUNCTION_RTOL
    # Channel c of a and channel c of b share the one shift: one group, both modules in it,
    # and the shift follows that one scale.
    assert [(g.name, g.modules, g.size) for g in report.groups] == [("a", ("a", "b"), 4)]
    assert report.boundaries == ()
    s = torch.exp(torch.as_tensor(report.log_scales["a"]))
    torch.testing.assert_close(model.bn.running_mean, mean * s, rtol=1e-15, atol=0)


def test_two_parameters_over_one_memory_are_pinned() -> None:
    class Views(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l0 = nn.Linear(4, 6)
            self.l1 = nn.Linear(6, 6)
            self.l2 = nn.Linear(6, 6)
            self.l3 = nn.Linear(6, 6)
            self.out = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.l1(torch.relu(self.l0(x))))
            return self.out(torch.relu(self.l3(torch.relu(self.l2(h)))))

    model = _seeded(Views(), seed=6)
    # l3's weight is a second Parameter object over l2's memory (a hand-made tie).
    model.l3.weight = nn.Parameter(model.l2.weight.detach())
    assert model.l3.weight.data_ptr() == model.l2.weight.data_ptr()
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    before = outputs(model, x)
    report = balance_(model, p=2.0, example=x)
    assert_rel(outputs(model, x), before, FUNCTION_RTOL, "aliased outputs")
    assert {(b.path, b.op) for b in report.boundaries} == {("l2", "Linear"), ("l3", "Linear")}
    # Both sides of l2 and l3 keep scale 1: l1's, l2's and l3's units; l0's are free.
    assert [g.name for g in report.groups] == ["l0"]


def test_costs_count_what_moves_once() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(6, 5)
            self.shared = nn.Linear(5, 5)
            self.out = nn.Linear(5, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.b(torch.relu(self.a(x))))
            return self.out(torch.relu(self.shared(torch.relu(self.shared(h)))))

    model = _seeded(Twice(), seed=8)
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    before = state_copy(model)
    report = balance_(model, p=2.0, example=x)
    assert [g.name for g in report.groups] == ["a"]

    # Only a's units move: a's weight rows and bias, b's weight columns. Nothing of b's
    # bias, the shared layer (called twice) or the head.
    def movable(state: dict[str, torch.Tensor]) -> float:
        return float(sum(state[k].double().square().sum()
                         for k in ("a.weight", "a.bias", "b.weight")))

    assert report.cost_before == pytest.approx(movable(before), rel=1e-13)
    assert report.cost_after == pytest.approx(movable(model.state_dict()), rel=1e-13)
    assert report.cost_before <= report.model_cost_before
    assert report.model_cost_after == pytest.approx(param_cost(model, 2.0), rel=1e-13)


def test_a_shared_weight_is_counted_once() -> None:
    model = _seeded(TiedLM(), seed=10)
    tokens = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(11))
    before = state_copy(model)
    report = balance_(model, p=2.0, example=tokens)
    # up's units move: up's rows and bias, down's columns; the tied table does not.
    expected = float(sum(before[k].double().square().sum()
                         for k in ("up.weight", "up.bias", "down.weight")))
    assert report.cost_before == pytest.approx(expected, rel=1e-13)
    assert report.cost_before <= report.model_cost_before


def test_an_all_functional_model_is_refused_with_the_reason() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(6, 4))
            self.w2 = nn.Parameter(torch.randn(2, 6))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(torch.relu(F.linear(x, self.w1)), self.w2)

    model = Functional()
    before = state_copy(model)
    with pytest.raises(NotHomogeneousError, match=r"no Linear, Conv or ConvTranspose module "
                                                  r"is called in its forward"):
        balance_(model, p=2.0, example=torch.randn(3, 4))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_model_on_the_meta_device_is_refused_with_one_line() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.raises(InvalidInputError, match=r"^model: 0.weight is on the meta device"):
        balance_(model, p=2.0)
