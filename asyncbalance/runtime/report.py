"""Plain-text tables of run summaries, for ``asyncbalance run`` and ``asyncbalance show``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

SUMMARY_ROWS = (
    ("name", "scenario"), ("status", "status"), ("backend", "backend"), ("rule", "rule"),
    ("p", "p"),
    ("n_units", "units"), ("n_shards", "shards"), ("seed", "seed"),
    ("converged", "converged"), ("stop_reason", "stopped by"), ("tol", "tolerance"),
    ("max_abs_log_scale_error", "max |u - u*|"), ("relative_cost_gap", "(R - R*) / R*"),
    ("function_max_rel_error", "function max rel. error"),
    ("function_checks", "function checks"), ("time_to_tol", "time to tolerance"),
    ("sim_time", "simulated time"), ("messages_sent", "messages sent"),
    ("messages_delivered", "messages delivered"), ("messages_dropped", "messages dropped"),
    ("messages_duplicated", "messages duplicated"), ("messages_per_unit", "messages per unit"),
    ("unit_updates", "unit updates"), ("unit_updates_per_second", "unit updates / s"),
    ("crashes", "crashes"), ("restarts", "restarts"), ("run_seconds", "run seconds"),
    ("wall_seconds", "wall seconds (total)"),
)


def format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3e}" if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5) \
            else f"{value:.4g}"
    return str(value)


#: Rows whose values are in the run's time unit (``time_unit`` of the summary).
TIME_ROWS = ("time_to_tol", "sim_time")


def summary_table(summary: Mapping[str, Any]) -> str:
    """One row per known key; times carry their unit, and a record whose run did not end
    (``running``, or ``incomplete``: interrupted or failed) says so with its reason."""
    unit = summary.get("time_unit")
    rows = []
    for key, label in SUMMARY_ROWS:
        if key not in summary:
            continue
        value = format_value(summary[key])
        if key in TIME_ROWS and unit and summary[key] is not None:
            value = f"{value} ({unit})"
        if key == "status" and summary[key] == "running":
            value += " (not finished, or its process died: the record stops here)"
        rows.append((label, value))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def grid_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def sweep_table(sweep: Mapping[str, Any]) -> str:
    keys = list(sweep.get("keys", []))
    columns = ("converged", "time_to_tol", "max_abs_log_scale_error", "function_max_rel_error",
               "messages_sent", "messages_dropped", "wall_seconds")
    rows = [[row["point"], *(format_value(row["sweep"].get(k)) for k in keys),
             *(format_value(row.get(c)) for c in columns)] for row in sweep["points"]]
    return grid_table(["point", *keys, *columns], rows)
