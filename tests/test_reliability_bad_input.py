"""Generated bad input from a new user's trial: special files, links, oversize scenarios,
values that only fail once computed, a non-Ray port and a full disk.

Every case is built on private paths in the test's own workspace (FIFOs, device nodes and a
tmpfs are made there; no system file is touched) and must end the same way: exit 2, one
line naming the file, key or option, no traceback, nothing new or changed on disk (the
full-disk case keeps its record, marked incomplete).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from asyncbalance.cli import main

ROOT = Path(__file__).resolve().parents[1]
NET = ROOT / "asyncbalance" / "data" / "example_mlp.npz"
RUN = ROOT / "scenarios" / "quickstart.toml"
TRAIN = ROOT / "scenarios" / "train_digits_quick.toml"


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def _snapshot(root: Path) -> dict[str, tuple]:
    found = {}
    for path in sorted(root.rglob("*")):
        info = os.lstat(path)
        found[str(path.relative_to(root))] = (stat.S_IFMT(info.st_mode), info.st_size,
                                              info.st_mtime_ns)
    return found


# -- special inputs, each made in the workspace -----------------------------------------

def _fifo(ws: Path) -> Path:
    os.mkfifo(ws / "pipe")
    return ws / "pipe"


def _char_device(ws: Path) -> Path:
    try:
        os.mknod(ws / "zero", 0o666 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero's numbers
    except PermissionError:
        pytest.skip("making a device node needs root")
    return ws / "zero"


def _dangling(ws: Path) -> Path:
    (ws / "dangling").symlink_to(ws / "missing")
    return ws / "dangling"


def _loop(ws: Path) -> Path:
    (ws / "a").symlink_to(ws / "b")
    (ws / "b").symlink_to(ws / "a")
    return ws / "a"


def _directory(ws: Path) -> Path:
    (ws / "dir").mkdir()
    return ws / "dir"


SPECIAL: dict[str, tuple[Callable[[Path], Path], str]] = {
    "fifo": (_fifo, "is a FIFO"),
    "char-device": (_char_device, "is a character device"),
    "dangling-link": (_dangling, "no such file"),
    "link-loop": (_loop, "cannot be read"),
    "directory": (_directory, "is a directory"),
}

COMMANDS: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "balance": (lambda p: ["balance", str(p), "--p", "2", "-o", "out.npz"], "NET.npz"),
    "run": (lambda p: ["run", str(p), "--out", "out"], "SCENARIO.toml"),
    "train": (lambda p: ["train", str(p), "--out", "out"], "SCENARIO.toml"),
}


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.chdir(ws)
    return ws


def _assert_refused(argv: list[str], ws: Path, *words: str) -> str:
    before = _snapshot(ws)
    code, out, err = _run_cli(argv)
    assert code == 2, (argv, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out + err, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert out == ""
    assert _snapshot(ws) == before
    return lines[0]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("special", SPECIAL)
def test_special_files_as_input(workspace: Path, command: str, special: str) -> None:
    make, words = SPECIAL[special]
    argv, field = COMMANDS[command]
    _assert_refused(argv(make(workspace)), workspace, field, words)


# -- values that fail only once computed, or that used to be called internal ------------

def _npz(ws: Path, **arrays: np.ndarray) -> Path:
    np.savez(ws / "net.npz", **arrays)
    return ws / "net.npz"


CASES: dict[str, tuple[Callable[[Path], list[str]], tuple[str, ...]]] = {
    # The optimum's scales overflow float64 at a tiny p: named as balance.p, before the
    # record is begun (it used to leave a run directory and name W1).
    "tiny-p": (lambda ws: ["run", str(RUN), "--backend", "sim", "--out", "out", "--quiet",
                           "--set", "balance.p=1e-9"], ("balance.p:", "larger balance.p")),
    "negative-seed": (lambda ws: ["balance", str(NET), "--p", "2", "-o", "o.npz",
                                  "--method", "stochastic", "--seed", "-1"], ("--seed",)),
    "keys-from-W0": (lambda ws: ["balance", str(_npz(ws, W0=np.ones((3, 2)),
                                                      W1=np.ones((2, 3)))), "--p", "2",
                                 "-o", "o.npz"], ("W0:", "numbered from 1")),
    "leading-zero": (lambda ws: ["balance", str(_npz(ws, W01=np.ones((3, 2)),
                                                      W2=np.ones((2, 3)))), "--p", "2",
                                 "-o", "o.npz"], ("W01:",)),
    "long-name": (lambda ws: ["run", str(RUN), "--backend", "sim", "--quiet", "--set",
                              f'name="{"n" * 300}"'], ("name:", "200 bytes")),
    "empty-scenario": (lambda ws: ["run", str(_write(ws / "e.toml", ""))], ("is empty",)),
    "oversize-layer": (lambda ws: ["run", str(RUN), "--out", "out", "--quiet", "--set",
                                   "network.sizes=[10,100000000,10]"],
                       ("partition.shards_per_layer:", "of memory")),
    "oversize-neurons": (lambda ws: ["run", str(RUN), "--out", "out", "--quiet", "--set",
                                     "network.sizes=[10,10000000,10]", "--set",
                                     'partition.granularity="neuron"'], ("of memory",)),
    "oversize-widths": (lambda ws: ["train", str(TRAIN), "--out", "runs", "--quiet", "--set",
                                    "model.widths=[0,100000000,0]"], ("model.widths:",)),
    "report-over-input": (lambda ws: ["report", str(_train_record(ws)), "-o",
                                      str(_train_record(ws) / "summary.json")],
                          ("-o/--output", "run records")),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _train_record(ws: Path) -> Path:
    from asyncbalance.training.records import write_run

    run = ws / "runs" / "seed-0"
    if not run.exists():
        write_run(run, {"name": "d", "label": "a", "seed": 0, "trainer": "backprop",
                        "test_accuracy": 0.5, "best_test_accuracy": 0.5,
                        "train_accuracy": 0.5}, [{"epoch": 0, "test_accuracy": 0.5}])
    return run


@pytest.mark.parametrize("case", CASES)
def test_refused_in_one_line_with_nothing_written(workspace: Path, case: str) -> None:
    make, words = CASES[case]
    argv = make(workspace)
    _assert_refused(argv, workspace, *words)


# -- a full disk during a run: a private tmpfs, filled part-way through the run -------------

@pytest.fixture
def tiny_disk(tmp_path: Path):
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_full_disk_during_a_run_is_one_line_and_the_record_says_incomplete(
        tiny_disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from asyncbalance.commands import run as run_command

    out = tiny_disk / "run"
    shown = run_command._ProgressBar.__call__
    seen = {"samples": 0}

    def fill_the_disk_at_sample_3(self, sample, scenario) -> None:
        seen["samples"] += 1
        if seen["samples"] == 3:
            # Another process takes every free byte: the run's next write has no room,
            # nor has the usual atomic replacement of its summary.
            with open(tiny_disk / "filler", "wb") as filler, contextlib.suppress(OSError):
                while True:
                    filler.write(b"x" * 4096)
                    filler.flush()
        shown(self, sample, scenario)

    monkeypatch.setattr(run_command._ProgressBar, "__call__", fill_the_disk_at_sample_3)
    code, _, err = _run_cli(["run", str(RUN), "--backend", "sim", "--out", str(out),
                             "--quiet", "--set", 'record_events="messages"'])
    assert seen["samples"] >= 3
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "no space left on the device" in lines[0], err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "incomplete"
    assert "No space left" in summary["stop_reason"]


def test_special_outputs_are_not_replaced(workspace: Path) -> None:
    """-o onto a loop of links is refused (devices, FIFOs and links: test_reliability_outputs)."""
    loop = _loop(workspace)
    _assert_refused(["balance", str(NET), "--p", "2", "-o", str(loop)], workspace,
                    "-o/--output", "loop")


def test_a_sweep_can_be_set_from_the_command_line(workspace: Path) -> None:
    from asyncbalance.runtime.scenario import load_scenarios

    points = load_scenarios(RUN, ['sweep."links.mean"=[0, 1]', "sweep.seed=[1, 2, 3]"])
    assert sorted((p.sweep["links.mean"], p.sweep["seed"]) for p in points) == \
        [(m, s) for m in (0, 1) for s in (1, 2, 3)]
    assert {p.scenario.links.mean for p in points} == {0.0, 1.0}


def test_shipped_sweep_headers_count_their_runs() -> None:
    import re

    from asyncbalance.runtime.scenario import load_scenarios

    for path in sorted((ROOT / "scenarios").glob("*.toml")):
        said = re.search(r"#\s*(\d+) runs", path.read_text())
        if said:
            assert int(said.group(1)) == len(load_scenarios(path)), path.name


def test_a_large_sweep_reports_its_checking_progress(tmp_path: Path) -> None:
    from asyncbalance.runtime.scenario import load_scenarios

    # Checking a 10^5-point sweep takes ~20 s: `run` shows how far it got, every 1,000.
    path = tmp_path / "sweep.toml"
    path.write_text('name = "s"\n[sweep]\nseed = ' + str(list(range(2500))) + "\n")
    seen: list[tuple[int, int]] = []
    points = load_scenarios(path, (), lambda done, total: seen.append((done, total)))
    assert len(points) == 2500
    assert seen == [(0, 2500), (1000, 2500), (2000, 2500)]
