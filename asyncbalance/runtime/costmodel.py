"""The cost model of asynchronous balancing at scale: bytes, messages, memory and time.

Pure functions of the network's shape, fitted to measurements and extrapolated from them.

**The network.** A layered network with hidden widths ``h_1 .. h_L`` between ``n_in`` inputs
and ``n_out`` outputs (dense layers and biases), so ``E = sum of h_{l-1} h_l (+ h_l)``
weights and ``H = sum h_l`` hidden units. Layer ``l`` is cut into ``k_l`` slices, one shard
each: ``S = sum k_l`` shards, spread over ``N`` nodes.

**A round** is one wake of every shard: it applies its local rule and, when its log-scales
changed, sends them to every neighbour shard (the shards of the adjacent hidden layers, as
every slice of layer ``l`` is joined to every slice of ``l +- 1`` by dense weights).

- messages per round ``M = sum_l k_l (k_{l-1} + k_{l+1})`` (hidden neighbours only);
- log-scales shipped per round ``U = sum_l h_l (k_{l-1} + k_{l+1})``;
- bytes per round ``B = M * c_env + U * c_unit``: ``c_unit = 12`` (a uint32 id and a float64
  value), ``c_env`` the msgpack envelope, fitted; a fraction ``(N - 1) / N`` of them crosses
  between nodes when shards are spread evenly;
- memory per shard: the costs of the hidden-to-hidden edges touching its units (``8 T``
  bytes per edge for ``T`` regulariser terms; edges to inputs, outputs and biases are held
  aggregated per unit) plus a process baseline ``m_0`` (interpreter, numpy, Ray worker),
  fitted;
- CPU per shard and round ``c = a_0 + a_e e + (a_m + a_ray) m`` for a shard touching ``e``
  edges and sending ``m`` messages: ``a_0, a_e, a_m`` fitted to the shard logic timed in
  process, ``a_ray`` (an actor call's cost to send and receive) to the Ray measurements;
  ``s = S / N`` shards share a node's ``C`` cores, so ``t_round = max(P, max(1, s / C) c) + d``
  with wake period ``P`` and link delay ``d``;
- rounds to tolerance ``R``: measured in the simulator (deterministic, no clock) as a
  function of depth, ``R = r L^alpha``, fitted.

**The centralised alternative** gathers every weight to one node for every balance, solves
the exact optimum there and scatters the weights back: ``2 * 8 E`` bytes through that node's
network link, ``8 E (1 + T)`` bytes of memory on it, and a solve of
``t_solve = s_0 + s_e E`` seconds, fitted to the engine's exact solver.

Time through a network link is bytes over bandwidth plus a latency per message; the
decentralised bytes are spread over the ``N`` nodes' links, the centralised ones all go
through one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

BYTES_PER_UNIT = 12.0  # uint32 unit id + float64 log-scale, see runtime.messages
BYTES_PER_WEIGHT = 8.0  # float64

# How far a fitted prediction may miss a measured point (max of predicted/measured and its
# inverse), per kind, and why:
FIT_FACTORS: dict[str, float] = {
    # Bytes are counted exactly from the event log; only msgpack's variable-length integer
    # headers (sequence numbers, sizes) make the envelope vary by a few bytes.
    "bytes": 1.1,
    # Resident memory of an actor is dominated by the interpreter, numpy and Ray's worker
    # (~100-200 MB); small shards' costs barely register and the allocator adds noise.
    "memory": 1.5,
    # Rounds to tolerance in the simulator follow r L^alpha closely but not exactly (width,
    # random weights and wake jitter matter a little).
    "rounds": 1.5,
    # CPU and wall time on a shared, loaded 2-core machine: scheduling noise between runs.
    "cpu": 3.0,
    "round_time": 3.0,
    # The exact solver's Newton iterations vary with the network, not only with E.
    "solve": 3.0,
}


@dataclass(frozen=True)
class Layout:
    """A layered network cut into shards: hidden widths and slices per hidden layer."""

    n_in: int
    widths: tuple[int, ...]
    n_out: int
    slices: tuple[int, ...]
    bias: bool = True

    def __post_init__(self) -> None:
        if not self.widths or min(self.widths) < 1 or self.n_in < 1 or self.n_out < 1:
            raise ValueError(f"widths: need >= 1 hidden layer of >= 1 unit, got {self.widths}")
        if len(self.slices) != len(self.widths):
            raise ValueError(f"slices: one count per hidden layer ({len(self.widths)}), got "
                             f"{len(self.slices)}")
        if any(k < 1 or k > h for k, h in zip(self.slices, self.widths, strict=True)):
            raise ValueError(f"slices: each must lie in 1 .. its layer's width, got "
                             f"{self.slices} for widths {self.widths}")

    @classmethod
    def uniform(cls, n_in: int, width: int, depth: int, n_out: int, shards: int,
                bias: bool = True) -> Layout:
        """``depth`` hidden layers of ``width``; ``shards`` spread evenly over the layers."""
        if shards < depth:
            raise ValueError(f"shards: need at least one per hidden layer ({depth}), got "
                             f"{shards}")
        base, extra = divmod(shards, depth)
        slices = tuple(min(width, base + (1 if i < extra else 0)) for i in range(depth))
        return cls(n_in, (width,) * depth, n_out, slices, bias)

    @property
    def sizes(self) -> tuple[int, ...]:
        return (self.n_in, *self.widths, self.n_out)

    @property
    def weights(self) -> int:
        s = self.sizes
        return sum(a * b + (b if self.bias else 0) for a, b in zip(s[:-1], s[1:], strict=True))

    @property
    def hidden(self) -> int:
        return sum(self.widths)

    @property
    def shards(self) -> int:
        return sum(self.slices)

    @property
    def depth(self) -> int:
        return len(self.widths)

    def _neighbour_slices(self, layer: int) -> int:
        k = self.slices
        return (k[layer - 1] if layer > 0 else 0) + (k[layer + 1] if layer + 1 < len(k) else 0)

    def messages_per_round(self) -> int:
        return sum(k * self._neighbour_slices(i) for i, k in enumerate(self.slices))

    def units_per_round(self) -> int:
        return sum(h * self._neighbour_slices(i) for i, h in enumerate(self.widths))

    def shard_edges(self) -> list[int]:
        """Hidden-to-hidden edges touching each shard's units (its rows and columns).

        Edges to visible units (inputs, outputs, biases) are held aggregated per unit by the
        runtime's shards (a few numbers per unit), so they do not count here.
        """
        w = self.widths
        edges = []
        for i, (h, k) in enumerate(zip(w, self.slices, strict=True)):
            fan = (w[i - 1] if i > 0 else 0) + (w[i + 1] if i + 1 < len(w) else 0)
            for piece in np.array_split(np.arange(h), k):
                edges.append(int(piece.size) * fan)
        return edges

    def shard_messages(self) -> list[int]:
        """Messages each shard sends per round (one per neighbour shard)."""
        return [self._neighbour_slices(i) for i, k in enumerate(self.slices) for _ in range(k)]


@dataclass
class CostModel:
    """Fitted constants; see the module docstring for the formulas they enter."""

    envelope_bytes: float = 20.0
    unit_bytes: float = BYTES_PER_UNIT
    process_bytes: float = 1.5e8
    cost_terms: int = 1
    cpu_base: float = 1e-4
    cpu_per_edge: float = 1e-8
    cpu_per_message: float = 1e-5
    message_seconds: float = 3e-4
    rounds_coef: float = 10.0
    rounds_power: float = 2.0
    solve_base: float = 5e-3
    solve_per_weight: float = 1e-7
    fitted: dict[str, Any] = field(default_factory=dict)

    # -- predictions -------------------------------------------------------------------------
    def bytes_per_round(self, layout: Layout) -> float:
        return (layout.messages_per_round() * self.envelope_bytes
                + layout.units_per_round() * self.unit_bytes)

    def shard_memory(self, layout: Layout) -> float:
        """Resident bytes of the largest shard process."""
        return self.process_bytes + 8.0 * self.cost_terms * max(layout.shard_edges())

    def shard_cpu(self, layout: Layout) -> float:
        """CPU seconds per round of the busiest shard."""
        return max(self._cpu(e, m) for e, m in
                   zip(layout.shard_edges(), layout.shard_messages(), strict=True))

    def _cpu(self, edges: float, messages: float) -> float:
        return (self.cpu_base + self.cpu_per_edge * edges
                + (self.cpu_per_message + self.message_seconds) * messages)

    def time_per_round(self, layout: Layout, nodes: int, cores_per_node: float,
                       period: float = 0.0, delay: float = 0.0) -> float:
        per_node = layout.shards / max(nodes, 1)
        return max(period, max(1.0, per_node / cores_per_node) * self.shard_cpu(layout)) + delay

    def rounds_to_tol(self, layout: Layout) -> float:
        return self.rounds_coef * layout.depth ** self.rounds_power

    def solve_seconds(self, weights: float) -> float:
        return self.solve_base + self.solve_per_weight * weights

    def compare(self, layout: Layout, nodes: int, cores_per_node: float, bandwidth: float,
                latency: float, delay: float = 0.0, delay_factor: float = 1.0
                ) -> dict[str, float]:
        """One balance of ``layout``, decentralised vs centralised, on ``nodes`` nodes.

        ``bandwidth``: bytes/s of each node's network link; ``latency``: seconds per message
        on the wire; ``delay``: extra delay per message (the scenario's link delay);
        ``delay_factor``: gamma, how much of a message's delay and latency each round waits
        for (fitted in the simulator: time to tolerance = R (P + gamma d)).
        """
        rounds = self.rounds_to_tol(layout)
        per_round = self.bytes_per_round(layout)
        cross = (nodes - 1) / nodes if nodes > 1 else 0.0
        link_bytes_round = per_round * cross / max(nodes, 1)
        round_time = (self.time_per_round(layout, nodes, cores_per_node)
                      + delay_factor * (delay + latency) + link_bytes_round / bandwidth)
        weights = layout.weights
        gather = BYTES_PER_WEIGHT * weights * cross
        central_time = 2 * gather / bandwidth + self.solve_seconds(weights)
        return {
            "weights": float(weights), "hidden": float(layout.hidden),
            "shards": float(layout.shards), "nodes": float(nodes),
            "rounds": rounds, "bytes_per_round": per_round,
            "messages_per_round": float(layout.messages_per_round()),
            "decentral_bytes": rounds * per_round * cross,
            "decentral_link_bytes_per_node": rounds * link_bytes_round,
            "decentral_seconds": rounds * round_time,
            "decentral_memory_per_node": (layout.shards / nodes) * self.shard_memory(layout),
            "central_bytes": 2 * gather,
            "central_link_bytes": 2 * gather,
            "central_seconds": central_time,
            "central_memory": BYTES_PER_WEIGHT * weights * (1 + self.cost_terms),
        }

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- fitting ------------------------------------------------------------------------------

def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.optimize import nnls

    return nnls(a, b)[0]


def _relative_nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Non-negative least squares on relative errors (each row divided by its target)."""
    return _nnls(a / b[:, None], np.ones_like(b))


def _power_law(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    if lx.size < 2 or np.ptp(lx) == 0:
        return float(np.exp(np.mean(ly - lx))), 1.0
    power, log_coef = np.polyfit(lx, ly, 1)
    return float(np.exp(log_coef)), float(power)


def fit(measured: Mapping[str, Sequence[Mapping[str, Any]]]) -> CostModel:
    """Fit the constants to measured points (the benchmark's JSON ``points`` sections).

    ``bytes``: rows with ``messages``, ``units``, ``bytes`` (per round);
    ``memory``: ``edges`` (largest shard), ``terms``, ``resident_bytes`` (largest process);
    ``cpu``: ``edges``, ``messages`` (per shard and round), ``seconds`` (in-process CPU per
    shard-round); ``round_time``: ``edges``, ``messages`` (busiest shard), ``shards_per_core``,
    ``period``, ``seconds`` (per round on Ray);
    ``rounds``: ``depth``, ``rounds``; ``solve``: ``weights``, ``seconds``.
    """
    model = CostModel()
    rows = measured.get("bytes", ())
    if rows:
        a = np.array([[r["messages"], r["units"]] for r in rows], float)
        b = np.array([r["bytes"] for r in rows], float)
        model.envelope_bytes, model.unit_bytes = (float(v) for v in _relative_nnls(a, b))
    rows = measured.get("memory", ())
    if rows:
        model.cost_terms = int(rows[0].get("terms", 1))
        extra = np.array([r["resident_bytes"] - 8.0 * model.cost_terms * r["edges"]
                          for r in rows], float)
        model.process_bytes = float(np.median(extra))
    rows = measured.get("cpu", ())
    if rows:
        a = np.array([[1.0, r["edges"], r["messages"]] for r in rows], float)
        b = np.array([r["seconds"] for r in rows], float)
        model.cpu_base, model.cpu_per_edge, model.cpu_per_message = (
            float(v) for v in _relative_nnls(a, b))
    rows = [r for r in measured.get("round_time", ())
            if r["seconds"] > 1.2 * r.get("period", 0.0) and r["messages"] > 0]
    if rows:
        # What a Ray round costs beyond the shard logic, per message, where CPU-bound.
        extra = [(r["seconds"] / max(1.0, r["shards_per_core"])
                  - model.cpu_base - model.cpu_per_edge * r["edges"]
                  - model.cpu_per_message * r["messages"]) / r["messages"] for r in rows]
        model.message_seconds = max(0.0, float(np.median(extra)))
    rows = measured.get("rounds", ())
    if rows:
        model.rounds_coef, model.rounds_power = _power_law(
            [r["depth"] for r in rows], [r["rounds"] for r in rows])
    rows = measured.get("solve", ())
    if rows:
        a = np.array([[1.0, r["weights"]] for r in rows], float)
        b = np.array([r["seconds"] for r in rows], float)
        model.solve_base, model.solve_per_weight = (float(v) for v in _relative_nnls(a, b))
    model.fitted = {name: len(measured.get(name, ())) for name in
                    ("bytes", "memory", "cpu", "round_time", "rounds", "solve")}
    return model


def prediction_ratios(model: CostModel, measured: Mapping[str, Sequence[Mapping[str, Any]]]
                      ) -> dict[str, list[float]]:
    """Predicted / measured for every measured point, per kind (1.0 is a perfect fit)."""
    out: dict[str, list[float]] = {}
    out["bytes"] = [(model.envelope_bytes * r["messages"] + model.unit_bytes * r["units"])
                    / r["bytes"] for r in measured.get("bytes", ())]
    out["memory"] = [(model.process_bytes + 8.0 * model.cost_terms * r["edges"])
                     / r["resident_bytes"] for r in measured.get("memory", ())]
    out["cpu"] = [(model.cpu_base + model.cpu_per_edge * r["edges"]
                   + model.cpu_per_message * r["messages"]) / r["seconds"]
                  for r in measured.get("cpu", ())]
    out["round_time"] = [
        max(r.get("period", 0.0), max(1.0, r["shards_per_core"])
            * model._cpu(r["edges"], r["messages"])) / r["seconds"]
        for r in measured.get("round_time", ())]
    out["rounds"] = [model.rounds_coef * r["depth"] ** model.rounds_power / r["rounds"]
                     for r in measured.get("rounds", ())]
    out["solve"] = [model.solve_seconds(r["weights"]) / r["seconds"]
                    for r in measured.get("solve", ())]
    return out


def worst_factor(ratios: Sequence[float]) -> float:
    """The largest factor by which a prediction misses (max of r and 1/r); 1.0 is exact."""
    return max((max(r, 1.0 / r) for r in ratios if r > 0 and math.isfinite(r)), default=1.0)
