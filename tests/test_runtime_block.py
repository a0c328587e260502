"""The array block against the per-shard reference: the same event sequence gives the same
log-scales, messages and decisions, under every rule, degrees c != 1, recurrent nets and
restarts from a checkpoint or from zero.

Tolerance: the block sums each unit's flows in another order than the reference's matrix
products, so values agree to float64 rounding of those sums, not bit for bit. Every flow is a
sum of at most a few dozen positive terms, so one move differs by a few ulps; over the short
event sequences here the difference stays below 1e-12 (absolute, on log-scales of order 1).
A wrong neighbour, a missed delivery or a move of the wrong unit is off by 1e-3 or more.
"""

from __future__ import annotations

import numpy as np
import pytest

from asyncbalance import build_cost_graph
from asyncbalance.network import layered_network, recurrent_network
from asyncbalance.regularisers import elastic_net, lp
from asyncbalance.runtime.block import ShardBlock, version_of
from asyncbalance.runtime.layout import build_layout
from asyncbalance.runtime.messages import StateMessage
from asyncbalance.runtime.partition import partition_units
from asyncbalance.runtime.shard import Rule, Shard, build_shard_specs

TOL = 1e-12


def _mlp(seed: int, sizes: tuple[int, ...], activation: str = "relu", density: float = 0.7):
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal((o, i)) * np.exp(0.7 * rng.standard_normal((o, 1)))
               * (rng.random((o, i)) < density)
               for i, o in zip(sizes[:-1], sizes[1:], strict=True)]
    biases = [0.1 * rng.standard_normal(o) for o in sizes[1:]]
    return layered_network(weights, biases, activation)


def _rnn(seed: int, n: int = 7):
    rng = np.random.default_rng(seed)
    return recurrent_network(rng.standard_normal((n, 3)), 0.5 * rng.standard_normal((n, n)),
                             rng.standard_normal((2, n)), 0.1 * rng.standard_normal(n),
                             0.1 * rng.standard_normal(2), "relu")


CASES = {
    "neuron-exact": (lambda: _mlp(1, (4, 6, 5, 3)), lp(1.0), "neuron", 1, Rule("exact")),
    "slices-exact-p2": (lambda: _mlp(2, (5, 8, 7, 6, 3)), lp(2.0), "shard", 3, Rule("exact")),
    "chunks-damped": (lambda: _mlp(3, (4, 6, 6, 3)), lp(0.7), "chunk", 4,
                      Rule("damped", alpha=0.6)),
    "neuron-gradient": (lambda: _mlp(4, (4, 5, 5, 3)), lp(1.0), "neuron", 1,
                        Rule("gradient", eta=0.05)),
    "bipu-c2": (lambda: _mlp(5, (4, 6, 5, 3), activation="power:2"), lp(2.0), "shard", 2,
                Rule("exact")),
    "recurrent-neuron": (lambda: _rnn(6), lp(1.0), "neuron", 1, Rule("exact")),
    "recurrent-slices": (lambda: _rnn(7), lp(1.5), "shard", 2, Rule("exact")),
    "elastic-net": (lambda: _mlp(8, (4, 6, 5, 3)), elastic_net(0.5, 0.2), "neuron", 1,
                    Rule("exact")),
}


def _setup(name: str):
    make, reg, granularity, per, rule = CASES[name]
    net = make()
    graph = build_cost_graph(net, reg)
    if granularity == "chunk":
        partition = partition_units(graph, "shard", units_per_shard=per)
    else:
        partition = partition_units(graph, granularity, shards_per_layer=per)
    specs = build_shard_specs(graph, partition)
    return graph, partition, specs, rule


def _compare(block: ShardBlock, shards: list[Shard | None]) -> None:
    lay = block.layout
    for s, shard in enumerate(shards):
        if shard is None:
            continue
        lo, hi = lay.unit_ptr[s], lay.unit_ptr[s + 1]
        np.testing.assert_allclose(block.own[lo:hi], shard.log_scales, rtol=0, atol=TOL)
        # The halo view: every slot of the shard's incoming links equals the reference's.
        for link in lay.in_links[lay.in_link_ptr[s]:lay.in_link_ptr[s + 1]]:
            sl = slice(lay.link_slot_ptr[link], lay.link_slot_ptr[link + 1])
            units = lay.units[lay.slot_sender_pos[sl]]
            local = shard.spec.n_own + np.searchsorted(shard.spec.halo, units)
            np.testing.assert_allclose(block.halo[sl], shard.state[local], rtol=0, atol=TOL)
        assert bool(block.dirty[s]) == shard.dirty
        assert int(block.seq[s]) == shard.seq


