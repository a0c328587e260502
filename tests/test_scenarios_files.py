"""Scenario files: the shipped ones validate, mistakes get their own clear message, and the
``run`` / ``show`` commands write and read complete records (never a partial one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asyncbalance.cli import main
from asyncbalance.runtime import load_scenarios, read_events

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"

SMALL = """
name = "small"
backend = "sim"
[network]
kind = "mlp"
sizes = [4, 6, 6, 2]
[partition]
shards_per_layer = 2
[stop]
tol = 1e-8
"""


@pytest.mark.parametrize("name", ["quickstart", "delay_sweep", "faults", "cluster"])
def test_shipped_scenarios_validate(name):
    points = load_scenarios(SCENARIOS / f"{name}.toml")
    assert points and all(p.scenario.name == name for p in points)
    if name == "delay_sweep":
        assert len(points) == 18
        assert {p.sweep["balance.rule"] for p in points} == {"exact", "damped", "gradient"}
    if name == "faults":
        faults = points[0].scenario.faults
        assert points[0].scenario.links.loss == 0.3 and len(faults.crashes) == 1


BAD = {
    "unknown key": ('bakend = "sim"\n', "bakend: unknown key", "backend"),
    "unknown nested key": ("[links]\ndelay_mean = 1.0\n", "links.delay_mean: unknown key",
                           "resend_interval"),
    "bad choice": ('[links]\ndelay = "gaussian"\n', "links.delay: invalid value 'gaussian'",
                   "constant, uniform, exponential, lognormal, pareto"),
    "bad rule": ('[balance]\nrule = "newton"\n', "balance.rule: invalid value 'newton'",
                 "exact, damped, gradient"),
    "bad backend": ('backend = "mpi"\n', "backend: invalid value 'mpi'", "sim, ray"),
    "bad type": ('[stop]\ntol = "small"\n', "stop.tol: must be a number", None),
    "out of range": ("[links]\nloss = 1.5\n", "links.loss: must lie in [0, 1)", None),
    "bad activation": ('[network]\nactivation = "tanh"\n', "network.activation", None),
    "crash target": ("[[faults.crashes]]\nshard = 99\nat = 1.0\n",
                     "faults.crashes[0].shard: no shard 99", "valid shards are 0 .."),
    "partition target": ("[[faults.partitions]]\nstart = 1.0\nstop = 2.0\nshards = [-1]\n",
                         "faults.partitions[0].shards: no shard -1", None),
    "empty sweep": ('[sweep]\n"links.mean" = []\n', "sweep.links.mean: must be a non-empty",
                    None),
    "not toml": ("name = \n", "is not valid TOML", None),
}


@pytest.mark.parametrize("case", list(BAD))
def test_each_mistake_has_its_own_message_and_leaves_nothing(tmp_path, capsys, case):
    text, message, choices = BAD[case]
    file = tmp_path / "bad.toml"
    file.write_text(text)
    out = tmp_path / "runs" / "bad"
    code = main(["run", str(file), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    if choices:
        assert choices in err
    assert not out.exists()
    assert not list((tmp_path / "runs").glob(".*")) if (tmp_path / "runs").exists() else True


def test_bad_override_and_missing_file(tmp_path, capsys):
    file = tmp_path / "s.toml"
    file.write_text(SMALL)
    assert main(["run", str(file), "--set", "links.mean", "--quiet"]) == 2
    assert "--set: expected key=value" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.toml"), "--quiet"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["run", str(file), "--address", "head:6379", "--quiet"]) == 2
    assert "--address: names a Ray cluster" in capsys.readouterr().err


def test_existing_output_directory_is_refused(tmp_path, capsys):
    file = tmp_path / "s.toml"
    file.write_text(SMALL)
    out = tmp_path / "taken"
    out.mkdir()
    assert main(["run", str(file), "--out", str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_run_prints_a_result_table_and_show_reads_it(tmp_path, capsys):
    file = tmp_path / "s.toml"
    file.write_text(SMALL)
    out = tmp_path / "run"
    assert main(["run", str(file), "--out", str(out), "--set", "links.mean=1.5",
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "converged                yes" in printed and "max |u - u*|" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scenario"]["links"]["mean"] == 1.5
    assert main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert shown.strip() == printed.split("record:")[0].strip()
    assert main(["show", str(tmp_path)]) == 2
    assert "RUN_DIR" in capsys.readouterr().err


def test_a_sweep_writes_one_record_per_point_and_a_plot(tmp_path, capsys):
    file = tmp_path / "sweep.toml"
    file.write_text(SMALL + '[sweep]\n"links.mean" = [0.0, 2.0]\n'
                            '"balance.rule" = ["exact", "damped"]\n')
    out = tmp_path / "sweep"
    assert main(["run", str(file), "--out", str(out), "--quiet"]) == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert [p["point"] for p in sweep["points"]] == [f"point-{i:03d}" for i in range(4)]
    assert all(p["converged"] for p in sweep["points"])
    assert (out / "sweep.png").is_file()
    for point in sweep["points"]:
        events = list(read_events(out / point["point"] / "events.msgpack"))
        assert events[0]["kind"] == "header"
    # More delay never makes the exact rule faster here (same seed, same net).
    exact = {p["sweep"]["links.mean"]: p["time_to_tol"] for p in sweep["points"]
             if p["sweep"]["balance.rule"] == "exact"}
    assert exact[2.0] > exact[0.0]
    assert "point-003" in capsys.readouterr().out
