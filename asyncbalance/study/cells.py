"""Study records grouped into cells (a claim's setting and sweep point), by arm and seed,
and the per-record and per-arm quantities the report reads from them."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .spec import Claim, Study, plan
from .speed import area_under_curve


@dataclass
class Cell:
    """Records of one (setting, point) group of a claim, by arm and seed."""

    setting: str
    point: str
    runs: dict[str, dict[int, dict]] = field(default_factory=lambda: defaultdict(dict))
    expected: dict[str, int] = field(default_factory=dict)
    #: seeds an arm needs before its comparisons are verdicts: the budget's seed count (a
    #: claim that plans more seeds reports verdicts from the first ones, saying so, and
    #: tightens them as the rest arrive)
    minimum: dict[str, int] = field(default_factory=dict)

    def complete(self) -> bool:
        return all(len(self.runs.get(arm, {})) >= n for arm, n in self.expected.items())

    def enough(self, arm: str) -> bool:
        need = self.minimum.get(arm, self.expected.get(arm, 0))
        return len(self.runs.get(arm, {})) >= need


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def pct(mean: float, sd: float | None = None) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{100 * mean:.2f}" + ("" if sd is None else f" ± {100 * sd:.2f}")


def curve(record: dict, key: str = "test_accuracy") -> tuple[list[float], list[float]]:
    """Epochs and values of one curve (per-layer lists, e.g. feedback cosines, averaged)."""
    c = record["curves"]
    values = [float(np.mean(v)) if isinstance(v, list) and v else
              (None if isinstance(v, list) else v) for v in c.get(key, [])]
    return list(c.get("epoch", [])), values


def group_cells(study: Study, claim: Claim, budget: str, records: list[dict]) -> list[Cell]:
    cells: dict[tuple[str, str], Cell] = {}
    base_seeds = study.budgets[budget].seeds
    for job in plan(study, budget, (claim.id,)):
        if job.phase != "run":
            continue
        cell = cells.setdefault((job.setting, job.point), Cell(job.setting, job.point))
        cell.expected[job.arm] = cell.expected.get(job.arm, 0) + 1
        cell.minimum[job.arm] = min(cell.expected[job.arm], base_seeds)
    for record in records:
        if record.get("claim") != claim.id or record.get("phase") != "run":
            continue
        key = (record["setting"], record["point"])
        if key in cells:
            cells[key].runs[record["arm"]][int(record["seed"])] = record
    return list(cells.values())


def paired(cell: Cell, arm: str, against: str, metric
           ) -> tuple[list[float], list[float], list[int]]:
    """``metric`` of both arms over the seeds where both have it, and those seeds."""
    seeds = sorted(set(cell.runs.get(arm, {})) & set(cell.runs.get(against, {})))
    a = [metric(cell.runs[arm][s]) for s in seeds]
    b = [metric(cell.runs[against][s]) for s in seeds]
    keep = [i for i in range(len(seeds)) if a[i] is not None and b[i] is not None]
    return [a[i] for i in keep], [b[i] for i in keep], [seeds[i] for i in keep]


def final_acc(record: dict) -> float | None:
    return record["summary"].get("test_accuracy")


def auc_acc(record: dict) -> float | None:
    """The area under the test-accuracy curve; None for a run without one (diverged), as
    ``final_acc``, so that a diverged seed leaves both paired tests alike."""
    if record.get("diverged"):
        return None
    area = area_under_curve(*curve(record))
    return area if math.isfinite(area) else None


def mean_curve(runs: dict[int, dict], key: str = "test_accuracy"
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    curves = [c for c in (curve(r, key) for r in runs.values()) if c[0]]
    if not curves:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    n = min(len(e) for e, _ in curves)
    epochs = np.asarray(curves[0][0][:n], dtype=float)
    vals = np.array([[np.nan if v is None else v for v in c[1][:n]] for c in curves], float)
    sd = np.nanstd(vals, axis=0, ddof=1) if len(curves) > 1 else np.zeros(n)
    return epochs, np.nanmean(vals, axis=0), sd


