"""``pytest -m cuda`` selects every CUDA case of the training tests, and those cases would
run on a machine with a CUDA device: with availability faked (``torch.cuda.is_available``
patched to True by a plugin loaded before collection), none of them is skipped; here, with
a CPU build of torch, each then fails at its first CUDA operation, which shows it ran."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # three pytest runs in subprocesses (~20 s on a quiet machine)

ROOT = Path(__file__).resolve().parents[1]
TRAINING_TESTS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob(
    "test_training_*.py") if p.name != Path(__file__).name)


def _pytest(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def _collected(*args: str) -> set[str]:
    done = _pytest("--collect-only", "-q", *args, *TRAINING_TESTS)
    assert done.returncode in (0, 5), done.stdout + done.stderr
    return {line.strip() for line in done.stdout.splitlines() if "::" in line}


def test_cuda_cases_are_exactly_the_ones_marked_cuda() -> None:
    everything = _collected()
    selected = _collected("-m", "cuda")
    # a CUDA case names CUDA in its file, test or parameter id
    by_name = {node for node in everything if "cuda" in node.lower()}
    assert len(selected) >= 3  # the training-on-CUDA cases
    assert selected == by_name
    assert selected < everything


def test_cuda_cases_would_run_with_a_device(tmp_path: Path) -> None:
    plugin = tmp_path / "fake_cuda_available.py"
    plugin.write_text("import torch\n\ntorch.cuda.is_available = lambda: True\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    report = tmp_path / "report.xml"
    done = _pytest("-p", "fake_cuda_available", "-m", "cuda", f"--junitxml={report}",
                   *TRAINING_TESTS, env=env)
    cases = ET.parse(report).getroot().iter("testcase")
    outcomes = {}
    for case in cases:
        kinds = {child.tag for child in case} & {"skipped", "failure", "error"}
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = kinds or {"passed"}
    assert len(outcomes) >= 3, done.stdout[-2000:]
    assert all("skipped" not in kinds for kinds in outcomes.values()), outcomes
    if not torch.backends.cuda.is_built():
        # a CPU build: each case got as far as its first CUDA operation
        assert all(kinds & {"failure", "error"} for kinds in outcomes.values()), outcomes
        assert "CUDA" in done.stdout
