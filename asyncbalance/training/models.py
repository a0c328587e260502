"""Torch models and how their homogeneous units map onto the engine's ``Network``.

Each model exposes ``balance_layout()``: the unit groups, the connections (with the engine's
``dense``/``bias``/``conv``/``flatten`` layouts) and the torch parameters behind every
connection key. Balancing reads those parameters into a float64 ``Network``, moves the
log-scales, and writes the scaled weights back (see ``bridge.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..activations import Activation, parse_activation
from ..errors import InvalidInputError, NotHomogeneousError
from ..network import Connection, UnitGroup
from .config import ModelConfig
from .data import Dataset

TRANSFORMER_FIXED = ("attention", "layernorm", "embedding", "gelu")


@dataclass(frozen=True)
class SmoothActivation:
    """A non-homogeneous activation a network can train with (DFA, FA, backprop) but whose
    units cannot be balanced: ``tanh``."""

    name: str
    degree = None  # no homogeneity degree: marks the units as not balanceable

    @property
    def spec(self) -> str:
        return self.name


SMOOTH_ACTIVATIONS = ("tanh",)


def training_activation(spec: str, field: str) -> Activation | SmoothActivation:
    """A homogeneous activation (see ``parse_activation``) or one of SMOOTH_ACTIVATIONS."""
    if isinstance(spec, str) and spec.strip().lower() in SMOOTH_ACTIVATIONS:
        return SmoothActivation(spec.strip().lower())
    return parse_activation(spec, field)


@dataclass(frozen=True, eq=False)
class BalanceLayout:
    """Unit groups and connections of the balanceable part of a model, with its parameters."""

    groups: tuple[UnitGroup, ...]
    connections: tuple[Connection, ...]
    params: dict[str, nn.Parameter]


def act_forward(act: Activation | SmoothActivation, x: torch.Tensor) -> torch.Tensor:
    """The BiLU ``a x (x<0), b x (x>=0)``, BiPU ``relu(x)**c`` or tanh on a tensor."""
    if isinstance(act, SmoothActivation):
        return torch.tanh(x)
    if act.degree != 1.0:
        return torch.relu(x) ** act.degree
    if act.name == "relu":
        return torch.relu(x)
    if act.name == "linear":
        return x
    return torch.where(x >= 0, act.pos_slope * x, act.neg_slope * x)


def act_derivative(act: Activation | SmoothActivation, x: torch.Tensor) -> torch.Tensor:
    """f'(x), with autograd's convention at x = 0 (0 for ReLU, the positive slope for the
    other BiLUs), so hand-written rules match autograd bit for bit."""
    if isinstance(act, SmoothActivation):
        return 1.0 - torch.tanh(x) ** 2
    if act.degree != 1.0:
        return act.degree * torch.relu(x) ** (act.degree - 1.0)
    if act.name == "relu":
        return (x > 0).to(x.dtype)
    return torch.where(x >= 0, torch.full_like(x, act.pos_slope),
                       torch.full_like(x, act.neg_slope))


class MLP(nn.Module):
    """``x -> f(W1 x + b1) -> ... -> WL h + bL`` with one homogeneous activation."""

    kind = "mlp"

    def __init__(self, widths: tuple[int, ...] | list[int], activation: str = "relu",
                 bias: bool = True) -> None:
        super().__init__()
        if len(widths) < 2:
            raise InvalidInputError("model.widths", "needs at least input and output sizes")
        self.widths = tuple(int(w) for w in widths)
        self.act = training_activation(activation, "model.activation")
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias)
                                    for a, b in zip(self.widths[:-1], self.widths[1:],
                                                    strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_cache(x)[2]

    def forward_cache(self, x: torch.Tensor
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Pre-activations a_l, layer inputs h_{l-1} (h_0 = x) and the output."""
        h = x.flatten(1)
        pre: list[torch.Tensor] = []
        inputs: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            inputs.append(h)
            a = layer(h)
            if i < len(self.layers) - 1:
                pre.append(a)
                h = act_forward(self.act, a)
            else:
                h = a
        return pre, inputs, h

    def balance_layout(self) -> BalanceLayout:
        if len(self.layers) < 2:
            raise InvalidInputError("model.widths", f"{list(self.widths)} has no hidden layer, "
                                    "so there are no balanceable units")
        if isinstance(self.act, SmoothActivation):
            raise NotHomogeneousError(
                "model.activation", f"{self.act.name} units are not positively homogeneous, "
                "so this MLP has no balanceable units (train it without balancing, or use a "
                "homogeneous activation)", ["relu", "leaky_relu:A", "linear", "abs", "power:C"])
        names = ["input"] + [f"h{i}" for i in range(1, len(self.layers))] + ["output"]
        groups = [UnitGroup("input", self.widths[0])]
        groups += [UnitGroup(f"h{i}", w, self.act) for i, w in enumerate(self.widths[1:-1], 1)]
        groups += [UnitGroup("output", self.widths[-1])]
        conns, params = [], {}
        for i, layer in enumerate(self.layers):
            key = f"layers.{i}.weight"
            conns.append(Connection(key, names[i + 1], names[i], "dense"))
            params[key] = layer.weight
            if layer.bias is not None:
                conns.append(Connection(f"layers.{i}.bias", names[i + 1], "bias", "bias"))
                params[f"layers.{i}.bias"] = layer.bias
        if any(layer.bias is not None for layer in self.layers):
            groups.append(UnitGroup("bias", 1))
        return BalanceLayout(tuple(groups), tuple(conns), params)


