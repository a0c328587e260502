"""Outputs get the modes the umask asks for, and balancing in place keeps the file's mode.

``tempfile`` creates files 0600 and directories 0700 whatever the umask; every output here is
written through a temporary, so each must be given its final mode explicitly.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from asyncbalance.cli import main
from asyncbalance.training.records import write_run

ROOT = Path(__file__).resolve().parents[1]
VECTOR = ROOT / "tests" / "data" / "testvectors" / "mlp_bias_p2.npz"
RUN_SCENARIO = ROOT / "scenarios" / "quickstart.toml"


@pytest.fixture(params=[0o022, 0o077], ids=["umask-022", "umask-077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_balance_outputs_and_new_directories_follow_the_umask(umask: int, tmp_path: Path):
    out = tmp_path / "new" / "dir" / "o.npz"
    report = tmp_path / "r.json"
    assert main(["balance", str(VECTOR), "--p", "2", "-o", str(out), "--report", str(report),
                 "--quiet"]) == 0
    assert _mode(out) == 0o666 & ~umask
    assert _mode(report) == 0o666 & ~umask
    assert _mode(out.parent) == 0o777 & ~umask
    assert _mode(out.parent.parent) == 0o777 & ~umask


def test_balancing_in_place_keeps_the_file_mode(umask: int, tmp_path: Path):
    net = tmp_path / "net.npz"
    shutil.copy(VECTOR, net)
    os.chmod(net, 0o640)
    before = net.read_bytes()
    assert main(["balance", str(net), "--p", "2", "-o", str(net), "--quiet"]) == 0
    assert net.read_bytes() != before  # really rewritten
    assert _mode(net) == 0o640


def test_training_records_and_report_follow_the_umask(umask: int, tmp_path: Path):
    summary = {"name": "demo", "label": "a", "seed": 0, "trainer": "backprop",
               "test_accuracy": 0.5, "best_test_accuracy": 0.5, "train_accuracy": 0.5}
    rows = [{"epoch": 0, "test_accuracy": 0.5, "seconds": 1.0},
            {"epoch": 1, "test_accuracy": 0.6, "seconds": 1.0}]
    run_dir = write_run(tmp_path / "runs" / "seed-0", summary, rows)
    assert _mode(run_dir) == 0o777 & ~umask
    for name in ("summary.json", "epochs.csv"):
        assert _mode(run_dir / name) == 0o666 & ~umask
    report = tmp_path / "rep" / "r.md"
    assert main(["report", str(tmp_path / "runs"), "-o", str(report)]) == 0
    written = sorted(report.parent.iterdir())
    assert report in written and any(p.suffix == ".png" for p in written)
    for path in written:
        assert _mode(path) == 0o666 & ~umask, path


def test_run_record_follows_the_umask(umask: int, tmp_path: Path):
    out = tmp_path / "run"
    code = main(["run", str(RUN_SCENARIO), "--backend", "sim", "--out", str(out), "--quiet",
                 "--set", "stop.tol=1e-4", "--json"])
    assert code == 0
    assert _mode(out) == 0o777 & ~umask
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"summary.json", "trace.csv"} <= {p.name for p in files}
    for path in files:
        assert _mode(path) == 0o666 & ~umask, path
