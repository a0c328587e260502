"""Block hosts exchanging array frames, driven by hand on one clock: a neuron's change leaves
once per destination host and is fanned out there; hosts converge to the optimum, paced or
free-running, and the frames survive the wire format."""

from __future__ import annotations

import numpy as np
import pytest

from asyncbalance.errors import InvalidInputError
from asyncbalance.runtime import block_loops
from asyncbalance.runtime.array_sim import default_step, link_mean_array
from asyncbalance.runtime.block_host import BlockHost, decode_checkpoint
from asyncbalance.runtime.coordinator import prepare
from asyncbalance.runtime.frames import decode_frame, encode_frame
from asyncbalance.runtime.host import assign_hosts, settings_for
from asyncbalance.runtime.layout import build_layout
from asyncbalance.runtime.scenario import scenario_from_mapping

SCENARIO = {
    "name": "hosts", "seed": 2,
    "network": {"kind": "mlp", "sizes": [6, 20, 20, 20, 3], "unit_spread": 1.0, "seed": 3},
    "partition": {"granularity": "neuron"},
    "links": {"delay": "exponential", "mean": 0.5},
}


def _hosts(n_hosts: int, paced: bool = True, data: dict | None = None, local: bool = True):
    # Each host builds its own part of the layout (as on Ray), or all hosts share the whole.
    problem = prepare(scenario_from_mapping(data or SCENARIO))
    partition = [spec.units for spec in problem.specs]
    layout = build_layout(problem.graph, partition)
    shard_host = np.array(assign_hosts(problem.specs, n_hosts))
    s = problem.scenario
    hosts = []
    for h in range(n_hosts):
        own = build_layout(problem.graph, partition, shard_host == h) if local else layout
        hosts.append(BlockHost(h, own, shard_host, settings_for(s, {}, paced=paced),
                               link_mean_array(s, own), default_step(s)))
    return problem, layout, hosts


def _gather(layout, hosts) -> np.ndarray:
    u = np.zeros(layout.n_units_global)
    for host in hosts:
        positions, _ = layout.shard_positions(np.array(host.order))
        u[layout.units[positions]] = host.owned_log_scales()
    return u


def _run(problem, layout, hosts, tick: float = 0.05, max_time: float = 400.0,
         frames: list | None = None) -> float:
    clock = 0.0
    target = problem.optimum.log_scales
    while clock < max_time:
        clock += tick
        for host in hosts:
            host.advance(clock)
        for host in hosts:
            for dst in host.pending_hosts():
                frame = decode_frame(encode_frame(host.take_frame(dst)))
                if frames is not None:
                    frames.append((host.host_id, dst, frame))
                hosts[dst].receive_frame(frame, clock)
        if np.abs(_gather(layout, hosts) - target).max() <= 1e-8:
            return clock
    raise AssertionError("hosts did not converge")


def test_a_neurons_change_leaves_once_per_destination_host() -> None:
    problem, layout, hosts = _hosts(3)
    frames: list = []
    _run(problem, layout, hosts, frames=frames)
    assert frames
    fanned = 0
    for src, dst, frame in frames:
        # One entry per sender in each frame, never one per neighbour neuron.
        assert np.unique(frame.senders).shape[0] == frame.n_entries
        assert (hosts[src].routes.shard_host[frame.senders] == src).all()
        links, _ = hosts[dst].routes.links_to(frame.senders, dst)
        fanned += links.shape[0]
        assert (hosts[dst].routes.shard_host[hosts[dst].layout.link_dst[links]] == dst).all()
    entries = sum(f.n_entries for _, _, f in frames)
    # A 20-wide dense layer: each entry feeds its neighbours on the other host (~20 of them).
    assert fanned >= 10 * entries
    assert sum(h.counters["frame_entries"] for h in hosts) == entries


