"""Every command refuses bad input the same way: exit 2, one line naming the file, key or
option (and the valid choices where there are some), no traceback, nothing new on disk.

One table drives the whole test: each case builds its inputs in a fresh workspace, runs the
command there (so default output locations are inside it too) and the workspace is compared
file by file before and after (names, sizes and modification times).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from asyncbalance.cli import main
from asyncbalance.training.records import write_run

ROOT = Path(__file__).resolve().parents[1]
VECTOR = ROOT / "tests" / "data" / "testvectors" / "mlp_bias_p2.npz"
RUN_SCENARIO = ROOT / "scenarios" / "quickstart.toml"
TRAIN_SCENARIO = ROOT / "scenarios" / "train_digits_quick.toml"


@dataclass(frozen=True)
class Case:
    make: Callable[[Path], list[str]]  # builds inputs in the workspace, returns argv
    words: tuple[str, ...]  # each must appear in the error line
    code: int = 2


def _arrays() -> dict[str, np.ndarray]:
    with np.load(VECTOR) as data:
        return {k: data[k] for k in data.files}


def _npz(ws: Path, name: str = "net.npz", **changes: np.ndarray | None) -> Path:
    arrays = _arrays()
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    path = ws / name
    np.savez(path, **arrays)
    return path


def _balance(net: Path | str, *extra: str, out: str = "out.npz") -> list[str]:
    return ["balance", str(net), "--p", "2", "-o", out, "--quiet", *extra]


def _raw(ws: Path, name: str, data: bytes) -> Path:
    path = ws / name
    path.write_bytes(data)
    return path


def _truncated(ws: Path) -> Path:
    whole = VECTOR.read_bytes()
    return _raw(ws, "cut.npz", whole[: len(whole) // 2])


def _npy(ws: Path) -> Path:
    path = ws / "net.npz"
    with open(path, "wb") as handle:
        np.save(handle, np.ones((3, 3)))
    return path


def _pickled(ws: Path) -> Path:
    path = ws / "net.npz"
    np.savez(path, W1=np.array([{"a": 1}], dtype=object), W2=np.ones((1, 1)))
    return path


def _summary(ws: Path, data: object, name: str = "rec") -> Path:
    directory = ws / name
    directory.mkdir()
    (directory / "summary.json").write_text(json.dumps(data))
    return directory


def _train_records(ws: Path, epochs: tuple[int, int], seeds: tuple[int, int] = (0, 1)) -> Path:
    """Two training records of scenario 'demo', label 'a' (as two output roots would hold)."""
    for index, (seed, n_epochs) in enumerate(zip(seeds, epochs, strict=True)):
        summary = {"name": "demo", "label": "a", "seed": seed, "trainer": "backprop",
                   "test_accuracy": 0.5, "best_test_accuracy": 0.5, "train_accuracy": 0.5,
                   "config": {"name": "demo", "epochs": n_epochs, "seeds": 2, "first_seed": 0}}
        rows = [{"epoch": i, "test_accuracy": 0.5, "seconds": 1.0} for i in range(n_epochs + 1)]
        write_run(ws / "runs" / f"root{index}" / f"seed-{seed}", summary, rows)
    return ws / "runs"


def _existing_train_run(ws: Path) -> list[str]:
    (ws / "runs" / "train_digits_quick" / "default" / "seed-0").mkdir(parents=True)
    return ["train", str(TRAIN_SCENARIO), "--out", "runs", "--quiet", "--device", "cpu"]


CASES: dict[str, Case] = {
    # balance: unreadable, empty, truncated or wrong-type inputs
    "npz-missing": Case(lambda ws: _balance(ws / "absent.npz"), ("NET.npz", "no such file")),
    "npz-empty-file": Case(lambda ws: _balance(_raw(ws, "e.npz", b"")),
                           ("NET.npz", "e.npz", "not a readable .npz")),
    "npz-truncated": Case(lambda ws: _balance(_truncated(ws)), ("NET.npz", "cut.npz")),
    "npz-garbage": Case(lambda ws: _balance(_raw(ws, "g.npz", b"\x00\xff" * 50)),
                        ("NET.npz", "g.npz")),
    "npz-is-npy": Case(lambda ws: _balance(_npy(ws)), ("NET.npz", "not an .npz archive")),
    "npz-directory": Case(lambda ws: _balance(ws), ("NET.npz", "is a directory")),
    "npz-pickled-objects": Case(lambda ws: _balance(_pickled(ws)), ("NET.npz",)),
    "npz-no-arrays": Case(lambda ws: _balance(_empty_npz(ws)), ("NET.npz", "holds no arrays")),
    "weights-complex": Case(lambda ws: _balance(_npz(ws, W2=_arrays()["W2"] * (1 + 1j))),
                            ("W2", "complex", "real numbers")),
    "weights-boolean": Case(lambda ws: _balance(_npz(ws, W1=_arrays()["W1"] > 0)),
                            ("W1", "boolean")),
    "weights-text": Case(lambda ws: _balance(_npz(ws, b1=np.array(["a", "b", "c", "d"]))),
                         ("b1", "text")),
    "weights-zero-size": Case(lambda ws: _balance(_npz(ws, b2=np.zeros(0))), ("b2", "empty")),
    "weights-nan": Case(lambda ws: _balance(_npz(ws, W2=_arrays()["W2"] * np.nan)),
                        ("W2", "non-finite")),
    "no-hidden-units": Case(lambda ws: _balance(_one_layer(ws)),
                            ("NET.npz", "no hidden units", "nothing to balance")),
    "key-unknown": Case(lambda ws: _balance(_npz(ws, weights=np.ones(2))),
                        ("weights", "W<i>", "W_rec")),
    "key-layer-missing": Case(lambda ws: _balance(_npz(ws, W2=None)), ("W2", "missing")),
    # balance: options
    "p-zero": Case(lambda ws: ["balance", str(_npz(ws)), "--p", "0", "-o", "o.npz"],
                   ("p", "> 0")),
    "p-not-a-number": Case(lambda ws: ["balance", str(_npz(ws)), "--p", "two", "-o", "o.npz"],
                           ("--p", "invalid float value", "two")),
    "method-unknown": Case(lambda ws: _balance(_npz(ws), "--method", "newton"),
                           ("--method", "newton", "exact", "full", "stochastic")),
    "activation-tanh": Case(lambda ws: _balance(_npz(ws), "--activation", "tanh"),
                            ("--activation", "tanh", "homogeneous", "relu")),
    "tol-negative": Case(lambda ws: _balance(_npz(ws), "--tol", "-1"), ("--tol", "> 0")),
    "costs-overflow-float64": Case(
        lambda ws: ["balance", str(_npz(ws, W1=_arrays()["W1"] * 1e30)), "--p", "200", "-o",
                    "o.npz"], ("overflow float64", "p = 200", "h1")),
    "result-overflows-float64": Case(
        lambda ws: ["balance", str(_wide_to_narrow(ws)), "--p", "1e-3", "-o", "o.npz"],
        ("W", "balanced weights overflow float64", "--p 0.001")),
    # balance: unwritable, directory or clashing outputs; nothing half-written
    "output-is-directory": Case(lambda ws: _balance(_npz(ws), out=str(_dir(ws, "d"))),
                                ("-o/--output", "is a directory")),
    "output-read-only-place": Case(lambda ws: _balance(_npz(ws), out="/proc/out.npz"),
                                   ("-o/--output", "/proc")),
    "output-under-a-file": Case(lambda ws: _balance(_npz(ws), out=str(_npz(ws, "f.npz")) + "/x"),
                                ("-o/--output", "not a directory")),
    "report-fails-after-output": Case(
        lambda ws: _balance(_npz(ws), "--report", "/proc/r.json"), ("--report", "/proc")),
    "report-same-as-output": Case(lambda ws: _balance(_npz(ws), "--report", "out.npz"),
                                  ("--report", "same file", "-o/--output")),
    "report-same-as-input": Case(lambda ws: _balance(_npz(ws), "--report", "net.npz"),
                                 ("--report", "same file", "NET.npz")),
    # run
    "run-given-an-npz": Case(lambda ws: ["run", str(_npz(ws))],
                             ("SCENARIO.toml", "not a text (TOML)", "asyncbalance balance")),
    "run-given-a-training-scenario": Case(lambda ws: ["run", str(TRAIN_SCENARIO)],
                                          ("SCENARIO.toml", "training scenario",
                                           "asyncbalance train")),
    "run-scenario-missing": Case(lambda ws: ["run", "absent.toml"], ("no such file",)),
    "run-scenario-directory": Case(lambda ws: ["run", str(ws)], ("is a directory",)),
    "run-scenario-garbage": Case(lambda ws: ["run", str(_raw(ws, "s.toml", b"\xff\xfe[x"))],
                                 ("SCENARIO.toml", "s.toml", "UTF-8")),
    "run-scenario-bad-toml": Case(lambda ws: ["run", str(_raw(ws, "s.toml", b"a = [1,"))],
                                  ("SCENARIO.toml", "not valid TOML")),
    "run-out-exists": Case(lambda ws: ["run", str(RUN_SCENARIO), "--out", str(_dir(ws, "d"))],
                           ("--out", "already exists")),
    "run-out-under-a-file": Case(
        lambda ws: ["run", str(RUN_SCENARIO), "--out", str(_npz(ws)) + "/r"],
        ("--out", "not a directory")),
    "run-backend-unknown": Case(lambda ws: ["run", str(RUN_SCENARIO), "--backend", "mpi"],
                                ("--backend", "mpi", "sim", "ray")),
    # train
    "train-given-a-run-scenario": Case(lambda ws: ["train", str(RUN_SCENARIO)],
                                       ("SCENARIO.toml", "asynchronous balancing scenario",
                                        "asyncbalance run")),
    "train-run-exists": Case(_existing_train_run, ("--out", "already holds a run record",
                                                   "--overwrite")),
    "train-out-is-a-file": Case(lambda ws: ["train", str(TRAIN_SCENARIO), "--out",
                                            str(_npz(ws))], ("--out", "not a directory")),
    "train-bad-key": Case(lambda ws: ["train", str(TRAIN_SCENARIO), "--set", "trainer.rule=x"],
                          ("trainer.rule", "backprop", "dfa", "fa")),
    # show
    "show-empty-object": Case(lambda ws: ["show", str(_summary(ws, {}))],
                              ("RUN_DIR", "summary.json", "lacks")),
    "show-list": Case(lambda ws: ["show", str(_summary(ws, [1, 2]))],
                      ("RUN_DIR", "JSON list", "not a run summary")),
    "show-not-json": Case(lambda ws: ["show", str(_garbage_record(ws))], ("RUN_DIR", "JSON")),
    "show-no-record": Case(lambda ws: ["show", str(_dir(ws, "d"))],
                           ("RUN_DIR", "no summary.json")),
    "show-training-record": Case(
        lambda ws: ["show", str(_summary(ws, {"trainer": "dfa", "test_accuracy": 0.9}))],
        ("RUN_DIR", "training run record", "asyncbalance report")),
    # report
    "report-configs-differ": Case(
        lambda ws: ["report", str(_train_records(ws, (2, 10))), "-o", "r.md"],
        ("RUN_DIR", "differ in more than the seed", "epochs: 2 vs 10")),
    "report-seed-twice": Case(
        lambda ws: ["report", str(_train_records(ws, (2, 2), seeds=(0, 0))), "-o", "r.md"],
        ("RUN_DIR", "both seed 0")),
    "report-output-is-directory": Case(
        lambda ws: ["report", str(_train_records(ws, (2, 2))), "-o", str(_dir(ws, "d"))],
        ("-o/--output", "is a directory")),
    "report-no-runs": Case(lambda ws: ["report", str(_dir(ws, "d")), "-o", "r.md"],
                           ("RUN_DIR", "no training run records")),
}


def _dir(ws: Path, name: str) -> Path:
    path = ws / name
    path.mkdir(exist_ok=True)
    return path


def _empty_npz(ws: Path) -> Path:
    path = ws / "none.npz"
    np.savez(path)
    return path


def _one_layer(ws: Path) -> Path:
    path = ws / "one.npz"
    np.savez(path, W1=np.ones((2, 3)), b1=np.ones(2))
    return path


def _wide_to_narrow(ws: Path) -> Path:
    """400 inputs into one hidden unit with one output: at p = 1e-3 the optimum rescales it
    by about e^(log(400) / 2e-3), far beyond float64."""
    rng = np.random.default_rng(3)
    path = ws / "wide.npz"
    np.savez(path, W1=rng.standard_normal((1, 400)), W2=rng.standard_normal((1, 1)))
    return path


def _garbage_record(ws: Path) -> Path:
    directory = _dir(ws, "rec")
    (directory / "summary.json").write_bytes(b"\xff{not json")
    return directory


def _snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``root`` with size, mtime and mode (directories: mode only, since
    probing a directory for write access touches its mtime without leaving anything)."""
    return {str(p.relative_to(root)): (0, 0, p.stat().st_mode) if p.is_dir()
            else (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_mode)
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    case = CASES[name]
    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.chdir(ws)
    argv = case.make(ws)
    before = _snapshot(ws)
    code = _exit_code(argv)
    captured = capsys.readouterr()
    assert code == case.code, captured.err
    assert "Traceback" not in captured.err + captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "error" in lines[0]
    for word in case.words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert captured.out == ""
    assert _snapshot(ws) == before
    assert not (tmp_path / "runs").exists()


def _exit_code(argv: list[str]) -> int:
    """main's return value, or the status argparse exits with on a malformed option."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def test_unforeseen_error_prints_one_line_and_saves_the_traceback(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    import asyncbalance.commands.show as show

    def broken(args: object) -> int:
        raise ZeroDivisionError("an unforeseen failure")

    monkeypatch.setattr(show, "run", broken)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    assert main(["show", str(tmp_path)]) == 3
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert "internal error: ZeroDivisionError: an unforeseen failure" in lines[0]
    saved = list(tmp_path.glob("asyncbalance-error-*.txt"))
    assert len(saved) == 1 and str(saved[0]) in lines[0]
    text = saved[0].read_text()
    assert "Traceback" in text and "ZeroDivisionError" in text and "def broken" not in lines[0]


def test_non_convergence_exits_1_interrupt_130_closed_pipe_141(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import asyncbalance.commands.show as show
    from asyncbalance.errors import NonConvergenceError

    def stalls(args: object) -> int:
        raise NonConvergenceError("full", 10, 0.5, 1e-10)

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(show, "run", stalls)
    assert main(["show", "x"]) == 1
    assert "did not converge" in capsys.readouterr().err
    monkeypatch.setattr(show, "run", interrupted)
    assert main(["show", "x"]) == 130
    assert "interrupted" in capsys.readouterr().err

    def reader_gone(args: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(show, "run", reader_gone)
    assert main(["show", "x"]) == 141
    assert capsys.readouterr().err == ""  # no traceback file for a closed pipe


def test_a_failed_report_leaves_the_existing_output_untouched(tmp_path: Path) -> None:
    out = tmp_path / "out.npz"
    shutil.copy(VECTOR, out)
    before = out.read_bytes()
    net = _npz(tmp_path, W2=_arrays()["W2"] * np.nan)
    assert main(_balance(net, out=str(out))) == 2
    assert out.read_bytes() == before
