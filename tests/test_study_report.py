"""The claims report on hand-made records: verdicts follow the paired intervals, "final"
only for a flattened baseline, missing seeds keep a cell pending."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from asyncbalance.study.records import write_record
from asyncbalance.study.report import write_report
from asyncbalance.study.runner import record_root
from asyncbalance.study.spec import Job, parse_study, plan

SEEDS = 5


def _study():
    claim = {"id": "c", "title": "Claim C", "paper": "paper says", "baseline": "plain",
             "epochs": {"cpu": 10},
             "compare": [["better", "plain"], ["same", "plain"], ["partial", "plain"]],
             "arms": {"plain": {}, "better": {"set": {"balancing.mode": "partial"}},
                      "same": {"set": {"balancing.p": 1.0}},
                      "partial": {"set": {"balancing.mode": "full"}}},
             "settings": {"paper": {"source": "defaults"}}}
    return parse_study({"name": "s", "base": {"data": {"name": "digits"}},
                        "budgets": {"cpu": {"seeds": SEEDS}}, "claim": [claim]})


def _record(job: Job, curve: list[float]) -> dict:
    return {"study": "s", "budget": "cpu", "claim": job.claim, "setting": job.setting,
            "point": job.point, "arm": job.arm, "seed": job.seed, "phase": "run",
            "tuned": {}, "config_hash": "h", "config": dict(job.mapping),
            "summary": {"test_accuracy": curve[-1], "best_test_accuracy": max(curve),
                        "dataset": "digits", "n_train": 100, "n_test": 50,
                        "max_function_rel_error_at_balance": None},
            "curves": {"epoch": list(range(len(curve))), "test_accuracy": curve},
            "provenance": {"git_commit": "abc"}}


def _write(tmp_path: Path, flat: bool, rising: str = "") -> str:
    study = _study()
    root = record_root(tmp_path / "rec", study, "cpu")
    rng = np.random.default_rng(3)
    seed_luck = rng.normal(0, 0.02, SEEDS)
    for job in plan(study, "cpu"):
        if job.arm == "partial" and job.seed >= 3:
            continue                                    # two seeds missing: pending
        level = 0.8 + seed_luck[job.seed]
        if job.arm == "better":
            level += 0.03 + rng.normal(0, 0.002)
        if job.arm == "same":
            level += rng.normal(0, 0.02)
        rise = np.linspace(0.1, level, 11) if not flat or job.arm == rising else \
            np.concatenate([np.linspace(0.1, level, 6), np.full(5, level)])
        write_record(root / job.relpath(), _record(job, [float(v) for v in rise]))
    out = tmp_path / "claims.md"
    write_report(study, "cpu", tmp_path / "rec", out)
    return out.read_text()


def test_verdicts_follow_the_intervals(tmp_path: Path) -> None:
    text = _write(tmp_path, flat=True)
    assert "- [paper] better vs plain, final accuracy: higher (+3." in text
    assert "- [paper] same vs plain, final accuracy: no detectable difference" in text
    assert "partial vs plain" not in text.split("**Verdicts**")[1]
    assert "pending (seeds missing)" in text
    assert "**partial** (18/20 runs" in text
    assert "Every arm has settled" in text
    # Holm over the claim's complete tests; the minimal detectable effect beside "same"
    assert "over the claim's 4 tests" in text
    same = next(line for line in text.splitlines()
                if line.startswith("- [paper] same vs plain, final accuracy"))
    assert "minimal detectable effect ±" in same


def test_an_arm_still_rising_blocks_final(tmp_path: Path) -> None:
    """The baseline has settled but one compared arm still rises: its comparison is "at
    epoch 10", the other's stays "final"."""
    text = _write(tmp_path, flat=True, rising="better")
    verdicts = text.split("**Verdicts**")[1]
    assert "better vs plain, accuracy at epoch 10: higher" in verdicts
    assert "better vs plain, final accuracy" not in verdicts
    assert "same vs plain, final accuracy" in verdicts
    assert "Not settled at epoch 10" in text and "better (still rising" in text
    # every directional verdict has its own line in the summary
    summary = text.split("## Summary")[1].split("## Claim C")[0]
    assert "  - [paper] better vs plain, accuracy at epoch 10: higher" in summary


