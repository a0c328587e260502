"""Positively homogeneous operations ``balance_`` passes through: PReLU, abs, zero (and
copying) padding, transposed convolutions, amax/amin. Each model has exactly the expected
groups and no boundary, keeps its function in float64, and lowers the cost; a Linear called
twice stays a boundary."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from test_torch_support import outputs, param_cost
from test_torch_support import unbalance_ as spread_
from tolerances import FUNCTION_RTOL, assert_rel

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402, N812

from asyncbalance.torch_bridge import balance_  # noqa: E402


class PReLUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.act = nn.PReLU(6, init=0.2)  # one slope per unit
        self.b = nn.Linear(6, 5)
        self.shared_slope = nn.Parameter(torch.tensor([0.3]))
        self.out = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.a(x))
        return self.out(F.prelu(self.b(h), self.shared_slope))


class AbsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.b(torch.abs(self.a(x))).abs())


class PaddedNet(nn.Module):
    """Zero padding by F.pad (spatial and on channels), a ZeroPad2d module, reflect padding."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)
        self.b = nn.Conv2d(6, 5, 3)
        self.pad = nn.ZeroPad2d((1, 2, 0, 1))
        self.c = nn.Conv2d(5, 3, 3)
        self.head = nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        h = F.pad(h, (1, 1, 1, 1, 1, 1))            # zeros around, one zero channel each side
        h = torch.relu(self.b(h))
        h = torch.relu(self.c(self.pad(h)))
        return self.head(F.pad(h, (1, 1, 1, 1), mode="reflect"))


class TransposedNet(nn.Module):
    """A decoder: conv, transposed conv (stride 2), grouped transposed conv, 1x1 head."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(2, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 6, 2, stride=2)
        self.grouped = nn.ConvTranspose2d(6, 4, 3, padding=1, groups=2)
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.up(torch.relu(self.enc(x))))
        return self.head(torch.relu(self.grouped(h)))


class AmaxNet(nn.Module):
    """Max and min over positions instead of pooling modules."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 5, 3)
        self.fc = nn.Linear(10, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        pooled = torch.cat([torch.amax(h, dim=2), h.amin(dim=-1)], dim=1)
        return self.out(torch.relu(self.fc(pooled)))


CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], list[str]]] = {
    "prelu": (PReLUNet, (6, 4), ["a", "b"]),
    "abs": (AbsNet, (6, 4), ["a", "b"]),
    "pad": (PaddedNet, (2, 3, 7, 7), ["a", "b", "c"]),
    "conv_transpose": (TransposedNet, (2, 2, 5, 5), ["enc", "up", "grouped"]),
    "amax": (AmaxNet, (4, 3, 9), ["conv", "fc"]),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("p", [2.0, 1.0])
def test_homogeneous_operations_pass(name: str, p: float) -> None:
    make, shape, groups = CASES[name]
    torch.manual_seed(0)
    model = spread_(make().double(), seed=1)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    fresh = torch.randn((9, *shape[1:]), dtype=torch.float64,
                        generator=torch.Generator().manual_seed(3))
    before, cost = outputs(model, fresh), param_cost(model, p)
    report = balance_(model, p=p, example=x)
    assert report.boundaries == ()
    assert [g.name for g in report.groups] == groups
    assert_rel(outputs(model, fresh), before, FUNCTION_RTOL, f"{name} outputs")
    assert report.function_change_float64 <= FUNCTION_RTOL
    # The balanced cost is below the start by far more than rounding (spread layer gains),
    # and the drop measured on the stored parameters is the engine's: its cost graph
    # describes exactly the weights the write-back moved (a transposed weight read with its
    # axes swapped would break this). Both drops are sums of a few hundred float64 terms:
    # 1e-9 relative is far above their rounding.
    after = param_cost(model, p)
    assert after < cost * (1 - 1e-3)
    assert_rel(cost - after, report.cost_before - report.cost_after, 1e-9, f"{name} drop")
    assert report.max_log_imbalance <= 1e-10


def test_prelu_slopes_stay() -> None:
    torch.manual_seed(0)
    model = spread_(PReLUNet().double(), seed=1)
    slopes = (model.act.weight.detach().clone(), model.shared_slope.detach().clone())
    balance_(model, p=2.0, example=torch.randn(6, 4, dtype=torch.float64))
    assert torch.equal(model.act.weight.detach(), slopes[0])
    assert torch.equal(model.shared_slope.detach(), slopes[1])


def test_a_nonzero_constant_pad_and_a_slope_from_the_input_are_boundaries() -> None:
    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)
            self.b = nn.Conv2d(4, 4, 3)
            self.c = nn.Linear(4, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.b(F.pad(torch.relu(self.a(x)), (1, 1, 1, 1), value=1.0))
            h = h.mean(dim=(2, 3))
            return self.out(F.prelu(self.c(h), h[0, :1].abs() + 0.1))

    torch.manual_seed(0)
    model = spread_(Bad().double(), seed=1)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    before = outputs(model, x)
    report = balance_(model, p=2.0, example=x)
    # a's units meet the pad of ones; c's units meet prelu, whose slope is computed from the
    # input (itself a constant added: the add boundary). b's units (mean, then c) stay free.
    assert {(b.op, b.path) for b in report.boundaries} == {("pad", "pad"), ("prelu", "prelu"),
                                                           ("add", "add")}
    assert [g.name for g in report.groups] == ["b"]
    assert_rel(outputs(model, x), before, FUNCTION_RTOL, "outputs")


def test_a_linear_called_twice_stays_a_boundary() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 5)
            self.twice = nn.Linear(5, 5)
            self.out = nn.Linear(5, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.twice(torch.relu(self.twice(self.a(x))))))

    torch.manual_seed(0)
    model = spread_(Twice().double(), seed=1)
    x = torch.randn(6, 4, dtype=torch.float64)
    before = outputs(model, x)
    with pytest.raises(Exception, match="no rescalable units"):
        balance_(model, p=2.0, example=x)
    assert_rel(outputs(model, x), before, 0.0, "untouched")
