"""Run records: summary.json, trace.csv and plots, all written atomically."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from ..io import atomic_write, write_json

SUMMARY_KEYS = (
    "converged", "max_abs_log_scale_error", "relative_cost_gap", "function_max_rel_error",
    "messages_sent", "messages_delivered", "messages_dropped", "wall_seconds", "sim_time",
    "backend", "n_units", "n_shards", "seed",
)


@dataclass(frozen=True)
class Sample:
    """One convergence sample, gathered from the owners' own log-scales."""

    time: float
    wall_seconds: float
    max_abs_error: float
    relative_cost_gap: float
    max_log_imbalance: float
    messages_sent: int
    messages_delivered: int
    messages_dropped: int
    unit_updates: int
    function_rel_error: float | None


#: Header of each time column, with its unit (the time axis unit is the scenario's).
WALL_HEADER = "wall_seconds (s)"


def time_header(time_unit: str) -> str:
    return f"time ({time_unit})"


def write_trace_csv(path: Path, samples: Sequence[Sample],
                    time_unit: str = "scenario time units") -> None:
    """One row per sample; the time columns name their unit in the header."""
    names = list(Sample.__dataclass_fields__)
    headers = {"time": time_header(time_unit), "wall_seconds": WALL_HEADER}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([headers.get(n, n) for n in names])
    for sample in samples:
        row = asdict(sample)
        writer.writerow(["" if row[n] is None else repr(row[n]) for n in names])
    with atomic_write(path, "w") as handle:
        handle.write(buffer.getvalue())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: A pause between two samples longer than this many typical intervals is drawn as a gap.
GAP_FACTOR = 5.0


