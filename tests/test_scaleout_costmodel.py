"""The scale-out cost model: its counts against the runtime's real shards, its fit against
the benchmark's measured points, and its extrapolation table.

Tolerances: message and log-scale counts per round are exact (integers). Bytes per message
match the encoder to within msgpack's variable-length headers (a few bytes; 1.1x over a
whole round). Every measured point saved by ``benchmarks/bench_scaling.py`` must be predicted
within ``HELD_OUT_FACTORS`` by a model fitted without that point (the bounds of
``FIT_FACTORS``, justified in ``costmodel.py``, and one wider one explained below); no time
is measured here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from asyncbalance.runtime.coordinator import prepare
from asyncbalance.runtime.costmodel import (
    FIT_FACTORS,
    CostModel,
    Layout,
    fit,
    prediction_ratios,
    worst_factor,
)
from asyncbalance.runtime.messages import StateMessage, encode_message
from asyncbalance.runtime.scenario import scenario_from_mapping

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "scaling.json"


def _specs(sizes: list[int], k: int):
    scenario = scenario_from_mapping({
        "name": "cm", "network": {"kind": "mlp", "sizes": sizes, "seed": 0},
        "balance": {"p": 2.0}, "partition": {"granularity": "shard", "shards_per_layer": k}})
    return prepare(scenario).specs


@pytest.mark.parametrize(("sizes", "k"), [([5, 8, 8, 3], 1), ([6, 12, 12, 12, 4], 2),
                                           ([4, 9, 7, 10, 2], 3)])
def test_counts_match_the_runtime_shards(sizes: list[int], k: int) -> None:
    specs = _specs(sizes, k)
    layout = Layout(sizes[0], tuple(sizes[1:-1]), sizes[-1], (k,) * (len(sizes) - 2))
    assert layout.shards == len(specs)
    # One message per neighbour shard per round, carrying the units that neighbour needs.
    assert layout.messages_per_round() == sum(len(s.send_units) for s in specs)
    assert layout.units_per_round() == sum(int(v.size) for s in specs
                                           for v in s.send_units.values())
    # The costs each shard holds: one float64 per hidden-to-hidden edge touching its units
    # (p = 2: T = 1 term).
    assert sorted(layout.shard_edges()) == sorted(s.cost_bytes // 8 for s in specs)
    assert sorted(layout.shard_messages()) == sorted(len(s.send_units) for s in specs)


def test_bytes_per_message_match_the_encoder() -> None:
    model = CostModel(envelope_bytes=14.0, unit_bytes=12.0)
    for n in (1, 10, 1000):
        message = StateMessage(3, 7, 1, 12345, np.arange(n), np.linspace(0, 1, n))
        size = len(encode_message(message))
        predicted = model.envelope_bytes + model.unit_bytes * n
        assert abs(size - predicted) <= 4, (n, size)


def test_fit_recovers_known_constants() -> None:
    rng = np.random.default_rng(0)
    points = {
        "bytes": [{"messages": m, "units": u, "bytes": 17 * m + 12 * u}
                  for m, u in rng.integers(1, 500, size=(8, 2))],
        "cpu": [{"edges": e, "messages": m, "seconds": 2e-4 + 3e-8 * e + 5e-5 * m}
                for e, m in rng.integers(1, 100_000, size=(8, 2))],
        "rounds": [{"depth": d, "rounds": 3.0 * d ** 1.8} for d in (2, 3, 5, 8)],
        "solve": [{"weights": w, "seconds": 0.004 + 2e-8 * w} for w in (1e4, 1e5, 1e6)],
        "memory": [{"edges": e, "terms": 1, "resident_bytes": 1e8 + 8 * e}
                   for e in (1e3, 1e5, 1e6)],
    }
    model = fit(points)
    assert model.envelope_bytes == pytest.approx(17, rel=1e-6)
    assert model.unit_bytes == pytest.approx(12, rel=1e-6)
    assert model.cpu_per_edge == pytest.approx(3e-8, rel=1e-4)
    assert model.cpu_per_message == pytest.approx(5e-5, rel=1e-4)
    assert model.rounds_power == pytest.approx(1.8, rel=1e-9)
    assert model.solve_per_weight == pytest.approx(2e-8, rel=1e-6)
    assert model.process_bytes == pytest.approx(1e8)
    for values in prediction_ratios(model, points).values():
        assert worst_factor(values) == pytest.approx(1.0, abs=1e-4)


def test_bad_layout_names_the_field() -> None:
    with pytest.raises(ValueError, match="slices"):
        Layout(4, (8, 8), 2, (1,))
    with pytest.raises(ValueError, match="slices"):
        Layout(4, (8, 8), 2, (1, 9))
    with pytest.raises(ValueError, match="shards"):
        Layout.uniform(4, 8, 3, 2, shards=2)


@pytest.fixture(scope="module")
def saved() -> dict:
    if not RESULTS.is_file():
        pytest.fail(f"{RESULTS} is missing: run benchmarks/bench_scaling.py")
    return json.loads(RESULTS.read_text())


def test_saved_points_cover_nodes_shards_and_sizes(saved: dict) -> None:
    ray_rows = saved["ray"]
    assert {r["nodes"] for r in ray_rows} == {1, 2, 3}
    assert len({r["shards"] for r in ray_rows}) >= 2
    assert len({r["weights"] for r in ray_rows + saved["sim"]["bytes"]}) >= 4
    # With more than one node, the shards really ran on more than one.
    assert all(r["distinct_nodes"] >= 2 for r in ray_rows if r["nodes"] > 1)


# A point left out of the fit is predicted with one point less of evidence: the bounds of
# FIT_FACTORS hold for every kind but the exact solver's time, whose Newton iteration count
# varies with the network (observed 3.3x held out vs 2.8x in-sample on the saved points);
# 4x still fails a wrong model form (the solve points span 100x in weights).
HELD_OUT_FACTORS = {**FIT_FACTORS, "solve": 4.0}


def _without(points: dict, kind: str, index: int) -> dict:
    return {k: (v[:index] + v[index + 1:] if k == kind else v) for k, v in points.items()}


def test_model_predicts_points_left_out_of_its_fit(saved: dict) -> None:
    """Leave-one-out: every measured point is predicted by a model fitted without it."""
    points = saved["points"]
    for kind in ("bytes", "memory", "cpu", "round_time", "rounds", "solve"):
        assert len(points[kind]) >= 3, f"too few measured {kind} points to hold one out"
        ratios = []
        for index, point in enumerate(points[kind]):
            model = fit(_without(points, kind, index))
            ratios += prediction_ratios(model, {kind: [point]})[kind]
        factor = worst_factor(ratios)
        assert factor <= HELD_OUT_FACTORS[kind], (kind, factor, ratios)
    # The constants fitted on everything are physical: 12 bytes per log-scale (uint32 id +
    # float64), an envelope of tens of bytes, a positive cost per edge.
    model = fit(points)
    assert model.unit_bytes == pytest.approx(12.0, rel=0.05)
    assert 5 <= model.envelope_bytes <= 60
    assert model.cpu_per_edge > 0


def test_extrapolation_reaches_a_billion_weights_on_100_nodes(saved: dict) -> None:
    rows = [r for r in saved["extrapolation"] if r["weights"] >= 9e8 and r["nodes"] == 100]
    assert rows
    row = rows[0]
    # The centralised alternative moves every weight through one link, twice.
    assert row["central_link_bytes"] == pytest.approx(2 * 8 * row["weights"] * 99 / 100)
    assert row["decentral_memory_per_node"] < row["central_memory"]
