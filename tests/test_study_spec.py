"""Study files: validation of keys and values, override order, job order."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncbalance.cli import main
from asyncbalance.errors import InvalidInputError
from asyncbalance.study.spec import load_study, parse_study, part_of_plan, plan

STUDY = Path(__file__).resolve().parents[1] / "studies" / "paper_claims.toml"


def _study(**claim_extra) -> dict:
    claim = {"id": "c", "epochs": {"smoke": 2, "cpu": 5}, "baseline": "plain",
             "arms": {"plain": {}, "nb": {"set": {"balancing.mode": "partial"}}},
             "settings": {"paper": {"set": {"optimizer.lr": 0.1}},
                          "tuned": {"tune": {"optimizer.lr": [0.01, 0.1]}}}}
    claim.update(claim_extra)
    return {"name": "s", "base": {"data": {"name": "digits"}},
            "budgets": {"smoke": {"seeds": 2, "tune_seeds": 1,
                                  "set": {"data.batch_size": 16}},
                        "cpu": {"seeds": 3}},
            "claim": [claim]}


def test_override_order_and_job_order() -> None:
    study = parse_study(_study(set={"optimizer.lr": 0.5, "data.batch_size": 8}))
    jobs = plan(study, "smoke")
    paper = [j for j in jobs if j.setting == "paper" and j.phase == "run"]
    assert paper[0].mapping["optimizer"]["lr"] == 0.1          # setting over claim
    assert paper[0].mapping["data"]["batch_size"] == 16         # budget over claim
    assert paper[0].mapping["epochs"] == 2
    phases = [(j.setting, j.phase) for j in jobs]
    # paper runs first, then the tuning runs, then the tuned runs
    assert phases.index(("tuned", "tune")) > max(i for i, p in enumerate(phases)
                                                 if p == ("paper", "run"))
    assert phases.index(("tuned", "run")) > max(i for i, p in enumerate(phases)
                                                if p == ("tuned", "tune"))
    tune = [j for j in jobs if j.phase == "tune"]
    assert len(tune) == 2 * 2 * 1                               # arms x candidates x seeds
    assert all(j.mapping["data"]["validation_fraction"] > 0 for j in tune)
    # seed-major within a phase: every arm gets seed 0 before any gets seed 1
    seeds = [j.seed for j in paper]
    assert seeds == sorted(seeds)
    assert len(plan(study, "cpu")) == 2 * 3 + 4 * 2 + 2 * 3


@pytest.mark.parametrize("change, field", [
    ({"baseline": "nope"}, "baseline"),
    ({"kind": "magic"}, "kind"),
    ({"colour": 1}, "colour"),
    ({"epochs": {"weekly": 3}}, "epochs.weekly"),
    ({"compare": [["nb", "ghost"]]}, "compare"),
    ({"set": {"optimizer.name": "lion"}}, "optimizer.name"),
])
def test_bad_study_names_the_key(change: dict, field: str) -> None:
    with pytest.raises(InvalidInputError, match=field.replace(".", r"\.")):
        plan(parse_study(_study(**change)), "smoke")


def test_bad_budget_and_cli_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(InvalidInputError, match="full"):
        plan(parse_study(_study()), "full")
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nwhat = 1\n')
    assert main(["study", "plan", str(bad), "--budget", "smoke"]) == 2
    assert "study.what" in capsys.readouterr().err


def test_shipped_study_is_valid_for_every_budget() -> None:
    study = load_study(STUDY)
    for budget in ("smoke", "cpu", "full"):
        jobs = plan(study, budget)
        assert jobs
        # at least 5 seeds per cell on the cpu budget
        if budget == "cpu":
            cells: dict = {}
            for job in jobs:
                if job.phase == "run":
                    cells.setdefault(job.cell, set()).add(job.seed)
            assert min(len(s) for s in cells.values()) >= 5
    for claim in study.claims:
        assert claim.paper, claim.id
        for setting in claim.settings:
            assert setting.source, (claim.id, setting.label)


def test_tuning_resplits_per_seed_with_the_claims_validation_share() -> None:
    data = _study(validation_fraction=0.2, paper_epochs=50,
                  paper_effects={"nb-plain": 1.5})
    data["validation_resplit"] = True
    data["budgets"]["smoke"]["tune_seeds"] = 3
    study = parse_study(data)
    tune = [j for j in plan(study, "smoke") if j.phase == "tune"]
    by_seed = {j.seed: j.mapping["data"] for j in tune}
    assert sorted(by_seed) == [0, 1, 2]
    assert [by_seed[k]["split_seed"] for k in (0, 1, 2)] == [0, 1, 2]   # one split per seed
    assert all(m["validation_fraction"] == 0.2 for m in by_seed.values())
    run = [j for j in plan(study, "smoke") if j.phase == "run"]
    assert all("validation_fraction" not in j.mapping["data"] for j in run)  # test set kept
    claim = study.claims[0]
    assert claim.paper_epochs == 50 and claim.paper_effects == {"nb-plain": 1.5}
    with pytest.raises(InvalidInputError, match="paper_effects"):
        parse_study(_study(paper_effects={"nb-ghost": 1.0}))
    with pytest.raises(InvalidInputError, match="validation_fraction"):
        parse_study(_study(validation_fraction=1.5))


def test_tuning_seed_s_holds_out_fold_s_of_the_claims_k_fold() -> None:
    data = _study(validation_folds=4)
    data["budgets"]["smoke"]["tune_seeds"] = 4
    study = parse_study(data)
    tune = [j for j in plan(study, "smoke") if j.phase == "tune"]
    by_seed = {j.seed: j.mapping["data"] for j in tune}
    assert [by_seed[s]["validation_fold"] for s in range(4)] == [0, 1, 2, 3]
    assert all("split_seed" not in m for m in by_seed.values())  # one partition
    assert all(m["subset_seed"] == 0 for m in by_seed.values())    # of one subset
    assert all(m["validation_folds"] == 4 and "validation_fraction" not in m
               for m in by_seed.values())
    run = [j for j in plan(study, "smoke") if j.phase == "run"]
    assert all("validation_folds" not in j.mapping["data"] for j in run)  # test set kept
    for bad in (1, -2, 2.5, True):
        with pytest.raises(InvalidInputError, match="validation_folds"):
            parse_study(_study(validation_folds=bad))
    with pytest.raises(InvalidInputError, match="validation_folds"):
        parse_study(_study(validation_folds=5, validation_fraction=0.2))


@pytest.mark.parametrize("count", [2, 3])
def test_parts_of_a_plan_split_it_by_whole_cells(count: int) -> None:
    jobs = plan(load_study(STUDY), "cpu")
    parts = [part_of_plan(jobs, index, count) for index in range(1, count + 1)]
    # Every job in exactly one part, each part in plan order (tuning before tuned runs).
    assert sorted(id(job) for part in parts for job in part) == sorted(id(j) for j in jobs)
    for part in parts:
        positions = [jobs.index(job) for job in part]
        assert positions == sorted(positions)
    # A cell's jobs (its tuning candidates, seeds and tuned runs) never span two parts.
    owner = {}
    for index, part in enumerate(parts):
        for job in part:
            assert owner.setdefault(job.cell, index) == index
    tuned_cells = {job.cell for job in jobs if job.needs_tune}
    assert tuned_cells and all(
        {owner[job.cell] for job in jobs if job.cell == cell} == {owner[cell]}
        for cell in tuned_cells)
    # Cells are dealt out in turn: the parts differ by at most one cell.
    cells = [len({job.cell for job in part}) for part in parts]
    assert max(cells) - min(cells) <= 1


def test_bad_part_is_refused_in_one_line(capsys: pytest.CaptureFixture) -> None:
    for text in ("3/2", "0/2", "x", "1/0", "1"):
        assert main(["study", "run", str(STUDY), "--budget", "smoke", "--part", text]) == 2
        err = capsys.readouterr().err
        assert "--part" in err and err.count("\n") == 1 and "Traceback" not in err