class ReluRNN(nn.Module):
    """Vanilla ``h_t = relu(W_in x_t + b_ih + W_rec h_{t-1} + b_hh)``, read out from h_T.

    Inputs (batch, steps * features) are read as ``steps`` rows of ``features`` (an image
    row by row, e.g. sequential Fashion-MNIST: 28 steps of 28 pixels).
    """

    kind = "rnn"

    def __init__(self, steps: int, features: int, hidden: int, n_out: int) -> None:
        super().__init__()
        self.steps, self.features = steps, features
        self.rnn = nn.RNN(features, hidden, nonlinearity="relu", batch_first=True)
        self.readout = nn.Linear(hidden, n_out)
        self.act = parse_activation("relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.reshape(x.shape[0], self.steps, self.features)
        states, _ = self.rnn(seq)
        return self.readout(states[:, -1])

    def balance_layout(self) -> BalanceLayout:
        hidden = self.rnn.hidden_size
        groups = (UnitGroup("input", self.features), UnitGroup("hidden", hidden, self.act),
                  UnitGroup("output", self.readout.out_features), UnitGroup("bias", 1))
        conns = (Connection("rnn.weight_ih_l0", "hidden", "input"),
                 Connection("rnn.weight_hh_l0", "hidden", "hidden"),
                 Connection("rnn.bias_ih_l0", "hidden", "bias", "bias"),
                 Connection("rnn.bias_hh_l0", "hidden", "bias", "bias"),
                 Connection("readout.weight", "output", "hidden"),
                 Connection("readout.bias", "output", "bias", "bias"))
        params = {"rnn.weight_ih_l0": self.rnn.weight_ih_l0,
                  "rnn.weight_hh_l0": self.rnn.weight_hh_l0,
                  "rnn.bias_ih_l0": self.rnn.bias_ih_l0, "rnn.bias_hh_l0": self.rnn.bias_hh_l0,
                  "readout.weight": self.readout.weight, "readout.bias": self.readout.bias}
        return BalanceLayout(groups, conns, params)


class SmallCNN(nn.Module):
    """conv3x3 -> ReLU -> max-pool 2 -> conv3x3 -> ReLU -> avg-pool 2 -> flatten -> Linear
    -> ReLU -> Linear. Conv units are channels: scaling a channel commutes with ReLU and both
    pools, and the flattened Linear sees each channel over its spatial positions."""

    kind = "cnn"

    def __init__(self, image_shape: tuple[int, ...], channels: tuple[int, ...], hidden: int,
                 n_out: int) -> None:
        super().__init__()
        if len(image_shape) != 3:
            raise InvalidInputError("model.kind", f"cnn needs image data (C, H, W), got shape "
                                    f"{image_shape}", ["mlp", "rnn", "transformer"])
        c_in, height, width = image_shape
        c1, c2 = channels
        self.image_shape = tuple(image_shape)
        self.conv1 = nn.Conv2d(c_in, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.positions = (height // 2 // 2) * (width // 2 // 2)
        if self.positions < 1:
            raise InvalidInputError("data", f"images {image_shape} are too small for two pools")
        self.fc = nn.Linear(c2 * self.positions, hidden)
        self.out = nn.Linear(hidden, n_out)
        self.act = parse_activation("relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.reshape(x.shape[0], *self.image_shape)
        z = nn.functional.max_pool2d(torch.relu(self.conv1(z)), 2)
        z = nn.functional.avg_pool2d(torch.relu(self.conv2(z)), 2)
        z = torch.relu(self.fc(z.flatten(1)))
        return self.out(z)

    def balance_layout(self) -> BalanceLayout:
        groups = (UnitGroup("input", self.image_shape[0]),
                  UnitGroup("conv1", self.conv1.out_channels, self.act),
                  UnitGroup("conv2", self.conv2.out_channels, self.act),
                  UnitGroup("fc", self.fc.out_features, self.act),
                  UnitGroup("output", self.out.out_features), UnitGroup("bias", 1))
        conns = (Connection("conv1.weight", "conv1", "input", "conv"),
                 Connection("conv1.bias", "conv1", "bias", "bias"),
                 Connection("conv2.weight", "conv2", "conv1", "conv"),
                 Connection("conv2.bias", "conv2", "bias", "bias"),
                 Connection("fc.weight", "fc", "conv2", "flatten", self.positions),
                 Connection("fc.bias", "fc", "bias", "bias"),
                 Connection("out.weight", "output", "fc"),
                 Connection("out.bias", "output", "bias", "bias"))
        params = {c.key: dict(self.named_parameters())[c.key] for c in conns}
        return BalanceLayout(groups, conns, params)


class EncoderBlock(nn.Module):
    """Post-norm encoder block: x = LN(x + attn(x)); x = LN(x + W2 f(W1 x + b1) + b2)."""

    def __init__(self, d_model: int, heads: int, d_ff: int, activation: str) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff_in = nn.Linear(d_model, d_ff)
        self.ff_out = nn.Linear(d_ff, d_model)
        self.activation = activation

    def ff_act(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "gelu":
            return nn.functional.gelu(x)
        return act_forward(parse_activation(self.activation, "model.ff_activation"), x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attn(x, x, x, need_weights=False)
        x = self.norm1(x + attended)
        return self.norm2(x + self.ff_out(self.ff_act(self.ff_in(x))))


class FFTransformer(nn.Module):
    """A transformer encoder classifier over image rows as tokens. Only the feed-forward
    hidden units are balanced; attention, LayerNorm and embeddings stay fixed."""

    kind = "transformer"

    def __init__(self, steps: int, features: int, n_out: int, d_model: int, heads: int,
                 d_ff: int, blocks: int, ff_activation: str,
                 balance_parts: tuple[str, ...] = ("ff",)) -> None:
        super().__init__()
        if ff_activation != "gelu":
            parse_activation(ff_activation, "model.ff_activation")
        self.steps, self.features = steps, features
        self.ff_activation = ff_activation
        self.balance_parts = tuple(balance_parts)
        self.embed = nn.Linear(features, d_model)
        self.position = nn.Parameter(torch.zeros(steps, d_model))
        self.blocks = nn.ModuleList(EncoderBlock(d_model, heads, d_ff, ff_activation)
                                    for _ in range(blocks))
        self.head = nn.Linear(d_model, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.embed(x.reshape(x.shape[0], self.steps, self.features)) + self.position
        for block in self.blocks:
            z = block(z)
        return self.head(z.mean(dim=1))

    def balance_layout(self) -> BalanceLayout:
        fixed = [part for part in self.balance_parts if part != "ff"]
        if fixed:
            raise NotHomogeneousError(
                "model.balance_parts", f"{fixed[0]!r} cannot be balanced: attention, LayerNorm, "
                "embeddings and GELU are not positively homogeneous; only the feed-forward "
                "hidden units ('ff') can be rescaled", ["ff"])
        if self.ff_activation == "gelu":
            raise NotHomogeneousError(
                "model.ff_activation", "the feed-forward units use GELU, which is not "
                "homogeneous, so this transformer has no balanceable units (use relu, "
                "leaky_relu:A, abs or linear)", ["relu", "leaky_relu:A", "linear", "abs"])
        if "ff" not in self.balance_parts:
            raise InvalidInputError("model.balance_parts", "is empty: no balanceable units",
                                    ["ff"])
        act = parse_activation(self.ff_activation, "model.ff_activation")
        groups: list[UnitGroup] = [UnitGroup("bias", 1)]
        conns: list[Connection] = []
        params: dict[str, nn.Parameter] = {}
        for b, block in enumerate(self.blocks):
            d_model, d_ff = block.ff_in.in_features, block.ff_in.out_features
            groups += [UnitGroup(f"ff{b}_in", d_model), UnitGroup(f"ff{b}", d_ff, act),
                       UnitGroup(f"ff{b}_out", d_model)]
            prefix = f"blocks.{b}"
            conns += [Connection(f"{prefix}.ff_in.weight", f"ff{b}", f"ff{b}_in"),
                      Connection(f"{prefix}.ff_in.bias", f"ff{b}", "bias", "bias"),
                      Connection(f"{prefix}.ff_out.weight", f"ff{b}_out", f"ff{b}")]
            params[f"{prefix}.ff_in.weight"] = block.ff_in.weight
            params[f"{prefix}.ff_in.bias"] = block.ff_in.bias
            params[f"{prefix}.ff_out.weight"] = block.ff_out.weight
        return BalanceLayout(tuple(groups), tuple(conns), params)


def _sequence_shape(data: Dataset) -> tuple[int, int]:
    if len(data.image_shape) == 3:
        c, h, w = data.image_shape
        return h, c * w
    return 1, data.n_features


def build_model(config: ModelConfig, data: Dataset) -> nn.Module:
    """The configured model sized for ``data`` (widths 0 at the ends are filled in)."""
    if config.kind == "mlp":
        widths = list(config.widths)
        if widths[0] == 0:
            widths[0] = data.n_features
        if widths[-1] == 0:
            widths[-1] = data.n_classes
        if widths[0] != data.n_features or widths[-1] != data.n_classes:
            raise InvalidInputError("model.widths", f"{widths} does not fit {data.name}: input "
                                    f"{data.n_features}, {data.n_classes} classes (use 0 at "
                                    "either end to fill in)")
        return MLP(widths, config.activation, config.bias)
    steps, features = _sequence_shape(data)
    if config.kind == "rnn":
        return ReluRNN(steps, features, config.hidden, data.n_classes)
    if config.kind == "cnn":
        return SmallCNN(data.image_shape, config.channels, config.hidden, data.n_classes)
    if config.kind == "transformer":
        return FFTransformer(steps, features, data.n_classes, config.d_model, config.heads,
                             config.d_ff, config.blocks, config.ff_activation,
                             config.balance_parts)
    raise InvalidInputError("model.kind", f"unknown model {config.kind!r}",
                            ["mlp", "rnn", "cnn", "transformer"])
