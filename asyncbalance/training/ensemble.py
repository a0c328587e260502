"""Several seeds of one MLP configuration trained as one ensemble of stacked weights.

Each member is the ``SeedRun`` a separate ``train_run`` of its seed would build: the same
initialisation, feedback matrices, data subset, alignment batch and mini-batch order. Its
parameters are then re-pointed at slices of stacked tensors (``(seeds, out, in)``), so that
one batched product (``torch.baddbmm``) does the gradient step of every member at once,
while balancing, monitors, evaluation and records act on each member's own modules exactly
as in a separate run. The optimiser holds the stacked tensors; SGD and Adam are elementwise,
so each member's slice follows its own update (every member steps together, so Adam's step
count is every member's). A balancing step's optimiser-state transform acts on the member's
slice only.

The gradient step is written out (no autograd): backprop, DFA and FA deltas are those of
``rules.py`` (the same output error, the same ``f'`` convention), batched over members. The
products are summed in another order than a separate run's, so an ensemble member matches
its separate run to float32 rounding, not bit for bit.

``ensemble_fallback_reason`` says when a configuration cannot be batched (then the caller
runs the seeds one by one).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..optim_state import transform_optimizer_state_
from .config import TrainConfig
from .data import Dataset
from .loop import DivergedError, RunResult, SeedRun, last_of_epoch, resolve_device
from .models import MLP, BalanceLayout, act_derivative, act_forward
from .rescaling import parameter_scale_factors
from .rules import FeedbackRule, make_optimizer


def ensemble_fallback_reason(config: TrainConfig) -> str | None:
    """None when the seeds of ``config`` can train as one ensemble, else why not."""
    if config.model.kind != "mlp":
        return f"model.kind {config.model.kind!r} (ensembles stack MLPs only)"
    bal = config.balancing
    if bal.mode == "background":
        return "balancing.mode 'background' (one runtime per member would run concurrently)"
    if bal.mode == "async" and bal.async_backend != "sim":
        return f"balancing.async_backend {bal.async_backend!r} (hosts per member)"
    return None


class StackedMLP:
    """The members' Linear weights and biases stacked along a leading seed axis; every
    member's parameters become views of its slice (updates to either are shared)."""

    def __init__(self, members: Sequence[MLP]) -> None:
        first = members[0]
        if any(m.widths != first.widths for m in members):
            raise ValueError("ensemble members need the same widths")
        self.act = first.act
        self.weights: list[torch.nn.Parameter] = []
        self.biases: list[torch.nn.Parameter | None] = []
        # (stacked tensor, member index) behind every member parameter, by identity
        self.slot: dict[int, tuple[torch.nn.Parameter, int]] = {}
        for i in range(len(first.layers)):
            w = torch.nn.Parameter(torch.stack([m.layers[i].weight.detach() for m in members]))
            self.weights.append(w)
            has_bias = first.layers[i].bias is not None
            b = torch.nn.Parameter(torch.stack([m.layers[i].bias.detach() for m in members])) \
                if has_bias else None
            self.biases.append(b)
            for s, m in enumerate(members):
                layer = m.layers[i]
                layer.weight.data = w.data[s]
                self.slot[id(layer.weight)] = (w, s)
                if b is not None:
                    layer.bias.data = b.data[s]
                    self.slot[id(layer.bias)] = (b, s)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for pair in zip(self.weights, self.biases, strict=True) for p in pair
                if p is not None]

    def forward_cache(self, x: torch.Tensor
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """As ``MLP.forward_cache``, batched: x is (members, batch, features)."""
        h = x
        pre: list[torch.Tensor] = []
        inputs: list[torch.Tensor] = []
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            inputs.append(h)
            wt = w.detach().transpose(1, 2)
            a = torch.bmm(h, wt) if b is None else torch.baddbmm(b.detach()[:, None, :], h, wt)
            if i < last:
                pre.append(a)
                h = act_forward(self.act, a)
            else:
                h = a
        return pre, inputs, h


def batched_output_error(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per member d(mean cross-entropy)/d(logits) = (softmax - onehot) / batch."""
    probs = torch.softmax(logits, dim=2)
    probs.scatter_add_(2, targets[..., None], torch.full_like(probs[..., :1], -1.0))
    return probs / targets.shape[1]


@torch.no_grad()
def ensemble_step(stack: StackedMLP, rule: str, feedback: list[torch.Tensor],
                  x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Set ``.grad`` of every stacked parameter (data term) for the rule; returns each
    member's mean cross-entropy and its number of correct predictions."""
    pre, inputs, logits = stack.forward_cache(x)
    error = batched_output_error(logits, y)
    act = stack.act
    if rule == "dfa":
        hidden = [torch.bmm(error, b.transpose(1, 2)) * act_derivative(act, a)
                  for a, b in zip(pre, feedback, strict=True)]
        deltas = [*hidden, error]
    else:
        # backprop through W_{l+1}, FA through its fixed stand-in B_{l+1} (same shape)
        backward = [w.detach() for w in stack.weights[1:]] if rule == "backprop" else feedback
        deltas = [error]
        for a, b in zip(reversed(pre), reversed(backward), strict=True):
            deltas.append(torch.bmm(deltas[-1], b) * act_derivative(act, a))
        deltas.reverse()
    for w, b, delta, h in zip(stack.weights, stack.biases, deltas, inputs, strict=True):
        # a contiguous delta^T: MKL's batched product is ~1.5x slower on a transposed operand
        w.grad = torch.bmm(delta.transpose(1, 2).contiguous(), h)
        if b is not None:
            b.grad = delta.sum(dim=1)
    log_probs = torch.log_softmax(logits, dim=2)
    loss = -log_probs.gather(2, y[..., None]).squeeze(2).mean(dim=1)
    correct = (logits.argmax(dim=2) == y).sum(dim=1)
    return loss, correct


@torch.no_grad()
def add_stacked_regulariser_grad(stack: StackedMLP, config: TrainConfig) -> None:
    """``rules.add_regulariser_grad`` on the stacked tensors (weights always, biases when
    ``include_biases``)."""
    reg = config.regulariser
    if reg.kind == "none" or reg.strength == 0:
        return
    params = list(stack.weights) + ([b for b in stack.biases if b is not None]
                                    if reg.include_biases else [])
    for p in params:
        extra = torch.sign(p) if reg.kind == "l1" else 2.0 * p
        p.grad.add_(extra, alpha=reg.strength)


def member_state_rescaler(optimizer: torch.optim.Optimizer, stack: StackedMLP, mode: str
                          ) -> Callable[[BalanceLayout, np.ndarray], None]:
    """The optimiser-state transform of one member's balancing step, on its slices."""

    def rescale(layout: BalanceLayout, log_scales: np.ndarray) -> None:
        if mode == "keep":
            return
        full: dict[torch.nn.Parameter, torch.Tensor] = {}
        for param, factor in parameter_scale_factors(layout, log_scales).items():
            stacked, s = stack.slot[id(param)]
            ones = torch.ones_like(stacked.detach())
            ones[s] = factor
            full[stacked] = ones
        # "reset" forgets the stacked state: every member balances at the same boundary,
        # so each forgets its own at the same step as its separate run would.
        transform_optimizer_state_(optimizer, full, mode)

    return rescale


def _stack_data(runs: Sequence[SeedRun]) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The training inputs and labels: shared when every member has the same data set
    (one copy, indexed per member), else stacked (members, n, ...)."""
    first = runs[0]
    if all(r.data is first.data for r in runs):
        return first.x_train, first.y_train, True
    return (torch.stack([r.x_train for r in runs]), torch.stack([r.y_train for r in runs]),
            False)


def train_ensemble(config: TrainConfig, seeds: Sequence[int], datas: Sequence[Dataset],
                   device: str | None = None,
                   progress: Callable[[int, str], None] | None = None
                   ) -> list[RunResult | DivergedError]:
    """Train every seed of ``seeds`` (with its data set ``datas[i]``) as one ensemble.

    Returns, per seed in order, the ``RunResult`` its separate ``train_run`` would return
    (to float32 rounding) or the ``DivergedError`` it would raise. A member's ``seconds``
    (rows and summary) is its share of the ensemble's time: the time divided by the number
    of members; ``ensemble_size`` and ``ensemble_seconds`` give the whole.
    """
    reason = ensemble_fallback_reason(config)
    if reason is not None:
        raise ValueError(f"this configuration cannot train as an ensemble: {reason}")
    if len(seeds) != len(datas) or not seeds:
        raise ValueError("one data set per seed, at least one seed")
    dev = resolve_device(device or config.device)
    started = time.perf_counter()
    runs = [SeedRun(config, seed, data, dev) for seed, data in zip(seeds, datas, strict=True)]
    sizes = {(r.x_train.shape, r.x_test.shape) for r in runs}
    if len(sizes) != 1:
        raise ValueError(f"ensemble members need data sets of one shape, got {sorted(sizes)}")
    members: list[MLP] = [r.model for r in runs]  # type: ignore[misc]
    stack = StackedMLP(members)
    opt_config = config.optimizer
    optimizer = make_optimizer(stack.parameters(), opt_config.name, opt_config.lr,
                               opt_config.momentum)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1,
                                                gamma=opt_config.lr_decay)
    rescale = member_state_rescaler(optimizer, stack, config.balancing.optimizer_state)
    for run in runs:
        run.attach(optimizer, rescale)
    rule_name = config.trainer.rule
    feedback: list[torch.Tensor] = []
    if rule_name in ("dfa", "fa"):
        rules: list[FeedbackRule] = [r.rule for r in runs]  # type: ignore[misc]
        feedback = [torch.stack(mats) for mats in zip(*(r.feedback for r in rules),
                                                      strict=True)]
    bal = config.balancing
    alive = list(range(len(runs)))
    failed: dict[int, DivergedError] = {}
    for run in runs:
        run.start()
    x_train, y_train, shared = _stack_data(runs)
    n = runs[0].x_train.shape[0]
    batch = config.data.batch_size
    steps_per_epoch = -(-n // batch)
    rows_of = torch.arange(len(runs), device=dev)[:, None]
    step = 0
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        # each member's order from its own generator, as in its separate run
        order = torch.stack([torch.randperm(n, generator=r.generator) for r in runs]).to(dev)
        loss_sums = torch.zeros(len(runs), dtype=torch.float64, device=dev)
        corrects = torch.zeros(len(runs), dtype=torch.int64, device=dev)
        for start in range(0, n, batch):
            idx = order[:, start:start + batch]
            xb = x_train[idx] if shared else x_train[rows_of, idx]
            yb = y_train[idx] if shared else y_train[rows_of, idx]
            loss, correct = ensemble_step(stack, rule_name, feedback, xb, yb)
            add_stacked_regulariser_grad(stack, config)
            optimizer.step()
            step += 1
            loss_sums += loss.double() * idx.shape[1]
            corrects += correct
            for i in alive:
                runs[i].step = step
            if bal.mode != "none" and bal.unit == "step" and step % bal.every == 0:
                last = last_of_epoch(step, bal.every, epoch * steps_per_epoch)
                for i in alive:
                    runs[i].balance(bal.mode, epoch, last_of_epoch=last)
        losses, rights = loss_sums.tolist(), corrects.tolist()
        for i in list(alive):
            if not np.isfinite(losses[i]):
                try:
                    runs[i].end_epoch(epoch, losses[i], 0, n, 0.0)
                except DivergedError as exc:
                    failed[i] = exc
                # its slices train on (independently of the others) and are never read
                alive.remove(i)
        if bal.mode != "none" and bal.unit == "epoch" and epoch % bal.every == 0:
            for i in alive:
                runs[i].balance(bal.mode, epoch)
        scheduler.step()
        share = (time.perf_counter() - t0) / len(runs)
        for i in list(alive):
            try:
                runs[i].end_epoch(epoch, losses[i], int(rights[i]), n, share,
                                  None if progress is None else
                                  (lambda text, i=i: progress(seeds[i], text)))
            except DivergedError as exc:
                # A finite loss far above the untrained model's: the member diverged, as its
                # separate run would have; the others go on.
                failed[i] = exc
                alive.remove(i)
        if not alive:
            break
    total = time.perf_counter() - started
    out: list[RunResult | DivergedError] = []
    for i, run in enumerate(runs):
        if i in failed:
            if run.balancer is not None:
                run.balancer.close()
            out.append(failed[i])
            continue
        result = run.result(total / len(runs))
        result.summary["ensemble_size"] = len(runs)
        result.summary["ensemble_seconds"] = total
        out.append(result)
    return out
