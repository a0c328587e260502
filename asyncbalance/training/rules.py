"""Learning rules that fill ``param.grad``: backprop, DFA and feedback alignment (FA).

DFA (Noekland 2016): hidden deltas ``delta_l = (e B_l^T) * f'(a_l)`` with a fixed random
``B_l`` of shape (hidden_l, n_out) and ``e = dLoss/dy`` the output error; the output layer
uses its true gradient. FA (Lillicrap et al. 2016): ``delta_l = (delta_{l+1} B_{l+1}) *
f'(a_l)`` with a fixed random ``B_{l+1}`` shaped like ``W_{l+1}``. On MLPs the deltas are
written out by hand; weight gradients are ``delta_l^T h_{l-1}`` and bias gradients
``sum delta_l`` as in backprop. Feedback entries are uniform in [-s, s] (or normal with
std s), ``s = feedback_scale / sqrt(fan)``, drawn per layer or as one shared matrix.

Other models (conv nets, any module whose weighted layers are Linear/Conv modules called
once each) train through autograd with the rule's signal injected (``HookedFeedbackRule``):
DFA replaces the gradient arriving at the input of every weighted layer after the first (the
output of the block below, after its activation and pooling) by ``e B^T`` reshaped to that
input's shape, and autograd carries it back through the activation and pooling to the
weights below; FA replaces the gradient a weighted layer passes to its input by the one its
fixed feedback weights would pass (``B`` shaped like the layer's weight).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import InvalidInputError
from .config import FeedbackConfig, RegulariserConfig, TrainerConfig
from .models import MLP, act_derivative

FEEDBACK_SEED_OFFSET = 1_000_003
WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def draw_feedback(shapes: Sequence[tuple[int, ...]], fans: Sequence[int], scale: float,
                  config: FeedbackConfig, run_seed: int, device: torch.device | str,
                  dtype: torch.dtype) -> list[torch.Tensor]:
    """Fixed random feedback matrices, one per shape, entries scaled by scale / sqrt(fan).

    ``independent``: drawn one after another from one seeded generator; ``shared``: one
    matrix of the elementwise largest shape (same rank required), each layer its leading
    slice. The seed is ``config.seed`` when >= 0, else the run's seed plus a fixed offset.
    """
    seed = config.seed if config.seed >= 0 else int(run_seed) + FEEDBACK_SEED_OFFSET
    generator = torch.Generator().manual_seed(seed)

    def draw(shape: tuple[int, ...]) -> torch.Tensor:
        if config.distribution == "normal":
            return torch.randn(shape, generator=generator, dtype=torch.float64)
        return torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1

    if config.layers == "shared" and shapes:
        if len({len(s) for s in shapes}) != 1:
            raise InvalidInputError("trainer.feedback.layers", "shared feedback needs matrices "
                                    f"of one rank, got shapes {list(shapes)}",
                                    ["independent"])
        big = draw(tuple(max(dims) for dims in zip(*shapes, strict=True)))
        raw = [big[tuple(slice(0, n) for n in shape)] for shape in shapes]
    else:
        raw = [draw(tuple(shape)) for shape in shapes]
    return [(b * (scale / math.sqrt(fan))).to(device=device, dtype=dtype)
            for b, fan in zip(raw, fans, strict=True)]


def output_error(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d(mean cross-entropy)/d(logits) = (softmax - onehot) / batch."""
    probs = torch.softmax(logits, dim=1)
    probs[torch.arange(targets.shape[0], device=targets.device), targets] -= 1.0
    return probs / targets.shape[0]


def dfa_deltas(pre: list[torch.Tensor], error: torch.Tensor, feedback: list[torch.Tensor],
               model: MLP) -> list[torch.Tensor]:
    """Hidden deltas ``(e B_l^T) * f'(a_l)`` for every hidden layer l."""
    return [(error @ b.T) * act_derivative(model.act, a)
            for a, b in zip(pre, feedback, strict=True)]


def fa_deltas(pre: list[torch.Tensor], error: torch.Tensor, feedback: list[torch.Tensor],
              model: MLP) -> list[torch.Tensor]:
    """Hidden deltas ``(delta_{l+1} B_{l+1}) * f'(a_l)``, from the top hidden layer down."""
    deltas: list[torch.Tensor] = [error]
    for a, b in zip(reversed(pre), reversed(feedback), strict=True):
        deltas.append((deltas[-1] @ b) * act_derivative(model.act, a))
    return list(reversed(deltas[1:]))


