"""One training run: gradient steps on the device interleaved with balancing and monitors.

The run is deterministic for a given seed on a given device: the seed fixes the model
initialisation, the feedback matrices, the limited-data subset and the mini-batch order.
At a balancing step the optimiser state (momentum, Adam moments) of the rescaled weights is
transformed with them (``balancing.optimizer_state``: transform, the default; keep; reset).
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ..errors import InvalidInputError
from .balancing import AsyncBalancer, BalanceEvent, balance_model, unit_log_imbalance
from .bridge import model_layout
from .config import TrainConfig
from .data import Dataset, load_dataset
from .models import MLP, build_model
from .monitors import (
    alignment_angles,
    bp_quantity,
    drift,
    fa_quantity,
    feedback_cosines,
    law_scale,
    unit_norms,
)
from .rules import FeedbackRule, add_regulariser_grad, make_optimizer, make_rule, regulariser_value
from .weights_only import WeightsOnlyView

DIVERGED_FACTOR = 1e6


class DivergedError(InvalidInputError):
    """Training produced a non-finite loss (the learning rate is too large)."""


def resolve_device(requested: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; ``cuda`` without a GPU is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("device", "cuda was requested but no CUDA device is available",
                                ["auto", "cpu", "cuda"])
    if requested not in ("cpu", "cuda"):
        raise InvalidInputError("device", f"unknown device {requested!r}", ["auto", "cpu", "cuda"])
    return torch.device(requested)


@dataclass
class RunResult:
    summary: dict
    rows: list[dict]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 4096
             ) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over (x, y)."""
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, x.shape[0], batch):
        logits = model(x[start:start + batch])
        target = y[start:start + batch]
        loss += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    model.train(was_training)
    n = max(1, x.shape[0])
    return loss / n, correct / n


def _quantiles(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"median": 0.0, "p90": 0.0, "max": 0.0}
    a = np.abs(values)
    return {"median": float(np.median(a)), "p90": float(np.quantile(a, 0.9)),
            "max": float(a.max())}


