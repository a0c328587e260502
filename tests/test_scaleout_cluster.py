"""A real 3-node Ray cluster on this machine: shards spread over nodes, a node killed mid-run.

The cluster runs in a subprocess (``python -m actors.cluster``): a Ray driver is connected to
one cluster at a time, and the rest of the suite shares the session's local Ray. The
subprocess starts three nodes (head + two workers, each its own raylet and object store) in
a private temporary directory, runs the scenario through the runtime's Ray backend with
``address`` pointed at the cluster, then runs it again and kills the worker node that hosts
the most shard actors after 10 convergence samples. It reports, from the cluster's control
store (the run record does not name nodes), on which node each shard actor ran.

Every process is torn down even on failure: the subprocess leads its own session, which is
killed as a whole on timeout, and the test checks that no process of the cluster survives.

Tolerances: max |u - u*| <= 1e-8 is the runtime's stopping rule, judged against the exact
optimum; the network function is exact in exact arithmetic, so <= 1e-12 relative (float64
rounding of a 4-layer forward pass is ~1e-15).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-8
FUNCTION_TOL = 1e-12
# Start-up of 3 nodes (~7-20 s on 2 loaded cores), two runs of ~20 s each, teardown.
TIMEOUT_S = 240
REMOVE_AFTER_SAMPLES = 4

SCENARIO = """
name = "scaleout"
seed = 1
backend = "ray"
[network]
kind = "mlp"
sizes = [6, 10, 10, 10, 3]
unit_spread = 1.0
seed = 3
[partition]
granularity = "shard"
shards_per_layer = 2          # 6 shards on 3 hosts over 3 nodes
[links]
delay = "exponential"
mean = 0.5
[stop]
tol = 1e-8
max_wall_seconds = 30.0
function_check = "every_sample"
[ray]
time_unit = 0.04              # slow enough that the run outlasts the node's removal
sample_seconds = 0.05
hosts = 3                     # one per node (a net this small would get one host by default)
"""


def _cluster_processes(marker: str) -> list[Any]:
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if marker in " ".join(proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _kill_session(proc: subprocess.Popen) -> None:
    """Kill the subprocess's whole session (driver, raylets, workers), then reap it."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        time.sleep(1.0)
    for child in family:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("ray")
    pytest.importorskip("psutil")
    work = tmp_path_factory.mktemp("scaleout")
    scenario = work / "scaleout.toml"
    scenario.write_text(SCENARIO)
    report_file = work / "report.json"
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "actors.cluster", str(scenario), "--out",
               str(work / "runs"), "--nodes", "3", "--removal-run", str(REMOVE_AFTER_SAMPLES),
               "--report", str(report_file)]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_session(proc)
        pytest.fail(f"the 3-node cluster run took more than {TIMEOUT_S} s; killed it")
    if not report_file.is_file():
        pytest.fail(f"no report (exit {proc.returncode}):\n{output[-4000:]}")
    report = json.loads(report_file.read_text())
    report["exit_code"] = proc.returncode
    report["output_tail"] = output[-4000:]
    return report


