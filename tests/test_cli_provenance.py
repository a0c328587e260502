"""The provenance block: what produced a record."""

from __future__ import annotations

import subprocess
from datetime import datetime
from pathlib import Path

import numpy as np

from asyncbalance.provenance import finish, git_commit, provenance

REPO = Path(__file__).resolve().parents[1]


def test_provenance_names_versions_command_host_and_time():
    record = provenance(["asyncbalance", "balance", "net.npz"])
    assert record["command_line"] == ["asyncbalance", "balance", "net.npz"]
    assert record["package"] == "asyncbalance"
    assert record["package_version"]
    assert record["numpy"] == np.__version__
    assert record["host"]
    started = datetime.fromisoformat(record["started_utc"])
    assert started.utcoffset().total_seconds() == 0
    for lib in ("torch", "ray", "python"):
        assert lib in record
    assert "finished_utc" not in record
    assert finish(record)["finished_utc"] >= record["started_utc"]


def test_git_commit_matches_the_checkout_or_is_none_outside_one(tmp_path):
    assert git_commit(tmp_path) is None
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=False)
    if head.returncode == 0:
        assert git_commit(REPO).split("+")[0] == head.stdout.strip()


def test_git_commit_is_none_without_git(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable on PATH
    assert git_commit(REPO) is None
