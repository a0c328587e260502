"""What the commands print and record: results on stdout (or JSON with --json), progress on
stderr as plain lines when it is not a terminal, provenance in every record, time columns
that name their unit."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime
from pathlib import Path

import pytest

from asyncbalance.cli import main
from asyncbalance.progress import Progress

ROOT = Path(__file__).resolve().parents[1]
VECTOR = ROOT / "tests" / "data" / "testvectors" / "mlp_bias_p2.npz"
RUN_SCENARIO = ROOT / "scenarios" / "quickstart.toml"
PROVENANCE_KEYS = {"package_version", "git_commit", "command_line", "started_utc",
                   "finished_utc", "host", "python", "numpy", "torch", "ray"}


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_in_a_log_is_plain_lines_and_on_a_terminal_one_redrawn_line() -> None:
    log = io.StringIO()
    progress = Progress("job", stream=log, delay=0.0, log_interval=0.0)
    for i in range(3):
        progress.update(f"step {i}")
    progress.close("done")
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    assert [line.split(" [")[0] for line in text.splitlines()] == [
        "job: step 0", "job: step 1", "job: step 2", "job: done"]
    terminal = _Terminal()
    progress = Progress("job", stream=terminal, delay=0.0, interval=0.0)
    progress.update("step 0")
    progress.close("done")
    assert terminal.getvalue().startswith("\rjob: step 0") and "\x1b[K" in terminal.getvalue()
    assert terminal.getvalue().endswith("\n") and terminal.getvalue().count("\n") == 1


def test_a_log_ends_on_the_last_state_even_when_updates_were_throttled() -> None:
    log = io.StringIO()
    progress = Progress("job", stream=log, delay=0.0, log_interval=3600.0)
    for i in range(5):
        progress.update(f"step {i}")
    progress.close()
    assert [line.split(" [")[0] for line in log.getvalue().splitlines()] == [
        "job: step 0", "job: step 4"]


def _check_provenance(record: dict, argv: list[str]) -> None:
    assert PROVENANCE_KEYS <= set(record), PROVENANCE_KEYS - set(record)
    assert record["command_line"] == ["asyncbalance", *argv]
    started = datetime.fromisoformat(record["started_utc"])
    finished = datetime.fromisoformat(record["finished_utc"])
    assert started.utcoffset().total_seconds() == 0 and started <= finished


def test_balance_prints_its_result_on_stdout_and_json_on_request(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, report = tmp_path / "o.npz", tmp_path / "r.json"
    argv = ["balance", str(VECTOR), "--p", "2", "-o", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "max log-imbalance" in captured.out
    argv = ["balance", str(VECTOR), "--p", "2", "-o", str(out), "--report", str(report),
            "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert printed == json.loads(report.read_text())
    assert printed["method"] == "exact" and printed["output"] == str(out)
    _check_provenance(printed["provenance"], argv)


def test_run_json_carries_provenance_and_the_trace_names_its_time_unit(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = ["run", str(RUN_SCENARIO), "--backend", "sim", "--out", str(out), "--quiet",
            "--set", "stop.tol=1e-4", "--json"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out / "summary.json").read_text())
    assert PROVENANCE_KEYS <= set(printed["provenance"])
    with open(out / "trace.csv") as handle:
        header = next(csv.reader(handle))
    assert header[:2] == ["time (scenario time units)", "wall_seconds (s)"]
