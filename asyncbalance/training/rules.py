"""Learning rules that fill ``param.grad``: backprop, DFA and feedback alignment (FA).

DFA (Noekland 2016): hidden deltas ``delta_l = (e B_l^T) * f'(a_l)`` with a fixed random
``B_l`` of shape (hidden_l, n_out) and ``e = dLoss/dy`` the output error; the output layer
uses its true gradient. FA (Lillicrap et al. 2016): ``delta_l = (delta_{l+1} B_{l+1}) *
f'(a_l)`` with a fixed random ``B_{l+1}`` shaped like ``W_{l+1}``. Both rules are defined for
MLPs; weight gradients are ``delta_l^T h_{l-1}`` and bias gradients ``sum delta_l`` as in
backprop. Feedback entries are uniform in [-s, s], ``s = feedback_scale / sqrt(fan)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import InvalidInputError
from .config import RegulariserConfig, TrainerConfig
from .models import MLP, act_derivative


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

    def __init__(self, model: nn.Module, name: str, seed: int, scale: float = 1.0) -> None:
        super().__init__(model)
        if not isinstance(model, MLP):
            raise InvalidInputError("trainer.rule", f"{name} is defined for MLPs; model "
                                    f"{getattr(model, 'kind', type(model).__name__)!r} trains "
                                    "with backprop only", ["backprop"])
        if len(model.layers) < 2:
            raise InvalidInputError("model.widths", f"{name} needs at least one hidden layer")
        self.name = name
        device = model.layers[0].weight.device
        generator = torch.Generator().manual_seed(int(seed) + 1_000_003)
        n_out = model.widths[-1]
        self.feedback: list[torch.Tensor] = []
        if name == "dfa":
            shapes = [(w, n_out) for w in model.widths[1:-1]]
            fans = [n_out] * len(shapes)
        else:
            shapes = [tuple(layer.weight.shape) for layer in model.layers[1:]]
            fans = [s[1] for s in shapes]
        for shape, fan in zip(shapes, fans, strict=True):
            bound = scale / math.sqrt(fan)
            b = (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound
            self.feedback.append(b.to(device=device, dtype=model.layers[0].weight.dtype))

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


def make_rule(model: nn.Module, config: TrainerConfig, seed: int) -> Rule:
    if config.rule == "backprop":
        return Backprop(model)
    if config.rule in ("dfa", "fa"):
        return FeedbackRule(model, config.rule, seed, config.feedback_scale)
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
