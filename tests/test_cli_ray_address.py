"""An unreachable cluster address is named at once, and nothing is written."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_address_fails_fast_naming_the_option(tmp_path: Path) -> None:
    out = tmp_path / "run"
    address = f"127.0.0.1:{_closed_port()}"
    result = subprocess.run(
        [sys.executable, "-m", "asyncbalance.cli", "run", str(ROOT / "scenarios/quickstart.toml"),
         "--address", address, "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"--address: no Ray cluster answers at {address}" in result.stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
