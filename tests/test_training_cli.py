"""End to end: ``asyncbalance train`` on digits, run records, ``asyncbalance report``, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from asyncbalance.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "scenarios" / "train_digits_quick.toml"


def test_quick_scenario_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "runs"
    argv = ["train", str(QUICK), "--out", str(out), "--device", "cpu", "--quiet", "--json"]
    assert main(argv) == 0
    run = out / "train_digits_quick" / "default" / "seed-0"
    summary = json.loads((run / "summary.json").read_text())
    assert json.loads(capsys.readouterr().out) == {"runs": [summary]}
    provenance = summary["provenance"]
    assert provenance["command_line"] == ["asyncbalance", *argv]
    assert provenance["started_utc"] <= provenance["finished_utc"]
    assert provenance["torch"] and provenance["numpy"] and provenance["package_version"]
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


def test_train_never_overwrites_a_run_unless_told(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "runs"
    argv = ["train", str(QUICK), "--out", str(out), "--quiet", "--device", "cpu",
            "--set", "epochs=0"]
    assert main(argv) == 0
    summary = out / "train_digits_quick" / "default" / "seed-0" / "summary.json"
    first = summary.read_bytes()
    assert main([*argv, "--set", "optimizer.lr=0.5"]) == 2
    assert "already holds a run record" in capsys.readouterr().err
    assert summary.read_bytes() == first
    assert main([*argv, "--set", "optimizer.lr=0.5", "--overwrite"]) == 0
    assert json.loads(summary.read_text())["config"]["optimizer"]["lr"] == 0.5
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]


def test_report_without_runs_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "r.md")]) == 2
    assert "no training run records" in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()


def test_report_statistics_and_records_round_trip(tmp_path: Path) -> None:
    from asyncbalance.training.records import read_epochs, write_run
    from asyncbalance.training.report import build_report, mean_std

    mean, std, n = mean_std([0.9, 0.8, float("nan"), None])
    assert n == 2 and mean == pytest.approx(0.85) and std == pytest.approx(0.0707106781)
    for seed, accs in enumerate([(0.5, 0.7), (0.6, 0.9)]):
        summary = {"name": "demo", "label": "a", "seed": seed, "trainer": "backprop",
                   "test_accuracy": accs[-1], "best_test_accuracy": max(accs),
                   "train_accuracy": accs[-1], "final_unit_log_imbalance": [0.1, -0.2],
                   "imbalance_p": 2.0}
        rows = [{"epoch": i, "test_accuracy": a, "seconds": 1.0, "alignment_deg": [1.0, 2.0]}
                for i, a in enumerate(accs)]
        write_run(tmp_path / "runs" / f"seed-{seed}", summary, rows)
    back = read_epochs(tmp_path / "runs" / "seed-1" / "epochs.csv")
    assert back[1]["test_accuracy"] == 0.9 and back[1]["alignment_deg"] == "[1.0, 2.0]"
    text = build_report([str(tmp_path / "runs")], tmp_path / "out" / "r.md")
    assert "| a | 2 | backprop | 80.00 ± 14.14 | 80.00 ± 14.14 |" in text
