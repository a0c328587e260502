"""Run a study's jobs for one budget: finished runs are skipped, each record is written
atomically when its run ends, tuned settings take the values chosen on the validation split.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import from_mapping, set_dotted
from ..errors import InvalidInputError
from ..provenance import finish, provenance
from ..training.config import DataConfig, TrainConfig
from ..training.loop import DivergedError
from .records import make_record, read_record, write_record
from .spec import Job, Study, config_hash, part_of_plan, plan, points, tuned_label


@dataclass
class RunStats:
    planned: int = 0
    skipped: int = 0
    ran: int = 0
    seconds: float = 0.0


def record_root(root: str | Path, study: Study, budget: str) -> Path:
    return Path(root) / study.name / budget


def job_fields(study: Study, budget: str, job: Job) -> dict[str, Any]:
    return {"study": study.name, "budget": budget, "claim": job.claim, "setting": job.setting,
            "point": job.point, "arm": job.arm, "seed": job.seed, "phase": job.phase,
            "tuned": dict(job.tuned)}


def select_tuned(study: Study, budget: str, job: Job, root: Path) -> dict[str, Any]:
    """The candidate with the best mean final validation accuracy over the tune seeds
    (the first in the listed order on a tie); every tune record must exist."""
    claim = study.claim(job.claim)
    setting = next(s for s in claim.settings if s.label == job.setting)
    best: tuple[float, dict[str, Any]] | None = None
    for candidate in points(setting.tune):
        accs = []
        for seed in range(study.budgets[budget].tune_seeds):
            tune_job = Job(job.claim, job.setting, job.point, job.arm, seed, "tune", {},
                           candidate)
            record = read_record(root / tune_job.relpath())
            if record is None:
                raise InvalidInputError("--budget", f"tuning record {tune_job.relpath()} is "
                                        "missing; run the study's tuning jobs first")
            final = record["summary"].get("test_accuracy")
            accs.append(float("-inf") if final is None else float(final))
        mean = sum(accs) / len(accs)
        if best is None or mean > best[0]:
            best = (mean, candidate)
    assert best is not None
    return dict(best[1])


def job_configuration(study: Study, budget: str, job: Job, root: Path
                      ) -> tuple[Mapping[str, Any], dict[str, Any], str]:
    """A job's configuration (its tuned values chosen from the tuning records under
    ``root`` where it needs them), those values and the hash its record carries; raises
    ``InvalidInputError`` while a tuning record it chooses from is missing."""
    mapping: Mapping[str, Any] = job.mapping
    tuned: dict[str, Any] = dict(job.tuned)
    if job.needs_tune:
        tuned = select_tuned(study, budget, job, root)
        mapping = json.loads(json.dumps(mapping))
        for key, value in tuned.items():
            set_dotted(mapping, key, value)  # type: ignore[arg-type]
    return mapping, tuned, config_hash(mapping)


def record_state(study: Study, budget: str, job: Job, root: Path) -> str:
    """``"current"`` (a record of the job's current configuration), ``"missing"`` (none, or
    one of an earlier design or other tuned values: it will be run), or ``"awaiting
    tuning"`` (a record whose tuned values cannot be checked until the job's tuning records
    are all there; it stands, and is re-run only if the new choice differs)."""
    record = read_record(root / job.relpath())
    if record is None:
        return "missing"
    try:
        _, _, digest = job_configuration(study, budget, job, root)
    except InvalidInputError:
        return "awaiting tuning"
    return "current" if record.get("config_hash") == digest else "missing"


class DataCache:
    """Loaded data sets by configuration (a few at most: Fashion-MNIST is large)."""

    def __init__(self, data_dir: str | None, size: int = 3) -> None:
        self.data_dir, self.size = data_dir, size
        self.items: OrderedDict[str, Any] = OrderedDict()

    def get(self, config: TrainConfig, seed: int) -> Any:
        from ..training.data import load_dataset
        key = json.dumps([repr(config.data), seed if config.data.fraction < 1 else None])
        if key not in self.items:
            self.items[key] = load_dataset(config.data, seed, self.data_dir)
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        self.items.move_to_end(key)
        return self.items[key]


def preflight(jobs: list[Job], data_dir: str | None) -> None:
    """Fail at once when a needed data set is missing (before any long run starts)."""
    from ..training.data import check_available
    seen: set[str] = set()
    for job in jobs:
        data = from_mapping(DataConfig, dict(job.mapping.get("data", {})))
        if repr(data) not in seen:
            seen.add(repr(data))
            check_available(data, data_dir)


def run_study(study: Study, budget: str, root: str | Path, claims: tuple[str, ...] = (),
              device: str = "cpu", data_dir: str | None = None, threads: int = 1,
              max_runs: int | None = None, log: Callable[[str], None] = print,
              ensemble: bool = True, part: tuple[int, int] = (1, 1)) -> RunStats:
    """Run every job of ``budget`` not yet recorded under ``root``; ``max_runs`` stops after
    that many new runs (the rest is picked up by the next call).

    With ``ensemble`` (the default), the pending seeds of a cell (same claim, setting,
    point, arm, phase and configuration) train together as one ensemble of stacked models
    (``training.ensemble``) when the configuration allows it, else one by one. Each seed's
    record is the one its separate run writes (to float32 rounding), with ``ensemble``
    naming the seeds that trained together.

    ``part = (I, N)`` runs only the I-th of N parts of the plan (``spec.part_of_plan``), so
    that N processes share one record folder.
    """
    import torch

    from ..training.ensemble import ensemble_fallback_reason, train_ensemble
    from ..training.loop import train_run

    if threads > 0:
        torch.set_num_threads(threads)
    jobs = part_of_plan(plan(study, budget, claims), *part)
    preflight(jobs, data_dir)
    base = record_root(root, study, budget)
    stats = RunStats(planned=len(jobs))
    cache = DataCache(data_dir)
    code_commit = provenance().get("git_commit")
    started = time.perf_counter()

    def prepare(job: Job) -> tuple[Path, Mapping[str, Any], dict[str, Any], str] | None:
        """Path, configuration, tuned values and hash of a job; None when recorded."""
        path = base / job.relpath()
        mapping, tuned, digest = job_configuration(study, budget, job, base)
        existing = read_record(path)
        if existing is not None and existing.get("config_hash") == digest:
            return None
        return path, mapping, tuned, digest

    def cell_key(job: Job, digest: str) -> tuple:
        return (job.claim, job.setting, job.point, job.arm, job.phase, digest)

    def write(index: int, job: Job, path: Path, mapping: Mapping[str, Any],
              tuned: dict[str, Any], digest: str, outcome: Any, seconds: float,
              extra: dict[str, Any]) -> None:
        prov = provenance()
        prov["git_commit"] = code_commit  # the code this process loaded, not today's HEAD
        fields = job_fields(study, budget, job)
        fields["tuned"] = tuned
        fields.update(extra)
        if isinstance(outcome, DivergedError):
            # a diverged run is a result (recorded, never re-run), not a failure of the study
            fields["diverged"] = str(outcome)
            write_record(path, make_record(fields, digest, mapping, {"test_accuracy": None},
                                           [], finish(prov)))
            log(f"[{index}/{len(jobs)}] {job.claim} {job.phase} {job.setting} {job.point} "
                f"{job.arm} seed {job.seed}: diverged")
        else:
            write_record(path, make_record(fields, digest, mapping, outcome.summary,
                                           outcome.rows, finish(prov)))
            acc = outcome.summary["test_accuracy"]
            log(f"[{index}/{len(jobs)}] {job.claim} {job.phase} {job.setting} {job.point} "
                f"{job.arm}{' ' + tuned_label(tuned) if tuned else ''} seed {job.seed}: "
                f"{outcome.summary.get('evaluated_on', 'test')} accuracy {100 * acc:.2f}% "
                f"({seconds:.1f}s)")
        stats.ran += 1

    taken: set[int] = set()  # jobs already run as members of an ensemble
    for index, job in enumerate(jobs, 1):
        if index in taken:
            continue
        prepared = prepare(job)
        if prepared is None:
            stats.skipped += 1
            continue
        if max_runs is not None and stats.ran >= max_runs:
            break
        path, mapping, tuned, digest = prepared
        config = from_mapping(TrainConfig, dict(mapping))
        group = [(index, job, prepared)]
        if ensemble and ensemble_fallback_reason(config) is None:
            room = None if max_runs is None else max_runs - stats.ran
            for later, other in enumerate(jobs[index:], index + 1):
                if room is not None and len(group) >= room:
                    break
                if later in taken or (other.claim, other.setting, other.point, other.arm,
                                      other.phase) != cell_key(job, digest)[:5]:
                    continue
                other_prepared = prepare(other)
                if other_prepared is not None and other_prepared[3] == digest:
                    group.append((later, other, other_prepared))
        if len(group) > 1:
            t0 = time.perf_counter()
            seeds = [member.seed for _, member, _ in group]
            datas = [cache.get(config, seed) for seed in seeds]
            outcomes = train_ensemble(config, seeds, datas, device)
            share = (time.perf_counter() - t0) / len(group)
            for (i, member, (m_path, _, m_tuned, _)), outcome in zip(group, outcomes,
                                                                     strict=True):
                taken.add(i)
                write(i, member, m_path, mapping, m_tuned, digest, outcome, share,
                      {"ensemble": {"seeds": seeds}})
            continue
        t0 = time.perf_counter()
        try:
            outcome: Any = train_run(config, job.seed, device,
                                     data=cache.get(config, job.seed), data_dir=data_dir)
        except DivergedError as exc:
            outcome = exc
        write(index, job, path, mapping, tuned, digest, outcome, time.perf_counter() - t0, {})
    stats.seconds = time.perf_counter() - started
    return stats
