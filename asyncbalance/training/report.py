"""Aggregate run records into markdown tables (mean ± std over seeds) and PNG plots."""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidInputError
from ..io import StagedFiles, atomic_write
from ..study.stats import format_interval, paired_interval
from .records import EPOCHS, SUMMARY, find_runs, read_epochs


@dataclass
class Run:
    path: Path
    summary: dict
    rows: list[dict]


# The label of runs whose scenario names none (one arm of their own).
UNLABELLED = "(no label)"


def load_runs(paths: list[str]) -> list[Run]:
    runs = []
    for path in find_runs(paths):
        try:
            summary = json.loads((path / SUMMARY).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidInputError("RUN_DIR", f"{path / SUMMARY} is not readable ({exc})") \
                from None
        if not isinstance(summary, dict):
            raise InvalidInputError("RUN_DIR", f"{path / SUMMARY} holds a JSON "
                                    f"{type(summary).__name__}, not a run summary (an object)")
        if "test_accuracy" not in summary or "trainer" not in summary:
            continue  # another command's run record (e.g. a balancing run)
        rows = read_epochs(path / EPOCHS) if (path / EPOCHS).is_file() else []
        runs.append(Run(path, summary, rows))
    if not runs:
        raise InvalidInputError("RUN_DIR", f"no training run records (summary.json with "
                                f"test_accuracy) under {', '.join(map(str, paths))}")
    return runs


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean and sample standard deviation (n - 1; 0 for a single value) of finite values."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan"), 0
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0
    return float(np.mean(finite)), std, len(finite)


def fmt_pct(values: list[float]) -> str:
    mean, std, n = mean_std(values)
    return "n/a" if n == 0 else f"{100 * mean:.2f} ± {100 * std:.2f}"


def fmt_sci(values: list[float | None], worst: bool = True) -> str:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "–"
    return f"{max(finite) if worst else float(np.mean(finite)):.1e}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "scenario"


# Seeds differ between the runs of one configuration by design; nothing else may.
_SEED_KEYS = ("seeds", "first_seed")
# Records written before summaries carried their full configuration: compare what they show.
_FALLBACK_KEYS = ("epochs", "trainer", "model", "architecture", "dataset", "n_train",
                  "balancing", "regulariser", "optimizer")


def configuration(summary: dict) -> dict:
    """What a run was asked to do, without its seed: runs with equal ones may be averaged."""
    config = summary.get("config")
    if isinstance(config, dict):
        return {k: v for k, v in config.items() if k not in _SEED_KEYS}
    return {k: summary[k] for k in _FALLBACK_KEYS if k in summary}


