"""Runtime faults that counting decisions cannot catch: checked on what the receiver sees.

* A duplicated message reaches its receiver twice: counted from the ``deliver`` records
  (written after the receiving shard took the message) and the drops on arrival, per
  message id, not from the ``duplicate`` decision written before anything is sent.
* A Ray host whose process dies resumes from the checkpoints the driver saved, not from
  u = 0: read back from the resumed host itself, before it has taken a new checkpoint.
"""

from __future__ import annotations

import io
import time
from collections import Counter

import msgpack
import numpy as np
import pytest

from asyncbalance.runtime.coordinator import prepare
from asyncbalance.runtime.events import EventWriter
from asyncbalance.runtime.scenario import scenario_from_mapping
from asyncbalance.runtime.shard import Shard, build_shard_specs, gather_log_scales
from asyncbalance.runtime.simulator import Simulator, rule_of

LAYERED = {"kind": "mlp", "sizes": [6, 10, 10, 10, 3], "unit_spread": 1.0, "seed": 3}
PER_LAYER = {"granularity": "shard", "shards_per_layer": 2}
HORIZON = 400.0
# Lognormal delays of mean 1 and spread 1.5: a copy sent this long before the end has
# arrived unless its delay exceeded 60 means (probability ~1e-4 per copy; the run is
# seeded, so the set of messages checked is fixed).
SETTLED = 60.0


def _events(buffer: io.BytesIO) -> list[list]:
    return list(msgpack.Unpacker(io.BytesIO(buffer.getvalue()), raw=False))


def test_a_duplicated_message_is_delivered_twice() -> None:
    scenario = scenario_from_mapping({
        "seed": 5, "network": LAYERED, "partition": PER_LAYER,
        "links": {"delay": "lognormal", "mean": 1.0, "spread": 1.5, "duplication": 0.5}})
    problem = prepare(scenario)
    # The per-message engine needs each shard's cost graph (a block run needs units only).
    specs = build_shard_specs(problem.graph, [s.units for s in problem.specs])
    buffer = io.BytesIO()
    simulator = Simulator(specs, scenario, EventWriter(buffer))
    simulator.advance(HORIZON)
    records = _events(buffer)
    sent_at = {tuple(r[2:6]): r[1] for r in records if r[0] == "send"}
    duplicated = {tuple(r[2:6]) for r in records if r[0] == "duplicate"}
    # An arrival: taken by the receiving shard, or dropped there (down, or a stale epoch).
    arrivals = Counter(tuple(r[2:6]) for r in records
                       if r[0] == "deliver" or (r[0] == "drop" and r[6] in ("down", "stale")))
    settled = [m for m, t in sent_at.items() if t <= HORIZON - SETTLED]
    checked = [m for m in settled if m in duplicated]
    assert len(checked) >= 50, "too few duplicated messages to judge"
    assert all(arrivals[m] == 2 for m in checked), \
        Counter(arrivals[m] for m in checked)
    single = [m for m in settled if m not in duplicated]
    assert single and all(arrivals[m] == 1 for m in single)
    counters = simulator.message_counters()
    assert counters.delivered == sum(1 for r in records if r[0] == "deliver")


