"""Generated garbage: malformed .npz networks, scenario files and run records.

Hypothesis builds inputs that are invalid by construction (truncated or foreign bytes, arrays
that cannot be weights, keys no scenario has, records that are not summaries) and each must
end the same way: exit status 2, one line on stderr, no traceback, nothing written.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncbalance.cli import main

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = {"run": ROOT / "scenarios" / "quickstart.toml",
             "train": ROOT / "scenarios" / "train_digits_quick.toml"}
KEYS = ["W1", "W2", "W3", "b1", "b2", "W_in", "W_rec", "W_out", "b", "b_out", "weights", "x"]
SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def _snapshot(root: Path) -> set[tuple[str, int]]:
    return {(str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1)
            for p in root.rglob("*")}


def _assert_refused(argv: list[str], workspace: Path) -> None:
    before = _snapshot(workspace)
    code, out, err = _run_cli(argv)
    assert code == 2, (argv, err)
    assert "Traceback" not in out + err
    assert len(err.strip().splitlines()) == 1, err
    assert "error" in err
    assert out == ""
    assert _snapshot(workspace) == before


# --- arrays that can never be weights -------------------------------------------------------

def _bad_arrays() -> st.SearchStrategy[np.ndarray]:
    shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)
    return st.one_of(
        shapes.map(lambda s: np.ones(s, dtype=complex) * (1 + 2j)),
        shapes.map(lambda s: np.zeros(s, dtype=bool)),
        shapes.map(lambda s: np.full(s, "w")),
        st.lists(st.integers(0, 3), min_size=1, max_size=3).filter(lambda s: 0 in s)
        .map(lambda s: np.zeros(tuple(s))),
        shapes.map(lambda s: np.full(s, np.nan)),
        shapes.map(lambda s: np.full(s, -np.inf)),
    )


def _any_arrays() -> st.SearchStrategy[np.ndarray]:
    shapes = st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple)
    return st.one_of(
        shapes.map(lambda s: np.random.default_rng(len(s)).standard_normal(s)),
        shapes.map(lambda s: np.arange(int(np.prod(s)), dtype=np.int32).reshape(s)),
        _bad_arrays(),
    )


@st.composite
def malformed_npz(draw: st.DrawFn) -> bytes:
    arrays = draw(st.dictionaries(st.sampled_from(KEYS), _any_arrays(), max_size=5))
    # At least one array that no network accepts, under a key of its own.
    arrays[draw(st.sampled_from(["W1", "W2", "b1", "W_rec", "bad"]))] = draw(_bad_arrays())
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    whole = buffer.getvalue()
    damage = draw(st.sampled_from(["none", "truncate", "garbage", "prefix"]))
    if damage == "truncate":  # a zip without its end record is unreadable
        return whole[:draw(st.integers(0, len(whole) - 1))]
    if damage == "garbage":
        return draw(st.binary(min_size=0, max_size=300))
    if damage == "prefix":
        return draw(st.binary(min_size=1, max_size=50)).replace(b"PK", b"KP") + whole
    return whole


@SETTINGS
@given(data=malformed_npz())
def test_generated_malformed_networks_are_refused(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp)
        net = ws / "net.npz"
        net.write_bytes(data)
        _assert_refused(["balance", str(net), "--p", "2", "-o", str(ws / "out.npz"),
                         "--report", str(ws / "r.json"), "--quiet"], ws)


# --- scenario files ---------------------------------------------------------------------

_toml_values = st.one_of(st.integers(-5, 5), st.floats(allow_nan=False, allow_infinity=False),
                         st.text("abc xyz", max_size=8), st.booleans(),
                         st.lists(st.integers(0, 9), max_size=3))
_unknown_keys = st.text("abcdefghij_", min_size=1, max_size=8).map(lambda k: f"zz_{k}")


def _toml_line(key: str, value: object) -> str:
    return f"{key} = {json.dumps(value)}"


@st.composite
def malformed_scenario(draw: st.DrawFn) -> tuple[str, bytes]:
    command = draw(st.sampled_from(sorted(SCENARIOS)))
    style = draw(st.sampled_from(["unknown-keys", "truncated-plus-unknown", "garbage",
                                  "wrong-types", "other-command"]))
    if style == "unknown-keys":
        table = draw(st.dictionaries(_unknown_keys, _toml_values, min_size=1, max_size=5))
        text = "\n".join(_toml_line(k, v) for k, v in table.items())
        return command, text.encode()
    if style == "truncated-plus-unknown":
        text = SCENARIOS[command].read_text()
        cut = draw(st.integers(0, len(text)))
        key = draw(_unknown_keys)
        # Whatever table the cut leaves open, the key is unknown there too.
        return command, (text[:cut] + f"\n{key} = 1\n").encode()
    if style == "garbage":  # never valid UTF-8
        return command, draw(st.binary(max_size=200)) + b"\xff\xfe\x80"
    if style == "wrong-types":
        # Keys every scenario of this kind has, with values of the wrong type.
        key = draw(st.sampled_from(["seed", "name"] if command == "run" else
                                   ["epochs", "seeds"]))
        bad = "[1, 2]" if key == "name" else draw(st.sampled_from(['"many"', "[1]", "{a = 1}"]))
        return command, (SCENARIOS[command].read_text() + "\n").replace(
            f"\n{key} = ", f"\n{key} = {bad}\n_was_{key} = ", 1).encode()
    other = "train" if command == "run" else "run"
    return command, SCENARIOS[other].read_bytes()


@SETTINGS
@given(case=malformed_scenario())
def test_generated_malformed_scenarios_are_refused(case: tuple[str, bytes]) -> None:
    command, data = case
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp)
        scenario = ws / "s.toml"
        scenario.write_bytes(data)
        argv = [command, str(scenario), "--out", str(ws / "out"), "--quiet"]
        if command == "run":
            argv += ["--backend", "sim"]
        else:
            argv += ["--device", "cpu"]
        _assert_refused(argv, ws)


# --- run records given to show ------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=10)


@SETTINGS
@given(payload=st.one_of(_json_values.map(lambda v: json.dumps(v).encode()),
                         st.binary(max_size=100).map(lambda b: b"\xff" + b)))
def test_generated_malformed_records_are_refused(payload: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp)
        record = ws / "rec"
        record.mkdir()
        (record / "summary.json").write_bytes(payload)
        _assert_refused(["show", str(record)], ws)