class Rule:
    """Base: ``compute(x, y)`` sets ``.grad`` of every trainable parameter (data term only)."""

    name = "rule"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def compute(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class Backprop(Rule):
    name = "backprop"

    def compute(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for param in self.model.parameters():
            param.grad = None
        logits = self.model(x)
        loss = nn.functional.cross_entropy(logits, y)
        loss.backward()
        return loss.detach(), logits.detach()


class FeedbackRule(Rule):
    """DFA or FA on an MLP with fixed, seeded random feedback matrices."""

    def __init__(self, model: nn.Module, name: str, seed: int, scale: float = 1.0,
                 feedback: FeedbackConfig | None = None) -> None:
        super().__init__(model)
        if not isinstance(model, MLP):
            raise InvalidInputError("trainer.rule", f"{name} is defined for MLPs here; other "
                                    "models train through HookedFeedbackRule (make_rule picks "
                                    "it)")
        if len(model.layers) < 2:
            raise InvalidInputError("model.widths", f"{name} needs at least one hidden layer")
        self.name = name
        weight = model.layers[0].weight
        n_out = model.widths[-1]
        if name == "dfa":
            shapes = [(w, n_out) for w in model.widths[1:-1]]
            fans = [n_out] * len(shapes)
        else:
            shapes = [tuple(layer.weight.shape) for layer in model.layers[1:]]
            fans = [s[1] for s in shapes]
        self.feedback: list[torch.Tensor] = draw_feedback(
            shapes, fans, scale, feedback or FeedbackConfig(), seed, weight.device, weight.dtype)

    def deltas(self, x: torch.Tensor, y: torch.Tensor
               ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        model: MLP = self.model  # type: ignore[assignment]
        with torch.no_grad():
            pre, inputs, logits = model.forward_cache(x)
            error = output_error(logits, y)
            hidden = (dfa_deltas if self.name == "dfa" else fa_deltas)(
                pre, error, self.feedback, model)
        return [*hidden, error], inputs, logits

    def compute(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        deltas, inputs, logits = self.deltas(x, y)
        for layer, delta, h in zip(self.model.layers, deltas, inputs, strict=True):
            layer.weight.grad = delta.T @ h
            if layer.bias is not None:
                layer.bias.grad = delta.sum(dim=0)
        loss = nn.functional.cross_entropy(logits, y)
        return loss, logits


class _InjectedGradient(torch.autograd.Function):
    """Identity forward; backward returns ``e B^T`` (the DFA signal) shaped like the input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rule: HookedFeedbackRule,  # noqa: ANN001
                feedback: torch.Tensor) -> torch.Tensor:
        ctx.rule, ctx.feedback = rule, feedback
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:  # noqa: ANN001
        signal = ctx.rule.error @ ctx.feedback.T
        return signal.reshape(grad.shape), None, None


_CONV_INPUT_GRAD = {nn.Conv1d: torch.nn.grad.conv1d_input, nn.Conv2d: torch.nn.grad.conv2d_input,
                    nn.Conv3d: torch.nn.grad.conv3d_input}


def feedback_input_grad(layer: nn.Module, feedback: torch.Tensor, input_shape: torch.Size,
                        grad_output: torch.Tensor) -> torch.Tensor:
    """The gradient ``layer`` would pass to its input if its weight were ``feedback``."""
    if isinstance(layer, nn.Linear):
        return grad_output @ feedback
    conv_input = _CONV_INPUT_GRAD[type(layer)]
    return conv_input(input_shape, feedback, grad_output, layer.stride, layer.padding,
                      layer.dilation, layer.groups)


class HookedFeedbackRule(Rule):
    """DFA or FA on any model whose weighted layers are Linear/Conv modules called once each
    per forward pass (conv nets, MLPs with any activation); see the module docstring.

    The feedback matrices are drawn at the first batch, when the layers' input shapes are
    known: DFA ``B_k`` is (input numel of layer k, n_out) for every weighted layer k after
    the first in call order, fan n_out; FA ``B_k`` is shaped like ``W_k``, fan its input
    size per output (in_features, or in_channels / groups x kernel size).
    """

    def __init__(self, model: nn.Module, name: str, seed: int, scale: float = 1.0,
                 feedback: FeedbackConfig | None = None) -> None:
        super().__init__(model)
        self.name, self.seed, self.scale = name, seed, scale
        self.config = feedback or FeedbackConfig()
        self.layers: list[nn.Module] = []
        self.feedback: list[torch.Tensor] = []
        self.error: torch.Tensor | None = None

    def _discover(self, x: torch.Tensor) -> None:
        """Weighted layers in call order and the shapes of their inputs, from one pass."""
        calls: list[tuple[nn.Module, torch.Size]] = []
        hooks = [m.register_forward_pre_hook(
            lambda mod, args: calls.append((mod, args[0].shape)))
            for m in self.model.modules() if isinstance(m, WEIGHTED)]
        try:
            with torch.no_grad():
                logits = self.model(x)
        finally:
            for h in hooks:
                h.remove()
        modules = [m for m, _ in calls]
        if len(set(map(id, modules))) != len(modules):
            raise InvalidInputError("trainer.rule", f"{self.name} needs every weighted layer "
                                    "called once per forward pass (shared layers are not "
                                    "supported)", ["backprop"])
        if len(calls) < 2:
            raise InvalidInputError("trainer.rule", f"{self.name} needs at least two weighted "
                                    "layers (a hidden layer)", ["backprop"])
        self.layers = modules
        n_out = logits.shape[1]
        if self.name == "dfa":
            shapes = [(math.prod(shape[1:]), n_out) for _, shape in calls[1:]]
            fans = [n_out] * len(shapes)
        else:
            shapes = [tuple(m.weight.shape) for m in modules[1:]]
            fans = [m.weight[0].numel() for m in modules[1:]]
        weight = modules[0].weight
        self.feedback = draw_feedback(shapes, fans, self.scale, self.config, self.seed,
                                      weight.device, weight.dtype)

    def _hooks(self) -> list:
        handles = []
        for layer, b in zip(self.layers[1:], self.feedback, strict=True):
            if self.name == "dfa":
                handles.append(layer.register_forward_pre_hook(
                    lambda mod, args, b=b: (_InjectedGradient.apply(args[0], self, b),
                                            *args[1:])))
            else:
                handles.append(layer.register_full_backward_hook(
                    lambda mod, grad_in, grad_out, b=b: (
                        None if grad_in[0] is None else
                        feedback_input_grad(mod, b, grad_in[0].shape, grad_out[0]),)))
        return handles

    def compute(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.layers:
            self._discover(x)
        for param in self.model.parameters():
            param.grad = None
        handles = self._hooks()
        try:
            logits = self.model(x)
            # The DFA signal needs the output error before the backward pass reaches it.
            self.error = output_error(logits.detach(), y)
            loss = nn.functional.cross_entropy(logits, y)
            loss.backward()
        finally:
            for h in handles:
                h.remove()
            self.error = None
        return loss.detach(), logits.detach()


def make_rule(model: nn.Module, config: TrainerConfig, seed: int) -> Rule:
    if config.rule == "backprop":
        return Backprop(model)
    if config.rule in ("dfa", "fa"):
        if isinstance(model, MLP):
            return FeedbackRule(model, config.rule, seed, config.feedback_scale,
                                config.feedback)
        if getattr(model, "kind", "") == "rnn":
            raise InvalidInputError("trainer.rule", f"{config.rule} is not defined for the "
                                    "recurrent model (its layer is applied at every step)",
                                    ["backprop"])
        return HookedFeedbackRule(model, config.rule, seed, config.feedback_scale,
                                  config.feedback)
    raise InvalidInputError("trainer.rule", f"unknown rule {config.rule!r}",
                            ["backprop", "dfa", "fa"])


def regularised_params(model: nn.Module, config: RegulariserConfig) -> list[nn.Parameter]:
    return [p for name, p in model.named_parameters()
            if p.requires_grad and (config.include_biases or p.ndim > 1)
            and not name.endswith("position")]


def regulariser_value(model: nn.Module, config: RegulariserConfig) -> float:
    """``strength * sum |w|^p`` over the regularised parameters (0 when kind is none)."""
    if config.kind == "none" or config.strength == 0:
        return 0.0
    power = 1 if config.kind == "l1" else 2
    with torch.no_grad():
        return config.strength * float(sum(p.abs().pow(power).sum()
                                           for p in regularised_params(model, config)))


@torch.no_grad()
def add_regulariser_grad(model: nn.Module, config: RegulariserConfig) -> None:
    """Add ``strength * d(sum |w|^p)/dw`` (sign(w) for L1, 2w for L2) to every ``.grad``."""
    if config.kind == "none" or config.strength == 0:
        return
    for p in regularised_params(model, config):
        extra = torch.sign(p) if config.kind == "l1" else 2.0 * p
        if p.grad is None:
            p.grad = config.strength * extra
        else:
            p.grad.add_(extra, alpha=config.strength)


def make_optimizer(params: list[nn.Parameter], name: str, lr: float, momentum: float
                   ) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise InvalidInputError("optimizer.name", f"unknown optimiser {name!r}", ["sgd", "adam"])