class SeedRun:
    """One seed's model, learning rule, balancing and records; the gradient steps are the
    caller's (``train_run`` for one model, ``ensemble.train_ensemble`` for stacked seeds).

    The seed fixes, in this order, the model initialisation (torch's global generator), the
    feedback matrices, the alignment batch and the mini-batch order (``generator``).
    """

    def __init__(self, config: TrainConfig, seed: int, data: Dataset, dev: torch.device
                 ) -> None:
        self.config, self.seed, self.data, self.dev = config, seed, data, dev
        torch.manual_seed(seed)
        self.model = build_model(config.model, data).to(dev)
        bal = config.balancing
        if bal.active:
            model_layout(self.model)  # refuses models without balanceable units
        self.rule = make_rule(self.model, config.trainer, seed)
        self.x_train = torch.from_numpy(data.x_train).to(dev)
        self.y_train = torch.from_numpy(data.y_train).to(dev)
        self.x_test = torch.from_numpy(data.x_test).to(dev)
        self.y_test = torch.from_numpy(data.y_test).to(dev)
        mon = config.monitor
        self.probe = self.x_test[:mon.probe_size]
        self.generator = torch.Generator().manual_seed(int(seed) + 2)
        align_idx = torch.randperm(self.x_train.shape[0], generator=self.generator)
        align_idx = align_idx[:mon.alignment_batch].to(dev)
        self.x_align, self.y_align = self.x_train[align_idx], self.y_train[align_idx]
        self.events: list[tuple[int, BalanceEvent]] = []
        self.target = self.model if bal.include_biases else WeightsOnlyView(self.model)
        # One asynchronous runtime for the whole run (Ray hosts are created once, not per
        # step).
        self.balancer = AsyncBalancer(bal.async_backend, bal.async_shards, seed,
                                      reload_every=bal.async_reload_every,
                                      clock=bal.async_clock) \
            if bal.mode in ("async", "background") else None
        if self.balancer is not None:
            weakref.finalize(self.model, self.balancer.close)
        self.optimizer: torch.optim.Optimizer | None = None
        self.rescale_state: Callable | None = None
        self.step = 0  # gradient steps so far
        self.boundaries = 0  # balancing boundaries so far (the monitor schedule counts them)
        self.rows: list[dict] = []
        self.norms_history: list[dict] = []
        self.n_events = 0  # events up to here are in the last recorded row
        self.epoch_seconds = 0.0

    def attach(self, optimizer: torch.optim.Optimizer,
               rescale_state: Callable | None = None) -> None:
        self.optimizer, self.rescale_state = optimizer, rescale_state

    def checked(self, last_of_epoch: bool) -> bool:
        """Whether the monitors run at the boundary about to happen (the schedule)."""
        mon = self.config.monitor
        return (mon.check_every > 0 and self.boundaries % mon.check_every == 0) or \
            (mon.check_epoch_end and last_of_epoch)

    def balance(self, kind: str, epoch: int, p: float | None = None,
                last_of_epoch: bool = True) -> None:
        bal, mon = self.config.balancing, self.config.monitor
        check = self.checked(last_of_epoch)
        self.boundaries += 1
        self.events.append((epoch, balance_model(
            self.target, bal.p if p is None else p, kind, self.probe if check else None,
            bal.tol, bal.full_method, bal.direction, with_optimum=mon.optimum and check,
            seed=self.seed, async_budget=bal.async_budget, async_shards=bal.async_shards,
            async_backend=bal.async_backend, optimizer=self.optimizer,
            optimizer_state=bal.optimizer_state, balancer=self.balancer, step=self.step,
            rescale_state=self.rescale_state)))

    def start(self) -> None:
        """The balance before training (``at_start``), the laws' reference, row 0."""
        bal = self.config.balancing
        if bal.at_start:
            self.balance("full", 0, bal.start_p or bal.p)
        model, rule = self.model, self.rule
        self.is_mlp = isinstance(model, MLP) and len(model.layers) >= 2
        self.watch_laws = self.config.monitor.conservation and self.is_mlp
        self.bp0 = bp_quantity(model) if self.watch_laws else None
        self.fa0 = fa_quantity(model, rule) if self.watch_laws and \
            isinstance(rule, FeedbackRule) else None
        self.scale0 = law_scale(model) if self.watch_laws else 1.0
        self.record(0, float("nan"), float("nan"), 0.0)

    def end_epoch(self, epoch: int, loss_sum: float, correct: int, seen: int,
                  seconds: float, progress: Callable[[str], None] | None = None) -> None:
        """The divergence check, then a row when the evaluation schedule asks for one."""
        if not math.isfinite(loss_sum):
            raise DivergedError("optimizer.lr", f"training diverged in epoch {epoch} "
                                "(non-finite loss); lower the learning rate")
        # A finite loss can have diverged too (4e27 after a few DFA epochs at a large rate):
        # an epoch's mean loss a million times the untrained model's counts as diverged.
        start = self.rows[0]["test_loss"] if self.rows else float("nan")
        mean = loss_sum / max(seen, 1)
        if math.isfinite(start) and mean > DIVERGED_FACTOR * max(start, 1.0):
            raise DivergedError("optimizer.lr", f"training diverged in epoch {epoch} (mean "
                                f"loss {mean:.3g}, {mean / max(start, 1.0):.3g} times the "
                                "untrained model's); lower the learning rate")
        self.epoch_seconds += seconds
        config = self.config
        if epoch % config.monitor.eval_every and epoch != config.epochs:
            return
        self.record(epoch, loss_sum / max(seen, 1), correct / max(seen, 1), self.epoch_seconds)
        self.epoch_seconds = 0.0
        if progress is not None:
            progress(f"epoch {epoch}/{config.epochs} loss {self.rows[-1]['train_loss']:.4f} "
                     f"test acc {100 * self.rows[-1]['test_accuracy']:.2f}%")

    def record(self, epoch: int, train_loss: float, train_acc: float, seconds: float) -> None:
        step_events = [e for _, e in self.events[self.n_events:]]
        self.n_events = len(self.events)
        model, rule, mon = self.model, self.rule, self.config.monitor
        test_loss, test_acc = evaluate(model, self.x_test, self.y_test)
        row: dict = {"epoch": epoch, "step": self.step, "train_loss": train_loss,
                     "train_accuracy": train_acc,
                     "test_loss": test_loss, "test_accuracy": test_acc, "seconds": seconds,
                     "regulariser": regulariser_value(model, self.config.regulariser)}
        row["n_balance"] = len(step_events)
        row["balance_seconds"] = sum(e.seconds for e in step_events)
        row["monitor_seconds"] = sum(e.monitor_seconds for e in step_events)
        if step_events:
            last = step_events[-1]
            checked = [e for e in step_events if e.checked]
            row["n_checked"] = len(checked)
            if checked:
                row["function_rel_error"] = max(e.function_rel_error for e in checked)
                row["function_rel_error_float32"] = max(e.function_rel_error_float32
                                                        for e in checked)
                # the last checked boundary of the span (the schedule's epoch-end check)
                row["distance_to_optimum"] = checked[-1].distance_to_optimum
                row["cost_optimum"] = checked[-1].cost_optimum
            if last.staleness_steps is not None:
                row["staleness_steps"] = max(e.staleness_steps or 0 for e in step_events)
            row["cost_before"] = last.cost_before
            row["cost_after"] = last.cost_after
            row["balance_imbalance_before"] = last.max_log_imbalance_before
            row["balance_imbalance_after"] = last.max_log_imbalance_after
        try:
            q = _quantiles(unit_log_imbalance(self.target, self.config.balancing.p))
            row.update({f"imbalance_{k}": v for k, v in q.items()})
        except InvalidInputError:
            pass
        if self.watch_laws:
            bp_now = bp_quantity(model)
            row["bp_law_drift"] = drift(bp_now, self.bp0, self.scale0)
            # root mean square of ||in||^2 - ||out||^2: decays like exp(-4 lr lambda t)
            # under an L2 regulariser lambda (the decay_fit claim)
            row["bp_law_rms"] = float(np.sqrt(np.mean(bp_now ** 2))) if bp_now.size else 0.0
            if self.fa0 is not None:
                row["fa_law_drift"] = drift(fa_quantity(model, rule), self.fa0, self.scale0)
        if mon.alignment and isinstance(rule, FeedbackRule):
            angles = alignment_angles(model, rule, self.x_align, self.y_align)
            row["alignment_deg_mean"] = float(np.nanmean(angles)) if angles else float("nan")
            row["alignment_deg"] = angles
            row["feedback_cosine"] = feedback_cosines(model, rule)
        if mon.unit_norms and self.is_mlp:
            ins, outs = unit_norms(model)
            self.norms_history.append({"epoch": epoch, "in": ins.tolist(),
                                       "out": outs.tolist()})
        self.rows.append(row)

    def result(self, seconds: float) -> RunResult:
        """The summary and the rows; closes the asynchronous runtime."""
        config, bal, data, model = self.config, self.config.balancing, self.data, self.model
        rows, events = self.rows, self.events
        final = rows[-1]
        checked = [e for _, e in events if e.checked]
        summary = {
            "name": config.name, "label": config.label, "seed": self.seed,
            "device": str(self.dev), "trainer": config.trainer.rule, "model": config.model.kind,
            "architecture": list(getattr(model, "widths", ())) or None,
            "dataset": data.name, "evaluated_on": "validation"
            if config.data.validation_fraction or config.data.validation_folds else "test",
            "n_train": int(data.x_train.shape[0]),
            "n_test": int(data.x_test.shape[0]), "epochs": config.epochs,
            "balancing": asdict(bal), "regulariser": asdict(config.regulariser),
            "optimizer": asdict(config.optimizer),
            "test_accuracy": final["test_accuracy"],
            "best_test_accuracy": max(r["test_accuracy"] for r in rows),
            "train_accuracy": final["train_accuracy"], "test_loss": final["test_loss"],
            "n_balance_events": len(events), "n_checked_events": len(checked),
            "max_function_rel_error_at_balance": max(
                (e.function_rel_error for e in checked), default=None),
            "max_function_rel_error_float32": max(
                (e.function_rel_error_float32 for e in checked), default=None),
            "balance_seconds": sum(e.seconds for _, e in events),
            "monitor_seconds": sum(e.monitor_seconds for _, e in events),
            "seconds": seconds,
            "torch_version": torch.__version__,
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        if events:
            summary["last_balance"] = events[-1][1].to_dict()
        if checked:
            summary["max_distance_to_optimum"] = max(e.distance_to_optimum for e in checked)
        if self.watch_laws:
            summary["bp_law_drift"] = final.get("bp_law_drift")
            summary["fa_law_drift"] = final.get("fa_law_drift")
        if "alignment_deg" in final:
            summary["alignment_deg"] = final["alignment_deg"]
        try:
            summary["final_unit_log_imbalance"] = unit_log_imbalance(self.target,
                                                                     bal.p).tolist()
            summary["imbalance_p"] = bal.p
        except InvalidInputError:
            summary["final_unit_log_imbalance"] = None
        if self.norms_history:
            summary["unit_norms"] = self.norms_history
        if self.balancer is not None:
            summary["async_runtimes_created"] = self.balancer.runtimes_created
            summary["async_runtime_start_seconds"] = self.balancer.runtime_start_seconds
            self.balancer.close()
        summary["config"] = asdict(config)
        return RunResult(summary, rows)


def last_of_epoch(step: int, every: int, epoch_end_step: int) -> bool:
    """Whether a step-unit boundary at ``step`` is the last one before the epoch ends."""
    return step + every > epoch_end_step


def train_run(config: TrainConfig, seed: int, device: str | None = None,
              data: Dataset | None = None, data_dir: str | None = None,
              progress: Callable[[str], None] | None = None) -> RunResult:
    """Train one seed of ``config``; returns the summary and one row per epoch (0 = start)."""
    dev = resolve_device(device or config.device)
    started = time.perf_counter()
    data = data if data is not None else load_dataset(config.data, seed, data_dir)
    run = SeedRun(config, seed, data, dev)
    model, rule = run.model, run.rule
    optimizer = make_optimizer(list(model.parameters()), config.optimizer.name,
                               config.optimizer.lr, config.optimizer.momentum)
    run.attach(optimizer)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1,
                                                gamma=config.optimizer.lr_decay)
    bal = config.balancing
    run.start()
    x_train, y_train = run.x_train, run.y_train
    n = x_train.shape[0]
    batch = config.data.batch_size
    steps_per_epoch = -(-n // batch)
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=run.generator).to(dev)
        loss_sum, correct, seen = 0.0, 0, 0
        model.train()
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            xb, yb = x_train[idx], y_train[idx]
            loss, logits = rule.compute(xb, yb)
            add_regulariser_grad(model, config.regulariser)
            optimizer.step()
            run.step += 1
            loss_sum += float(loss) * idx.shape[0]
            correct += int((logits.argmax(dim=1) == yb).sum())
            seen += idx.shape[0]
            if bal.mode != "none" and bal.unit == "step" and run.step % bal.every == 0:
                run.balance(bal.mode, epoch, last_of_epoch=last_of_epoch(
                    run.step, bal.every, epoch * steps_per_epoch))
        if not math.isfinite(loss_sum):
            run.end_epoch(epoch, loss_sum, correct, seen, 0.0)  # raises DivergedError
        if bal.mode != "none" and bal.unit == "epoch" and epoch % bal.every == 0:
            run.balance(bal.mode, epoch)
        scheduler.step()
        run.end_epoch(epoch, loss_sum, correct, seen, time.perf_counter() - t0, progress)
    return run.result(time.perf_counter() - started)