def test_an_arm_whose_every_run_diverged_is_said_so_not_called_unsettled(
        tmp_path: Path) -> None:
    study = _study()
    root = record_root(tmp_path / "rec", study, "cpu")
    for job in plan(study, "cpu"):
        record = _record(job, [float(v) for v in np.linspace(0.1, 0.8, 11)])
        if job.arm == "partial":
            record["diverged"] = "optimizer.lr: training diverged in epoch 1"
            record["summary"]["test_accuracy"] = None
            record["curves"] = {"epoch": [], "test_accuracy": []}
        write_record(root / job.relpath(), record)
    out = tmp_path / "claims.md"
    write_report(study, "cpu", tmp_path / "rec", out)
    text = out.read_text()
    assert "Every run of partial diverged: no curve to settle." in text
    assert "partial (too short to settle" not in text and "+nan" not in text
    assert "Not settled at epoch 10" in text and "plain (still rising" in text


def test_a_seed_diverged_in_one_arm_leaves_both_paired_tests_alike(tmp_path: Path) -> None:
    # Seed 2 of "better" diverged (no curve, no accuracy): the accuracy and the area under
    # the curve are both paired over the 4 other seeds, and the tag says why.
    study = _study()
    root = record_root(tmp_path / "rec", study, "cpu")
    rng = np.random.default_rng(5)
    for job in plan(study, "cpu"):
        level = 0.8 + rng.normal(0, 0.002) + (0.03 if job.arm == "better" else 0.0)
        record = _record(job, [float(v) for v in np.linspace(0.1, level, 11)])
        if job.arm == "better" and job.seed == 2:
            record["diverged"] = "optimizer.lr: training diverged in epoch 3"
            record["summary"]["test_accuracy"] = None
            record["curves"] = {}
        write_record(root / job.relpath(), record)
    out = tmp_path / "claims.md"
    write_report(study, "cpu", tmp_path / "rec", out)
    text = out.read_text()
    lines = [line for line in text.splitlines() if line.startswith("- [paper; 4 of 5 planned "
                                                                  "seeds, 1 diverged")]
    assert any("better vs plain, area under the accuracy curve: higher (" in line
               and "4 seeds" in line for line in lines)
    assert any("better vs plain, accuracy at epoch 10: higher (" in line for line in lines)
    assert "inf" not in text and "nan" not in text


def test_no_final_word_while_the_baseline_still_rises(tmp_path: Path) -> None:
    text = _write(tmp_path, flat=False)
    verdicts = text.split("**Verdicts**")[1]
    assert "final accuracy" not in verdicts
    assert "better vs plain, accuracy at epoch 10: higher" in verdicts
    assert "Not settled at epoch 10" in text and "plain (still rising" in text


def test_a_diverged_run_is_recorded_and_never_rerun(tmp_path: Path) -> None:
    from asyncbalance.study.records import read_record
    from asyncbalance.study.runner import run_study

    study = parse_study({
        "name": "d", "base": {"data": {"name": "digits"}, "device": "cpu"},
        "budgets": {"smoke": {"seeds": 1, "tune_seeds": 1}},
        "claim": [{"id": "c", "epochs": {"smoke": 1}, "baseline": "plain",
                   "arms": {"plain": {}, "wild": {"set": {"optimizer.lr": 1e30}}},
                   "settings": {"tuned": {"tune": {"optimizer.lr": [1e30, 0.1]}}}}]})
    stats = run_study(study, "smoke", tmp_path, log=lambda _: None)
    assert stats.ran == len(plan(study, "smoke"))
    root = record_root(tmp_path, study, "smoke")
    wild = read_record(root / "c" / "tune" / "tuned" / "wild" / "lr=1e+30" / "seed-0.json")
    assert wild is not None and "diverged" in wild and wild["summary"]["test_accuracy"] is None
    tuned = read_record(root / "c" / "tuned" / "plain" / "seed-0.json")
    assert tuned is not None and tuned["tuned"] == {"optimizer.lr": 0.1}  # never the diverged
    assert run_study(study, "smoke", tmp_path, log=lambda _: None).ran == 0


