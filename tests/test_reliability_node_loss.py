"""A node lost when no CPU is free: the run still ends within its wall budget, with a record
that says what happened.

Three local nodes of one CPU each, three shard hosts that reserve one CPU each
(``ray.actor_cpus = 1``, as ``scenarios/cluster.toml`` ships): when a worker node is killed,
its host cannot be placed again with a CPU of its own. Before the fix the driver waited for
that placement for ever (``summary.json`` stayed ``running``). Now the lost host is replaced
by one that reserves no CPU (it shares a core) or, failing that, the run goes on without it
and stops at ``stop.max_wall_seconds``; either way the record's ``transport.host_losses``
says which host was lost, when, and how it ended. The driver keeps sampling the live hosts
while the lost one is brought back (no pause over ``MAX_SAMPLE_GAP_SECONDS``).

The cluster runs in a subprocess (``python -m actors.cluster``), killed as a whole if it
outlives its bound.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_scaleout_cluster import _cluster_processes, _kill_session

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
MAX_WALL_SECONDS = 30.0
TIME_UNIT = 0.05
SAMPLE_SECONDS = 0.1
# The longest pause between two samples: the sampling loop's own waits add at most two
# intervals to one (a Ray poll waits one interval at most for a slow host, telling the hosts
# of a replacement as long); the rest is slack for 2 cores shared by 3 Ray nodes, their
# hosts and the driver. 15 intervals, well under the >= 5 s a blocking recovery takes here.
MAX_SAMPLE_GAP_SECONDS = 1.5
# Beyond the wall budget a run may take: building the hosts (~5 s on 2 loaded cores), one
# bounded poll (5 s), the shortest recovery window (2 s), closing the hosts (<= 10 s) and
# writing the record.
MARGIN_SECONDS = 30.0
# The subprocess as a whole also starts and stops 3 nodes (<= 60 s each way on 2 cores).
PROCESS_TIMEOUT_S = 60 + MAX_WALL_SECONDS + MARGIN_SECONDS + 60

SCENARIO = f"""
name = "nofreecpu"
seed = 1
backend = "ray"
[network]
kind = "mlp"
sizes = [6, 10, 10, 10, 3]
unit_spread = 1.0
seed = 3
[partition]
granularity = "shard"
shards_per_layer = 2          # 6 shards on 3 hosts, one per node
[links]
delay = "exponential"
mean = 0.5
[stop]
tol = 1e-8
max_wall_seconds = {MAX_WALL_SECONDS}
function_check = "final"
[ray]
time_unit = {TIME_UNIT}              # slow enough that the loss is noticed before convergence
sample_seconds = {SAMPLE_SECONDS}
actor_cpus = 1.0              # no CPU is free once a node is gone
hosts = 3                     # one host per node (small shards would share one host)
"""


@pytest.fixture(scope="module")
def loss_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("ray")
    pytest.importorskip("psutil")
    work = tmp_path_factory.mktemp("nodeloss")
    scenario = work / "nofreecpu.toml"
    scenario.write_text(SCENARIO)
    report_file = work / "report.json"
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "actors.cluster", str(scenario), "--out",
               str(work / "runs"), "--nodes", "3", "--no-baseline", "--removal-run", "3",
               "--report", str(report_file)]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        output, errors = proc.communicate(timeout=PROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_session(proc)
        pytest.fail(f"a node loss with no free CPU kept the run going past "
                    f"{PROCESS_TIMEOUT_S} s; killed it")
    if not report_file.is_file():
        pytest.fail(f"no report (exit {proc.returncode}):\n{errors[-4000:]}")
    report = json.loads(report_file.read_text())
    # stdout is the JSON report alone: Ray's node processes log to stderr.
    assert json.loads(output) == report, output[:2000]
    report["exit_code"] = proc.returncode
    report["work"] = str(work)
    return report


def test_node_loss_without_free_cpu_ends_within_budget_with_a_record(loss_report: dict) -> None:
    run = loss_report["runs"][0]
    assert run["removal"]["done_at_sample"] == 3 and run["removal"]["error"] is None, run
    assert run["error"] is None, run["error"]
    assert run["seconds"] <= MAX_WALL_SECONDS + MARGIN_SECONDS, run["seconds"]
    summary = json.loads((Path(run["out"]) / "summary.json").read_text())
    assert summary["status"] == "complete", summary["status"]
    losses = summary["transport"]["host_losses"]
    assert losses, "the removed node's host was never noticed as lost"
    for loss in losses:
        assert loss["outcome"].startswith(("resumed from checkpoints", "not resumed"))
        if loss["resumed_at"] is None:
            assert summary["stop_reason"] == "max_wall_seconds"
        else:
            # Its own CPU was gone with the node: it was replaced on a shared one.
            assert loss["cpus"] == 0.0 and "shared CPU" in loss["outcome"]
            assert loss["resumed_at"] >= loss["lost_at"]
    if summary["converged"]:
        assert summary["max_abs_log_scale_error"] <= 1e-8
        assert summary["restarts"] == sum(loss["shards"] for loss in losses)
    assert loss_report["exit_code"] == 0


def test_node_loss_run_leaves_no_cluster_behind(loss_report: dict) -> None:
    assert not Path(loss_report["temp_dir"]).exists()
    assert not _cluster_processes(loss_report["temp_dir"])


def _sample_seconds(run_dir: Path) -> list[float]:
    """The run clock of every sample, in seconds (trace.csv's first column is in time
    units of ``ray.time_unit`` wall seconds)."""
    import csv

    with open(run_dir / "trace.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    return [float(row[0]) * TIME_UNIT for row in rows[1:]]


def test_live_hosts_are_sampled_while_the_lost_host_is_brought_back(loss_report: dict) -> None:
    # The lost host is brought back by steps taken between samples: no pause in the
    # sampling longer than MAX_SAMPLE_GAP_SECONDS anywhere in the run, the outage included.
    # Waiting for it instead (as the driver once did) stops sampling for the whole outage,
    # which here lasts at least PENDING_SECONDS (5 s: the unreachable host is only replaced
    # after that) and was measured at 9-11 s.
    run = loss_report["runs"][0]
    summary = json.loads((Path(run["out"]) / "summary.json").read_text())
    times = _sample_seconds(Path(run["out"]))
    gaps = [b - a for a, b in zip(times[:-1], times[1:], strict=True)]
    worst = max(range(len(gaps)), key=gaps.__getitem__)
    assert gaps[worst] <= MAX_SAMPLE_GAP_SECONDS, (
        f"no sample for {gaps[worst]:.2f} s after {times[worst]:.2f} s "
        f"(losses: {summary['transport']['host_losses']})")
    for loss in summary["transport"]["host_losses"]:
        end = times[-1] if loss["resumed_at"] is None else loss["resumed_at"] * TIME_UNIT
        # Only an outage longer than the bound shows anything; this scenario's always is.
        assert end - loss["lost_at"] * TIME_UNIT > MAX_SAMPLE_GAP_SECONDS, loss
