"""``asyncbalance balance`` on the test vectors, and its refusal of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_engine_vectors import INDEX, NAMES, VECTORS_DIR, WEIGHT_RTOL, _activation
from tolerances import FUNCTION_RTOL, assert_rel

from asyncbalance.cli import main

REQUIRED_KEYS = {"cost_before", "cost_after", "max_log_imbalance", "iterations", "seconds",
                 "function_max_rel_error", "method", "p"}


def _run(argv: list[str]) -> int:
    return main([str(a) for a in argv])


@pytest.mark.parametrize("method", ["exact", "full"])
@pytest.mark.parametrize("entry", INDEX, ids=NAMES)
def test_cli_balances_vector(entry: dict, method: str, tmp_path: Path) -> None:
    out, report = tmp_path / "out.npz", tmp_path / "REPORT.json"
    code = _run(["balance", VECTORS_DIR / f"{entry['name']}.npz", "--p", entry["p"],
                 "--activation", _activation(entry), "--method", method, "--tol", "1e-12",
                 "-o", out, "--report", report, "--quiet"])
    assert code == 0
    with np.load(VECTORS_DIR / f"{entry['name']}.balanced.npz") as ref, np.load(out) as got:
        assert set(got.files) == set(ref.files)
        for key in ref.files:
            assert got[key].dtype == np.float64
            assert_rel(got[key], ref[key], WEIGHT_RTOL, f"{entry['name']} {key}")
    data = json.loads(report.read_text())
    assert REQUIRED_KEYS <= set(data), REQUIRED_KEYS - set(data)
    assert data["method"] == method and data["p"] == entry["p"]
    assert_rel(data["cost_before"], entry["cost_before"], 1e-13, "cost_before")
    assert_rel(data["cost_after"], entry["cost_after"], 1e-12, "cost_after")
    assert 0 <= data["max_log_imbalance"] <= 1e-12
    assert data["iterations"] >= 1 and data["seconds"] >= 0
    assert 0 <= data["function_max_rel_error"] <= FUNCTION_RTOL
    assert data["dead_units"] == []


def test_cli_entry_point_runs_as_a_program(tmp_path: Path) -> None:
    out = tmp_path / "o.npz"
    proc = subprocess.run(
        [sys.executable, "-m", "asyncbalance.cli", "balance",
         str(VECTORS_DIR / "mlp_bias_p2.npz"), "--p", "2", "-o", str(out)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # The result line is the command's output (stdout); stderr carries progress only, and a
    # run this short shows none.
    assert "max log-imbalance" in proc.stdout and str(out) in proc.stdout
    assert proc.stderr == ""
    assert out.is_file()


def _bad_net(tmp_path: Path, arrays: dict) -> Path:
    path = tmp_path / "net.npz"
    np.savez(path, **arrays)
    return path


def _good_arrays() -> dict:
    rng = np.random.default_rng(3)
    return {"W1": rng.standard_normal((4, 3)), "b1": rng.standard_normal(4),
            "W2": rng.standard_normal((2, 4)), "b2": rng.standard_normal(2)}


def _nan_arrays() -> dict:
    arrays = _good_arrays()
    arrays["W2"][1, 2] = np.nan
    return arrays


def _inf_arrays() -> dict:
    arrays = _good_arrays()
    arrays["b1"][0] = np.inf
    return arrays


def _shape_arrays() -> dict:
    arrays = _good_arrays()
    arrays["W2"] = np.ones((2, 5))
    return arrays


def _key_arrays() -> dict:
    arrays = _good_arrays()
    arrays["weights3"] = np.ones(2)
    return arrays


def _gap_arrays() -> dict:
    arrays = _good_arrays()
    arrays["W4"] = np.ones((2, 2))
    return arrays


CASES = {
    # name: (arrays, extra argv, words the message must contain)
    "nan": (_nan_arrays, [], ["W2", "non-finite", "nan"]),
    "inf": (_inf_arrays, [], ["b1", "non-finite", "inf"]),
    "p_zero": (_good_arrays, ["--p", "0"], ["p", "> 0"]),
    "p_negative": (_good_arrays, ["--p", "-1.5"], ["p", "> 0"]),
    "shape": (_shape_arrays, [], ["W2", "(2, 5)"]),
    "unknown_activation": (_good_arrays, ["--activation", "swishy"],
                           ["--activation", "swishy", "relu", "leaky_relu:A", "power:C"]),
    "tanh": (_good_arrays, ["--activation", "tanh"], ["--activation", "tanh", "homogeneous",
                                                      "relu"]),
    "bad_key": (_key_arrays, [], ["weights3", "W1", "W_rec"]),
    "missing_layer": (_gap_arrays, [], ["W3", "missing"]),
    "tol": (_good_arrays, ["--tol", "-1"], ["--tol", "> 0"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_refuses_bad_input(case: str, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    make, extra, words = CASES[case]
    net = _bad_net(tmp_path, make())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = ["balance", net, "-o", out_dir / "o.npz", "--report", out_dir / "r.json"]
    if "--p" not in extra:
        argv += ["--p", "2"]
    code = _run(argv + extra)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "error" in err
    for word in words:
        assert word in err, f"{word!r} missing from {err!r}"
    # Nothing written, not even a temporary file.
    assert list(out_dir.iterdir()) == []


def test_cli_missing_file_and_unreadable_npz(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.npz"
    assert _run(["balance", tmp_path / "absent.npz", "--p", "1", "-o", out]) == 2
    assert "NET.npz" in capsys.readouterr().err
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    assert _run(["balance", junk, "--p", "1", "-o", out]) == 2
    assert "NET.npz" in capsys.readouterr().err
    assert not out.exists()


def test_cli_failure_leaves_existing_output_untouched(tmp_path: Path) -> None:
    out = tmp_path / "o.npz"
    out.write_bytes(b"previous result")
    net = _bad_net(tmp_path, _nan_arrays())
    assert _run(["balance", net, "--p", "2", "-o", out, "--quiet"]) == 2
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.npz", "o.npz"]


def test_cli_program_exit_code_two(tmp_path: Path) -> None:
    net = _bad_net(tmp_path, _nan_arrays())
    out = tmp_path / "o.npz"
    proc = subprocess.run(
        [sys.executable, "-m", "asyncbalance.cli", "balance", str(net), "--p", "2",
         "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "W2" in proc.stderr and "non-finite" in proc.stderr
    assert not out.exists()
