"""The pure shard logic: local costs, moves, messages, views, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncbalance import build_cost_graph, kernels, layered_network, recurrent_network
from asyncbalance.errors import InvalidInputError
from asyncbalance.optimum import solve_optimum
from asyncbalance.runtime import (
    Rule,
    Shard,
    StateMessage,
    build_shard_specs,
    decode_message,
    encode_message,
    gather_log_scales,
    partition_units,
)


def random_mlp(seed: int, sizes=(4, 6, 5, 6, 3)):
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal((o, i)) * np.exp(rng.standard_normal((o, 1)))
               for i, o in zip(sizes[:-1], sizes[1:], strict=True)]
    biases = [rng.standard_normal(o) for o in sizes[1:]]
    return layered_network(weights, biases, "relu")


def random_rnn(seed: int, n: int = 5):
    rng = np.random.default_rng(seed)
    return recurrent_network(rng.standard_normal((n, 3)), rng.standard_normal((n, n)),
                             rng.standard_normal((2, n)), rng.standard_normal(n), None)


def specs_for(graph, granularity="shard", shards_per_layer=1, units_per_shard=0):
    return build_shard_specs(graph, partition_units(graph, granularity, shards_per_layer,
                                                    units_per_shard))


PARTITIONS = [("neuron", 1, 0), ("shard", 2, 0), ("shard", 1, 4), ("shard", 1, 1000)]


@pytest.mark.parametrize("make", [random_mlp, random_rnn], ids=["mlp", "rnn"])
@pytest.mark.parametrize("p", [0.7, 1.0, 2.0])
@pytest.mark.parametrize("partition", PARTITIONS, ids=lambda x: f"{x[0]}-{x[1]}-{x[2]}")
def test_local_moves_equal_the_engine_moves(make, p, partition):
    # With a view equal to the global state, a shard's exact move of one colour group is
    # the engine's exact move of those units: the shard holds every cost they depend on.
    graph = build_cost_graph(make(1), p)
    u = np.random.default_rng(2).normal(0, 0.5, graph.n_units)
    for spec in specs_for(graph, *partition):
        local = np.concatenate([u[spec.units], u[spec.halo]])
        for group in spec.colors:
            mine = kernels.exact_moves(spec.graph, local, group)
            engine = kernels.exact_moves(graph, u, spec.units[group])
            np.testing.assert_allclose(mine, engine, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("make", [random_mlp, random_rnn], ids=["mlp", "rnn"])
def test_shard_holds_only_its_rows_and_columns(make):
    graph = build_cost_graph(make(3), 1.0)
    for spec in specs_for(graph, "shard", 2):
        total_in = sum(b.costs[0].sum() for b in spec.graph.blocks if b.dst == (0, spec.n_own))
        flows = kernels.unit_flows(graph, np.zeros(graph.n_units))
        hidden_in = flows[0][0, spec.units].sum() - graph.visible_in[0, spec.units].sum()
        assert total_in == pytest.approx(hidden_in, rel=1e-12)
        # Every halo unit is a real neighbour owned by another shard.
        assert not np.isin(spec.halo, spec.units).any()
        assert (spec.halo_owner != spec.shard_id).all() and (spec.halo_owner >= 0).all()


def test_synchronous_rounds_reach_the_optimum():
    graph = build_cost_graph(random_rnn(5), 2.0)
    optimum = solve_optimum(graph).log_scales
    specs = specs_for(graph, "shard", 1, 2)
    shards = [Shard(s, Rule("exact"), 5.0) for s in specs]
    for now in range(500):
        for message in [m for s in shards for m in s.on_wake(float(now))]:
            shards[message.receiver].on_message(message)
        u = gather_log_scales(graph.n_units, specs, [s.log_scales for s in shards])
        if np.abs(u - optimum).max() < 1e-11:
            break
    assert np.abs(u - optimum).max() < 1e-11


def test_dead_units_are_owned_by_nobody_and_stay_at_zero():
    rng = np.random.default_rng(6)
    weights = [rng.standard_normal((o, i)) for i, o in ((4, 6), (6, 6), (6, 3))]
    weights[0][2] = 0.0  # unit 2 of the first hidden layer has no incoming cost: dead
    graph = build_cost_graph(layered_network(weights, None, "relu"), 1.0)
    assert graph.dead[2]
    optimum = solve_optimum(graph).log_scales
    for partition in PARTITIONS:
        specs = specs_for(graph, *partition)
        assert all(2 not in s.units for s in specs)
        assert all(peer >= 0 for s in specs for peer in s.send_units)
        shards = [Shard(s, Rule("exact"), 5.0) for s in specs]
        for now in range(300):
            for message in [m for s in shards for m in s.on_wake(float(now))]:
                shards[message.receiver].on_message(message)
        u = gather_log_scales(graph.n_units, specs, [s.log_scales for s in shards])
        assert u[2] == 0.0
        np.testing.assert_allclose(u, optimum, atol=1e-10)


def _message(sender=1, receiver=0, epoch=0, seq=1, units=(3, 4), values=(0.5, -0.25)):
    return StateMessage(sender, receiver, epoch, seq, np.array(units), np.array(values))


def test_message_round_trip_is_exact_and_little_endian():
    message = _message(values=(np.pi, -1e-300))
    payload = encode_message(message)
    back = decode_message(payload)
    assert (back.sender, back.receiver, back.epoch, back.seq) == (1, 0, 0, 1)
    assert back.units.tolist() == [3, 4]
    assert back.log_scales.tobytes() == np.array([np.pi, -1e-300], dtype="<f8").tobytes()
    assert np.array([np.pi], dtype="<f8").tobytes() in payload


@pytest.mark.parametrize("payload", [b"", b"\x93\x01\x02\x03", encode_message(_message())[:-3]])
def test_malformed_messages_are_refused(payload):
    with pytest.raises(InvalidInputError, match="message"):
        decode_message(payload)


@settings(max_examples=40, deadline=None)
@given(order=st.permutations(range(6)), duplicates=st.lists(st.integers(0, 5), max_size=6))
def test_duplicates_and_reordering_leave_the_same_view(order, duplicates):
    # Messages carry absolute state: any delivery order, with repeats, ends at the newest.
    graph = build_cost_graph(random_mlp(7), 1.0)
    specs = specs_for(graph, "shard", 1)
    middle = specs[1]
    rng = np.random.default_rng(0)
    history = []
    for seq in range(1, 4):
        for spec in (specs[0], specs[2]):
            idx = spec.send_units[middle.shard_id]
            history.append(StateMessage(spec.shard_id, middle.shard_id, 0, seq,
                                        spec.units[idx], rng.normal(size=idx.shape[0])))
    reference = Shard(middle, Rule("exact"), 5.0)
    for message in history:
        reference.on_message(message)
    shuffled = Shard(middle, Rule("exact"), 5.0)
    for i in list(order) + list(duplicates):
        shuffled.on_message(decode_message(encode_message(history[i])))
    assert shuffled.state.tobytes() == reference.state.tobytes()
    assert shuffled.on_wake(0.0)[0].log_scales.tobytes() == \
        reference.on_wake(0.0)[0].log_scales.tobytes()


def test_a_restarted_shard_wins_over_its_old_messages():
    graph = build_cost_graph(random_mlp(8), 1.0)
    specs = specs_for(graph, "shard", 1)
    receiver = Shard(specs[1], Rule("exact"), 5.0)
    old = specs[0]
    idx = old.send_units[1]
    receiver.on_message(StateMessage(0, 1, 0, 50, old.units[idx], np.full(idx.size, 2.0)))
    restarted = Shard.restore(old, Rule("exact"), 5.0, epoch=1, checkpoint=None)
    fresh = [m for m in restarted.on_wake(0.0) if m.receiver == 1][0]
    assert fresh.version == (1, 1) and fresh.version > (0, 50)
    assert receiver.on_message(fresh)
    assert np.array_equal(receiver.state[receiver.spec.n_own:][:idx.size], fresh.log_scales)


def test_checkpoint_restores_state_and_view():
    graph = build_cost_graph(random_mlp(9), 1.0)
    specs = specs_for(graph, "shard", 1)
    shard = Shard(specs[1], Rule("damped", alpha=0.5), 5.0)
    shard.on_message(StateMessage(0, 1, 0, 3, specs[0].units, np.full(specs[0].n_own, 0.3)))
    shard.on_wake(0.0)
    back = Shard.restore(specs[1], shard.rule, 5.0, epoch=2, checkpoint=shard.checkpoint())
    assert back.state.tobytes() == shard.state.tobytes()
    assert back.versions == shard.versions and back.epoch == 2
    with pytest.raises(ValueError, match="does not fit"):
        Shard.restore(specs[0], shard.rule, 5.0, 1, shard.checkpoint())


def test_exact_shard_is_quiet_until_news_or_resend():
    graph = build_cost_graph(random_mlp(10), 1.0)
    specs = specs_for(graph, "shard", 1)
    shard = Shard(specs[1], Rule("exact"), resend_interval=5.0)
    assert shard.on_wake(0.0)  # first wake moves and announces
    updates = shard.unit_updates
    assert shard.on_wake(1.0) == [] and shard.unit_updates == updates
    resent = shard.on_wake(5.0)
    assert resent and shard.unit_updates == updates  # anti-entropy: same state, sent again


@pytest.mark.parametrize("rule", [Rule("damped", alpha=0.5), Rule("gradient", eta=0.05)])
def test_damped_and_gradient_rules_lower_the_cost(rule):
    graph = build_cost_graph(random_mlp(11), 1.0)
    specs = specs_for(graph, "shard", 1)
    shards = [Shard(s, rule, 5.0) for s in specs]
    costs = []
    for now in range(30):
        for message in [m for s in shards for m in s.on_wake(float(now))]:
            shards[message.receiver].on_message(message)
        u = gather_log_scales(graph.n_units, specs, [s.log_scales for s in shards])
        costs.append(kernels.total_cost(graph, u))
    assert costs[-1] < costs[0]


def test_partition_choices_are_validated():
    graph = build_cost_graph(random_mlp(12), 1.0)
    with pytest.raises(InvalidInputError, match="granularity.*valid choices: neuron, shard"):
        partition_units(graph, "layer")
    shards = partition_units(graph, "shard", shards_per_layer=3)
    assert sorted(np.concatenate(shards).tolist()) == np.nonzero(graph.free)[0].tolist()


def test_cost_bytes_count_what_a_shard_holds_dense_or_sparse() -> None:
    from asyncbalance.runtime.coordinator import prepare
    from asyncbalance.runtime.scenario import scenario_from_mapping

    def specs(kind: str) -> list:
        return prepare(scenario_from_mapping({
            "name": kind, "network": {"kind": kind, "sizes": [20, 40, 40, 5], "fan_in": 4,
                                      "seed": 0} if kind == "sparse_mlp" else
            {"kind": kind, "sizes": [20, 40, 40, 5], "seed": 0},
            "partition": {"shards_per_layer": 2}})).specs

    for spec in specs("mlp"):
        # dense: the shard's rows and columns as arrays, one matrix per term
        assert spec.cost_bytes == sum(k.nbytes for s in spec.graph.stacks for k in s.costs) > 0
    for spec in specs("sparse_mlp"):
        nnz = sum(k.nnz for block in spec.graph.blocks for k in block.costs)
        # sparse: 8-byte values and 4- or 8-byte indices per stored cost, plus row pointers
        assert 12 * nnz <= spec.cost_bytes <= 16 * nnz + 8 * 8 * (spec.graph.n_units + 1)
        assert nnz > 0
