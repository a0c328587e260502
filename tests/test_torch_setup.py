"""The CUDA path of the setup: every CUDA case of the torch tests carries the ``cuda`` marker
(so ``pytest -m cuda`` runs exactly them), and ``scripts/bootstrap.sh`` takes ``--cuda``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _collected(marker_expression: str) -> list[str]:
    files = sorted(str(p) for p in (ROOT / "tests").glob("test_torch_*.py"))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "-m", marker_expression, *files],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode in (0, 5), result.stdout[-2000:] + result.stderr[-2000:]
    return [line for line in result.stdout.splitlines() if "::" in line]


def test_every_cuda_case_is_marked_cuda() -> None:
    cuda = _collected("cuda")
    rest = _collected("not cuda")
    # The CUDA cases are the ones parametrised with the "cuda" device.
    assert cuda and all("cuda" in item.split("[", 1)[-1] for item in cuda), cuda
    assert not [item for item in rest if "[" in item and "cuda" in item.split("[", 1)[1]]
    assert len(cuda) >= 12


def test_bootstrap_refuses_an_unknown_option_before_touching_anything() -> None:
    result = subprocess.run(["bash", str(ROOT / "scripts" / "bootstrap.sh"), "--gpu"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == ("bootstrap.sh: unknown option '--gpu' (valid choices: "
                                     "--cpu, --cuda)")