def test_cluster_is_torn_down(cluster_report: dict[str, Any]) -> None:
    marker = cluster_report["temp_dir"]
    assert marker and marker.startswith("/tmp/abray-")
    deadline = time.monotonic() + 20
    while (left := _cluster_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for proc in left:  # never leave them behind, even when failing
        proc.kill()
    assert not left, f"{len(left)} cluster processes outlived the driver"
    assert not Path(marker).exists()


def test_three_nodes_shards_spread_converged_exact(cluster_report: dict[str, Any]) -> None:
    assert len(cluster_report["node_ids"]) == 3
    run = cluster_report["runs"][0]
    assert run["error"] is None, run["error"]
    summary = run["summary"]
    assert summary["converged"], summary["stop_reason"]
    assert summary["max_abs_log_scale_error"] <= TOL
    assert summary["function_exact"]
    assert summary["function_max_rel_error"] <= FUNCTION_TOL
    # One shard host per CPU of the cluster (3 nodes x 1 CPU) for the 6 shards, each host on
    # a node of this cluster; at least two distinct nodes.
    assert summary["n_shards"] == 6
    assert len(run["actors"]) == summary["transport"]["hosts"] == 3
    assert all(actor["node"] in (0, 1, 2) for actor in run["actors"])
    assert run["distinct_nodes"] >= 2, run["actors"]
    # The run record names the node of every shard too, and agrees on the spread.
    assert len(summary["shard_nodes"]) == summary["n_shards"]
    assert None not in summary["shard_nodes"]
    assert len(set(summary["shard_nodes"])) >= 2


def test_node_removed_mid_run_still_converges(cluster_report: dict[str, Any]) -> None:
    run = cluster_report["runs"][1]
    removal = run["removal"]
    # The node really went away mid-run, with shard actors on it.
    assert removal["done_at_sample"] == REMOVE_AFTER_SAMPLES
    assert removal["node_index"] in (1, 2) and removal["actors_on_node"] >= 1
    assert run["error"] is None, run["error"]
    summary = run["summary"]
    assert summary["converged"], summary["stop_reason"]
    assert summary["max_abs_log_scale_error"] <= TOL
    assert summary["function_exact"]
    assert summary["function_max_rel_error"] <= FUNCTION_TOL
    # Each lost host was resumed elsewhere and the record says so: its shards count as
    # crashed and restarted, and they last ran on a surviving node.
    losses = summary["transport"]["host_losses"]
    assert len(losses) >= removal["actors_on_node"]
    assert all(loss["real_down_for"] > 0 for loss in losses)
    assert summary["crashes"] == summary["restarts"] >= sum(loss["shards"] for loss in losses)
    lost = {loss["host"] for loss in losses}
    moved = [sid for sid, host in enumerate(summary["transport"]["host_of_shard"])
             if host in lost]
    assert moved and all(summary["shard_nodes"][sid] != removal["node_id"] for sid in moved)


def test_unreachable_address_is_named_not_waited_on() -> None:
    import socket

    from actors.cluster import ClusterError, check_address

    # A port nobody listens on: bind one, note it, close it.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Refused at once; an address that drops packets would wait the bounded timeout.
    with pytest.raises(ClusterError, match=r"^address: no Ray cluster answers"):
        check_address(f"127.0.0.1:{port}", timeout=5.0)
    with pytest.raises(ClusterError, match=r"^address: expected HOST:PORT"):
        check_address("nowhere")


def test_a_scenario_that_cannot_fit_is_refused_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The memory estimate refuses it before any node starts: exit 2, one line naming the key
    # and the estimate, no run directory.
    from actors.cluster import main

    out = tmp_path / "run"
    code = main([str(ROOT / "scenarios" / "neurons_100k.toml"), "--out", str(out), "--set",
                 "network.sizes=[1000,50000000,50000000,50000000,50000000,10]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "partition.granularity: needs about" in err[0] and "neurons_100k.toml" in err[0]
    assert not out.exists()


def test_bad_cluster_sizes_name_the_field() -> None:
    from actors.cluster import LocalCluster

    with pytest.raises(ValueError, match="^nodes"):
        LocalCluster(nodes=0)
    with pytest.raises(ValueError, match="^cpus_per_node"):
        LocalCluster(nodes=2, cpus_per_node=0)


def test_explicit_placement_pins_every_shard_to_the_named_node(tmp_path: Path) -> None:
    """``ray.placement`` = a node's custom resource: every shard runs on that node."""
    pytest.importorskip("ray")
    scenario = tmp_path / "placement.toml"
    scenario.write_text(SCENARIO)
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "placement_driver.py"), str(scenario),
         str(tmp_path / "run")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    node_two = report["node_ids"]["2"]
    assert report["converged"]
    assert report["function_max_rel_error"] <= FUNCTION_TOL
    assert report["shard_nodes"] == [node_two] * 6


def test_placement_on_a_resource_no_node_offers_is_named(ray_session: Any,
                                                         tmp_path: Path) -> None:
    from asyncbalance.errors import InvalidInputError
    from asyncbalance.runtime.coordinator import run_scenario
    from asyncbalance.runtime.scenario import load_scenarios

    scenario = tmp_path / "placement.toml"
    scenario.write_text(SCENARIO)
    point = load_scenarios(scenario, ['ray.placement=["no_such_node"]'])[0]
    with pytest.raises(InvalidInputError, match=r"ray\.placement: no node offers"):
        run_scenario(point.scenario, tmp_path / "run", backend="ray", base_dir=point.base_dir)
    assert not (tmp_path / "run").exists()