@pytest.mark.parametrize("local", [True, False])
@pytest.mark.parametrize("paced", [True, False])
def test_block_hosts_converge_to_the_optimum(paced: bool, local: bool) -> None:
    problem, layout, hosts = _hosts(3, paced=paced, local=local)
    units = _run(problem, layout, hosts)
    assert np.abs(_gather(layout, hosts) - problem.optimum.log_scales).max() <= 1e-8
    # Every link message into a host was counted there, and none was lost.
    assert sum(h.counters["delivered"] for h in hosts) > 0
    assert sum(h.counters["dropped"] for h in hosts) == 0
    assert units > 0


def test_paced_hosts_take_the_time_units_of_one_host() -> None:
    one = _run(*_hosts(1))
    three = _run(*_hosts(3))
    # Delays are modelled per link from the send time on either side of a frame, so the
    # split changes nothing but the draws (measured 0.9-1.1 here).
    assert 0.75 * one <= three <= 1.25 * one, (one, three)


def test_a_host_restarts_its_shards_from_their_checkpoints() -> None:
    problem, layout, hosts = _hosts(2)
    for clock in np.arange(0.5, 12.0, 0.5):
        for host in hosts:
            host.advance(float(clock))
        for host in hosts:
            for dst in host.pending_hosts():
                hosts[dst].receive_frame(host.take_frame(dst), float(clock))
    saved = hosts[1].take_checkpoints()
    assert set(saved) == set(hosts[1].order)
    state = {sid: decode_checkpoint(raw) for sid, raw in saved.items()}
    assert any(np.abs(s["own"]).max() > 0 for s in state.values())
    s = problem.scenario
    restarts = {sid: 1 for sid in hosts[1].order}
    replacement = BlockHost(1, layout, hosts[1].routes.shard_host, settings_for(s, {}),
                            link_mean_array(s, layout), default_step(s), checkpoints=saved,
                            restarts=restarts, now=12.0)
    for sid in hosts[1].order:
        lo, hi = layout.unit_ptr[sid], layout.unit_ptr[sid + 1]
        np.testing.assert_array_equal(replacement.block.own[lo:hi], state[sid]["own"])
        assert replacement.block.epoch[sid] == 1
    hosts[1] = replacement
    _run(problem, layout, hosts)


def test_a_malformed_frame_is_refused() -> None:
    with pytest.raises(InvalidInputError):
        decode_frame(b"\x93\x01\x02")
    _, _, hosts = _hosts(2)
    hosts[0].advance(3.0)
    frame = hosts[0].take_frame(1)
    raw = encode_frame(frame)
    again = decode_frame(raw)
    np.testing.assert_array_equal(again.values, frame.values)
    np.testing.assert_array_equal(again.senders, frame.senders)


def test_monitor_replies_after_the_first_carry_only_what_changed() -> None:
    import types

    import msgpack

    from actors.host_actor import HostActor

    problem, layout, hosts = _hosts(1)
    actor = HostActor(0, 0.01, 4, transport="calls")
    actor.host = hosts[0]
    link = types.SimpleNamespace()

    def reply() -> tuple[dict, int]:
        raw = actor._monitor_state(link)
        return msgpack.unpackb(raw, raw=False), len(raw)

    first, _ = reply()
    state = np.frombuffer(first["log_scales"], dtype="<f8").copy()
    assert "delta" not in first and state.shape == (layout.n_own,)
    clock = 0.0
    for clock in np.arange(0.2, 3.0, 0.2):
        hosts[0].advance(float(clock))
        sample, _ = reply()
        if "delta" in sample:
            index, values = sample["delta"]
            state[np.frombuffer(index, dtype="<u4")] = np.frombuffer(values, dtype="<f8")
        else:
            state = np.frombuffer(sample["log_scales"], dtype="<f8").copy()
        # Replies add up to the host's state exactly, whichever form they take.
        np.testing.assert_array_equal(state, hosts[0].owned_log_scales())
    _run(problem, layout, hosts, max_time=400.0)
    reply()
    quiet, size = reply()
    # A converged host that did not move since the last reply answers with an empty delta.
    assert quiet["delta"][0] == b"" and size < 400
    # A new connection starts from the whole state.
    link = types.SimpleNamespace()
    fresh, _ = reply()
    assert "delta" not in fresh