@pytest.mark.ray
def test_ray_host_that_dies_resumes_from_the_saved_checkpoints(ray_session) -> None:
    import ray

    from actors.backend import RayBackend

    scenario = scenario_from_mapping({
        "seed": 1, "backend": "ray", "network": LAYERED, "partition": PER_LAYER,
        "links": {"delay": "exponential", "mean": 0.5},
        # 50 ms per time unit; a host re-checkpoints a shard 20 units (1 s) after the last,
        # so right after a resume it still reports the checkpoints it was resumed from.
        "faults": {"checkpoint_interval": 20.0},
        "ray": {"time_unit": 0.05, "sample_seconds": 0.1, "checkpoint_seconds": 0.0,
                "hosts": 2, "max_restarts": 1},
        "stop": {"max_wall_seconds": 60.0}})
    problem = prepare(scenario)
    # Per-shard hosts (no graph given) need each shard's cost graph.
    specs = build_shard_specs(problem.graph, [s.units for s in problem.specs])
    backend = RayBackend(specs, scenario, EventWriter(None))
    try:
        backend.start()
        # Balance until the driver holds checkpoints well away from u = 0 for host 1.
        members = backend.members[1]
        rule = rule_of(scenario)
        resend = scenario.links.resend_interval

        def saved_u() -> np.ndarray:
            return np.concatenate([Shard.restore(specs[s], rule, resend, 0,
                                                 backend.saved[s]).log_scales
                                   for s in members])

        deadline = time.monotonic() + 30.0
        while np.max(np.abs(saved_u())) < 0.3 and time.monotonic() < deadline:
            backend.advance(backend.elapsed() + 10.0)
            backend.final_poll()
        expected = saved_u()
        assert np.max(np.abs(expected)) >= 0.3, "no checkpoint away from u = 0 was saved"
        ray.kill(backend.actors[1], no_restart=False)  # its process dies; Ray restarts it
        deadline = time.monotonic() + 30.0
        while not backend.host_losses and time.monotonic() < deadline:
            time.sleep(0.05)
            backend.final_poll()  # notices the loss and resumes the host
        assert [loss["host"] for loss in backend.host_losses] == [1]
        reply = ray.get(backend.actors[1].poll.remote(True), timeout=30)
        resumed = np.concatenate([Shard.restore(specs[s], rule, resend, 0,
                                                reply["checkpoints"][s]).log_scales
                                  for s in members])
        # The same values, bit for bit: a checkpoint is restored, not recomputed.
        np.testing.assert_array_equal(resumed, expected)
    finally:
        backend.close()


@pytest.mark.ray
def test_ray_block_host_that_dies_resumes_from_the_saved_checkpoints(ray_session) -> None:
    # The same for neuron shards, which run as block hosts: per-shard checkpoints taken from
    # the block, held by the driver, handed to the restarted process.
    import ray

    from actors.backend import RayBackend
    from asyncbalance.runtime.block_host import decode_checkpoint

    scenario = scenario_from_mapping({
        "seed": 1, "backend": "ray", "network": LAYERED, "partition": {"granularity": "neuron"},
        "links": {"delay": "exponential", "mean": 0.5},
        "faults": {"checkpoint_interval": 20.0},
        "ray": {"time_unit": 0.05, "sample_seconds": 0.1, "checkpoint_seconds": 0.0,
                "hosts": 2, "max_restarts": 1},
        "stop": {"max_wall_seconds": 60.0}})
    problem = prepare(scenario)
    backend = RayBackend(problem.specs, scenario, EventWriter(None), graph=problem.graph)
    try:
        assert backend.blocks
        backend.start()
        members = backend.members[1]

        def own(saved: dict) -> np.ndarray:
            return np.concatenate([np.zeros(problem.specs[s].n_own) if saved[s] is None
                                   else decode_checkpoint(saved[s])["own"] for s in members])

        deadline = time.monotonic() + 30.0
        while np.max(np.abs(own(backend.saved))) < 0.3 and time.monotonic() < deadline:
            backend.advance(backend.elapsed() + 10.0)
            backend.final_poll()
        expected = own(backend.saved)
        assert np.max(np.abs(expected)) >= 0.3, "no checkpoint away from u = 0 was saved"
        # The driver's one-scatter sample over both hosts is the per-shard gather.
        n = problem.graph.n_units
        vector = backend.log_scale_vector(n)
        assert np.max(np.abs(vector)) > 0
        np.testing.assert_array_equal(
            vector, gather_log_scales(n, problem.specs, backend.owned_log_scales()))
        ray.kill(backend.actors[1], no_restart=False)
        deadline = time.monotonic() + 30.0
        while not backend.host_losses and time.monotonic() < deadline:
            time.sleep(0.05)
            backend.final_poll()
        assert [loss["host"] for loss in backend.host_losses] == [1]
        reply = ray.get(backend.actors[1].poll.remote(True), timeout=30)
        np.testing.assert_array_equal(own(reply["checkpoints"]), expected)
    finally:
        backend.close()