def _first_difference(a: object, b: object, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if a == b else f"{prefix.rstrip('.')}: {a!r} vs {b!r}"


def group_runs(runs: list[Run]) -> dict[str, dict[str, list[Run]]]:
    """Runs by scenario name and label; refuses a group whose runs are not seeds of one
    configuration (a different epoch count, say) or that holds one seed twice."""
    grouped: dict[str, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        grouped[run.summary.get("name", "?")][run.summary.get("label") or UNLABELLED].append(run)
    for name, groups in grouped.items():
        for label, group in groups.items():
            first = group[0]
            reference = configuration(first.summary)
            seeds: dict[object, Path] = {}
            for run in group:
                difference = _first_difference(reference, configuration(run.summary))
                if difference:
                    raise InvalidInputError(
                        "RUN_DIR", f"runs {first.path} and {run.path} (scenario {name!r}, label "
                        f"{label!r}) differ in more than the seed ({difference}); they cannot "
                        "be averaged: report them separately or give them different labels")
                seed = run.summary.get("seed")
                if seed in seeds:
                    raise InvalidInputError(
                        "RUN_DIR", f"{seeds[seed]} and {run.path} are both seed {seed} of "
                        f"scenario {name!r}, label {label!r}; pass only one of them")
                seeds[seed] = run.path
    return grouped


def _series(runs: list[Run], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    curves = [[r.get(key) for r in run.rows] for run in runs]
    curves = [[np.nan if v is None else float(v) for v in c] for c in curves if c]
    if not curves:
        return None
    length = min(len(c) for c in curves)
    data = np.array([c[:length] for c in curves])
    if np.all(np.isnan(data)):
        return None
    epochs = np.arange(length)
    with np.errstate(all="ignore"):
        mean = np.nanmean(data, axis=0)
        std = np.nanstd(data, axis=0, ddof=1) if data.shape[0] > 1 else np.zeros(length)
    return epochs, mean, np.nan_to_num(std)


def _save(fig: object, path: Path, staged: StagedFiles | None = None) -> None:
    with (atomic_write(path, "wb") if staged is None else staged.open(path, "wb")) as handle:
        fig.savefig(handle, format="png", dpi=110, bbox_inches="tight")  # type: ignore[attr-defined]


def plot_metric(groups: dict[str, list[Run]], key: str, title: str, path: Path,
                log: bool = False, scale: float = 1.0, staged: StagedFiles | None = None
                ) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for label, runs in groups.items():
        series = _series(runs, key)
        if series is None:
            continue
        epochs, mean, std = series
        line, = ax.plot(epochs, scale * mean, label=f"{label} (n={len(runs)})")
        ax.fill_between(epochs, scale * (mean - std), scale * (mean + std), alpha=0.2,
                        color=line.get_color())
        drawn = True
    if drawn:
        ax.set_xlabel("epoch")
        ax.set_ylabel(title)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        _save(fig, path, staged)
    plt.close(fig)
    return drawn


def plot_imbalance(groups: dict[str, list[Run]], path: Path,
                   staged: StagedFiles | None = None) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for label, runs in groups.items():
        values = [v for run in runs for v in (run.summary.get("final_unit_log_imbalance") or [])]
        if not values:
            continue
        ax.hist(np.clip(values, -3, 3), bins=60, range=(-3, 3), histtype="step",
                density=True, label=f"{label} (p={runs[0].summary.get('imbalance_p')})")
        drawn = True
    if drawn:
        ax.set_xlabel("final per-unit log-imbalance log(A_k / B_k) (clipped to ±3)")
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
        _save(fig, path, staged)
    plt.close(fig)
    return drawn


def plot_unit_norms(runs: list[Run], path: Path, staged: StagedFiles | None = None) -> bool:
    history = runs[0].summary.get("unit_norms")
    if not history:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [h["epoch"] for h in history]
    ins, outs = np.array([h["in"] for h in history]), np.array([h["out"] for h in history])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for k in range(ins.shape[1]):
        line, = ax.plot(epochs, ins[:, k], label=f"unit {k} in")
        ax.plot(epochs, outs[:, k], "--", color=line.get_color(), label=f"unit {k} out")
    ax.set_xlabel("epoch")
    ax.set_ylabel("L2 norm (in: with bias)")
    ax.legend(fontsize=6, ncol=2)
    _save(fig, path, staged)
    plt.close(fig)
    return True


def _last(run: Run, key: str) -> float | None:
    for row in reversed(run.rows):
        if row.get(key) is not None:
            return row[key]
    return None


def build_report(paths: list[str], output: str | Path) -> str:
    """Write ``output`` (markdown) and its PNGs beside it, all or nothing; returns the markdown.
    """
    out = Path(output)
    runs = load_runs(paths)
    with StagedFiles() as staged:
        text = _write_report(runs, out, staged)
        staged.commit()
    return text


def _paired_lines(groups: dict[str, list[Run]]) -> list[str]:
    """Each label against the first, paired by seed: final test accuracy differences with a
    95 % Student-t interval over the seeds both have (a direction only when it excludes 0)."""
    labels = sorted(groups)
    if len(labels) < 2:
        return []
    base = labels[0]
    by_seed = {label: {r.summary.get("seed"): r.summary["test_accuracy"]
                       for r in groups[label]} for label in labels}
    lines = [f"Paired by seed against `{base}` (final test accuracy, points):", "",
             "| label | seeds paired | difference [95 % t interval] | reads |",
             "|---|---|---|---|"]
    for label in labels[1:]:
        seeds = sorted(set(by_seed[label]) & set(by_seed[base]), key=str)
        if not seeds:
            lines.append(f"| {label} | 0 | – | no common seed |")
            continue
        iv = paired_interval([by_seed[label][k] for k in seeds],
                             [by_seed[base][k] for k in seeds])
        reads = ("higher" if iv.sign > 0 else "lower" if iv.sign < 0
                 else "no detectable difference")
        lines.append(f"| {label} | {len(seeds)} | {format_interval(iv)} | {reads} |")
    return lines + [""]


def _write_report(runs: list[Run], out: Path, staged: StagedFiles) -> str:
    lines = ["# Training report", "",
             f"{len(runs)} runs. Accuracies are percentages, mean ± sample std (n − 1) over "
             "seeds; 'final' is the last epoch, 'best' the best epoch on the test set.", ""]
    for name, groups in sorted(group_runs(runs).items()):
        lines += [f"## {name}", "",
                  "| label | seeds | rule | final test acc | best test acc | final train acc | "
                  "max float64 Δf at balance | max dist to optimum | final max abs log-imb | "
                  "BP law drift | FA law drift | align ° | s/epoch |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for label, group in sorted(groups.items()):
            s = [r.summary for r in group]
            imb = [float(np.max(np.abs(x["final_unit_log_imbalance"])))
                   for x in s if x.get("final_unit_log_imbalance")]
            align = [float(np.mean(x["alignment_deg"])) for x in s if x.get("alignment_deg")]
            epoch_s = [np.mean([row["seconds"] for row in r.rows[1:]]) for r in group
                       if len(r.rows) > 1]
            lines.append(
                f"| {label} | {len(group)} | {s[0].get('trainer')} | "
                f"{fmt_pct([x['test_accuracy'] for x in s])} | "
                f"{fmt_pct([x['best_test_accuracy'] for x in s])} | "
                f"{fmt_pct([x.get('train_accuracy') for x in s])} | "
                f"{fmt_sci([x.get('max_function_rel_error_at_balance') for x in s])} | "
                f"{fmt_sci([x.get('max_distance_to_optimum') for x in s])} | "
                f"{fmt_sci(imb, worst=False)} | "
                f"{fmt_sci([x.get('bp_law_drift') for x in s], worst=False)} | "
                f"{fmt_sci([x.get('fa_law_drift') for x in s], worst=False)} | "
                f"{'–' if not align else f'{np.mean(align):.1f}'} | "
                f"{'–' if not epoch_s else f'{np.mean(epoch_s):.2f}'} |")
        lines.append("")
        lines += _paired_lines(groups)
        stem = f"{out.stem}-{_slug(name)}"
        figures = [
            (plot_metric(groups, "test_accuracy", "test accuracy (%)",
                         out.with_name(f"{stem}-accuracy.png"), scale=100.0, staged=staged),
             f"{stem}-accuracy.png", "test accuracy vs epoch (band: ± std over seeds)"),
            (plot_imbalance(groups, out.with_name(f"{stem}-imbalance.png"), staged),
             f"{stem}-imbalance.png", "final per-unit imbalance"),
            (plot_metric(groups, "imbalance_max", "max |log imbalance|",
                         out.with_name(f"{stem}-imbalance-epochs.png"), log=True,
                         staged=staged),
             f"{stem}-imbalance-epochs.png", "max per-unit |log-imbalance| vs epoch"),
            (plot_metric(groups, "fa_law_drift", "FA law drift (relative)",
                         out.with_name(f"{stem}-fa-law.png"), log=True, staged=staged),
             f"{stem}-fa-law.png", "FA conservation law drift vs epoch"),
            (plot_metric(groups, "bp_law_drift", "BP law drift (relative)",
                         out.with_name(f"{stem}-bp-law.png"), log=True, staged=staged),
             f"{stem}-bp-law.png", "BP conservation law drift vs epoch"),
        ]
        for label, group in sorted(groups.items()):
            target = out.with_name(f"{stem}-{_slug(label)}-norms.png")
            figures.append((plot_unit_norms(group, target, staged), target.name,
                            f"{label}: per-unit in/out norms (seed {group[0].summary['seed']})"))
        for drawn, file, caption in figures:
            if drawn:
                lines += [f"![{caption}]({file})", ""]
    text = "\n".join(lines) + "\n"
    with staged.open(out, "w") as handle:
        handle.write(text)
    return text