@pytest.mark.ray
@pytest.mark.slow
def test_ten_thousand_neurons_on_ray_reach_the_optimum(tmp_path, ray_session) -> None:
    from asyncbalance.runtime import run_scenario

    # 10^4 neuron shards of a sparse MLP on the local Ray's block hosts, free-running: every
    # neuron a logical shard, frames between the two hosts. Judged by the distance to the
    # exact optimum (any log-scales keep the function).
    summary = run_scenario(scenario_from_mapping({
        "name": "n10k", "seed": 0, "backend": "ray", "record_events": False,
        "network": {"kind": "sparse_mlp", "sizes": [50, 2500, 2500, 2500, 2500, 10],
                    "fan_in": 4, "unit_spread": 1.0, "seed": 0},
        "partition": {"granularity": "neuron"},
        "stop": {"tol": 1e-6, "max_wall_seconds": 90.0, "function_check": "final"},
        # Two hosts asked for (a net this small gets one by default), so frames cross.
        "ray": {"clock": "free", "hosts": 2}}), tmp_path / "run")
    assert summary["n_shards"] == 10_000
    assert summary["converged"] and summary["max_abs_log_scale_error"] <= 1e-6
    assert summary["transport"]["hosts"] == 2 and summary["transport"]["calls"] > 0
    assert summary["function_max_rel_error"] <= 1e-12


def test_a_hosts_part_of_the_layout_holds_only_what_it_reads() -> None:
    problem, layout, hosts = _hosts(3)
    for host in hosts:
        part = host.layout
        # Only links into this host's shards, each with the whole layout's slots and mean.
        assert (host.routes.shard_host[part.link_dst] == host.host_id).all()
        keys = part.link_src * layout.n_shards + part.link_dst
        full = layout.link_src * layout.n_shards + layout.link_dst
        at = np.searchsorted(full, keys)
        assert (full[at] == keys).all()
        np.testing.assert_array_equal(np.diff(part.link_slot_ptr),
                                      np.diff(layout.link_slot_ptr)[at])
        np.testing.assert_array_equal(host.link_mean, link_mean_array(problem.scenario,
                                                                      layout)[at])
        # Terms of its own units only.
        mine = host.routes.shard_host[layout.shard_of_unit] == host.host_id
        counts = np.diff(part.incoming.ptr)
        assert (counts[~mine] == 0).all()
        np.testing.assert_array_equal(counts[mine], np.diff(layout.incoming.ptr)[mine])
    total = sum(h.layout.n_links for h in hosts)
    assert total == layout.n_links


def test_link_means_are_lognormal_per_link_and_the_same_on_every_host() -> None:
    data = {**SCENARIO, "links": {"delay": "exponential", "mean": 0.5, "heterogeneity": 0.3},
            "network": {"kind": "sparse_mlp", "sizes": [50, 500, 500, 10], "fan_in": 20,
                        "seed": 1}}
    problem, layout, hosts = _hosts(2, data=data)
    means = link_mean_array(problem.scenario, layout)
    # Mean-one factors of sigma 0.3: over ~2e4 links, the mean within 1 % of 0.5 and the
    # log-spread within 3 % of 0.3.
    assert layout.n_links > 15_000
    assert abs(means.mean() - 0.5) < 0.005
    assert abs(np.log(means).std() - 0.3) < 0.01
    assert np.unique(means).shape[0] == layout.n_links


