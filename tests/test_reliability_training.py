"""Training that blows up says so: a finite but exploding loss is a divergence, not a result."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _train_digits(cwd: Path, out: Path, setting: str) -> subprocess.CompletedProcess:
    """``asyncbalance train`` on the quick digits scenario with one ``--set``."""
    return subprocess.run(
        [sys.executable, "-m", "asyncbalance.cli", "train",
         str(ROOT / "scenarios" / "train_digits_quick.toml"), "--set", setting,
         "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_a_finite_exploding_loss_is_reported_as_diverged(tmp_path: Path) -> None:
    # DFA with momentum at lr 0.05 on digits: the loss passes 1e6 times the untrained
    # model's within a dozen epochs while the test accuracy still reads ~90 %.
    out = tmp_path / "runs"
    proc = _train_digits(tmp_path, out, "optimizer.lr=0.05")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "optimizer.lr: training diverged in epoch" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_a_power_that_overflows_the_balanced_weights_names_balancing_p(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    proc = _train_digits(tmp_path, out, "balancing.p=1e-9")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and ": balancing.p: p = 1e-09" in lines[0]
    assert not out.exists()
