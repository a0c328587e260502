"""The command line's allocator policy: freed arrays stay with the process for reuse."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from asyncbalance.runtime import allocator

# A child process (the policy lasts for the process): the resident size after a 256 MiB
# array is filled and freed, less the size before it, in MiB.
CHILD = """
import sys
import numpy as np
from asyncbalance.runtime.allocator import retain_freed_memory

def resident_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

applied = retain_freed_memory() if sys.argv[1] == "retain" else None
before = resident_mib()
array = np.ones(1 << 25)
del array
print(applied, resident_mib() - before)
"""


def _kept_after_free(mode: str) -> tuple[str, float]:
    result = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True,
                            text=True, check=True)
    applied, kept = result.stdout.split()
    return applied, float(kept)


@pytest.mark.skipif(not Path("/proc/self/statm").exists() or
                    not sys.platform.startswith("linux"), reason="reads /proc")
def test_freed_arrays_stay_resident_only_with_the_policy() -> None:
    # glibc unmaps a freed 256 MiB array at once; with the policy it stays in the heap for
    # the next window's arrays. (musl has no mallopt: the policy reports it did not apply.)
    applied, kept = _kept_after_free("retain")
    if applied == "False":
        pytest.skip("not glibc: no allocator policy to set")
    assert applied == "True"
    assert kept > 200.0
    _, released = _kept_after_free("default")
    assert released < 50.0


def test_the_run_command_sets_the_policy_and_the_library_does_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from asyncbalance.cli import main
    from asyncbalance.commands import run as run_command
    from asyncbalance.runtime import run_scenario
    from asyncbalance.runtime.scenario import scenario_from_mapping

    calls: list[int] = []
    monkeypatch.setattr(run_command, "retain_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(allocator, "retain_freed_memory", lambda: calls.append(2) or True)
    data = {"name": "a", "network": {"kind": "mlp", "sizes": [3, 4, 2], "seed": 1}}
    run_scenario(scenario_from_mapping(data), tmp_path / "library")
    assert calls == []
    scenario = tmp_path / "a.toml"
    scenario.write_text('name = "a"\n[network]\nkind = "mlp"\nsizes = [3, 4, 2]\n')
    assert main(["run", str(scenario), "--quiet", "--out", str(tmp_path / "cli")]) == 0
    assert calls == [1]
