"""The analysis claims: balance kept against the learning rate (fig. 21), the decay rate of
the imbalance under L2 (theorem B.31), and feedback alignment (seed 003). Each returns the
table lines and the verdicts (only for complete cells when verdicts are allowed)."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from .cells import Cell, final_acc, mean_sd, pct
from .spec import Claim
from .stats import format_interval, paired_interval, t_interval, verdict


def final_curve_value(record: dict, key: str) -> float | None:
    values = [v for v in record["curves"].get(key, []) if v is not None]
    return float(values[-1]) if values else None


def first_curve_value(record: dict, key: str) -> float | None:
    values = [v for v in record["curves"].get(key, []) if v is not None]
    return float(values[0]) if values else None


def balance_vs_lr(claim: Claim, cells: list[Cell], allow: bool) -> tuple[list[str], list[str]]:
    lines = ["| setting / point | arm | seeds | median log-imbalance at start | at end | max at "
             "end | test accuracy |", "|---|---|---|---|---|---|---|"]
    verdicts = []
    for cell in cells:
        for arm in cell.expected:
            runs = list(cell.runs.get(arm, {}).values())
            if not runs:
                lines.append(f"| {cell.setting} {cell.point} | {arm} | 0 | pending | | | |")
                continue
            s0 = mean_sd([first_curve_value(r, "imbalance_median") for r in runs])
            s1 = mean_sd([final_curve_value(r, "imbalance_median") for r in runs])
            mx = mean_sd([final_curve_value(r, "imbalance_max") for r in runs])
            acc = mean_sd([final_acc(r) for r in runs])
            lines.append(f"| {cell.setting} {cell.point} | {arm} | {len(runs)} | "
                         f"{s0[0]:.2e} | {s1[0]:.3f} ± {s1[1]:.3f} | {mx[0]:.3f} | "
                         f"{pct(*acc)} |")
    # paired across learning rates (same seeds, same initial weights)
    by_arm: dict[str, list[Cell]] = defaultdict(list)
    for cell in cells:
        for arm in cell.expected:
            by_arm[arm].append(cell)
    for arm, arm_cells in by_arm.items():
        for low, high in zip(arm_cells[:-1], arm_cells[1:], strict=True):
            seeds = sorted(set(low.runs.get(arm, {})) & set(high.runs.get(arm, {})))
            if len(seeds) < 2:
                continue
            a = [final_curve_value(high.runs[arm][s], "imbalance_median") for s in seeds]
            b = [final_curve_value(low.runs[arm][s], "imbalance_median") for s in seeds]
            iv = paired_interval(a, b)
            if allow and low.complete() and high.complete():
                verdicts.append(verdict(f"{arm} at {high.point}", f"at {low.point}",
                                        "final median log-imbalance", iv, 1.0, ""))
    return lines, verdicts


def decay_fit(claim: Claim, cells: list[Cell], allow: bool) -> tuple[list[str], list[str]]:
    lines = ["| point | seeds | predicted rate −4·lr·λ per step | fitted rate (mean, 95 % t "
             "interval) | fitted / predicted |", "|---|---|---|---|---|"]
    verdicts = []
    for cell in cells:
        rates, predicted = [], None
        for record in cell.runs.get(claim.baseline, {}).values():
            cfg = record["config"]
            lr = float(cfg["optimizer"]["lr"])
            lam = float(cfg["regulariser"]["strength"])
            predicted = -4.0 * lr * lam
            steps = record["curves"].get("step", [])
            rms = record["curves"].get("bp_law_rms", [])
            pts = [(s, math.log(v)) for s, v in zip(steps, rms, strict=False)
                   if v is not None and v > 0]
            if len(pts) >= 2:
                x, y = np.array(pts).T
                rates.append(float(np.polyfit(x, y, 1)[0]))
        if not rates or predicted is None:
            lines.append(f"| {cell.point} | 0 | pending | pending | |")
            continue
        iv = t_interval(rates)
        lines.append(f"| {cell.point} | {len(rates)} | {predicted:.3e} | {iv.mean:.3e} "
                     f"[{iv.low:.3e}, {iv.high:.3e}] | {iv.mean / predicted:.3f} |")
        if allow and cell.complete():
            inside = iv.low <= predicted <= iv.high
            ratio_low, ratio_high = sorted((iv.low / predicted, iv.high / predicted))
            off = 100 * max(abs(1 - ratio_low), abs(1 - ratio_high))
            verdicts.append(
                f"{cell.point}: fitted decay rate {iv.mean:.4e} per step "
                f"[{iv.low:.4e}, {iv.high:.4e}] vs the first-order prediction "
                f"{predicted:.4e}: ratio {iv.mean / predicted:.4f} [{ratio_low:.4f}, "
                f"{ratio_high:.4f}], within {off:.2g} % of it; "
                + ("the interval covers it." if inside else
                   "the interval excludes it (the prediction is first order in lr: a "
                   "discrete step and the mini-batch data term add higher-order terms)."))
    return lines, verdicts


def alignment(claim: Claim, cells: list[Cell], allow: bool) -> tuple[list[str], list[str]]:
    lines = ["| point | seeds | cos(W2, B2) at start | at end | Δ cos (95 % t interval) | FA "
             "law drift at end | BP law drift at end |", "|---|---|---|---|---|---|---|"]
    verdicts = []
    for cell in cells:
        runs = list(cell.runs.get(claim.baseline, {}).values())
        if not runs:
            lines.append(f"| {cell.point} | 0 | pending | | | | |")
            continue

        def cos_at(record: dict, index: int) -> float | None:
            values = [v for v in record["curves"].get("feedback_cosine", []) if v]
            return float(np.mean(values[index])) if values else None

        start = [cos_at(r, 0) for r in runs]
        end = [cos_at(r, -1) for r in runs]
        pairs = [(e, s) for e, s in zip(end, start, strict=True)
                 if e is not None and s is not None]
        drift = mean_sd([final_curve_value(r, "fa_law_drift") for r in runs])
        bp = mean_sd([final_curve_value(r, "bp_law_drift") for r in runs])
        s_m = mean_sd([p[1] for p in pairs])
        e_m = mean_sd([p[0] for p in pairs])
        if len(pairs) >= 2:
            iv = paired_interval([p[0] for p in pairs], [p[1] for p in pairs])
            shown = format_interval(iv, 1.0, "", 3)
            if allow and cell.complete():
                verdicts.append(verdict(f"cos(W2, B2) at the end ({cell.point})", "at the start",
                                        "alignment", iv, 1.0, ""))
        else:
            shown = "pending"
        lines.append(f"| {cell.point} | {len(runs)} | {s_m[0]:.3f} | {e_m[0]:.3f} ± "
                     f"{e_m[1]:.3f} | {shown} | {drift[0]:.2e} | {bp[0]:.2e} |")
    return lines, verdicts


