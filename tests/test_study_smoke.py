"""The smoke study end to end on scikit-learn's digits (no Fashion-MNIST): records, resume
after an interruption skips finished runs, report generation, README block."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import asyncbalance.training.ensemble as ensemble_module
import asyncbalance.training.loop as loop_module
from asyncbalance.cli import main
from asyncbalance.study.report import SUMMARY_BEGIN, SUMMARY_END
from asyncbalance.study.spec import load_study, plan

STUDY = Path(__file__).resolve().parents[1] / "studies" / "paper_claims.toml"


def _records(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns
            for p in root.rglob("seed-*.json")}


def test_smoke_study_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture) -> None:
    records = tmp_path / "records"
    root = records / "paper_claims" / "smoke"
    planned = plan(load_study(STUDY), "smoke")
    assert len(planned) > 50
    claims_in_plan = {job.claim for job in planned}
    assert claims_in_plan == {c.id for c in load_study(STUDY).claims}

    # an interruption in the fourth training call (a separate run or an ensemble of seeds):
    # the records of the first three calls, nothing half-written
    real_train_run = loop_module.train_run
    real_train_ensemble = ensemble_module.train_ensemble
    calls = {"n": 0}

    def interrupting(real):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(loop_module, "train_run", interrupting(real_train_run))
    monkeypatch.setattr(ensemble_module, "train_ensemble", interrupting(real_train_ensemble))
    args = ["study", "run", str(STUDY), "--budget", "smoke", "--records", str(records),
            "--quiet"]
    assert main(args) == 130
    first = _records(root)
    assert 3 <= len(first) < len(planned)      # three calls of one seed or more each
    assert not [p for p in root.rglob("*") if p.name.startswith(".")]
    monkeypatch.setattr(loop_module, "train_run", real_train_run)
    monkeypatch.setattr(ensemble_module, "train_ensemble", real_train_ensemble)

    # a stray temporary file from a killed write is ignored, never read as a record
    stray = root / next(iter(first))
    (stray.parent / f".{stray.name}.x.tmp").write_text("{not json")

    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"{len(planned) - len(first)} runs done, {len(first)} already recorded" in err
    after = _records(root)
    assert len(after) == len(planned)
    assert all(after[k] == v for k, v in first.items())  # finished runs were not re-run

    # a record whose configuration no longer matches is stale and re-run; others skipped
    victim = root / sorted(after)[0]
    data = json.loads(victim.read_text())
    data["config_hash"] = "stale"
    victim.write_text(json.dumps(data))
    plan_args = ["study", "plan", str(STUDY), "--budget", "smoke", "--records", str(records)]

    def missing(awaiting: dict[str, int] | None = None) -> dict[str, int]:
        assert main(plan_args) == 0
        counts = {}
        for line in capsys.readouterr().out.splitlines():
            claim, phase, ratio, *rest = line.split()
            done, total = map(int, ratio.split("/"))
            counts[f"{claim} {phase}"] = total - done
            if awaiting is not None and len(rest) > 1:   # "(k more awaiting their tuning)"
                awaiting[f"{claim} {phase}"] = int(rest[1].lstrip("("))
        return counts

    # the plan counts records of the current configuration only: the stale one is missing
    short = {k: v for k, v in missing().items() if v}
    assert short == {f"{data['claim']} {data['phase']}": 1}, short
    assert main(args) == 0
    assert "1 runs done" in capsys.readouterr().err
    assert not any(missing().values())
    # without one tuning record, the tuned runs that choose from it cannot be checked: they
    # are counted apart (they stand until their tuning is back, and are not re-run then
    # unless the choice changes)
    tuned = next(p for p in sorted(root.rglob("seed-*.json")) if "/tune/" in p.as_posix())
    kept = tuned.read_bytes()
    tuned.unlink()
    awaiting: dict[str, int] = {}
    short = {k: v for k, v in missing(awaiting).items() if v}
    claim = json.loads(kept)["claim"]
    assert short[f"{claim} tune"] == 1 and awaiting and all(
        key.startswith(claim) and key.endswith(" run") for key in awaiting), (short, awaiting)
    assert all(short.get(key, 0) >= n for key, n in awaiting.items())
    tuned.write_bytes(kept)
    assert not any(missing().values())

    record = json.loads(victim.read_text())
    for key in ("claim", "setting", "arm", "seed", "config_hash", "config", "summary",
                "curves", "provenance"):
        assert key in record
    assert record["summary"]["dataset"].startswith("digits")
    tune = [json.loads(p.read_text()) for p in root.rglob("seed-*.json")
            if "/tune/" in p.as_posix()]
    assert tune and all(t["summary"]["evaluated_on"] == "validation" for t in tune)

    # the report: every claim, no verdicts from the smoke budget, figures, README block
    readme = tmp_path / "README.md"
    readme.write_text("# Project\n\nintro\n")
    out = tmp_path / "docs" / "claims.md"
    report_args = ["study", "report", str(STUDY), "--budget", "smoke", "--records",
                   str(records), "-o", str(out), "--readme", str(readme)]
    assert main(report_args) == 0
    text = out.read_text()
    for claim in load_study(STUDY).claims:
        assert claim.title in text
    assert "None: the `smoke` budget proves the machinery only." in text
    assert "**Verdicts** (from" not in text          # no verdict section from smoke records
    assert not [line for line in text.splitlines() if line.startswith("- [")]
    assert list((tmp_path / "docs" / "claims").glob("*.png"))
    assert main(report_args) == 0   # regenerating replaces the block, never duplicates it
    body = readme.read_text()
    assert body.startswith("# Project\n\nintro\n")
    assert body.count(SUMMARY_BEGIN) == 1 and body.count(SUMMARY_END) == 1
    shutil.rmtree(records)


def test_missing_fashion_mnist_fails_at_once(tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    records = tmp_path / "records"
    code = main(["study", "run", str(STUDY), "--budget", "cpu", "--records", str(records),
                 "--data-dir", str(tmp_path / "nowhere"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "data.dir" in err and "apt-get install dataset-fashion-mnist" in err
    assert not records.exists()


def test_no_ensemble_trains_every_seed_on_its_own(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def refused(*args, **kwargs):
        calls.append(args)
        raise AssertionError("--no-ensemble must not train an ensemble")

    monkeypatch.setattr(ensemble_module, "train_ensemble", refused)
    records = tmp_path / "records"
    args = ["study", "run", str(STUDY), "--budget", "smoke", "--records", str(records),
            "--claim", "table2_partial_2fcn", "--max-runs", "2", "--quiet"]
    assert main([*args, "--no-ensemble"]) == 0
    assert not calls and len(_records(records)) == 2
    # without the flag the next cell's seeds go to the ensemble (refused here: an error)
    assert main(args) != 0
    assert calls
