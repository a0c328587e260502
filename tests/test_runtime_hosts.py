"""Shard hosts: many logical shards per process, coalesced links, event-driven wakes.

The pure ``ShardHost`` is driven here by hand (a manual clock, outboxes handed over between
hosts), so every property is checked deterministically and without Ray; the Ray tests at the
end run the same hosts as actors with far more shards than cores.

Tolerances: convergence is judged as in the behaviour suite, max |u - u*| <= 1e-8 against the
exact optimum (certified to 1e-12), and the float64 function of the gathered network to 1e-12.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from asyncbalance import build_cost_graph, lp, solve_optimum
from asyncbalance.runtime import build_shard_specs, gather_log_scales, partition_units
from asyncbalance.runtime.coordinator import FUNCTION_TOL, run_scenario
from asyncbalance.runtime.host import (
    EPOCH_STRIDE,
    HostCrash,
    HostSettings,
    ShardHost,
    assign_hosts,
)
from asyncbalance.runtime.messages import StateMessage, decode_batch, encode_batch
from asyncbalance.runtime.scenario import NetworkConfig, build_network, scenario_from_mapping
from asyncbalance.runtime.shard import Rule, Shard

TOL = 1e-8


def problem(sizes=(6, 10, 10, 10, 3), granularity="neuron", p=1.0, activation="relu",
            density=1.0, seed=3):
    net = build_network(NetworkConfig(kind="mlp", sizes=tuple(sizes), unit_spread=1.0,
                                      activation=activation, density=density, seed=seed))
    graph = build_cost_graph(net, lp(p))
    specs = build_shard_specs(graph, partition_units(graph, granularity))
    return graph, specs


def settings(**overrides) -> HostSettings:
    base = {"seed": 0, "rule": Rule("exact"), "resend_interval": 5.0, "wake_kind": "periodic",
            "wake_period": 1.0, "wake_jitter": 0.2, "delay": "exponential",
            "delay_spread": 0.5, "pareto_shape": 2.5, "loss": 0.0, "duplication": 0.0,
            "partitions": (), "checkpoint_interval": 3.0, "link_mean": {}}
    base.update(overrides)
    return HostSettings(**base)


def make_hosts(specs, n_hosts, **overrides):
    owner = assign_hosts(specs, n_hosts)
    link_mean = {(s.shard_id, n): 0.5 for s in specs for n in s.neighbours}
    config = settings(**{"link_mean": link_mean, **overrides})
    hosts = [ShardHost(h, [s for s in specs if owner[s.shard_id] == h], owner, config)
             for h in range(max(owner) + 1)]
    return hosts, owner


def exchange(hosts, now: float) -> int:
    """Hand every outbox to its host, through the wire format; the number of batches."""
    batches = 0
    for host in hosts:
        for dst in host.pending_hosts():
            hosts[dst].receive(decode_batch(encode_batch(host.take_outbox(dst))), now)
            batches += 1
    return batches


def gathered(graph, specs, hosts) -> np.ndarray:
    owned: list[np.ndarray] = [np.zeros(0)] * len(specs)
    for host in hosts:
        values, start = host.owned_log_scales(), 0
        for sid in host.order:
            owned[sid] = values[start:start + specs[sid].n_own]
            start += specs[sid].n_own
    return gather_log_scales(graph.n_units, specs, owned)


def drive(hosts, until: float, step: float = 0.25, start: float = 0.0) -> float:
    now = start
    while now < until:
        now += step
        for host in hosts:
            host.advance(now)
        exchange(hosts, now)
    return now


def test_many_neuron_shards_on_two_hosts_reach_the_optimum():
    graph, specs = problem()
    u_star = solve_optimum(graph).log_scales
    hosts, owner = make_hosts(specs, 2)
    assert len(specs) == 30 and sorted(set(owner)) == [0, 1]
    drive(hosts, 300.0)
    assert np.max(np.abs(gathered(graph, specs, hosts) - u_star)) <= TOL


def test_bipu_units_need_their_degree():
    # relu(x)^2 units have degree c = 2; a shard graph that used c = 1 would balance to
    # another point (the test's own check: that point is far from the true optimum).
    graph, specs = problem(activation="power:2", p=2.0, sizes=(5, 6, 6, 3))
    u_star = solve_optimum(graph).log_scales
    hosts, _ = make_hosts(specs, 2)
    drive(hosts, 300.0)
    assert np.max(np.abs(gathered(graph, specs, hosts) - u_star)) <= TOL
    wrong = build_cost_graph(build_network(NetworkConfig(
        kind="mlp", sizes=(5, 6, 6, 3), unit_spread=1.0, activation="relu", seed=3)), lp(2.0))
    assert np.max(np.abs(solve_optimum(wrong).log_scales - u_star)) > 1e-3


def test_newer_state_supersedes_older_on_the_same_link():
    graph, specs = problem()
    hosts, owner = make_hosts(specs, 2, delay="constant", link_mean={})
    host = hosts[0]
    src = host.order[0]
    remote = next(n for n in specs[src].neighbours if owner[n] == 1)
    units = specs[src].units
    for seq in (1, 2, 3):
        host._send(0.0, StateMessage(src, remote, 0, seq, units, np.full(units.size, seq)))
    batch = [m for m in host.take_outbox(1) if m.sender == src and m.receiver == remote]
    assert [m.seq for m in batch] == [3]  # only the newest state crosses
    assert host.counters["coalesced"] == 2
    assert host.counters["sent"] == 3


def test_a_quiet_converged_host_sends_only_anti_entropy():
    graph, specs = problem()
    hosts, _ = make_hosts(specs, 2, resend_interval=7.0)
    now = drive(hosts, 300.0)
    sent_before = sum(h.counters["sent"] for h in hosts)
    queues_before = [h.queue_length() for h in hosts]
    now = drive(hosts, now + 70.0, start=now)
    sent = sum(h.counters["sent"] for h in hosts) - sent_before
    # Ten re-send periods: each shard re-sends its state to each neighbour once a period.
    per_period = sum(len(s.neighbours) for s in specs)
    assert 9 * per_period <= sent <= 11 * per_period
    # Nothing accumulates while the system is quiet: host by host (a list comparison would
    # be lexicographic), at most one pending wake per shard and one message in flight per
    # link out of the host (each link re-sends once per 7 time units; delays average 0.5).
    for host, before in zip(hosts, queues_before, strict=True):
        bound = len(host.order) + sum(len(specs[s].neighbours) for s in host.order)
        assert host.queue_length() <= bound, (host.host_id, before, host.queue_length())


def test_a_message_of_an_older_generation_is_dropped_after_a_reload():
    graph, specs = problem()
    hosts, owner = make_hosts(specs, 2)
    drive(hosts, 20.0)
    host = hosts[1]
    sid = host.order[0]
    peer = specs[sid].neighbours[0]
    old = StateMessage(peer, sid, 0, 10**6, specs[peer].units, np.full(specs[peer].n_own, 9.0))
    host.reload([specs[s] for s in host.order], generation=1, now=20.0)
    assert not host.owned_log_scales().any()  # the new generation starts at u = 0
    host.receive([old], 20.0)
    assert host.counters["stale"] == 1
    assert not (host.shards[sid].state == 9.0).any()
    new = StateMessage(peer, sid, EPOCH_STRIDE, 1, specs[peer].units,
                       np.full(specs[peer].n_own, 0.5))
    host.receive([new], 20.0)
    assert host.counters["applied"] >= 1 and (host.shards[sid].state == 0.5).any()


@pytest.mark.parametrize("restore", ["checkpoint", "zero"])
def test_a_crashed_shard_restarts_from_its_checkpoint_or_from_zero(restore):
    graph, specs = problem()
    crash = HostCrash(shard=4, at=40.0, down_for=5.0, restore=restore)
    hosts, owner = make_hosts(specs, 2, crashes=(crash,))
    host = hosts[owner[4]]
    drive(hosts, 39.5)
    checkpoint_state = host.shards[4].log_scales
    assert np.abs(checkpoint_state).max() > 0.1  # far from zero, so the two cases differ
    drive(hosts, 44.0, start=39.5)
    assert host.shards[4] is None
    # While down, the shard counts with what it will restart from.
    down_values = host.owned_log_scales()[host.order.index(4)]
    drive(hosts, 45.0, step=1.0, start=44.0)
    restarted = host.shards[4]
    assert restarted is not None and restarted.epoch == 1
    record = host.crash_log[0].as_dict()
    assert record["real_down_for"] == pytest.approx(5.0, abs=0.5)
    if restore == "zero":
        assert down_values == 0.0
    else:
        # The last checkpoint is at most checkpoint_interval old: close to, not at, zero.
        assert abs(down_values) > 0.1
        assert abs(down_values - checkpoint_state[0]) < abs(checkpoint_state[0])
    drive(hosts, 400.0, start=45.0)
    u_star = solve_optimum(graph).log_scales
    assert np.max(np.abs(gathered(graph, specs, hosts) - u_star)) <= TOL


def test_free_running_hosts_converge_without_pacing():
    graph, specs = problem()
    hosts, _ = make_hosts(specs, 3, paced=False)
    drive(hosts, 5.0, step=0.01)
    u_star = solve_optimum(graph).log_scales
    assert np.max(np.abs(gathered(graph, specs, hosts) - u_star)) <= TOL


def test_free_running_shards_of_one_host_see_each_others_moves_within_a_round():
    # Free-running, a message between shards of one host is applied when it is sent, so the
    # first round is a Gauss-Seidel sweep in wake order. Delivering at the end of the round
    # instead (every shard moving against the state before the round) fails the comparison.
    graph, specs = problem()
    hosts, _ = make_hosts(specs, 1, paced=False)
    host = hosts[0]
    config = host.settings
    sweep = {sid: Shard(specs[sid], config.rule, config.resend_interval, 0,
                        config.send_threshold) for sid in host.order}
    for sid in host.order:
        for message in sweep[sid].on_wake(0.0):
            sweep[message.receiver].on_message(message)
    assert host.advance(0.0) == len(specs)
    for sid in host.order:
        np.testing.assert_array_equal(host.shards[sid].state, sweep[sid].state)
    # A paced host keeps modelling the delay within the host: the message waits in its queue.
    paced = make_hosts(specs, 1, delay="constant")[0][0]
    src = paced.order[0]
    dst = specs[src].neighbours[0]
    units = specs[src].units
    queued = paced.queue_length()
    paced._send(0.0, StateMessage(src, dst, 0, 1, units, np.ones(units.size)))
    assert paced.counters["delivered"] == 0 and paced.queue_length() == queued + 1


def test_a_round_taken_in_slices_moves_the_same_shards_as_a_whole_round():
    # A caller may stop a round after any event (the Ray host stops after each shard's move
    # to send and receive): the round stays open, and the slices end where one call ends. A
    # host that opened a new round at every call would move a shard twice in a round.
    graph, specs = problem(granularity="shard")
    whole, _ = make_hosts(specs, 1, paced=False)
    sliced, _ = make_hosts(specs, 1, paced=False)
    for now in (0.0, 1.0, 2.0, 3.0):
        events = whole[0].advance(now)
        assert events > 0
        calls = 0
        while sliced[0].advance(now, max_events=1):
            calls += 1
            assert calls <= events
        assert calls == events
        for sid in whole[0].order:
            np.testing.assert_array_equal(sliced[0].shards[sid].state,
                                          whole[0].shards[sid].state)


def test_hosts_get_contiguous_runs_of_near_equal_size():
    graph, specs = problem(sizes=(6, 10, 10, 10, 3))
    owner = assign_hosts(specs, 4)
    assert owner == sorted(owner) and sorted(set(owner)) == [0, 1, 2, 3]
    counts = np.bincount(owner)
    assert counts.max() - counts.min() <= 1
    assert assign_hosts(specs, 100) == list(range(len(specs)))


# -- the same hosts as Ray actors, actors far outnumbering the 2 cores -------------------------

RAY_STOP = {"tol": TOL, "max_wall_seconds": 120.0, "function_check": "final"}


def ray_run(tmp_path: Path, name: str, **sections) -> dict:
    data = {"name": name, "backend": "ray", "seed": 1, "record_events": False,
            "links": {"delay": "exponential", "mean": 0.5}, "stop": RAY_STOP}
    data.update(sections)
    return run_scenario(scenario_from_mapping(data), tmp_path / name)


def assert_at_optimum(summary: dict) -> None:
    assert summary["converged"], (summary["stop_reason"], summary["max_abs_log_scale_error"])
    assert summary["max_abs_log_scale_error"] <= TOL
    assert summary["function_max_rel_error"] <= FUNCTION_TOL


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("transport", ["stream", "calls"])
def test_ray_64_logical_shards_converge(tmp_path, ray_session, transport):
    summary = ray_run(tmp_path, f"shards64-{transport}",
                      network={"kind": "mlp", "sizes": [16, 48, 48, 48, 48, 8],
                               "unit_spread": 1.0, "seed": 2},
                      partition={"granularity": "shard", "shards_per_layer": 16},
                      # Shards of 3 units run as block hosts; two are asked for (a net this
                      # small would get one by default), so batches cross between them.
                      ray={"time_unit": 0.03, "sample_seconds": 0.3, "transport": transport,
                           "hosts": 2})
    links = summary["transport"]
    assert summary["n_shards"] == 64 and links["hosts"] == 2
    assert_at_optimum(summary)
    # The batches really crossed between the hosts over the named transport, none lost.
    assert links["transport"] == transport
    assert links["calls"] > 0 and links["lost_calls"] == 0
    assert links["mean_call_seconds"] > 0


@pytest.mark.ray
def test_ray_free_running_hosts_converge(tmp_path, ray_session):
    summary = ray_run(tmp_path, "free",
                      network={"kind": "mlp", "sizes": [16, 64, 64, 64, 8],
                               "unit_spread": 1.0, "seed": 3},
                      partition={"granularity": "shard", "shards_per_layer": 4},
                      ray={"clock": "free", "sample_seconds": 0.01})
    assert summary["clock"] == "free" and summary["transport"]["hosts"] == 2
    # Sampled over the monitor links (a Ray poll only every FULL_POLL_SECONDS): the distance
    # below is measured on the state those links returned.
    assert summary["transport"]["monitor_polls"] > 0
    assert_at_optimum(summary)
    assert summary["wall_seconds_to_tol"] is not None


@pytest.mark.ray
def test_free_running_hosts_are_sampled_when_they_rest_not_a_period_later(tmp_path,
                                                                          ray_session):
    # Samples every 3 s, a net the host balances in well under a second: the run stops at
    # the sample taken when the host rests after its last moves. A driver that waited out
    # the sample period would stop at 3 s or later.
    period = 3.0
    summary = ray_run(tmp_path, "rest",
                      network={"kind": "mlp", "sizes": [16, 64, 64, 64, 8],
                               "unit_spread": 1.0, "seed": 3},
                      partition={"granularity": "shard", "shards_per_layer": 4},
                      ray={"clock": "free", "sample_seconds": period, "hosts": 1})
    assert summary["transport"]["hosts"] == 1
    assert_at_optimum(summary)
    assert summary["wall_seconds_to_tol"] < period / 2
    # The driver's BLAS keeps to one thread once it has driven hosts (its samples would
    # otherwise wait for cores the hosts hold).
    from threadpoolctl import threadpool_info
    assert all(pool["num_threads"] == 1 for pool in threadpool_info()
               if pool["user_api"] == "blas")


@pytest.mark.ray
def test_hosts_at_rest_are_sampled_again_only_after_they_move(tmp_path, ray_session):
    # Once the host has settled it rests for good: a request at rest must then wait for the
    # sample time, or the driver would sample it back to back. A tolerance below float64's
    # reach keeps the run going for 1.5 s of samples every 0.1 s: ~15 samples, not hundreds.
    period, wall = 0.1, 1.5
    ray_run(tmp_path, "idle",
            network={"kind": "mlp", "sizes": [16, 64, 64, 64, 8], "unit_spread": 1.0,
                     "seed": 3},
            partition={"granularity": "shard", "shards_per_layer": 4},
            ray={"clock": "free", "sample_seconds": period, "hosts": 1},
            stop={**RAY_STOP, "tol": 1e-300, "max_wall_seconds": wall})
    samples = len((tmp_path / "idle" / "trace.csv").read_text().splitlines()) - 1
    assert samples <= 2 * wall / period


@pytest.mark.ray
def test_a_monitor_sample_and_a_ray_poll_of_quiet_hosts_agree(ray_session):
    # Most samples come over the monitor links, a Ray poll only every 0.25 s: a run whose
    # monitor samples were wrong (another host's state, a stale one) would still stop at a
    # correct Ray poll, so the two are compared here directly, at a converged quiet state.
    from actors.backend import RayBackend
    from asyncbalance.runtime.coordinator import prepare
    from asyncbalance.runtime.events import EventWriter

    scenario = scenario_from_mapping({
        "name": "monitor", "backend": "ray", "seed": 1, "record_events": False,
        "network": {"kind": "mlp", "sizes": [16, 64, 64, 64, 8], "unit_spread": 1.0,
                    "seed": 3},
        "partition": {"granularity": "shard", "shards_per_layer": 4},
        "ray": {"clock": "free", "sample_seconds": 0.01}})
    problem = prepare(scenario)
    backend = RayBackend(problem.specs, scenario, EventWriter(None))
    try:
        assert backend.n_hosts == 2 and len(backend.monitors) == 2
        backend.start()
        u_star = problem.optimum.log_scales
        error = math.inf
        # Until the hosts are quiet: moves below the 1e-13 send threshold stop the traffic.
        for step in range(1, 2000):
            backend.advance(step * 1.0)
            u = gather_log_scales(problem.graph.n_units, problem.specs,
                                  backend.owned_log_scales())
            error = float(np.max(np.abs(u - u_star)))
            if error <= 1e-12:
                break
        assert error <= 1e-12
        assert backend._fast_poll()
        by_monitor = gather_log_scales(problem.graph.n_units, problem.specs,
                                       backend.owned_log_scales())
        backend.final_poll()
        by_poll = gather_log_scales(problem.graph.n_units, problem.specs,
                                    backend.owned_log_scales())
        assert np.max(np.abs(by_monitor - u_star)) <= TOL
        np.testing.assert_allclose(by_monitor, by_poll, rtol=0, atol=1e-12)
    finally:
        backend.close()


@pytest.mark.ray
@pytest.mark.slow
def test_ray_500_neuron_shards_converge(tmp_path, ray_session):
    summary = ray_run(tmp_path, "neurons",
                      network={"kind": "mlp", "sizes": [24, 120, 120, 120, 120, 120, 8],
                               "density": 0.04, "unit_spread": 1.0, "seed": 5},
                      partition={"granularity": "neuron"},
                      ray={"time_unit": 0.08, "sample_seconds": 0.4})
    assert summary["n_shards"] >= 500
    assert_at_optimum(summary)
    # Coalescing and backpressure keep the hosts' queues bounded by the links, not the run.
    assert summary["transport"]["max_host_queue"] < 20 * summary["n_shards"]


def test_ray_asking_for_more_cpus_than_the_cluster_has_is_named(tmp_path, ray_session):
    from asyncbalance.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match=r"^ray\.actor_cpus: .*offers 2"):
        ray_run(tmp_path, "cpus", partition={"granularity": "shard", "shards_per_layer": 3},
                ray={"hosts": 6, "actor_cpus": 1.0})
    assert not (tmp_path / "cpus").exists()


def test_distance_is_not_gauge_projected_where_a_visible_unit_fixes_the_gauge(tmp_path):
    summary = run_scenario(scenario_from_mapping(
        {"name": "g", "network": {"kind": "mlp", "sizes": [3, 4, 2]}}), tmp_path / "g")
    assert summary["gauge_components"] == []
    assert summary["distance_measure"] == "max |u - u*|"
    assert math.isfinite(summary["max_abs_log_scale_error"])


def test_the_library_never_imports_the_ray_shells():
    """The runtime is host-independent: backends are found by entry point, not by import."""
    import re

    package = Path(__file__).resolve().parents[1] / "asyncbalance"
    pattern = re.compile(r"^\s*(from\s+actors\b|import\s+actors\b)|import_module\(\s*['\"]actors",
                         re.MULTILINE)
    offenders = [str(path.relative_to(package)) for path in package.rglob("*.py")
                 if pattern.search(path.read_text())]
    assert offenders == []


def test_every_copy_is_accounted_for():
    # Duplicates that reach an outbox holding the same or a newer state are dropped there:
    # counted as superseded, so that every copy a host put on a link is accounted for: it
    # was delivered, dropped, replaced in an outbox, or is still on its way.
    from asyncbalance.runtime.host import _DELIVER, _RELEASE

    graph, specs = problem()
    hosts, _ = make_hosts(specs, 2, duplication=0.3, loss=0.1)
    now = 0.0
    for until in (10.0, 40.0, 80.0):
        now = drive(hosts, until, start=now)
        total = {name: sum(h.counters[name] for h in hosts) for name in hosts[0].counters}
        flying = sum(1 for h in hosts for e in h.queue if e[2] in (_DELIVER, _RELEASE)) + \
            sum(len(box) for h in hosts for box in h.outbox.values())
        assert total["sent"] + total["duplicated"] == (
            total["delivered"] + total["dropped"] + total["stale"] + total["coalesced"]
            + total["superseded"] + flying), (until, total, flying)
    assert total["duplicated"] > 0 and total["superseded"] > 0


def test_block_hosts_by_default_one_per_cpu_and_per_30_million_links() -> None:
    from actors.backend import LINKS_PER_BLOCK_HOST, plan_host_count

    scenario = scenario_from_mapping({"name": "h", "network": {"kind": "mlp", "sizes": [4, 8, 3]}})
    assert LINKS_PER_BLOCK_HOST == 30_000_000
    # per-shard hosts: one per CPU (never more than shards)
    assert plan_host_count(scenario, 100, 2.0) == 2
    assert plan_host_count(scenario, 1, 2.0) == 1
    # block hosts: 10^5 neurons at fan-in 133 (2.7e7 links) measured faster on one host
    assert plan_host_count(scenario, 100_000, 2.0, 27_000_000) == 1
    assert plan_host_count(scenario, 1_000_000, 8.0, 270_000_000) == 8
    assert plan_host_count(scenario, 1_000_000, 4.0, 60_000_000) == 2
    # an explicit ray.hosts wins
    two = scenario_from_mapping({"name": "h", "network": {"kind": "mlp", "sizes": [4, 8, 3]},
                                 "ray": {"hosts": 2}})
    assert plan_host_count(two, 100_000, 2.0, 27_000_000) == 2
