"""``balance_`` on the models researchers have: ResNet, VGG, a transformer encoder layer, tanh
in the middle, a U-Net-like concatenation. Function kept, cost lowered, exactly the expected
units balanced, the optimum equal to the engine's on hand-built graphs, undo exact."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from test_torch_support import LinearResidual, ResNet, build, outputs, param_cost, state_copy
from test_torch_support import unbalance_ as spread_
from tolerances import FUNCTION_RTOL, assert_rel

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from asyncbalance import (  # noqa: E402
    Connection,
    InvalidInputError,
    Network,
    NotHomogeneousError,
    UnitGroup,
    build_cost_graph,
    parse_activation,
    solve_optimum,
)
from asyncbalance.torch_bridge import (  # noqa: E402
    balance_,
    network_from_sequential,
    unbalance_,
)

# `pytest -m cuda` selects these (set up a CUDA torch with `bash scripts/bootstrap.sh --cuda`);
# without a CUDA device they skip with this reason.
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the CUDA runs of balance_ need a GPU "
    "and a CUDA build of torch (bash scripts/bootstrap.sh --cuda)")])
DEVICES = ["cpu", CUDA]

# Float32 stores every rescaled weight with a relative rounding of at most 2**-24 = 6e-8, and
# the forward pass itself rounds at each of a few hundred multiply-adds per output; through
# these networks (at most 8 weighted layers, sums of at most 90 terms) that stays below a few
# hundred unit roundoffs of the largest output: 2e-5.
FLOAT32_RTOL = 2e-5

# What each model must balance, by construction (module paths; a tuple lists tied modules).
EXPECTED_GROUPS = {
    "resnet": {"stem": ("stem", "blocks.0.conv2"), "blocks.0.conv1": ("blocks.0.conv1",),
               "blocks.1.conv1": ("blocks.1.conv1",),
               "blocks.1.conv2": ("blocks.1.conv2", "blocks.1.shortcut.0")},
    "vgg": {"0": ("0",), "3": ("3",), "6": ("6",), "11": ("11",)},
    "encoder": {"block.ff_in": ("block.ff_in",)},
    "tanh": {"0": ("0",), "4": ("4",)},
    "unet": {"enc": ("enc",), "down": ("down",), "dec": ("dec",)},
    "residual": {"stem": ("stem", "l2"), "l1": ("l1",)},
}
# Module paths (and ops) where the rescaling must stop, per model.
EXPECTED_BOUNDARIES = {
    "resnet": set(), "vgg": set(), "unet": set(), "residual": set(),
    "tanh": {("3", "Tanh")},
    "encoder": {("block.attn", "MultiheadAttention"), ("block.norm1", "LayerNorm"),
                ("block:add", "add"), ("block:add_1", "add")},
}
MODELS = list(EXPECTED_GROUPS)


def _probe(model_name: str, x: torch.Tensor, n: int = 32) -> torch.Tensor:
    """A fresh, larger batch shaped like ``x`` (not the one balance_ saw)."""
    generator = torch.Generator().manual_seed(7)
    return torch.randn(n, *x.shape[1:], generator=generator, dtype=torch.float64).to(x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", MODELS)
def test_function_kept_cost_lowered_expected_units_float64(name: str, device: str) -> None:
    model, x = build(name)
    model, x = model.to(device), x.to(device)
    fresh = _probe(name, x)
    before_out, before_cost = outputs(model, fresh), param_cost(model, 2.0)
    report = balance_(model, p=2.0, example=x)
    assert_rel(outputs(model, fresh), before_out, FUNCTION_RTOL, f"{name} outputs")
    assert report.function_change_float64 <= FUNCTION_RTOL
    assert report.function_change <= FUNCTION_RTOL
    after_cost = param_cost(model, 2.0)
    assert after_cost < before_cost * (1 - 1e-3), (before_cost, after_cost)
    # The drop measured on the stored parameters is the engine's drop: the write-back moved
    # exactly the weights the engine's cost graph describes.
    assert_rel(before_cost - after_cost, report.cost_before - report.cost_after, 1e-9, "drop")
    assert {g.name: g.modules for g in report.groups} == EXPECTED_GROUPS[name]
    assert {(b.path, b.op) for b in report.boundaries} == EXPECTED_BOUNDARIES[name]
    assert report.max_log_imbalance <= 1e-10
    assert all(p.device.type == device and p.dtype == torch.float64
               for p in model.parameters())


def test_encoder_balances_exactly_the_feed_forward_hidden_units() -> None:
    model, x = build("encoder")
    before = state_copy(model)
    report = balance_(model, p=2.0, example=x)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    # ff_in's rows and bias carry the scales, ff_out's columns their inverse; nothing else.
    assert changed == {"block.ff_in.weight", "block.ff_in.bias", "block.ff_out.weight"}
    assert report.n_units == 12 and [g.size for g in report.groups] == [12]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", MODELS)
def test_function_kept_to_float32_rounding(name: str, device: str) -> None:
    model, x = build(name, dtype=torch.float32)
    model, x = model.to(device), x.to(device)
    fresh = _probe(name, x).float()
    before_out = outputs(model, fresh)
    report = balance_(model, p=2.0, example=x)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert_rel(outputs(model, fresh), before_out, FLOAT32_RTOL, f"{name} float32 outputs")
    assert report.function_change <= FLOAT32_RTOL
    # The float64 account of the same rescaling is exact. Whether the float32 outputs move
    # at all depends on one CPU's kernels (a rounding below half an ulp of the output leaves
    # it bit-identical), so the rounding is shown on the stored parameters instead: each is
    # the float32 rounding of its exact float64 product (IEEE multiplication, the same on
    # every CPU), and the rescaling did round some of them.
    assert report.function_change_float64 <= FUNCTION_RTOL
    rounded = 0
    stored_now = model.state_dict()
    for key, factor in report.factors.items():
        original = report.originals[key]
        exact = original.double() * factor.to(original.device, torch.float64)
        assert torch.equal(stored_now[key], exact.to(torch.float32)), key
        rounded += int((stored_now[key].double() != exact).sum())
    assert rounded > 0


@pytest.mark.parametrize("p", [2.0, 1.0, 0.7])
def test_sequential_log_scales_equal_the_engine_optimum(p: float) -> None:
    torch.manual_seed(3)
    model = spread_(nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.LeakyReLU(0.1),
                                  nn.Linear(6, 3)).double(), seed=3)
    optimum = solve_optimum(build_cost_graph(network_from_sequential(model), p)).log_scales
    report = balance_(model, p=p, tol=1e-12)
    got = np.concatenate([report.log_scales["0"], report.log_scales["2"]])
    # Both solves stop at a max log-imbalance of 1e-12; the costs reach the engine through
    # p-th roots (a few ulps), so the log-scales agree to well below 1e-9.
    np.testing.assert_allclose(got, optimum, rtol=0, atol=1e-9)


def _hand_network_linear_residual(model: LinearResidual) -> Network:
    w = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    relu = parse_activation("relu")
    groups = (UnitGroup("input", 4), UnitGroup("s", 6, relu), UnitGroup("h", 8, relu),
              UnitGroup("output", 3), UnitGroup("bias", 1))
    conns = (Connection("stem.weight", "s", "input"), Connection("stem.bias", "s", "bias", "bias"),
             Connection("l1.weight", "h", "s"), Connection("l1.bias", "h", "bias", "bias"),
             Connection("l2.weight", "s", "h"), Connection("l2.bias", "s", "bias", "bias"),
             Connection("head.weight", "output", "s"),
             Connection("head.bias", "output", "bias", "bias"))
    return Network(groups, conns, w)


def _hand_network_conv_block(model: ResNet) -> Network:
    """Stem + one identity basic block: the stream ``s`` (stem, conv2 tied), ``h`` (conv1);
    BatchNorm shifts are biases of the unit they follow."""
    w = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    relu = parse_activation("relu")
    groups = (UnitGroup("input", 3), UnitGroup("s", 6, relu), UnitGroup("h", 6, relu),
              UnitGroup("output", 4), UnitGroup("bias", 1))
    conns = (Connection("stem.weight", "s", "input", "conv"),
             Connection("stem.bias", "s", "bias", "bias"),
             Connection("bn.bias", "s", "bias", "bias"),
             Connection("blocks.0.conv1.weight", "h", "s", "conv"),
             Connection("blocks.0.bn1.bias", "h", "bias", "bias"),
             Connection("blocks.0.conv2.weight", "s", "h", "conv"),
             Connection("blocks.0.bn2.bias", "s", "bias", "bias"),
             Connection("head.weight", "output", "s"),
             Connection("head.bias", "output", "bias", "bias"))
    return Network(groups, conns, {c.key: w[c.key] for c in conns})


@pytest.mark.parametrize("p", [2.0, 1.0])
def test_one_residual_block_log_scales_equal_the_hand_built_optimum(p: float) -> None:
    torch.manual_seed(5)
    linear = spread_(LinearResidual().double(), seed=5)
    optimum = solve_optimum(build_cost_graph(_hand_network_linear_residual(linear), p))
    report = balance_(linear, p=p, example=torch.randn(4, 4, dtype=torch.float64), tol=1e-12)
    got = np.concatenate([report.log_scales["stem"], report.log_scales["l1"]])
    np.testing.assert_allclose(got, optimum.log_scales, rtol=0, atol=1e-9)

    conv = spread_(ResNet(widths=(6, 6)).double(), seed=6)
    optimum = solve_optimum(build_cost_graph(_hand_network_conv_block(conv), p))
    report = balance_(conv, p=p, example=torch.randn(2, 3, 8, 8, dtype=torch.float64),
                      tol=1e-12)
    assert [g.name for g in report.groups] == ["stem", "blocks.0.conv1"]
    got = np.concatenate([report.log_scales["stem"], report.log_scales["blocks.0.conv1"]])
    np.testing.assert_allclose(got, optimum.log_scales, rtol=0, atol=1e-9)
    # The report's cost leaves out what no rescaling moves: here only the head's bias
    # (output <- bias, both sides fixed), which the hand-built graph includes.
    unmoved = float(conv.head.bias.detach().abs().pow(p).sum())
    assert report.cost_after == pytest.approx(optimum.cost - unmoved, rel=1e-12)


@pytest.mark.parametrize("name", MODELS)
def test_undo_restores_every_parameter_and_buffer_exactly(name: str) -> None:
    model, x = build(name, dtype=torch.float32)
    before = state_copy(model)
    report = balance_(model, p=1.0, example=x)
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    unbalance_(model, report)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_batchnorm_shift_follows_the_scale() -> None:
    model, x = build("resnet")
    mean_before = model.bn.running_mean.clone()
    var_before = model.bn.running_var.clone()
    gamma_before = model.bn.weight.detach().clone()
    report = balance_(model, p=2.0, example=x)
    s = np.exp(report.log_scales["stem"])
    np.testing.assert_allclose(model.bn.running_mean.numpy(), mean_before.numpy() * s,
                               rtol=1e-15)
    # The variance and gamma stay: BatchNorm's slope is unchanged, only its shift scales.
    assert torch.equal(model.bn.running_var, var_before)
    assert torch.equal(model.bn.weight.detach(), gamma_before)


def test_strict_refuses_a_model_with_boundaries_and_changes_nothing() -> None:
    model, x = build("encoder")
    before = state_copy(model)
    with pytest.raises(NotHomogeneousError) as info:
        balance_(model, p=2.0, example=x, strict=True)
    assert "block.attn (MultiheadAttention)" in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    vgg, x = build("vgg")
    assert balance_(vgg, p=2.0, example=x, strict=True).boundaries == ()


def test_training_mode_batchnorm_is_a_boundary_and_its_statistics_stay() -> None:
    model, x = build("vgg")
    model.train()  # BatchNorm on batch statistics, Dropout active
    before = state_copy(model)
    report = balance_(model, p=2.0, example=x)
    assert {(b.path, b.op) for b in report.boundaries} == {("1", "BatchNorm2d")}
    assert [g.name for g in report.groups] == ["3", "6", "11"]
    # The probes draw the same dropout masks before and after: the function check holds.
    assert report.function_change <= FUNCTION_RTOL
    # The probe passes ran in training mode but the running statistics were put back.
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(model.state_dict()[key], before[key]), key


def test_shared_weights_are_pinned() -> None:
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

    torch.manual_seed(0)
    model = spread_(Twice().double(), seed=0)
    x = torch.randn(6, 4, dtype=torch.float64)
    before = outputs(model, x)
    report = balance_(model, p=2.0, example=x)
    assert {(b.path, b.op) for b in report.boundaries} == {("shared", "Linear")}
    # b's units and the shared layer's are pinned (both calls would need the same scales on
    # both sides); a's units, read by b only, stay free.
    assert [g.name for g in report.groups] == ["a"]
    assert_rel(outputs(model, x), before, FUNCTION_RTOL, "outputs")


def test_power_units_balance_with_their_degree() -> None:
    from asyncbalance.torch_bridge import PowerReLU

    torch.manual_seed(1)
    model = spread_(nn.Sequential(nn.Linear(4, 6), PowerReLU(2.0), nn.Linear(6, 5), nn.ReLU(),
                                  nn.Linear(5, 2)).double(), seed=1)
    optimum = solve_optimum(build_cost_graph(network_from_sequential(model), 2.0)).log_scales
    x = torch.randn(8, 4, dtype=torch.float64)
    before = outputs(model, x)
    report = balance_(model, p=2.0, example=x, tol=1e-12)
    assert [g.degree for g in report.groups] == [2.0, 1.0]
    got = np.concatenate([report.log_scales[g.name] for g in report.groups])
    np.testing.assert_allclose(got, optimum, rtol=0, atol=1e-9)
    assert_rel(outputs(model, x), before, FUNCTION_RTOL, "outputs")


def test_optimizer_state_follows_and_undo_takes_it_back() -> None:
    model, x = build("residual")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(x).square().sum().backward()
    optimizer.step()
    state = {name: {k: v.clone() for k, v in optimizer.state[p].items()}
             for name, p in model.named_parameters()}
    report = balance_(model, p=2.0, example=x, optimizer=optimizer)
    for name, p in model.named_parameters():
        s = report.factors[name] if name in report.factors else torch.ones_like(p)
        now = optimizer.state[p]
        torch.testing.assert_close(now["exp_avg"], state[name]["exp_avg"] / s, rtol=1e-14,
                                   atol=0)
        torch.testing.assert_close(now["exp_avg_sq"], state[name]["exp_avg_sq"] / s**2,
                                   rtol=1e-14, atol=0)
    report.undo(model, optimizer)
    for name, p in model.named_parameters():
        torch.testing.assert_close(optimizer.state[p]["exp_avg"], state[name]["exp_avg"],
                                   rtol=1e-14, atol=0)


def test_untraceable_module_is_named() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum() > 0 else -x

    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), Branchy(), nn.Linear(3, 2))
    with pytest.raises(InvalidInputError, match=r"failed in '2'"):
        balance_(model, p=2.0)


def test_conv_model_needs_an_example() -> None:
    model, _ = build("vgg")
    with pytest.raises(InvalidInputError, match="example"):
        balance_(model, p=2.0)


def test_report_lists_units_and_serialises() -> None:
    model, x = build("tanh")
    report = balance_(model, p=2.0, example=x)
    data = report.to_dict()
    assert data["n_units"] == 15 and data["n_units_found"] == 24
    assert data["boundaries"][0]["path"] == "3"
    assert "not balanced: 3 (Tanh)" in report.summary()


def test_sizes_and_views_in_forward_are_no_boundary() -> None:
    class Viewed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4 * 4 * 4, 5)
            self.out = nn.Linear(5, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.conv(x)).to(x.dtype)
            h = h.view(h.size(0), -1)
            return self.out(torch.relu(self.fc(h.reshape(h.shape[0], -1))))

    torch.manual_seed(0)
    model = spread_(Viewed().double(), seed=0)
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    report = balance_(model, p=2.0, example=x)
    assert [g.name for g in report.groups] == ["conv", "fc"] and report.boundaries == ()
    with pytest.raises(InvalidInputError, match=r"example: the model fails on the probe batch"):
        balance_(model, p=2.0, example=torch.randn(3, 3, 7, 6, dtype=torch.float64))


def test_balance_leaves_the_global_random_state_alone() -> None:
    model, x = build("vgg")
    model.train()  # dropout draws masks in the discovery and probe passes
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    balance_(model, p=2.0, example=x)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("method", ["full", "alternating", "stochastic"])
def test_every_schedule_reaches_the_same_balanced_model(method: str) -> None:
    model, x = build("resnet")
    exact = balance_(copy.deepcopy(model), p=2.0, example=x, tol=1e-12)
    other = balance_(model, p=2.0, example=x, method=method, tol=1e-11)
    # Stopping at a max log-imbalance of 1e-11 leaves the log-scales within a small multiple
    # of it (the graph is well conditioned): 1e-8 is far from any real disagreement.
    for name, u in exact.log_scales.items():
        np.testing.assert_allclose(other.log_scales[name], u, rtol=0, atol=1e-8)
    assert other.function_change_float64 <= FUNCTION_RTOL


def test_the_asynchronous_runtime_balances_the_symmetry_network() -> None:
    from asyncbalance import kernels
    from asyncbalance.torch_bridge import (
        apply_factors_,
        class_log_scales,
        scale_factors,
        symmetry_network,
    )
    from asyncbalance.torch_symmetry import discover
    from asyncbalance.training.balancing import async_balance

    model, x = build("resnet")
    fresh = _probe("resnet", x)
    before = outputs(model, fresh)
    network = symmetry_network(discover(model, (x,)), 2.0)
    graph = build_cost_graph(network, 2.0)
    start = kernels.total_cost(graph, np.zeros(graph.n_units))
    optimum = solve_optimum(graph).cost
    result = async_balance(graph, budget=200.0, seed=0, backend="sim")
    # Delayed, asynchronous shard moves on the torch model's graph: the cost falls most of
    # the way to the optimum (never below it) and the model computes the same function.
    assert optimum <= result.cost < optimum + 0.1 * (start - optimum)
    symmetry = discover(model, (x,))
    u = class_log_scales(symmetry, network, result.log_scales)
    apply_factors_(model, scale_factors(model, symmetry, u))
    assert_rel(outputs(model, fresh), before, FUNCTION_RTOL, "outputs")
    assert param_cost(model, 2.0) == pytest.approx(
        param_cost(build("resnet")[0], 2.0) - (start - result.cost), rel=1e-9)


def test_a_weight_also_read_outside_its_module_is_pinned() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(6, 6)
            self.c = nn.Linear(6, 6)
            self.out = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x))))))
            # c's weight used again by hand: rescaling c's columns (b's units) would change
            # this second product.
            h = torch.relu(nn.functional.linear(h, self.c.weight))
            return self.out(h)

    torch.manual_seed(0)
    model = spread_(Tied().double(), seed=0)
    x = torch.randn(5, 4, dtype=torch.float64)
    before = outputs(model, x)
    report = balance_(model, p=2.0, example=x)
    assert ("c", "Linear") in {(b.path, b.op) for b in report.boundaries}
    assert [g.name for g in report.groups] == ["a"]
    assert_rel(outputs(model, x), before, FUNCTION_RTOL, "outputs")


def test_undo_refuses_to_overwrite_edits_made_after_balancing() -> None:
    model, x = build("vgg")
    before = state_copy(model)
    report = balance_(model, p=2.0, example=x)
    balanced = state_copy(model)
    name = next(iter(report.originals))
    with torch.no_grad():
        dict(model.named_parameters())[name].mul_(1.01)  # as a training step would
    edited = state_copy(model)
    with pytest.raises(InvalidInputError, match=f"{name} changed since balance_"):
        report.undo(model)
    # Refused before anything changed; with force the originals come back.
    for key, value in model.state_dict().items():
        assert torch.equal(value, edited[key]), key
    report.undo(model, force=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert any(not torch.equal(balanced[k], before[k]) for k in before)
