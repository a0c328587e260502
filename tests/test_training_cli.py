"""End to end: ``asyncbalance train`` on digits, run records, ``asyncbalance report``, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from asyncbalance.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "scenarios" / "train_digits_quick.toml"


def test_quick_scenario_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    assert main(["train", str(QUICK), "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    run = out / "train_digits_quick" / "default" / "seed-0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.90
    assert summary["trainer"] == "dfa" and summary["device"] == "cpu"
    assert summary["balancing"]["mode"] == "partial" and summary["n_balance_events"] == 20
    # float64 twin: balancing changes outputs by rounding only
    assert summary["max_function_rel_error_at_balance"] < 1e-12
    with open(run / "epochs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == list(range(21))
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]

    report = tmp_path / "report" / "report.md"
    assert main(["report", str(out), "-o", str(report)]) == 0
    text = report.read_text()
    assert "| default | 1 | dfa |" in text
    assert (report.parent / "report-train_digits_quick-accuracy.png").stat().st_size > 1000
    assert (report.parent / "report-train_digits_quick-imbalance.png").is_file()


@pytest.mark.parametrize("override,message", [
    ("trainer.rule=hebb", "trainer.rule: invalid value 'hebb' (valid choices: backprop, dfa, fa)"),
    ("optimizer.name=rmsprop", "optimizer.name: invalid value 'rmsprop' (valid choices: sgd, "
                               "adam)"),
    ("data.fraction=0", "data.fraction: must be in (0, 1]"),
    ("data.fraction=1.5", "data.fraction: must be in (0, 1]"),
    ("model.widths=[0,0]", "model.widths: [64, 10] has no hidden layer"),
    ("balancing.mode=sometimes", "balancing.mode: invalid value 'sometimes'"),
    ("balancing.async_budget=0", "balancing.async_budget: must be > 0"),
])
def test_bad_input_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture, override: str,
                              message: str) -> None:
    out = tmp_path / "runs"
    code = main(["train", str(QUICK), "--out", str(out), "--quiet", "--set", override,
                 "--set", "epochs=1"])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or not any(out.rglob("summary.json"))


def test_missing_dataset_names_the_package(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "runs"
    code = main(["train", str(QUICK), "--out", str(out), "--quiet",
                 "--set", "data.name=fashion_mnist", "--data-dir", str(tmp_path / "absent")])
    assert code == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
    assert not out.exists()


def test_failed_run_leaves_no_partial_directory(tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "runs"
    code = main(["train", str(QUICK), "--out", str(out), "--quiet", "--set", "epochs=2",
                 "--set", "optimizer.lr=1e12", "--set", "balancing.mode=none"])
    assert code == 2
    assert "optimizer.lr: training diverged" in capsys.readouterr().err
    assert not out.exists() or not any(out.rglob("*"))


def test_report_without_runs_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "r.md")]) == 2
    assert "no training run records" in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()
