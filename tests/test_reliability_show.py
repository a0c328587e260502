"""``show`` says whether a run finished and gives every time with its unit."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

from asyncbalance.cli import main
from asyncbalance.runtime.report import summary_table

ROOT = Path(__file__).resolve().parents[1]


def _show(run_dir: Path) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["show", str(run_dir)]) == 0
    return out.getvalue()


def test_show_gives_status_and_the_unit_of_times(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["run", str(ROOT / "scenarios" / "quickstart.toml"), "--backend", "sim",
                     "--out", str(out), "--quiet", "--set", "stop.tol=1e-4"]) == 0
    text = _show(out)
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in text.splitlines())
    assert rows["status"] == "complete"
    assert rows["time to tolerance"].endswith("(simulated time units)")
    # A record left by a run that never finished says so.
    summary = json.loads((out / "summary.json").read_text())
    summary["status"] = "running"
    (out / "summary.json").write_text(json.dumps(summary))
    assert "running (not finished" in _show(out)


def test_ray_times_name_their_wall_seconds() -> None:
    table = summary_table({"name": "x", "status": "incomplete", "time_to_tol": 1680.0,
                           "time_unit": "time units of 0.005 wall seconds"})
    assert "1680 (time units of 0.005 wall seconds)" in table
    assert "incomplete" in table