def _play(name: str, seed: int, steps: int = 40, crash_every: int = 0) -> None:
    graph, partition, specs, rule = _setup(name)
    layout = build_layout(graph, partition)
    assert layout.n_shards == len(specs)
    for s, spec in enumerate(specs):
        assert layout.neighbours(s) == spec.neighbours
    resend, threshold = 3.0, 1e-13
    block = ShardBlock(layout, rule, resend, threshold)
    shards: list[Shard | None] = [Shard(spec, rule, resend, 0, threshold) for spec in specs]
    rng = np.random.default_rng(seed)
    in_flight: list[StateMessage] = []
    checkpoints = {s: shards[s].checkpoint() for s in range(len(specs))}
    block_saved = {s: block.checkpoint(np.array([s])) for s in range(len(specs))}
    epochs = np.zeros(len(specs), dtype=np.int64)
    for step in range(steps):
        now = float(step)
        wake = np.sort(rng.choice(len(specs), size=max(1, len(specs) // 2), replace=False))
        senders = block.wake(wake, now)
        expected = []
        for s in wake:
            messages = shards[s].on_wake(now)
            if messages:
                expected.append(int(s))
            in_flight += messages
        assert senders.tolist() == expected
        links, versions, values, ptr = block.outgoing(senders)
        sent = [m for m in in_flight[len(in_flight) - links.shape[0]:]] if links.size else []
        for i, message in enumerate(sent):
            assert layout.link_index(message.sender, message.receiver) == links[i]
            assert version_of(message.epoch, message.seq) == versions[i]
            np.testing.assert_allclose(values[ptr[i]:ptr[i + 1]], message.log_scales,
                                       rtol=0, atol=TOL)
        # Deliver a random part of what is in flight, in random order, with duplicates.
        rng.shuffle(in_flight)
        take = int(rng.integers(0, len(in_flight) + 1))
        batch, in_flight = in_flight[:take], in_flight[take:]
        batch += [m for m in batch if rng.random() < 0.2]
        applied_ref = [shards[m.receiver].on_message(m) for m in batch]
        if batch:
            links = np.array([layout.link_index(m.sender, m.receiver) for m in batch])
            versions = version_of([m.epoch for m in batch], [m.seq for m in batch])
            values = np.concatenate([m.log_scales for m in batch])
            ptr = np.concatenate([[0], np.cumsum([m.log_scales.shape[0] for m in batch])])
            applied, _ = block.deliver(links, versions, values, ptr)
            assert applied.tolist() == applied_ref
        if crash_every and step % crash_every == crash_every - 1:
            victim = int(rng.integers(len(specs)))
            from_checkpoint = bool(rng.random() < 0.5)
            epochs[victim] += 1
            shards[victim] = Shard.restore(specs[victim], rule, resend, int(epochs[victim]),
                                           checkpoints[victim] if from_checkpoint else None,
                                           threshold)
            block.restore(victim, int(epochs[victim]),
                          block_saved[victim] if from_checkpoint else None)
        if step % 7 == 3:
            for s in range(len(specs)):
                checkpoints[s] = shards[s].checkpoint()
                block_saved[s] = block.checkpoint(np.array([s]))
        _compare(block, shards)
    assert block.unit_updates.sum() == sum(s.unit_updates for s in shards)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_block_equals_the_per_shard_reference(name: str, seed: int) -> None:
    _play(name, seed)


@pytest.mark.parametrize("name", ["neuron-exact", "slices-exact-p2", "recurrent-neuron"])
def test_block_equals_the_reference_across_restarts(name: str) -> None:
    _play(name, 3, steps=50, crash_every=5)


def test_layout_fans_a_neurons_value_out_to_every_neighbour_once() -> None:
    graph, partition, specs, _ = _setup("neuron-exact")
    layout = build_layout(graph, partition)
    # Each halo slot is (receiver, neighbour) once, and its link's sender owns the neighbour.
    owners = layout.shard_of_unit[layout.slot_sender_pos]
    slot_link = np.repeat(np.arange(layout.n_links), np.diff(layout.link_slot_ptr))
    assert (owners == layout.link_src[slot_link]).all()
    pairs = set(zip(layout.link_dst[slot_link].tolist(), layout.slot_sender_pos.tolist(),
                    strict=True))
    assert len(pairs) == layout.n_slots
    expected = sum(spec.halo.shape[0] for spec in specs)
    assert layout.n_slots == expected


def test_shard_colours_read_every_slice_of_links(monkeypatch: pytest.MonkeyPatch) -> None:
    # Layer parity colours an MLP's neuron shards; one link joining two shards of the same
    # parity, even the very last one (read in a later slice), leaves a single colour, as
    # does a recurrent net.
    from dataclasses import replace

    from asyncbalance.runtime import layout as layout_module
    from asyncbalance.runtime.layout import shard_colours

    graph = build_cost_graph(_mlp(3, (4, 6, 5, 6, 3)), lp(1.0))
    layout = build_layout(graph, partition_units(graph, "neuron"))
    monkeypatch.setattr(layout_module, "COLOUR_CHECK_LINKS", 3)
    assert layout.n_links > 3 * 4
    colour, n_colours = shard_colours(layout)
    assert n_colours == 2
    np.testing.assert_array_equal(colour, layout.shard_group % 2)
    parity = layout.shard_group % 2
    link_dst = layout.link_dst.copy()
    src = layout.link_src[-1]
    link_dst[-1] = np.nonzero((parity == parity[src]) & (np.arange(layout.n_shards) != src))[0][0]
    colour, n_colours = shard_colours(replace(layout, link_dst=link_dst))
    assert n_colours == 1 and not colour.any()
    rnn = build_cost_graph(_rnn(5), lp(1.0))
    assert shard_colours(build_layout(rnn, partition_units(rnn, "neuron")))[1] == 1
