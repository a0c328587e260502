"""How long the pending runs of a study budget will take on this kind of machine, from the
seconds per epoch the existing records measured (one thread per run, as the study runs).

A pending job takes the median seconds per epoch of the recorded runs with its exact
model, learning rule, data fraction and batch size; without such records, the median of the
same rule, model kind, fraction and batch size scaled by the ratio of weight counts; without
those, the median over every record scaled the same way. Tuned runs whose record exists are
counted as done (the runner re-runs one only where the new tuning picks another value).
Records trained as an ensemble of seeds are faster per seed, so the estimate is an upper
bound once the runner batches seeds.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .records import iter_records, read_record
from .runner import record_root
from .spec import Study, config_hash, plan


@dataclass(frozen=True)
class ClaimEstimate:
    claim: str
    pending: int
    epochs: int
    hours: float
    basis: str          # "measured", "scaled" or "none"


def _shape(mapping: Mapping[str, Any]) -> tuple:
    model = mapping.get("model", {})
    data = mapping.get("data", {})
    kind = model.get("kind", "mlp")
    size = tuple(model.get("widths", ())) if kind == "mlp" else model.get("hidden")
    return (mapping.get("trainer", {}).get("rule", "backprop"), kind, size,
            float(data.get("fraction", 1.0)), int(data.get("batch_size", 64)))


def _weights(mapping: Mapping[str, Any]) -> float:
    model = mapping.get("model", {})
    if model.get("kind", "mlp") == "mlp":
        widths = [784 if w == 0 and i == 0 else 10 if w == 0 else w
                  for i, w in enumerate(model.get("widths", [0, 256, 0]))]
        return float(sum(a * b for a, b in zip(widths[:-1], widths[1:], strict=True)))
    hidden = float(model.get("hidden", 128))
    return 28 * hidden + hidden * hidden + 10 * hidden


def seconds_per_epoch(records: list[dict]) -> dict[tuple, float]:
    rates: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        seconds = r.get("summary", {}).get("seconds")
        epochs = r.get("config", {}).get("epochs")
        if seconds and epochs and not r.get("diverged") and not r.get("ensemble"):
            rates[_shape(r["config"])].append(float(seconds) / float(epochs))
    return {k: float(np.median(v)) for k, v in rates.items()}


def _rate(mapping: Mapping[str, Any], measured: dict[tuple, float]) -> tuple[float, str]:
    shape = _shape(mapping)
    if shape in measured:
        return measured[shape], "measured"
    weights = _weights(mapping)
    for keep in (lambda k: k[0] == shape[0] and k[1] == shape[1] and k[3:] == shape[3:],
                 lambda k: k[1] == shape[1], lambda k: True):
        near = [(k, v) for k, v in measured.items() if keep(k)]
        if near:
            scaled = []
            for key, value in near:
                ref = {"model": {"kind": key[1], "widths": list(key[2])}} if key[1] == "mlp" \
                    else {"model": {"kind": key[1], "hidden": key[2]}}
                fraction = shape[3] / key[3] if key[3] else 1.0
                scaled.append(value * weights / _weights(ref) * fraction)
            return float(np.median(scaled)), "scaled"
    return math.nan, "none"


def estimate(study: Study, budget: str, records_root: str | Path,
             rates_budget: str | None = None) -> list[ClaimEstimate]:
    """Pending runs per claim and their cpu hours; the seconds per epoch come from the
    records of ``rates_budget`` (default: the budget itself)."""
    root = record_root(records_root, study, budget)
    measured = seconds_per_epoch(iter_records(record_root(records_root, study,
                                                          rates_budget or budget)))
    totals: dict[str, list] = {}
    for job in plan(study, budget):
        entry = totals.setdefault(job.claim, [0, 0, 0.0, set()])
        existing = read_record(root / job.relpath())
        if existing is not None and (job.needs_tune
                                     or existing.get("config_hash") == config_hash(job.mapping)):
            continue
        epochs = int(job.mapping.get("epochs", 0))
        rate, basis = _rate(job.mapping, measured)
        entry[0] += 1
        entry[1] += epochs
        entry[2] += rate * epochs
        entry[3].add(basis)
    out = []
    for claim, (pending, epochs, seconds, bases) in totals.items():
        basis = "measured" if bases <= {"measured"} else \
            ("none" if "none" in bases else "scaled")
        out.append(ClaimEstimate(claim, pending, epochs, seconds / 3600.0, basis))
    return out


def format_estimate(rows: list[ClaimEstimate], cores: int = 2) -> str:
    lines = ["| claim | pending runs | epochs | cpu hours (1 thread per run) | basis |",
             "|---|---|---|---|---|"]
    for row in rows:
        if row.pending:
            lines.append(f"| {row.claim} | {row.pending} | {row.epochs} | {row.hours:.1f} | "
                         f"{row.basis} |")
    total = sum(r.hours for r in rows if math.isfinite(r.hours))
    runs = sum(r.pending for r in rows)
    lines.append(f"| total | {runs} | {sum(r.epochs for r in rows)} | {total:.1f} "
                 f"({total / cores:.1f} h of wall time on {cores} cores) | |")
    return "\n".join(lines)