def _free_trajectory(data: dict, n_hosts: int, direct: bool, rounds: int = 60) -> tuple:
    """Free-running hosts on a fixed clock, frames exchanged after every tick; the state
    after every tick (own values, halo, link versions) and the counters at the end."""
    problem, layout, hosts = _hosts(n_hosts, paced=False, data=data)
    for host in hosts:
        assert host.direct
        host.direct = direct
    states = []
    for tick in range(1, rounds + 1):
        for host in hosts:
            host.advance(0.05 * tick)
        # Taken after the windows (the wheel has delivered the frames of the last tick by
        # then; applied at once, they were in before).
        states.append([np.concatenate([h.block.values, h.block.link_version.astype(float)])
                       for h in hosts])
        for host in hosts:
            for dst in host.pending_hosts():
                hosts[dst].receive_frame(host.take_frame(dst), 0.05 * tick)
    counters = [{k: h.counters[k] for k in ("sent", "delivered", "applied")} for h in hosts]
    return states, counters, np.abs(_gather(layout, hosts) - problem.optimum.log_scales).max()


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("n_hosts", [1, 2])
@pytest.mark.parametrize("granularity", ["neuron", "slices"])
def test_free_running_hosts_apply_messages_as_they_leave(monkeypatch, compiled: bool,
                                                         n_hosts: int,
                                                         granularity: str) -> None:
    # Applied as they are fanned out, the link messages give every host the state a zero
    # delay through the timing wheel gives it (applied at the start of the next window),
    # after every tick, bit for bit, with the same counts.
    monkeypatch.setattr(block_loops, "COMPILED", compiled)
    data = dict(SCENARIO)
    if granularity == "slices":
        data["partition"] = {"granularity": "shard", "shards_per_layer": 4}
    wheel, wheel_counts, _ = _free_trajectory(data, n_hosts, direct=False)
    now, now_counts, error = _free_trajectory(data, n_hosts, direct=True)
    assert error <= 1e-8  # the run reached the optimum: the comparison covers a whole run
    for step_wheel, step_now in zip(wheel, now, strict=True):
        for a, b in zip(step_wheel, step_now, strict=True):
            np.testing.assert_array_equal(a, b)
    assert now_counts == wheel_counts
    assert all(c["applied"] > 0 for c in now_counts)


def test_free_running_with_faults_keeps_the_queue() -> None:
    # Loss, duplication, partitions and crashes act on link messages in flight: a host with
    # any of them sends through the timing wheel even when free-running.
    data = dict(SCENARIO, links={"delay": "exponential", "mean": 0.5, "loss": 0.1})
    _, _, hosts = _hosts(1, paced=False, data=data)
    assert not hosts[0].direct
    _, _, hosts = _hosts(1, paced=True)
    assert not hosts[0].direct


@pytest.mark.parametrize("paced", [True, False])
def test_batch_records_add_up_to_the_counters(paced: bool) -> None:
    # Link messages fanned out from frames between windows are counted in the next window's
    # record: after every window the records of a host sum to its counters.
    problem, layout, hosts = _hosts(2, paced=paced)
    fields = ("sent", "delivered", "applied")
    for tick in range(1, 201):
        clock = 0.05 * tick
        for host in hosts:
            host.advance(clock)
            batches = [e for e in host.events if e[0] == "batch"]
            sums = [sum(e[4 + i] for e in batches) for i in range(len(fields))]
            assert sums == [host.counters[name] for name in fields]
        for host in hosts:
            for dst in host.pending_hosts():
                hosts[dst].receive_frame(host.take_frame(dst), clock)
    assert all(h.counters["frame_entries"] > 0 and h.counters["applied"] > 0 for h in hosts)


def test_a_hosts_count_of_down_shards_follows_its_crashes_and_restarts() -> None:
    # The count stands for "some shard of mine is down" in every delivery: after each step
    # it equals the down shards among the host's own, rises with crashes (one overlapping
    # another, one on the other host) and is back to 0 once they have all restarted.
    data = dict(SCENARIO, faults={
        "checkpoint_interval": 1.0,
        "crashes": [{"shard": 5, "at": 2.0, "down_for": 3.0},
                    {"shard": 7, "at": 3.0, "down_for": 4.0, "restore": "zero"},
                    {"shard": 50, "at": 2.5, "down_for": 1.0}]})
    _, _, hosts = _hosts(2, data=data)
    seen = []
    for clock in np.arange(0.5, 10.0, 0.5):
        for host in hosts:
            host.advance(float(clock))
            assert host.n_down == int((~host.alive[host.local]).sum())
        seen.append(sum(host.n_down for host in hosts))
    assert max(seen) == 3 and seen[-1] == 0  # all three down at t = 3