def break_gaps(times: Sequence[float], values: Sequence[float]
               ) -> tuple[list[float], list[float]]:
    """``times, values`` with a NaN point inside every pause longer than ``GAP_FACTOR``
    median sample intervals (no samples were taken there, e.g. while a lost host was
    being resumed), so that a plotted line breaks instead of bridging it."""
    steps = sorted(b - a for a, b in zip(times[:-1], times[1:], strict=True))
    typical = steps[len(steps) // 2] if steps else 0.0
    out_t: list[float] = []
    out_v: list[float] = []
    for i, (t, v) in enumerate(zip(times, values, strict=True)):
        if i and typical > 0 and t - times[i - 1] > GAP_FACTOR * typical:
            out_t.append((t + times[i - 1]) / 2)
            out_v.append(float("nan"))
        out_t.append(t)
        out_v.append(v)
    return out_t, out_v


def plot_convergence(path: Path, samples: Sequence[Sample], tol: float, time_label: str,
                     title: str) -> None:
    """max |u - u*| and (R - R*)/R* against time, log scale, with the tolerance line; a
    pause in the sampling is left as a gap (``break_gaps``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    times = [s.time for s in samples]
    floor = 1e-17  # exact zeros cannot be drawn on a log axis
    ax.semilogy(*break_gaps(times, [max(s.max_abs_error, floor) for s in samples]),
                label="max |u - u*|")
    ax.semilogy(*break_gaps(times, [max(abs(s.relative_cost_gap), floor) for s in samples]),
                label="|R - R*| / R*", linestyle="--")
    ax.axhline(tol, color="grey", linewidth=0.8, linestyle=":", label=f"tolerance {tol:g}")
    ax.set_xlabel(time_label)
    ax.set_ylabel("error")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png")
    plt.close(fig)


#: Sweep keys that repeat a configuration rather than change it: averaged over in plots.
REPEAT_KEYS = ("seed", "network.seed")


def sweep_series(rows: Sequence[Mapping[str, Any]], x_key: str, series_keys: Sequence[str]
                 ) -> dict[str, list[tuple[float, float, float, float, int]]]:
    """Time to tolerance per line and x: ``(x, mean, min, max, n)`` over the repeat keys
    (seeds) of that point, sorted by x. A point that did not converge counts as NaN, so a
    mean over seeds that are not all converged is NaN (not drawn)."""
    lines = [k for k in series_keys if k not in REPEAT_KEYS]
    grouped: dict[str, dict[float, list[float]]] = {}
    for row in rows:
        label = ", ".join(f"{k}={row['sweep'][k]}" for k in lines) or "time to tolerance"
        value = row["time_to_tol"]
        grouped.setdefault(label, {}).setdefault(float(row["sweep"][x_key]), []).append(
            float("nan") if value is None else float(value))
    return {label: [(x, sum(v) / len(v), min(v), max(v), len(v))
                    for x, v in sorted(by_x.items())] for label, by_x in grouped.items()}


def plot_sweep(path: Path, rows: Sequence[Mapping[str, Any]], x_key: str,
               series_keys: Sequence[str], time_label: str) -> None:
    """Time to tolerance against the swept ``x_key``, one line per value of the other keys;
    swept seeds are averaged: the line is their mean, the band their range."""
    if x_key in REPEAT_KEYS:
        # Seeds on the x axis say nothing; another numeric key goes there if there is one.
        numeric = [k for k in series_keys if k not in REPEAT_KEYS and all(
            isinstance(r["sweep"][k], int | float) and not isinstance(r["sweep"][k], bool)
            for r in rows)]
        if numeric:
            series_keys = [x_key, *(k for k in series_keys if k != numeric[0])]
            x_key = numeric[0]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    repeated = [k for k in series_keys if k in REPEAT_KEYS]
    for label, points in sweep_series(rows, x_key, series_keys).items():
        xs = [p[0] for p in points]
        n = max(p[4] for p in points)
        line = ax.plot(xs, [p[1] for p in points], marker="o",
                       label=label + (f" (mean over {n} {'/'.join(repeated)} values; band: range)"
                                       if n > 1 else ""))
        if n > 1:
            ax.fill_between(xs, [p[2] for p in points], [p[3] for p in points], alpha=0.2,
                            color=line[0].get_color())
    ax.set_xlabel(x_key)
    ax.set_ylabel(f"time to tolerance ({time_label})")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png")
    plt.close(fig)


def write_summary(path: Path, summary: Mapping[str, Any]) -> None:
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    if missing:
        raise ValueError(f"summary lacks {missing}")
    write_json(path, summary)


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """The summary of a run directory (or of a sweep directory: its ``sweep.json``)."""
    directory = Path(run_dir)
    if not directory.is_dir():
        raise InvalidInputError("RUN_DIR", f"{directory} is not a directory"
                                if directory.exists() else f"no such directory: {directory}")
    for name in ("summary.json", "sweep.json"):
        file = directory / name
        if file.is_file():
            return _checked_summary(file, name)
    raise InvalidInputError("RUN_DIR", f"{directory} holds no summary.json or sweep.json "
                            "(is it a run directory?)")


def _checked_summary(file: Path, name: str) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInputError("RUN_DIR", f"{file} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise InvalidInputError("RUN_DIR", f"{file} cannot be read ({exc.strerror or exc})") \
            from None
    if not isinstance(data, dict):
        raise InvalidInputError("RUN_DIR", f"{file} holds a JSON {type(data).__name__}, not a "
                                "run summary (an object)")
    if name == "sweep.json":
        points = data.get("points")
        if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
            raise InvalidInputError("RUN_DIR", f"{file} has no list of sweep points ('points')")
        return data
    if "trainer" in data and "test_accuracy" in data:
        raise InvalidInputError("RUN_DIR", f"{file} is a training run record; summarise it "
                                "with 'asyncbalance report'")
    missing = [k for k in SUMMARY_KEYS if k not in data]
    if missing:
        raise InvalidInputError("RUN_DIR", f"{file} is not a run summary of 'asyncbalance run': "
                                f"it lacks {', '.join(missing)}")
    return data
