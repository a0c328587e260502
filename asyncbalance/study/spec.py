"""Study files: claims, their settings and arms, budgets; expanded into ordered run jobs.

A study file (TOML) holds:

* top level: ``name``, ``description``, ``validation_fraction`` (held-out share of the
  training set for learning-rate selection), ``validation_resplit`` (true: tuning seed k
  also draws its own held-out split, ``data.split_seed = k``, so the choice averages over
  as many random splits as there are tuning seeds), ``[base]`` (a training configuration mapping
  shared by every run, see ``asyncbalance/training/config.py``);
* ``[budgets.<smoke|cpu|full>]``: ``seeds``, ``tune_seeds``, ``note``, ``verdicts`` (whether
  verdicts may be written from these records), ``set`` (dotted overrides applied to every
  run of the budget, e.g. the data set);
* ``[[claim]]``: ``id``, ``title``, ``priority`` (1 runs first), ``kind`` (comparison,
  balance_vs_lr, decay_fit, alignment), ``paper`` (setting and numbers as published, with
  notes), ``baseline`` (the arm compared against), ``epochs`` (per budget), ``set`` (dotted
  overrides of the claim), ``sweep`` (dotted key = list: one cell per point),
  ``compare`` (pairs [arm, against]; default every arm against the baseline),
  ``[claim.settings.<label>]`` (``source``, ``set``, ``tune`` = dotted key = candidate
  values, chosen per arm on the validation split), ``[claim.arms.<label>]``
  (``description``, ``set``) and ``[claim.budget.<name>]`` (``set``, ``sweep``, ``seeds``,
  ``settings`` = the settings to run, ``skip``); for the report: ``paper_epochs`` (the
  length of the paper's runs), ``paper_effects`` ("arm-against" = the paper's difference in
  points), ``summary_note`` (one sentence the summary line must carry),
  ``validation_fraction`` (the claim's held-out share for tuning, over the study's) or
  ``validation_folds`` (k >= 2: tuning seed s holds out fold s mod k of a stratified k-fold
  of the training set, so k tuning seeds are a k-fold cross-validation; a subsetted
  training set is the same subset, ``data.subset_seed = 0``, in every fold).

Overrides apply in this order: base, claim, sweep point, setting, arm, budget, claim budget,
the tuned values, then ``epochs``.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import flatten_table, from_mapping, load_toml, set_dotted
from ..errors import InvalidInputError
from ..training.config import TrainConfig

BUDGETS = ("smoke", "cpu", "full")
KINDS = ("comparison", "balance_vs_lr", "decay_fit", "alignment")
STUDY_KEYS = ("name", "description", "validation_fraction", "validation_resplit", "base",
              "budgets", "claim")
BUDGET_KEYS = ("seeds", "tune_seeds", "note", "verdicts", "set")
CLAIM_KEYS = ("id", "title", "priority", "kind", "paper", "baseline", "epochs", "set", "sweep",
              "settings", "arms", "budget", "notes", "compare", "paper_epochs",
              "paper_effects", "summary_note", "validation_fraction", "validation_folds")
SETTING_KEYS = ("source", "set", "tune")
ARM_KEYS = ("description", "set")
CLAIM_BUDGET_KEYS = ("set", "sweep", "seeds", "settings", "skip", "epochs")


@dataclass(frozen=True)
class Budget:
    name: str
    seeds: int
    tune_seeds: int
    note: str
    verdicts: bool
    set: Mapping[str, Any]


@dataclass(frozen=True)
class Setting:
    label: str
    source: str
    set: Mapping[str, Any]
    tune: Mapping[str, tuple]


@dataclass(frozen=True)
class Arm:
    label: str
    description: str
    set: Mapping[str, Any]


@dataclass(frozen=True)
class Claim:
    id: str
    title: str
    priority: int
    kind: str
    paper: str
    notes: str
    baseline: str
    epochs: Mapping[str, int]
    set: Mapping[str, Any]
    sweep: Mapping[str, tuple]
    settings: tuple[Setting, ...]
    arms: tuple[Arm, ...]
    budget: Mapping[str, Mapping[str, Any]]
    compare: tuple[tuple[str, str], ...] = ()
    paper_epochs: int | None = None
    paper_effects: Mapping[str, float] = field(default_factory=dict)
    summary_note: str = ""
    validation_fraction: float | None = None
    validation_folds: int = 0

    def epochs_for(self, budget: str) -> int | None:
        value = self.for_budget(budget).get("epochs", self.epochs.get(budget))
        return None if value is None else int(value)

    def for_budget(self, budget: str) -> Mapping[str, Any]:
        return self.budget.get(budget, {})

    def sweep_for(self, budget: str) -> dict[str, tuple]:
        return dict(self.for_budget(budget).get("sweep", self.sweep))

    def settings_for(self, budget: str) -> tuple[Setting, ...]:
        keep = self.for_budget(budget).get("settings")
        return self.settings if keep is None else tuple(s for s in self.settings
                                                        if s.label in keep)


@dataclass(frozen=True)
class Study:
    name: str
    description: str
    validation_fraction: float
    base: Mapping[str, Any]
    budgets: Mapping[str, Budget]
    claims: tuple[Claim, ...]
    path: str = ""
    validation_resplit: bool = False

    def claim(self, claim_id: str) -> Claim:
        for claim in self.claims:
            if claim.id == claim_id:
                return claim
        raise InvalidInputError("--claim", f"no claim {claim_id!r}",
                                [c.id for c in self.claims])


@dataclass(frozen=True)
class Job:
    """One training run of a study: a cell (claim, setting, point, arm) and a seed.

    ``phase`` is ``run`` or ``tune``; tune jobs carry the candidate values in ``tuned``
    and evaluate on the validation split. A run job of a setting with ``tune`` values gets
    them from the tune records when it runs (``needs_tune``).
    """

    claim: str
    setting: str
    point: str
    arm: str
    seed: int
    phase: str
    mapping: Mapping[str, Any] = field(hash=False, compare=False)
    tuned: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)
    needs_tune: bool = False

    @property
    def cell(self) -> tuple[str, str, str, str]:
        return (self.claim, self.setting, self.point, self.arm)

    def relpath(self) -> Path:
        parts = [self.claim]
        if self.phase == "tune":
            parts.append("tune")
        parts.append(self.setting)
        if self.point:
            parts.append(self.point)
        parts.append(self.arm)
        if self.phase == "tune":
            parts.append(tuned_label(self.tuned))
        return Path(*[_slug(p) for p in parts]) / f"seed-{self.seed}.json"


def _slug(text: str) -> str:
    out = "".join(c if c.isalnum() or c in "_.=+-" else "-" for c in text)
    return out.strip("-") or "x"


def tuned_label(values: Mapping[str, Any]) -> str:
    return ",".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(values.items()))


def point_label(point: Mapping[str, Any]) -> str:
    parts = []
    for key, value in point.items():
        shown = "-".join(str(v) for v in value) if isinstance(value, list | tuple) else str(value)
        parts.append(f"{key.split('.')[-1]}={shown}")
    return ",".join(parts)


def config_hash(mapping: Mapping[str, Any]) -> str:
    text = json.dumps(mapping, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _table(value: Any, field_name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInputError(field_name, "must be a table")
    return value


def _check_keys(table: Mapping[str, Any], valid: tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in valid:
            raise InvalidInputError(f"{where}.{key}", "unknown key", valid)



def _grid(table: Any, where: str) -> dict[str, tuple]:
    out = {}
    for key, values in flatten_table(_table(table, where)).items():
        if not isinstance(values, list) or not values:
            raise InvalidInputError(f"{where}.{key}", "must be a non-empty list of values")
        out[key] = tuple(values)
    return out


def _budget(name: str, table: Any) -> Budget:
    where = f"budgets.{name}"
    table = _table(table, where)
    _check_keys(table, BUDGET_KEYS, where)
    seeds = int(table.get("seeds", 1))
    if seeds < 1:
        raise InvalidInputError(f"{where}.seeds", f"must be >= 1, got {seeds}")
    return Budget(name, seeds, int(table.get("tune_seeds", min(2, seeds))),
                  str(table.get("note", "")), bool(table.get("verdicts", name != "smoke")),
                  flatten_table(_table(table.get("set"), f"{where}.set")))


def _claim(index: int, table: Any) -> Claim:
    where = f"claim[{index}]"
    table = _table(table, where)
    _check_keys(table, CLAIM_KEYS, where)
    if "id" not in table:
        raise InvalidInputError(f"{where}.id", "is missing")
    where = f"claim.{table['id']}"
    kind = str(table.get("kind", "comparison"))
    if kind not in KINDS:
        raise InvalidInputError(f"{where}.kind", f"unknown kind {kind!r}", KINDS)
    settings = []
    for label, st in _table(table.get("settings"), f"{where}.settings").items():
        st = _table(st, f"{where}.settings.{label}")
        _check_keys(st, SETTING_KEYS, f"{where}.settings.{label}")
        overrides = flatten_table(_table(st.get("set"), f"{where}.settings.{label}.set"))
        settings.append(Setting(label, str(st.get("source", "")), overrides,
                                _grid(st.get("tune"), f"{where}.settings.{label}.tune")))
    arms = []
    for label, arm in _table(table.get("arms"), f"{where}.arms").items():
        arm = _table(arm, f"{where}.arms.{label}")
        _check_keys(arm, ARM_KEYS, f"{where}.arms.{label}")
        arms.append(Arm(label, str(arm.get("description", "")),
                        flatten_table(_table(arm.get("set"), f"{where}.arms.{label}.set"))))
    if not settings:
        settings = [Setting("default", "", {}, {})]
    if not arms:
        raise InvalidInputError(f"{where}.arms", "needs at least one arm")
    baseline = str(table.get("baseline", arms[0].label))
    if baseline not in [a.label for a in arms]:
        raise InvalidInputError(f"{where}.baseline", f"{baseline!r} is not an arm",
                                [a.label for a in arms])
    epochs = _table(table.get("epochs"), f"{where}.epochs")
    for key in epochs:
        if key not in BUDGETS:
            raise InvalidInputError(f"{where}.epochs.{key}", "unknown budget", BUDGETS)
    budget = {}
    for name, bt in _table(table.get("budget"), f"{where}.budget").items():
        if name not in BUDGETS:
            raise InvalidInputError(f"{where}.budget.{name}", "unknown budget", BUDGETS)
        bt = _table(bt, f"{where}.budget.{name}")
        _check_keys(bt, CLAIM_BUDGET_KEYS, f"{where}.budget.{name}")
        parsed: dict[str, Any] = dict(bt)
        parsed["set"] = flatten_table(_table(bt.get("set"), f"{where}.budget.{name}.set"))
        if "sweep" in bt:
            parsed["sweep"] = _grid(bt["sweep"], f"{where}.budget.{name}.sweep")
        budget[name] = parsed
    labels = [a.label for a in arms]
    compare = []
    for pair in table.get("compare", [[a, baseline] for a in labels if a != baseline]):
        if (not isinstance(pair, list) or len(pair) != 2
                or any(p not in labels for p in pair)):
            raise InvalidInputError(f"{where}.compare", f"{pair!r} is not a pair of arms",
                                    labels)
        compare.append((str(pair[0]), str(pair[1])))
    effects = {}
    for key, value in _table(table.get("paper_effects"), f"{where}.paper_effects").items():
        if key.count("-") != 1 or any(p not in labels for p in key.split("-")):
            raise InvalidInputError(f"{where}.paper_effects.{key}", "must name a pair of "
                                    "arms as \"arm-against\"", labels)
        effects[key] = float(value)
    fraction = table.get("validation_fraction")
    if fraction is not None and not 0 < float(fraction) < 1:
        raise InvalidInputError(f"{where}.validation_fraction",
                                f"must be in (0, 1), got {fraction}")
    folds = table.get("validation_folds", 0)
    if not isinstance(folds, int) or isinstance(folds, bool) or folds == 1 or folds < 0:
        raise InvalidInputError(f"{where}.validation_folds",
                                f"must be an integer >= 2 (or 0: off), got {folds!r}")
    if folds and fraction is not None:
        raise InvalidInputError(f"{where}.validation_folds", "and validation_fraction both "
                                "choose the validation set: set one of them")
    paper_epochs = table.get("paper_epochs")
    extra = {"paper_epochs": None if paper_epochs is None else int(paper_epochs),
             "paper_effects": effects, "summary_note": str(table.get("summary_note", "")),
             "validation_fraction": None if fraction is None else float(fraction),
             "validation_folds": int(folds)}
    return Claim(str(table["id"]), str(table.get("title", table["id"])),
                 int(table.get("priority", 9)), kind, str(table.get("paper", "")).strip(),
                 str(table.get("notes", "")).strip(), baseline,
                 {k: int(v) for k, v in epochs.items()},
                 flatten_table(_table(table.get("set"), f"{where}.set")),
                 _grid(table.get("sweep"), f"{where}.sweep"), tuple(settings), tuple(arms),
                 budget, tuple(compare), **extra)


def parse_study(data: Mapping[str, Any], path: str = "") -> Study:
    _check_keys(data, STUDY_KEYS, "study")
    budgets = {name: _budget(name, table)
               for name, table in _table(data.get("budgets"), "budgets").items()}
    for name in budgets:
        if name not in BUDGETS:
            raise InvalidInputError(f"budgets.{name}", "unknown budget", BUDGETS)
    claims_raw = data.get("claim", [])
    if not isinstance(claims_raw, list) or not claims_raw:
        raise InvalidInputError("claim", "needs at least one [[claim]]")
    claims = tuple(_claim(i, c) for i, c in enumerate(claims_raw))
    ids = [c.id for c in claims]
    if len(set(ids)) != len(ids):
        raise InvalidInputError("claim.id", f"duplicate claim ids in {ids}")
    fraction = float(data.get("validation_fraction", 0.1))
    if not 0 < fraction < 1:
        raise InvalidInputError("validation_fraction", f"must be in (0, 1), got {fraction}")
    return Study(str(data.get("name", Path(path).stem or "study")),
                 str(data.get("description", "")).strip(), fraction,
                 _table(data.get("base"), "base"), budgets, claims, str(path),
                 bool(data.get("validation_resplit", False)))


def load_study(path: str | Path) -> Study:
    return parse_study(load_toml(path, "STUDY"), str(path))


def _merge(base: Mapping[str, Any], *layers: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(dict(base))
    for layer in layers:
        for key, value in layer.items():
            set_dotted(merged, key, copy.deepcopy(value))
    return merged


def validate_mapping(mapping: Mapping[str, Any], where: str) -> TrainConfig:
    try:
        return from_mapping(TrainConfig, mapping)
    except InvalidInputError as exc:
        raise InvalidInputError(where, str(exc)) from None


def cell_mapping(study: Study, claim: Claim, setting: Setting, point: Mapping[str, Any],
                 arm: Arm, budget: Budget, tuned: Mapping[str, Any] | None = None,
                 validation: bool = False, split: int | None = None) -> dict[str, Any]:
    """The training configuration mapping of one cell (validated before it is returned);
    a tuning run holds out the claim's (else the study's) validation share, drawn with
    ``data.split_seed = split`` when the study re-splits per tuning seed, or, when the claim
    has ``validation_folds``, fold ``split`` of its k-fold."""
    extra: dict[str, Any] = dict(tuned or {})
    if validation and claim.validation_folds:
        extra["data.validation_folds"] = claim.validation_folds
        extra["data.validation_fold"] = int(split or 0) % claim.validation_folds
        # every fold of one training subset (a subsetted claim draws it per seed otherwise)
        extra["data.subset_seed"] = 0
    elif validation:
        extra["data.validation_fraction"] = (claim.validation_fraction
                                             or study.validation_fraction)
        if split is not None and study.validation_resplit:
            extra["data.split_seed"] = int(split)
    epochs = claim.for_budget(budget.name).get("epochs", claim.epochs.get(budget.name))
    if epochs is None:
        raise InvalidInputError(f"claim.{claim.id}.epochs", f"has no {budget.name!r} entry")
    mapping = _merge(study.base, claim.set, point, setting.set, arm.set, budget.set,
                     claim.for_budget(budget.name).get("set", {}), extra,
                     {"epochs": int(epochs), "name": claim.id,
                      "label": "/".join(x for x in (setting.label, point_label(point), arm.label)
                                        if x)})
    mapping.pop("seeds", None)
    validate_mapping(mapping, f"claim.{claim.id}.{setting.label}.{arm.label}")
    return mapping


def points(grid: Mapping[str, tuple]) -> list[dict[str, Any]]:
    if not grid:
        return [{}]
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True))
            for combo in itertools.product(*(grid[k] for k in keys))]


def plan(study: Study, budget_name: str, claims: tuple[str, ...] = ()) -> list[Job]:
    """Every job of the budget, in the order they should run: by claim priority; within a
    priority, the untuned settings first, then the tuning runs, then the tuned runs; within
    each of those claim by claim (in file order), and within a claim seed-major, so the
    first claims complete their seeds first and every arm of a claim has the same seeds."""
    if budget_name not in study.budgets:
        raise InvalidInputError("--budget", f"the study has no budget {budget_name!r}",
                                list(study.budgets))
    budget = study.budgets[budget_name]
    chosen = [study.claim(c) for c in claims] if claims else list(study.claims)
    jobs: list[tuple[tuple, Job]] = []
    for order, claim in enumerate(chosen):
        cb = claim.for_budget(budget_name)
        if cb.get("skip"):
            continue
        seeds = int(cb.get("seeds", budget.seeds))
        for setting in claim.settings_for(budget_name):
            for point_index, point in enumerate(points(claim.sweep_for(budget_name))):
                label = point_label(point)
                for arm_index, arm in enumerate(claim.arms):
                    if setting.tune:
                        for candidate in points(setting.tune):
                            for seed in range(budget.tune_seeds):
                                mapping = cell_mapping(
                                    study, claim, setting, point, arm, budget, candidate,
                                    validation=True,
                                    split=seed)
                                key = (claim.priority, 1, order, seed, setting.label,
                                       point_index, arm_index, tuned_label(candidate))
                                jobs.append((key, Job(claim.id, setting.label, label, arm.label,
                                                      seed, "tune", mapping, candidate)))
                    mapping = cell_mapping(study, claim, setting, point, arm, budget)
                    for seed in range(seeds):
                        key = (claim.priority, 2 if setting.tune else 0, order, seed,
                               setting.label, point_index, arm_index, "")
                        jobs.append((key, Job(claim.id, setting.label, label, arm.label, seed,
                                              "run", mapping, {}, bool(setting.tune))))
    jobs.sort(key=lambda item: item[0])
    return [job for _, job in jobs]


def parse_part(text: str) -> tuple[int, int]:
    """``"I/N"`` (1 <= I <= N) as ``(I, N)``; bad text names ``--part``."""
    head, _, tail = text.partition("/")
    try:
        index, count = int(head), int(tail)
    except ValueError:
        index, count = 0, 0
    if count < 1 or not 1 <= index <= count:
        raise InvalidInputError("--part", f"{text!r} is not I/N with 1 <= I <= N "
                                "(e.g. 1/2 and 2/2 for two processes)")
    return index, count


def part_of_plan(jobs: list[Job], index: int, count: int) -> list[Job]:
    """The jobs of part ``index`` of ``count``: the cells (claim, setting, point, arm) are
    dealt out in turn, in the order they first appear in ``jobs``. A cell's tuning jobs and
    its tuned runs stay in one part, and run there in plan order (tuning first), so parts
    run by separate processes over one record folder never run the same job and never wait
    for each other; the processes must plan the same jobs (the same study, budget and
    claims)."""
    slot: dict[tuple[str, str, str, str], int] = {}
    for job in jobs:
        slot.setdefault(job.cell, len(slot) % count)
    return [job for job in jobs if slot[job.cell] == index - 1]
