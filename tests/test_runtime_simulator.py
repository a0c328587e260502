"""The simulator: determinism from the seed, and a bounded soak with flat memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

from asyncbalance.runtime import read_events, run_scenario
from asyncbalance.runtime.scenario import scenario_from_mapping

FAULTY = {
    "network": {"kind": "mlp", "sizes": [5, 8, 8, 8, 3], "seed": 2},
    "partition": {"granularity": "shard", "shards_per_layer": 2},
    "wake": {"kind": "poisson", "period": 1.0},
    "links": {"delay": "pareto", "mean": 1.0, "heterogeneity": 0.5, "loss": 0.3,
              "duplication": 0.2},
    "faults": {"crashes": [{"shard": 3, "at": 10.0, "down_for": 5.0}],
               "partitions": [{"start": 5.0, "stop": 12.0, "shards": [0, 1]}]},
}


def events_bytes(tmp_path: Path, name: str, seed: int, level: str | bool = True) -> bytes:
    summary = run_scenario(scenario_from_mapping({**FAULTY, "name": name, "seed": seed,
                                                  "record_events": level}), tmp_path / name)
    # Loss, duplicates, a partition and a crash only slow it down.
    assert summary["converged"] and summary["function_exact"]
    return (tmp_path / name / "events.msgpack").read_bytes()


def test_same_seed_gives_byte_identical_message_events(tmp_path):
    first = events_bytes(tmp_path, "a", seed=7, level="messages")
    second = events_bytes(tmp_path, "b", seed=7, level="messages")
    other = events_bytes(tmp_path, "c", seed=8, level="messages")
    assert first == second
    assert first != other
    events = list(read_events(tmp_path / "a" / "events.msgpack"))
    kinds = {e["kind"] for e in events}
    # Every random path was exercised, so the comparison covers all of them.
    assert {"send", "deliver", "drop", "duplicate", "crash", "restart", "sample"} <= kinds
    reasons = {e["reason"] for e in events if e["kind"] == "drop"}
    assert {"loss", "partition"} <= reasons
    # The per-batch records count the same messages as the per-message ones.
    batches = [e for e in events if e["kind"] == "batch"]
    assert sum(b["sent"] for b in batches) == sum(e["kind"] == "send" for e in events)
    assert sum(b["delivered"] for b in batches) == sum(e["kind"] == "deliver" for e in events)
    assert sum(b["duplicated"] for b in batches) == sum(e["kind"] == "duplicate"
                                                        for e in events)


def test_same_seed_gives_byte_identical_batch_events(tmp_path):
    first = events_bytes(tmp_path, "a", seed=7)
    assert first == events_bytes(tmp_path, "b", seed=7)
    assert first != events_bytes(tmp_path, "c", seed=8)
    events = list(read_events(tmp_path / "a" / "events.msgpack"))
    kinds = {e["kind"] for e in events}
    assert {"batch", "crash", "restart", "sample"} <= kinds
    assert not kinds & {"send", "deliver", "drop", "duplicate"}
    batches = [e for e in events if e["kind"] == "batch"]
    last = [e for e in events if e["kind"] == "sample"][-1]
    assert sum(b["sent"] for b in batches) == last["messages_sent"]
    assert sum(b["delivered"] for b in batches) == last["messages_delivered"]
    assert sum(b["dropped"] for b in batches) == last["messages_dropped"]
    assert all(b["time"] <= b["until"] for b in batches)


def test_soak_of_a_hundred_thousand_messages_keeps_memory_flat(tmp_path):
    # Neuron shards of a dense recurrent net message all their peers on every wake; a tiny
    # tolerance keeps the run going until the message budget ends it.
    scenario = scenario_from_mapping({
        "name": "soak", "seed": 3, "record_events": "messages",
        "network": {"kind": "recurrent", "hidden": 8, "seed": 1},
        "partition": {"granularity": "neuron"},
        "links": {"resend_interval": 0.5, "loss": 0.1, "duplication": 0.1},
        "stop": {"tol": 1e-300, "max_messages": 100_000, "sample_interval": 50.0,
                 "function_check": "final"},
    })
    traced: list[int] = []
    tracemalloc.start()
    try:
        summary = run_scenario(scenario, tmp_path / "soak",
                               progress=lambda sample, _: traced.append(
                                   tracemalloc.get_traced_memory()[0]))
    finally:
        tracemalloc.stop()
    assert summary["stop_reason"] == "max_messages"
    assert summary["messages_sent"] >= 100_000
    assert summary["max_abs_log_scale_error"] <= 1e-8
    # After warm-up, the live Python heap may not grow with the number of messages: 100k
    # messages of ~150 bytes would add > 10 MB if anything kept them.
    warm = traced[len(traced) // 4]
    growth = max(traced[len(traced) // 4:]) - warm
    assert growth < 1_000_000, f"heap grew by {growth} bytes over the soak"
    # The events went to disk as they happened (several records per message).
    assert (tmp_path / "soak" / "events.msgpack").stat().st_size > 2_000_000
