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


def train_run(config: TrainConfig, seed: int, device: str | None = None,
              data: Dataset | None = None, data_dir: str | None = None,
              progress: Callable[[str], None] | None = None) -> RunResult:
    """Train one seed of ``config``; returns the summary and one row per epoch (0 = start)."""
    dev = resolve_device(device or config.device)
    started = time.perf_counter()
    torch.manual_seed(seed)
    data = data if data is not None else load_dataset(config.data, seed, data_dir)
    model = build_model(config.model, data).to(dev)
    bal = config.balancing
    if bal.active:
        model_layout(model)  # refuses models without balanceable units, naming the field
    rule = make_rule(model, config.trainer, seed)
    optimizer = make_optimizer(list(model.parameters()), config.optimizer.name,
                               config.optimizer.lr, config.optimizer.momentum)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1,
                                                gamma=config.optimizer.lr_decay)
    x_train = torch.from_numpy(data.x_train).to(dev)
    y_train = torch.from_numpy(data.y_train).to(dev)
    x_test = torch.from_numpy(data.x_test).to(dev)
    y_test = torch.from_numpy(data.y_test).to(dev)
    probe = x_test[:config.monitor.probe_size]
    mon = config.monitor
    generator = torch.Generator().manual_seed(int(seed) + 2)
    align_idx = torch.randperm(x_train.shape[0], generator=generator)[:mon.alignment_batch]
    x_align, y_align = x_train[align_idx.to(dev)], y_train[align_idx.to(dev)]
    events: list[tuple[int, BalanceEvent]] = []

    target = model if bal.include_biases else WeightsOnlyView(model)
    # One asynchronous runtime for the whole run (Ray hosts are created once, not per step).
    balancer = AsyncBalancer(bal.async_backend, bal.async_shards, seed,
                             reload_every=bal.async_reload_every) \
        if bal.mode in ("async", "background") else None
    if balancer is not None:
        weakref.finalize(model, balancer.close)
    step = 0  # gradient steps so far

    def balance(kind: str, epoch: int, p: float = bal.p) -> None:
        events.append((epoch, balance_model(
            target, p, kind, probe, bal.tol, bal.full_method, bal.direction,
            with_optimum=mon.optimum, seed=seed, async_budget=bal.async_budget,
            async_shards=bal.async_shards, async_backend=bal.async_backend,
            optimizer=optimizer, optimizer_state=bal.optimizer_state, balancer=balancer,
            step=step)))

    if bal.at_start:
        balance("full", 0, bal.start_p or bal.p)
    is_mlp = isinstance(model, MLP) and len(model.layers) >= 2
    watch_laws = mon.conservation and is_mlp
    bp0 = bp_quantity(model) if watch_laws else None
    fa0 = fa_quantity(model, rule) if watch_laws and isinstance(rule, FeedbackRule) else None
    scale0 = law_scale(model) if watch_laws else 1.0
    imbalance_p = bal.p
    rows: list[dict] = []
    norms_history: list[dict] = []

    def record(epoch: int, train_loss: float, train_acc: float, seconds: float,
               step_events: list[BalanceEvent]) -> None:
        test_loss, test_acc = evaluate(model, x_test, y_test)
        row: dict = {"epoch": epoch, "step": step, "train_loss": train_loss,
                     "train_accuracy": train_acc,
                     "test_loss": test_loss, "test_accuracy": test_acc, "seconds": seconds,
                     "regulariser": regulariser_value(model, config.regulariser)}
        row["n_balance"] = len(step_events)
        row["balance_seconds"] = sum(e.seconds for e in step_events)
        if step_events:
            last = step_events[-1]
            row["function_rel_error"] = max(e.function_rel_error for e in step_events)
            row["function_rel_error_float32"] = max(e.function_rel_error_float32
                                                    for e in step_events)
            row["distance_to_optimum"] = last.distance_to_optimum
            if last.staleness_steps is not None:
                row["staleness_steps"] = max(e.staleness_steps or 0 for e in step_events)
            row["cost_before"] = last.cost_before
            row["cost_after"] = last.cost_after
            row["cost_optimum"] = last.cost_optimum
            row["balance_imbalance_before"] = last.max_log_imbalance_before
            row["balance_imbalance_after"] = last.max_log_imbalance_after
        try:
            q = _quantiles(unit_log_imbalance(target, imbalance_p))
            row.update({f"imbalance_{k}": v for k, v in q.items()})
        except InvalidInputError:
            pass
        if watch_laws:
            bp_now = bp_quantity(model)
            row["bp_law_drift"] = drift(bp_now, bp0, scale0)
            # root mean square of ||in||^2 - ||out||^2: decays like exp(-4 lr lambda t)
            # under an L2 regulariser lambda (the decay_fit claim)
            row["bp_law_rms"] = float(np.sqrt(np.mean(bp_now ** 2))) if bp_now.size else 0.0
            if fa0 is not None:
                row["fa_law_drift"] = drift(fa_quantity(model, rule), fa0, scale0)
        if mon.alignment and isinstance(rule, FeedbackRule):
            angles = alignment_angles(model, rule, x_align, y_align)
            row["alignment_deg_mean"] = float(np.nanmean(angles)) if angles else float("nan")
            row["alignment_deg"] = angles
            row["feedback_cosine"] = feedback_cosines(model, rule)
        if mon.unit_norms and is_mlp:
            ins, outs = unit_norms(model)
            norms_history.append({"epoch": epoch, "in": ins.tolist(), "out": outs.tolist()})
        rows.append(row)

    record(0, float("nan"), float("nan"), 0.0, [e for _, e in events])
    n_events = len(events)  # events up to here are in the last recorded row
    epoch_seconds = 0.0
    n = x_train.shape[0]
    batch = config.data.batch_size
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=generator).to(dev)
        loss_sum, correct, seen = 0.0, 0, 0
        model.train()
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            xb, yb = x_train[idx], y_train[idx]
            loss, logits = rule.compute(xb, yb)
            add_regulariser_grad(model, config.regulariser)
            optimizer.step()
            step += 1
            loss_sum += float(loss) * idx.shape[0]
            correct += int((logits.argmax(dim=1) == yb).sum())
            seen += idx.shape[0]
            if bal.mode != "none" and bal.unit == "step" and step % bal.every == 0:
                balance(bal.mode, epoch)
        if not math.isfinite(loss_sum):
            raise DivergedError("optimizer.lr", f"training diverged in epoch {epoch} "
                                    "(non-finite loss); lower the learning rate")
        if bal.mode != "none" and bal.unit == "epoch" and epoch % bal.every == 0:
            balance(bal.mode, epoch)
        scheduler.step()
        epoch_seconds += time.perf_counter() - t0
        if epoch % mon.eval_every and epoch != config.epochs:
            continue
        record(epoch, loss_sum / max(seen, 1), correct / max(seen, 1), epoch_seconds,
               [e for _, e in events[n_events:]])
        n_events, epoch_seconds = len(events), 0.0
        if progress is not None:
            progress(f"epoch {epoch}/{config.epochs} loss {rows[-1]['train_loss']:.4f} "
                     f"test acc {100 * rows[-1]['test_accuracy']:.2f}%")
    final = rows[-1]
    errors64 = [e.function_rel_error for _, e in events]
    summary = {
        "name": config.name, "label": config.label, "seed": seed, "device": str(dev),
        "trainer": config.trainer.rule, "model": config.model.kind,
        "architecture": list(getattr(model, "widths", ())) or None,
        "dataset": data.name, "evaluated_on": "validation" if config.data.validation_fraction
        else "test", "n_train": int(data.x_train.shape[0]),
        "n_test": int(data.x_test.shape[0]), "epochs": config.epochs,
        "balancing": asdict(bal), "regulariser": asdict(config.regulariser),
        "optimizer": asdict(config.optimizer),
        "test_accuracy": final["test_accuracy"],
        "best_test_accuracy": max(r["test_accuracy"] for r in rows),
        "train_accuracy": final["train_accuracy"], "test_loss": final["test_loss"],
        "n_balance_events": len(events),
        "max_function_rel_error_at_balance": max(errors64) if errors64 else None,
        "max_function_rel_error_float32": max((e.function_rel_error_float32
                                               for _, e in events), default=None),
        "balance_seconds": sum(e.seconds for _, e in events),
        "seconds": time.perf_counter() - started,
        "torch_version": torch.__version__, "parameters": sum(p.numel()
                                                             for p in model.parameters()),
    }
    if events:
        summary["last_balance"] = events[-1][1].to_dict()
        summary["max_distance_to_optimum"] = max(e.distance_to_optimum for _, e in events)
    if watch_laws:
        summary["bp_law_drift"] = final.get("bp_law_drift")
        summary["fa_law_drift"] = final.get("fa_law_drift")
    if "alignment_deg" in final:
        summary["alignment_deg"] = final["alignment_deg"]
    try:
        summary["final_unit_log_imbalance"] = unit_log_imbalance(target, imbalance_p).tolist()
        summary["imbalance_p"] = imbalance_p
    except InvalidInputError:
        summary["final_unit_log_imbalance"] = None
    if norms_history:
        summary["unit_norms"] = norms_history
    if balancer is not None:
        summary["async_runtimes_created"] = balancer.runtimes_created
        summary["async_runtime_start_seconds"] = balancer.runtime_start_seconds
        balancer.close()
    summary["config"] = asdict(config)
    return RunResult(summary, rows)
