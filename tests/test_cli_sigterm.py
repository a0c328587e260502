"""SIGTERM ends a run as Ctrl-C does: the record is marked incomplete and interrupted."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sigterm_marks_a_run_interrupted(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # A tolerance no run meets: it runs until stopped (or its 60 s wall budget).
    process = subprocess.Popen(
        [sys.executable, "-m", "asyncbalance.cli", "run", str(ROOT / "scenarios/quickstart.toml"),
         "--backend", "sim", "--set", "stop.tol=1e-300", "--set", "stop.max_wall_seconds=60",
         "--set", "stop.max_time=1e9", "--out", str(out)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not (out / "trace.csv").exists():
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            time.sleep(0.1)
        assert (out / "trace.csv").exists(), "the run never sampled"
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert "interrupted" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "incomplete" and summary["stop_reason"] == "interrupted"
