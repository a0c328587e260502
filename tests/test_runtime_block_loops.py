"""The compiled loops of shard blocks against the numpy passes they replace: the same
deliveries, the same records byte for byte, under every fault the simulator models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from asyncbalance.runtime import block_loops, run_scenario
from asyncbalance.runtime import fan_out as fan_out_module
from asyncbalance.runtime.block import ShardBlock
from asyncbalance.runtime.block_host import Routes
from asyncbalance.runtime.coordinator import prepare
from asyncbalance.runtime.delays import DelaySampler
from asyncbalance.runtime.layout import build_layout
from asyncbalance.runtime.scenario import scenario_from_mapping
from asyncbalance.runtime.shard import Rule

pytest.importorskip("numba")

FAULTY = {
    "network": {"kind": "mlp", "sizes": [5, 8, 8, 8, 3], "seed": 2},
    "wake": {"kind": "poisson", "period": 1.0},
    # Frequent anti-entropy re-sends: deliveries that are newer but change nothing.
    "links": {"delay": "pareto", "mean": 1.0, "heterogeneity": 0.5, "loss": 0.3,
              "duplication": 0.2, "resend_interval": 1.5},
    "faults": {"checkpoint_interval": 2.0,
               "crashes": [{"shard": 3, "at": 10.0, "down_for": 5.0},
                           {"shard": 5, "at": 14.0, "down_for": 3.0, "restore": "zero"}],
               "partitions": [{"start": 5.0, "stop": 12.0, "shards": [0, 1]}]},
}
# Layer slices of 4 units (several slots per link) and single neurons (one slot per link).
PARTITIONS = {"slices": {"granularity": "shard", "shards_per_layer": 2},
              "neurons": {"granularity": "neuron"}}


# Without loss, duplicates or partitions the fan-out takes its short path.
CLEAN = {**FAULTY, "links": {"delay": "exponential", "mean": 0.7, "heterogeneity": 0.5},
         "faults": {}}


def _run(tmp_path: Path, name: str, data: dict, partition: str, level: str | bool,
         compiled: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, dict]:
    monkeypatch.setattr(block_loops, "COMPILED", compiled)
    summary = run_scenario(scenario_from_mapping({
        **data, "name": name, "seed": 5, "record_events": level,
        "partition": PARTITIONS[partition]}), tmp_path / name)
    return (tmp_path / name / "events.msgpack").read_bytes(), summary


@pytest.mark.parametrize("partition", sorted(PARTITIONS))
@pytest.mark.parametrize("level", ["messages", "batches"])
def test_compiled_loops_write_the_numpy_passes_records_byte_for_byte(
        tmp_path: Path, partition: str, level: str, monkeypatch: pytest.MonkeyPatch) -> None:
    compiled, summary = _run(tmp_path, "a", FAULTY, partition, level, True, monkeypatch)
    numpy_passes, _ = _run(tmp_path, "b", FAULTY, partition, level, False, monkeypatch)
    # Loss, duplicates, reordering (Pareto delays), a partition, restarts from a checkpoint
    # and from zero: every path of the delivery loop ran, and the run still converged.
    assert summary["converged"]
    assert summary["messages_dropped"] > 0 and summary["crashes"] == 2
    assert compiled == numpy_passes


@pytest.mark.parametrize("partition", sorted(PARTITIONS))
def test_compiled_loops_match_the_numpy_passes_without_faults(
        tmp_path: Path, partition: str, monkeypatch: pytest.MonkeyPatch) -> None:
    compiled, summary = _run(tmp_path, "a", CLEAN, partition, "messages", True, monkeypatch)
    numpy_passes, _ = _run(tmp_path, "b", CLEAN, partition, "messages", False, monkeypatch)
    assert summary["converged"] and summary["messages_dropped"] == 0
    assert compiled == numpy_passes


@pytest.mark.parametrize("delay", [{"delay": "exponential", "mean": 0.7},
                                   {"delay": "constant", "mean": 0.35},
                                   {"delay": "exponential", "mean": 0.0}],
                         ids=["exponential", "constant", "zero"])
def test_fused_fan_out_writes_the_general_paths_records_byte_for_byte(
        tmp_path: Path, delay: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    # Neurons with nothing to lose and batch records: the compiled host fans out in one
    # pass (``fan_out_into_windows``); the numpy passes take the general path.
    calls = []
    fused = block_loops.fan_out_into_windows
    monkeypatch.setattr(block_loops, "fan_out_into_windows",
                        lambda *args: calls.append(1) or fused(*args))
    data = {**CLEAN, "links": {**delay, "heterogeneity": 0.5, "resend_interval": 1.5}}
    compiled, summary = _run(tmp_path, "a", data, "neurons", "batches", True, monkeypatch)
    assert calls
    numpy_passes, _ = _run(tmp_path, "b", data, "neurons", "batches", False, monkeypatch)
    assert summary["converged"]
    assert compiled == numpy_passes


def test_routes_keep_a_link_table_only_where_links_are_out_of_their_order() -> None:
    # Hosts holding ranges of shards route link q from entry q: no table, and every loop
    # that reads routes finds the links an explicit identity table gives.
    problem = prepare(scenario_from_mapping({
        "name": "r", "network": {"kind": "mlp", "sizes": [5, 9, 9, 3], "seed": 3},
        "partition": {"granularity": "neuron"}}))
    layout = build_layout(problem.graph, [spec.units for spec in problem.specs])
    n = layout.n_shards
    ranges = Routes.build(layout, np.arange(n) * 3 // n)
    scattered_host = np.random.default_rng(0).integers(0, 3, n)
    scattered = Routes.build(layout, scattered_host)
    assert ranges.pair_links.size == 0 and scattered.pair_links.size == layout.n_links
    identity = np.arange(layout.n_links, dtype=np.int64)
    rng = np.random.default_rng(1)
    senders = np.sort(rng.integers(0, n, 30))
    versions = rng.integers(1, 1 << 40, 30)
    times = np.sort(rng.uniform(3.0, 9.0, 30))
    values = rng.standard_normal(30)
    link_mean = rng.uniform(0.1, 2.0, layout.n_links)
    lay = layout
    for host in range(3):
        links, entry = ranges.links_to(senders, host)
        assert links.size > 0
        keys = senders[entry] * 3 + host
        assert (links >= ranges.pair_ptr[keys]).all() and (links < ranges.pair_ptr[keys + 1]).all()
        assert (np.arange(n) * 3 // n)[lay.link_dst[links]].tolist() == [host] * links.size
        np.testing.assert_array_equal(lay.link_src[links], senders[entry])
        for table in (ranges.pair_links, identity):
            got = block_loops.messages_from(senders, versions, times, ranges.pair_ptr, table,
                                            3, host)
            np.testing.assert_array_equal(got[0], links)
            np.testing.assert_array_equal(got[1], entry)
        draws = rng.standard_exponential(links.size)
        fused = [block_loops.fan_out_into_windows(
            senders, versions, times, values, ranges.pair_ptr, table, 3, host, link_mean,
            draws, 2, 0.05) for table in (ranges.pair_links, identity)]
        for got, want in zip(*fused, strict=True):
            np.testing.assert_array_equal(got, want)
        applied = []
        for table in (ranges.pair_links, identity):
            version = np.full(lay.n_links, -1, dtype=np.int64)
            state = np.zeros(lay.n_own + lay.n_slots + 1)
            dirty = np.zeros(n, dtype=bool)
            counts = lay.unit_ptr[senders + 1] - lay.unit_ptr[senders]
            starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            result = block_loops.apply_sent(
                senders, versions, times, values, starts, ranges.pair_ptr, table, 3, host,
                lay.link_slot_ptr, lay.slot_sender_pos, lay.unit_ptr, lay.n_own, lay.link_dst,
                version, state, dirty, np.full(n, np.inf), np.zeros(n, dtype=np.int64))
            applied.append((result[:2], version, state, dirty))
        assert applied[0][0][1] > 0
        for got, want in zip(*applied, strict=True):
            np.testing.assert_array_equal(got, want)
        # With a table: every fresh link that messages_from lists, and no other, is applied.
        links, *_ = block_loops.messages_from(senders, versions, times, scattered.pair_ptr,
                                              scattered.pair_links, 3, host)
        version = np.full(lay.n_links, -1, dtype=np.int64)
        block_loops.apply_sent(
            senders, versions, times, values, starts, scattered.pair_ptr, scattered.pair_links,
            3, host, lay.link_slot_ptr, lay.slot_sender_pos, lay.unit_ptr, lay.n_own,
            lay.link_dst, version, np.zeros(lay.n_own + lay.n_slots + 1), np.zeros(n, bool),
            np.full(n, np.inf), np.zeros(n, dtype=np.int64))
        assert links.size > 0
        assert sorted(np.nonzero(version >= 0)[0]) == sorted(set(links.tolist()))
        # ... and those are the links from the senders to this host's shards, from the layout.
        from_senders = np.isin(lay.link_src, senders) & (scattered_host[lay.link_dst] == host)
        assert sorted(set(links.tolist())) == np.nonzero(from_senders)[0].tolist()


@pytest.mark.parametrize("delay_kind", [0, 1, 2])
@pytest.mark.parametrize("step", [0.05, 1e-7])
@pytest.mark.parametrize("width, n_senders", [(9, 40), (200, 1_500)])
def test_fan_out_into_windows_equals_messages_draws_and_the_window_sort(
        delay_kind: int, step: float, width: int, n_senders: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Three hosts, senders of every host, some twice; a step of 1e-7 spreads the windows
    # beyond the counting sort's range, so its stable-sort fallback runs as well. The wide
    # net's batches outgrow the cache (stores requested ahead). Two threads (every batch
    # split) give the same arrays.
    monkeypatch.setattr(fan_out_module, "PARALLEL_MIN_MESSAGES", 1)
    problem = prepare(scenario_from_mapping({
        "name": "f", "network": {"kind": "mlp", "sizes": [5, width, width, 3], "seed": 3},
        "partition": {"granularity": "neuron"}}))
    layout = build_layout(problem.graph, [spec.units for spec in problem.specs])
    rng = np.random.default_rng(delay_kind)
    routes = Routes.build(layout, rng.integers(0, 3, layout.n_shards))
    link_mean = rng.uniform(0.1, 2.0, layout.n_links)
    link_mean[::7] = 0.0  # zero means among positive ones: zero delays, draws still taken
    senders = np.sort(rng.integers(0, layout.n_shards, n_senders))
    versions = rng.integers(0, 1 << 40, n_senders)
    times = np.sort(rng.uniform(3.0, 9.0, n_senders))
    values = rng.standard_normal(n_senders)
    big = 0
    for host in range(3):
        links, entry, link_versions, sent_at = block_loops.messages_from(
            senders, versions, times, routes.pair_ptr, routes.pair_links, 3, host)
        assert links.shape[0] > 0
        draw_rng, fused_rng = np.random.default_rng(7), np.random.default_rng(7)
        if delay_kind == 0:
            delays, draws = np.zeros(links.shape[0]), np.zeros(0)
        elif delay_kind == 1:
            delays = DelaySampler("constant").sample_many(draw_rng, link_mean[links])
            draws = np.zeros(0)
        else:
            delays = DelaySampler("exponential").sample_many(draw_rng, link_mean[links])
            draws = fused_rng.standard_exponential(size=links.shape[0])
        want = block_loops.sort_into_windows(
            sent_at + delays, links, link_versions, values, entry,
            np.ones(layout.n_links, dtype=np.int64), step, True)
        *got, got_delays = block_loops.fan_out_into_windows(
            senders, versions, times, values, routes.pair_ptr, routes.pair_links, 3, host,
            link_mean, draws, delay_kind, step)
        assert len(np.unique(want[0])) > 1
        for got_array, want_array in zip(got, want, strict=True):
            np.testing.assert_array_equal(got_array, want_array)
        np.testing.assert_array_equal(got_delays, delays)
        *split, split_delays = fan_out_module.fan_out(
            senders, versions, times, values, routes.pair_ptr, routes.pair_links, 3, host,
            link_mean, draws, delay_kind, step, 2)
        for split_array, want_array in zip(split, want, strict=True):
            np.testing.assert_array_equal(split_array, want_array)
        np.testing.assert_array_equal(split_delays, delays)
        big += 4 * links.shape[0] >= block_loops.PREFETCH_MIN_ENTRIES
    assert big == (3 if width > 9 else 0)


def _block(seed: int, partition: str) -> ShardBlock:
    problem = prepare(scenario_from_mapping({
        "name": "b", "seed": seed,
        "network": {"kind": "mlp", "sizes": [4, 6, 6, 3], "seed": seed},
        "partition": {"granularity": "shard", "shards_per_layer": 3}
        if partition == "slices" else {"granularity": "neuron"}}))
    layout = build_layout(problem.graph, [s.units for s in problem.specs])
    return ShardBlock(layout, Rule("exact"), resend_interval=5.0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("partition", sorted(PARTITIONS))
def test_deliver_keeps_the_newest_in_arrival_order_when_links_repeat(
        seed: int, partition: str) -> None:
    rng = np.random.default_rng(seed)
    compiled, reference = _block(seed, partition), _block(seed, partition)
    lay = compiled.layout
    # Slices fill several halo slots per link; neurons one (the compiled loop's shortcut).
    assert compiled.one_slot == (partition == "neurons")
    compiled.link_version[:] = rng.integers(-1, 3, lay.n_links)
    reference.link_version[:] = compiled.link_version
    for round_ in range(5):
        # Few links, many deliveries: most links repeat, with versions out of arrival order
        # and equal times (the stable order decides), so every branch of the rule is taken.
        m = 60
        links = rng.integers(0, lay.n_links, m)
        versions = rng.integers(0, 6, m).astype(np.int64) + 2 * round_
        times = rng.integers(0, 8, m).astype(np.float64)
        counts = np.diff(lay.link_slot_ptr)[links]
        values = rng.integers(0, 3, int(counts.sum())).astype(np.float64)
        value_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        monkey = block_loops.COMPILED
        try:
            block_loops.COMPILED = True
            got = compiled.deliver(links, versions, values, value_ptr, times)
            block_loops.COMPILED = False
            want = reference.deliver(links, versions, values, value_ptr, times)
        finally:
            block_loops.COMPILED = monkey
        assert want[0].any() and not want[0].all()
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(compiled.link_version, reference.link_version)
        np.testing.assert_array_equal(compiled.values, reference.values)
        np.testing.assert_array_equal(compiled.dirty, reference.dirty)
        # The numpy passes' scratch: never made by the compiled loops, left all -1 by the
        # passes that use it.
        assert compiled._mark_array is None
        assert (reference._mark_array == -1).all()


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n_links", [100_003, block_loops.PREFETCH_MIN_ENTRIES + 3])
@pytest.mark.parametrize("carried", ["shuffled", "in order"])
def test_deliver_follows_the_rule_link_by_link(seed: int, n_links: int, carried: str) -> None:
    # Some links delivered once, some many times (out of version order, equal times
    # included), a few receivers down; the expected state comes from the rule itself, link
    # by link, in plain Python. Links in cache, and beyond (memory requested ahead). Each
    # message's value read through its start in a shuffled array, or, with no starts, the
    # i-th value for the i-th message.
    rng = np.random.default_rng(seed)
    n_shards, n_own, m = 50, 50, 4_000
    link_dst = rng.integers(0, n_shards, n_links)
    pool = rng.choice(n_links, 1_500, replace=False)
    links = rng.choice(pool, m)
    versions = rng.integers(0, 8, m).astype(np.int64)
    times = rng.integers(0, 20, m).astype(np.float64)
    values = rng.integers(0, 3, m).astype(np.float64)
    alive = rng.random(n_shards) > 0.1
    link_version = rng.integers(-1, 4, n_links)
    state = rng.integers(0, 3, n_own + n_links).astype(np.float64)
    want_version, want_state = link_version.copy(), state.copy()
    want_status = np.ones(m, dtype=np.int8)
    want_dirty = np.zeros(n_shards, dtype=bool)
    want_first = np.full(n_shards, np.inf)
    for link in np.unique(links):
        receiver = link_dst[link]
        group = sorted(np.nonzero(links == link)[0], key=lambda i: (times[i], i))
        if not alive[receiver]:
            want_status[group] = 0
            continue
        winner = -1
        for i in group:
            if versions[i] > want_version[link]:
                want_status[i], want_version[link], winner = 2, versions[i], i
                want_first[receiver] = min(want_first[receiver], times[i])
        if winner >= 0 and want_state[n_own + link] != values[winner]:
            want_state[n_own + link] = values[winner]
            want_dirty[receiver] = True
    dirty = np.zeros(n_shards, dtype=bool)
    first = np.full(n_shards, np.inf)
    touched = np.zeros(n_shards, dtype=np.int64)
    if carried == "shuffled":
        starts = rng.permutation(m).astype(np.int64)
        carried_values = np.empty(m)
        carried_values[starts] = values
    else:
        starts, carried_values = np.zeros(0, dtype=np.int64), values
    status, _, n_touched = block_loops.deliver(
        links, versions, times, False, carried_values, starts,
        np.arange(n_links + 1, dtype=np.int64), n_own, link_dst, link_version, state, dirty,
        alive, np.argsort(links, kind="stable"), True, first, touched)
    assert (want_status == 0).any() and (want_status == 1).any() and (want_status == 2).any()
    np.testing.assert_array_equal(status, want_status)
    np.testing.assert_array_equal(link_version, want_version)
    np.testing.assert_array_equal(state, want_state)
    np.testing.assert_array_equal(dirty, want_dirty)
    np.testing.assert_array_equal(first, want_first)
    assert sorted(touched[:n_touched]) == sorted(np.nonzero(np.isfinite(want_first))[0])


@pytest.mark.parametrize("n_keys", [1, 2, 3, 64, 65, 1_000, (1 << 20) + 7])
def test_stable_order_is_numpys_stable_argsort(n_keys: int) -> None:
    rng = np.random.default_rng(n_keys)
    for m in (0, 1, 5, 3_000):
        keys = rng.integers(0, n_keys, m)  # many repeats: the order among them matters
        np.testing.assert_array_equal(block_loops.stable_order(keys, n_keys),
                                      np.argsort(keys, kind="stable"))
    # Runs of ascending keys, as a window of link messages from several send batches.
    runs = np.concatenate([np.sort(rng.integers(0, n_keys, 200)) for _ in range(7)])
    np.testing.assert_array_equal(block_loops.stable_order(runs, n_keys),
                                  np.argsort(runs, kind="stable"))


def test_deliveries_sort_links_by_radix_up_to_a_size_then_by_numpy(monkeypatch) -> None:
    from asyncbalance.runtime import block as block_module

    shard_block = _block(0, "neurons")
    links = np.random.default_rng(0).integers(0, shard_block.layout.n_links, 500)
    calls = []
    radix = block_loops.stable_order
    monkeypatch.setattr(block_loops, "stable_order", lambda *a: calls.append(1) or radix(*a))
    want = np.argsort(links, kind="stable")
    np.testing.assert_array_equal(shard_block._link_order(links), want)
    assert calls == [1]
    monkeypatch.setattr(block_module, "RADIX_MAX_LINKS", shard_block.layout.n_links - 1)
    np.testing.assert_array_equal(shard_block._link_order(links), want)
    assert calls == [1]


def test_window_order_is_a_stable_sort_by_window() -> None:
    rng = np.random.default_rng(0)
    keys = rng.integers(100, 140, 5_000)
    order = block_loops.window_order(keys, 100, 40)
    np.testing.assert_array_equal(order, np.argsort(keys, kind="stable"))


def test_gather_runs_concatenates_the_runs() -> None:
    rng = np.random.default_rng(1)
    values = rng.random(100)
    starts = rng.integers(0, 90, 30)
    counts = rng.integers(0, 10, 30)
    out, ptr = block_loops.gather_runs(values, starts, counts)
    np.testing.assert_array_equal(
        out, np.concatenate([values[s:s + c] for s, c in zip(starts, counts, strict=True)]))
    np.testing.assert_array_equal(ptr, np.concatenate([[0], np.cumsum(counts)]))


@pytest.mark.parametrize("n", [0, 1, 5, 200])
def test_expand_ranges_compiled_equals_the_numpy_pass(
        n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from asyncbalance.runtime.layout import expand_ranges

    rng = np.random.default_rng(n)
    starts = rng.integers(0, 50, n)
    for stops in (starts + rng.integers(-3, 8, n), starts + 1):  # empty ranges; all of one
        compiled = expand_ranges(starts, stops)
        monkeypatch.setattr(block_loops, "COMPILED", False)
        reference = expand_ranges(starts, stops)
        monkeypatch.setattr(block_loops, "COMPILED", True)
        for got, want in zip(compiled, reference, strict=True):
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("regulariser", ["l1", "elastic"])
@pytest.mark.parametrize("partition", sorted(PARTITIONS))
def test_exponentials_taken_per_value_give_the_per_term_sums_bit_for_bit(
        partition: str, regulariser: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A window whose terms are many against the values takes each exponential once per
    # value; the flows must be the per-term path's and the numpy passes', exactly. Elastic
    # net: two cost terms (two powers), so two rows of rates per table.
    from asyncbalance.graph import build_cost_graph
    from asyncbalance.regularisers import elastic_net, lp
    from asyncbalance.runtime.partition import partition_units
    from asyncbalance.runtime.scenario import NetworkConfig, build_network

    network = build_network(NetworkConfig(sizes=(5, 9, 9, 3), unit_spread=1.0, seed=3))
    graph = build_cost_graph(network, lp(1.0) if regulariser == "l1"
                             else elastic_net(0.5, 0.5))
    layout = build_layout(graph, partition_units(
        graph, "neuron" if partition == "neurons" else "shard", 3))
    block = ShardBlock(layout, Rule("exact"), resend_interval=5.0)
    block.per_value_ratio = 10 ** 6  # neurons' windows would take the per-term path
    rng = np.random.default_rng(7)
    block.values[:layout.zero_index] = rng.normal(0.0, 0.7, layout.zero_index)
    positions = np.arange(layout.n_own)
    flows = {}
    for path in ("per value", "per term", "numpy"):
        monkeypatch.setattr(block_loops, "COMPILED", path != "numpy")
        if path == "per term":
            monkeypatch.setattr(ShardBlock, "_rates_by_value", lambda *args: None)
        flows[path] = block._flows(positions)
    monkeypatch.undo()
    assert block._rates_by_value(0, layout.incoming, positions) is not None  # it did run
    for path in ("per term", "numpy"):
        for got, want in zip(flows["per value"], flows[path], strict=True):
            np.testing.assert_array_equal(got, want)


def test_warm_up_compiles_every_signature_the_engine_uses(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Ray hosts compile before their clock starts: nothing may be left to compile later.
    block_loops.warm_up()
    loops = [block_loops.deliver, block_loops.wake_on_news, block_loops.messages_from,
             block_loops.expand_ranges, block_loops.gathered_sums,
             block_loops.link_values, block_loops.sort_into_windows]
    before = [len(loop.signatures) for loop in loops]
    for data in (FAULTY, CLEAN):
        for partition in PARTITIONS:
            for level in ("messages", "batches"):
                _run(tmp_path, f"w{len(list(tmp_path.iterdir()))}", data, partition, level,
                     True, monkeypatch)
    assert [len(loop.signatures) for loop in loops] == before


def test_the_simulator_compiles_its_loops_before_its_clock(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A first run after an install compiles the loops (~6 s): in the simulator's
    # construction, not inside ``advance``, whose seconds are the run's balancing time.
    from asyncbalance.runtime.array_sim import ArraySimulator
    from asyncbalance.runtime.events import EventWriter

    problem = prepare(scenario_from_mapping({**CLEAN, "name": "w", "seed": 1,
                                             "partition": PARTITIONS["neurons"]}))
    calls: list[int] = []
    monkeypatch.setattr(block_loops, "warm_up", lambda: calls.append(1))
    sim = ArraySimulator(problem.specs, problem.scenario, EventWriter(None), problem.graph)
    assert calls == [1]
    sim.advance(4.0)
    assert calls == [1]


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("partition", sorted(PARTITIONS))
def test_a_checkpoint_holds_the_state_it_was_taken_from(
        partition: str, compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # A restart from a checkpoint restores the link versions too: a saved version that is
    # too old would let a reordered, older message overwrite a newer view after the restart.
    from asyncbalance.runtime.array_sim import ArraySimulator
    from asyncbalance.runtime.events import EventWriter

    monkeypatch.setattr(block_loops, "COMPILED", compiled)
    problem = prepare(scenario_from_mapping({**FAULTY, "name": "c", "seed": 5,
                                             "partition": PARTITIONS[partition]}))
    host = ArraySimulator(problem.specs, problem.scenario, EventWriter(None),
                          problem.graph).host
    host.advance(8.0)
    shards = np.arange(host.layout.n_shards, dtype=np.int64)
    host._save(shards, np.full(shards.shape[0], 8.0))
    block, lay = host.block, host.layout
    assert (block.link_version >= 0).any()
    for sid in shards.tolist():
        saved = host._saved(sid)
        one = np.array([sid])
        np.testing.assert_array_equal(saved["versions"],
                                      block.link_version[lay.shard_in_links(one)])
        np.testing.assert_array_equal(saved["halo"], block.values[lay.n_own + lay.shard_slots(one)])
        np.testing.assert_array_equal(saved["own"], block.values[lay.shard_positions(one)[0]])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n_values", [50, block_loops.PREFETCH_MIN_ENTRIES + 5])
def test_scaled_neighbours_reads_each_term_once_in_order(seed: int, n_values: int) -> None:
    # Positions with no terms (at the start, the end and between), repeated and unsorted
    # positions, windows shorter and longer than the read-ahead cursor's distance: the
    # products are the plain formula's, term by term, in position order. Values in cache,
    # and beyond (a cursor requests them ahead).
    rng = np.random.default_rng(seed)
    n_positions = 40
    counts = rng.integers(0, 6, n_positions) * (rng.random(n_positions) > 0.3)
    counts[[0, -1]] = 0
    ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    values = rng.normal(size=n_values)
    value_index = rng.integers(0, values.shape[0], int(ptr[-1])).astype(np.int64)
    rate = rng.normal(size=int(ptr[-1]))
    for n in (0, 1, 3, 17, 40, 400):
        positions = rng.integers(0, n_positions, n).astype(np.int64)
        if n:
            positions[0] = 0
            positions[-1] = n_positions - 1
        terms = [q for p in positions for q in range(ptr[p], ptr[p + 1])]
        want = np.array([rate[q] * values[value_index[q]] for q in terms])
        got = block_loops.scaled_neighbours(values, positions, ptr, rate, value_index)
        np.testing.assert_array_equal(got, want.reshape(-1))
    assert block_loops.TERMS_AHEAD < int(counts.sum()) * 10  # the long windows pass it


def test_prefetch_is_a_hint_that_changes_nothing() -> None:
    import numba

    from asyncbalance.runtime.prefetch import prefetch

    @numba.njit
    def total(array, ahead):
        sum_ = 0.0
        for i in range(array.shape[0]):
            prefetch(array, i + ahead)  # past the end for the last ``ahead`` items
            sum_ += array[i]
        return sum_

    array = np.arange(100.0)
    assert total(array, 10**6) == total(array, 0) == float(array.sum())


def test_prefetch_reaches_the_machine_code() -> None:
    # A hint LLVM dropped (a wrong intrinsic name, a wrong pointer type) would leave the
    # results right and the loops slow: the x86 code must hold the instruction.
    import platform

    import numba

    from asyncbalance.runtime.prefetch import prefetch, prefetch_write

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("checks x86 machine code")

    @numba.njit
    def touch(array):
        prefetch(array, 3)
        prefetch_write(array, 5)
        return array[0]

    touch(np.zeros(8))
    code = "\n".join(touch.inspect_asm().values())
    # The write hint is prefetchw where the CPU has it, else a second prefetcht0.
    assert "prefetcht0" in code
    assert "prefetchw" in code or code.count("prefetcht0") >= 2


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("partition", sorted(PARTITIONS))
def test_deliveries_in_two_threads_give_the_one_thread_results(
        seed: int, partition: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Many repeated links (the cut between the two parts falls inside a link's deliveries
    # and must move past them), equal times, a receiver down: statuses, per-link state,
    # dirty marks and every receiver's first arrival as with one thread.
    from asyncbalance.runtime import block as block_module

    monkeypatch.setattr(block_module, "PARALLEL_MIN_DELIVERIES", 1)
    rng = np.random.default_rng(seed)
    one, two = _block(seed, partition), _block(seed, partition)
    two.threads = 2
    lay = one.layout
    start_versions = rng.integers(-1, 3, lay.n_links)
    one.link_version[:], two.link_version[:] = start_versions, start_versions
    alive = np.ones(lay.n_shards, dtype=bool)
    alive[rng.choice(lay.n_shards, 2, replace=False)] = False
    for round_ in range(4):
        m = 301
        links = np.sort(rng.integers(0, lay.n_links, m))[rng.permutation(m)]
        versions = rng.integers(0, 6, m).astype(np.int64) + 2 * round_
        times = rng.integers(0, 5, m).astype(np.float64)
        counts = np.diff(lay.link_slot_ptr)[links]
        values = rng.integers(0, 3, int(counts.sum())).astype(np.float64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        results = []
        for block in (one, two):
            first = np.full(lay.n_shards, np.inf)
            touched = np.zeros(lay.n_shards, dtype=np.int64)
            status, changed, n_touched = block.deliver_live(links, versions, values, starts,
                                                            times, alive, first, touched)
            results.append((status, changed, first, sorted(touched[:n_touched].tolist())))
        (s1, c1, f1, t1), (s2, c2, f2, t2) = results
        assert (s1 == 0).any() and (s1 == 2).any()
        assert len(t1) == len(set(t2)) == len(t2) > 0
        np.testing.assert_array_equal(s2, s1)
        np.testing.assert_array_equal(c2, c1)
        np.testing.assert_array_equal(f2, f1)
        assert t2 == t1
        np.testing.assert_array_equal(two.link_version, one.link_version)
        np.testing.assert_array_equal(two.values, one.values)
        np.testing.assert_array_equal(two.dirty, one.dirty)


def test_the_simulator_writes_the_same_records_with_two_threads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every batch of deliveries and every window of moves split between two threads, faults
    # included: the event log byte for byte.
    from asyncbalance.runtime import array_sim
    from asyncbalance.runtime import block as block_module

    monkeypatch.setattr(block_module, "PARALLEL_MIN_DELIVERIES", 1)
    monkeypatch.setattr(block_module, "PARALLEL_MIN_TERMS", 1)
    logs = []
    for cores in (1, 2):
        monkeypatch.setattr(array_sim.os, "cpu_count", lambda cores=cores: cores)
        logs.append(_run(tmp_path, f"threads{cores}", FAULTY, "neurons", "messages", True,
                         monkeypatch)[0])
    assert logs[0] == logs[1]


def test_the_fan_out_in_two_threads_writes_the_one_thread_records(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Neurons with exponential delays and batch records: every batch of sends is fanned out
    # by two threads (the second storing after the first in each window), and the second
    # thread draws the next fan-out's delays ahead while the first sorts a window's
    # deliveries; the event log byte for byte as with one thread.
    import threading

    from asyncbalance.runtime import array_sim, block_host
    from asyncbalance.runtime.draws import DelayDraws

    monkeypatch.setattr(fan_out_module, "PARALLEL_MIN_MESSAGES", 1)
    monkeypatch.setattr(block_host, "DRAW_AHEAD_MIN", 1)
    stores = []
    original = block_loops.store_into_windows
    monkeypatch.setattr(block_loops, "store_into_windows",
                        lambda *args: stores.append(args[8]) or original(*args))
    drawn_ahead = []
    prepare = DelayDraws.prepare

    def spied(self: DelayDraws, n: int) -> None:
        if threading.current_thread() is not threading.main_thread():
            drawn_ahead.append(n - self.waiting)
        prepare(self, n)

    monkeypatch.setattr(DelayDraws, "prepare", spied)
    logs = []
    for cores in (1, 2):
        monkeypatch.setattr(array_sim.os, "cpu_count", lambda cores=cores: cores)
        logs.append(_run(tmp_path, f"threads{cores}", CLEAN, "neurons", "batches", True,
                         monkeypatch)[0])
    # The one-thread run stores inside the compiled fan-out, unseen here; each batch of the
    # two-thread run stores twice, the second part from an entry past 0.
    assert sum(first > 0 for first in stores) > 100
    assert sum(missing > 0 for missing in drawn_ahead) > 20
    assert logs[0] == logs[1]


@pytest.mark.parametrize("partition", sorted(PARTITIONS))
def test_moves_in_two_threads_give_the_one_thread_flows(
        partition: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from asyncbalance.runtime import block as block_module

    monkeypatch.setattr(block_module, "PARALLEL_MIN_TERMS", 1)
    monkeypatch.setattr(ShardBlock, "_rates_by_value", lambda *args: None)  # per term
    one, two = _block(1, partition), _block(1, partition)
    two.threads = 2
    rng = np.random.default_rng(1)
    lay = one.layout
    one.values[:lay.zero_index] = rng.normal(0.0, 0.7, lay.zero_index)
    two.values[:] = one.values
    calls = []
    original = ShardBlock._term_sums

    def counted(self, *args):
        calls.append(self.threads)
        return original(self, *args)

    monkeypatch.setattr(ShardBlock, "_term_sums", counted)
    for positions in (np.arange(lay.n_own), np.arange(1, lay.n_own, 2), np.arange(1)):
        for got, want in zip(two._flows(positions), one._flows(positions), strict=True):
            np.testing.assert_array_equal(got, want)
    assert 2 in calls