def test_parts_run_by_separate_processes_record_every_job_once(tmp_path: Path) -> None:
    from asyncbalance.study.runner import run_study

    study = parse_study({
        "name": "p", "base": {"data": {"name": "digits"}, "device": "cpu"},
        "budgets": {"smoke": {"seeds": 2, "tune_seeds": 1}},
        "claim": [{"id": "c", "epochs": {"smoke": 1}, "baseline": "plain",
                   "arms": {"plain": {}, "slow": {"set": {"optimizer.lr": 1e-3}},
                            "fast": {"set": {"optimizer.lr": 0.2}}},
                   "settings": {"tuned": {"tune": {"optimizer.lr": [1e-2, 0.1]}}}}]})
    ran = [run_study(study, "smoke", tmp_path, log=lambda _: None, part=(index, 2)).ran
           for index in (1, 2)]
    # Each part ran its own cells whole (tuning, then the tuned runs that read it); together
    # they ran the plan once, and a full pass finds nothing left.
    assert all(ran) and sum(ran) == len(plan(study, "smoke"))
    assert run_study(study, "smoke", tmp_path, log=lambda _: None).ran == 0


def test_tuning_picks_the_best_mean_validation_accuracy(tmp_path: Path) -> None:
    from asyncbalance.study.runner import select_tuned

    study = parse_study({
        "name": "t", "base": {"data": {"name": "digits"}},
        "budgets": {"cpu": {"seeds": 2, "tune_seeds": 2}},
        "claim": [{"id": "c", "epochs": {"cpu": 1}, "arms": {"plain": {}},
                   "settings": {"tuned": {"tune": {"optimizer.lr": [0.01, 0.1, 1.0]}}}}]})
    jobs = plan(study, "cpu")
    root = record_root(tmp_path, study, "cpu")
    # validation accuracy by (lr, seed): 0.1 wins on the mean although 1.0 has the best run
    accs = {(0.01, 0): 0.50, (0.01, 1): 0.52, (0.1, 0): 0.70, (0.1, 1): 0.71,
            (1.0, 0): 0.90, (1.0, 1): 0.10}
    for job in jobs:
        if job.phase == "tune":
            acc = accs[(job.tuned["optimizer.lr"], job.seed)]
            write_record(root / job.relpath(), _record(job, [0.1, acc]))
    run_job = next(j for j in jobs if j.phase == "run")
    assert run_job.needs_tune
    assert select_tuned(study, "cpu", run_job, root) == {"optimizer.lr": 0.1}


def test_gap_curve_by_hand(tmp_path: Path) -> None:
    """The paired gap per epoch: mean of the per-seed differences with its t interval."""
    import math

    from asyncbalance.study.cells import Cell
    from asyncbalance.study.figures import gap_curves, gap_figure

    cell = Cell("paper", "")
    base = {0: [0.5, 0.6, 0.7], 1: [0.4, 0.5, 0.6], 2: [0.6, 0.6, 0.6]}
    gaps = {0: [0.0, 0.01, 0.02], 1: [0.0, 0.03, 0.04], 2: [0.0, 0.02, 0.06]}
    for seed in base:
        cell.runs["plain"][seed] = {"curves": {"epoch": [0, 1, 2],
                                               "test_accuracy": base[seed]}}
        cell.runs["nb"][seed] = {"curves": {"epoch": [0, 1, 2], "test_accuracy": [
            b + g for b, g in zip(base[seed], gaps[seed], strict=True)]}}
    e, mean, low, high = gap_curves(cell, "nb", "plain")
    assert list(e) == [0.0, 1.0, 2.0]
    # epoch 1: d = 0.01, 0.03, 0.02 -> mean 0.02, sd 0.01, half 4.302653 * 0.01 / sqrt(3)
    half = 4.302653 * 0.01 / math.sqrt(3)
    assert mean[1] == pytest.approx(0.02, abs=1e-12)
    assert (low[1], high[1]) == (pytest.approx(0.02 - half, rel=1e-6),
                                 pytest.approx(0.02 + half, rel=1e-6))
    # epoch 2: d = 0.02, 0.04, 0.06 -> mean 0.04, sd 0.02
    assert high[2] - mean[2] == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-6)
    assert gap_figure(cell, [("nb", "plain")], "t", tmp_path / "gap.png")
    assert (tmp_path / "gap.png").stat().st_size > 0
