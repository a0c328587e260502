"""The analysis claims: balance kept against the learning rate (fig. 21), the decay rate of
the imbalance under L2 (theorem B.31), and feedback alignment with its conservation law
(seed 003). Each returns the table lines, the paired tests (the claim's family for Holm's
correction; only complete cells, only when verdicts are allowed) and verdicts that are not
paired tests (the fitted decay rate against its prediction)."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from .cells import Cell, final_acc, mean_sd, pct
from .spec import Claim
from .stats import PairedTest, format_interval, paired_interval, t_interval


def final_curve_value(record: dict, key: str) -> float | None:
    values = [v for v in record["curves"].get(key, []) if v is not None]
    return float(values[-1]) if values else None


def first_curve_value(record: dict, key: str) -> float | None:
    values = [v for v in record["curves"].get(key, []) if v is not None]
    return float(values[0]) if values else None


Built = tuple[list[str], list[PairedTest], list[str]]


def balance_vs_lr(claim: Claim, cells: list[Cell], allow: bool) -> Built:
    lines = ["| setting / point | arm | seeds | median log-imbalance at start | at end | max at "
             "end | test accuracy |", "|---|---|---|---|---|---|---|"]
    tests: list[PairedTest] = []
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
            if allow and low.complete() and high.complete():
                tests.append(PairedTest("", f"{arm} at {high.point}", f"at {low.point}",
                                        "final median log-imbalance",
                                        tuple(x - y for x, y in zip(a, b, strict=True)),
                                        1.0, "", tuple(seeds)))
    return lines, tests, []


def decay_fit(claim: Claim, cells: list[Cell], allow: bool) -> Built:
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
    return lines, [], verdicts


def alignment(claim: Claim, cells: list[Cell], allow: bool) -> Built:
    lines = ["| point | seeds | cos(W2, B2) at start | at end | Δ cos (95 % t interval) | FA "
             "law drift at end | BP law drift at end |", "|---|---|---|---|---|---|---|"]
    tests: list[PairedTest] = []
    for cell in cells:
        runs = list(cell.runs.get(claim.baseline, {}).values())
        if not runs:
            lines.append(f"| {cell.point} | 0 | pending | | | | |")
            continue

        def cos_at(record: dict, index: int) -> float | None:
            values = [v for v in record["curves"].get("feedback_cosine", []) if v]
            return float(np.mean(values[index])) if values else None

        seeds = sorted(cell.runs.get(claim.baseline, {}))
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
                tests.append(PairedTest("", f"cos(W2, B2) at the end ({cell.point})",
                                        "at the start", "alignment",
                                        tuple(p[0] - p[1] for p in pairs), 1.0, "",
                                        tuple(seeds)))
        else:
            shown = "pending"
        lines.append(f"| {cell.point} | {len(runs)} | {s_m[0]:.3f} | {e_m[0]:.3f} ± "
                     f"{e_m[1]:.3f} | {shown} | {drift[0]:.2e} | {bp[0]:.2e} |")
    law_lines, law_tests = conservation_vs_lr(claim, cells, allow)
    return lines + [""] + law_lines, tests + law_tests, []


def _width_lr(cell: Cell) -> tuple[str, float] | None:
    record = next((r for runs in cell.runs.values() for r in runs.values()), None)
    if record is None:
        return None
    cfg = record["config"]
    widths = "-".join(str(w) for w in cfg.get("model", {}).get("widths", []))
    return widths, float(cfg["optimizer"]["lr"])


def conservation_vs_lr(claim: Claim, cells: list[Cell], allow: bool
                       ) -> tuple[list[str], list[PairedTest]]:
    """Seed 003's law <W2, B2> − ½||W1||² is exact for gradient flow only: with mini-batch
    steps its drift should grow with the learning rate. Paired over seeds (same
    initialisation) between consecutive learning rates of one width: the difference of
    log10(final FA-law drift)."""
    by_width: dict[str, list[tuple[float, Cell]]] = defaultdict(list)
    for cell in cells:
        key = _width_lr(cell)
        if key is not None:
            by_width[key[0]].append((key[1], cell))
    lines = ["Conservation law in mini-batch SGD (log10 of the FA law's relative drift at the "
             "end, paired over seeds between learning rates):", "",
             "| widths | lr | vs lr | seeds | Δ log10 drift (95 % t interval) |",
             "|---|---|---|---|---|"]
    tests: list[PairedTest] = []
    arm = claim.baseline
    for widths, items in sorted(by_width.items()):
        items.sort(key=lambda item: item[0])
        for (lr_low, low), (lr_high, high) in zip(items[:-1], items[1:], strict=True):
            seeds = sorted(set(low.runs.get(arm, {})) & set(high.runs.get(arm, {})))
            diffs, kept = [], []
            for seed in seeds:
                a = final_curve_value(high.runs[arm][seed], "fa_law_drift")
                b = final_curve_value(low.runs[arm][seed], "fa_law_drift")
                if a is not None and b is not None and a > 0 and b > 0:
                    diffs.append(math.log10(a) - math.log10(b))
                    kept.append(seed)
            if len(diffs) < 2:
                lines.append(f"| {widths} | {lr_high:g} | {lr_low:g} | {len(diffs)} | pending |")
                continue
            iv = t_interval(diffs)
            lines.append(f"| {widths} | {lr_high:g} | {lr_low:g} | {len(diffs)} | "
                         f"{format_interval(iv, 1.0, '', 3)} |")
            if allow and low.complete() and high.complete():
                tests.append(PairedTest("", f"FA-law drift at lr {lr_high:g} (widths {widths})",
                                        f"at lr {lr_low:g}", "log10 relative drift at the end",
                                        tuple(diffs), 1.0, "", tuple(kept)))
    return lines + [""], tests


