"""The cost model of block hosts at scale: memory per host, CPU per time unit, wire bytes.

Pure functions of counts (no I/O, no Ray, no clock), fitted by least squares to measured
points and extrapolated from them.

**What a host holds.** Every block host (``runtime/block_host.py``) holds the layout of the
*whole* network (``runtime/layout.py``: the Ray driver ships the global layout to every
host) and a ``ShardBlock`` and host state sized on it, not only on its own shards. Its arrays
are counted exactly from their dtypes (``array_bytes``) in terms of

- ``units`` U: owned positions (live hidden units) of the layout;
- ``terms`` 2 E: incoming plus outgoing terms, two per hidden-to-hidden synapse;
- ``slots``: halo slots, one per (receiving shard, neighbour owned by another shard);
- ``links``: directed shard pairs that exchange state;
- ``shards`` S and ``hosts`` H, with T regulariser terms (T = 1 for one power p).

Resident memory per host is then ``m_0 + beta * array_bytes``: ``m_0`` the process (the
interpreter, numpy, scipy, a Ray worker), ``beta`` what the allocator and the transient
arrays of a window add per byte of state; both fitted. ``array_bytes(..., local=True)``
counts what a host would hold with a layout of its own shards and their halos only (not
built: a per-host sub-layout), for the extrapolation's second column.

**CPU.** A host's CPU seconds are linear in what it did:

    cpu = a_w W + a_ws W S + a_m M + a_l D + a_e F + a_f R

with W windows (the ``_next_window``/``_wake_due`` scans cost O(S) each: the ``W S`` term),
M unit moves, D link messages delivered (the fan-out at the receiver), F frame entries
(taken, encoded, decoded and fanned out: one per changed shard per destination host) and R
frames. ``a_e`` and ``a_f`` are fitted first, to the frame exchange of two block hosts in one
process timed on its own; the others then to the simulator (one host: F = R = 0) and those
two hosts' whole CPU. A move's work over its unit's terms is proportional to the link
messages that brought the news, so ``a_l`` may carry it and ``a_m`` come out near 0. On Ray
free-running host's CPU is ``ray_scale`` times that (no delay drawn per link message, no
spread of arrival windows) plus ``ray_frame_seconds`` per frame (the event loop, the socket,
the acknowledgement), both fitted to the Ray hosts' CPU; Ray's windows are its hosts' loop
turns. The extrapolation charges paced hosts (the simulator's activity): the in-process
constants plus ``ray_frame_seconds`` per frame, without ``ray_scale``.

**Wire bytes.** A frame of F entries of shards of u units each is ``frame_bytes``: an
envelope of at most ``FRAME_ENVELOPE`` bytes plus ``4 + 8 + 8 + 8 u`` per entry (sender id,
version, send time, log-scales; ``runtime/frames.py``).

**Per time unit** (``rates_per_time_unit``): at neuron granularity on a sparse MLP each
synapse is a directed link both ways; while converging a fraction of the units moves and a
fraction of the links carries news each time unit (``activity``, measured in the simulator);
a sender's entry goes once to each other host holding a neighbour (``entries_per_send``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

__all__ = [
    "BYTES_PER_ENTRY_FIXED", "FRAME_ENVELOPE", "HELD_OUT_FACTOR", "BlockCounts", "CostModel",
    "Work", "array_bytes", "entries_per_send", "extrapolate", "fit", "frame_bytes",
    "held_array_bytes", "held_out_ratios", "layer_shares", "prediction_ratios",
    "rates_per_time_unit", "sparse_mlp_counts", "worst_factor",
]

I8, F8, B1 = 8, 8, 1  # int64 index, float64 value, bool flag
BYTES_PER_ENTRY_FIXED = 4 + 8 + 8  # uint32 sender, int64 version, float64 send time
# msgpack array header, format and host ints, generation, four bin headers: measured <= 32
# bytes for frames of 0 to 10^5 entries (tests/test_scaleout_costmodel.py).
FRAME_ENVELOPE = 32

# How far a prediction may miss a point held out of the fit (max of predicted/measured and
# its inverse): the bound, for every kind.
HELD_OUT_FACTOR = 2.0


@dataclass(frozen=True)
class BlockCounts:
    """Sizes of a layout (see the module docstring); ``terms`` counts both directions."""

    units: int
    terms: int
    slots: int
    links: int
    shards: int
    hosts: int = 1
    cost_terms: int = 1

    def __post_init__(self) -> None:
        for name in ("units", "terms", "slots", "links", "shards"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.hosts < 1 or self.cost_terms < 1:
            raise ValueError(f"hosts and cost_terms: must be >= 1, got {self.hosts}, "
                             f"{self.cost_terms}")

    def scaled(self, fraction: float) -> BlockCounts:
        """The counts of one host's share (its shards and their halos) of a balanced split."""
        return replace(self, units=math.ceil(self.units * fraction),
                       terms=math.ceil(self.terms * fraction),
                       slots=math.ceil(self.slots * fraction),
                       links=math.ceil(self.links * fraction),
                       shards=math.ceil(self.shards * fraction))


def layout_bytes(c: BlockCounts) -> int:
    """Bytes of a ``BlockLayout``'s arrays (its dataclass fields and two ``TermTable``s)."""
    t = c.cost_terms
    per_unit = (I8 * 3      # units, shard_of_unit, color
                + F8        # degrees
                + F8 * 3 * t  # visible_in, visible_out, self_cost
                + I8 * 2)   # incoming.ptr, outgoing.ptr
    per_term = F8 * 2 * t + I8  # cost, rate, value_index
    per_slot = I8           # slot_sender_pos
    per_link = I8 * 4       # link_src, link_dst, link_slot_ptr, in_links
    per_shard = I8 * 5      # unit_ptr, n_colors, out_link_ptr, in_link_ptr, shard_group
    fixed = F8 * 2 * t + I8 * 6  # powers, coefs; the extra entry of six CSR pointers
    return (per_unit * c.units + per_term * c.terms + per_slot * c.slots
            + per_link * c.links + per_shard * c.shards + fixed)


def block_bytes(c: BlockCounts) -> int:
    """Bytes of a ``ShardBlock``'s arrays (with the compiled loops: the numpy passes add a
    scratch int64 per link on their first delivery)."""
    values = F8 * (c.units + c.slots + 1)
    per_unit = F8           # last_sent
    per_link = I8           # link_version
    per_shard = I8 * 4 + B1  # epoch, seq, last_send_time, unit_updates; dirty
    return values + per_unit * c.units + per_link * c.links + per_shard * c.shards


def host_bytes(c: BlockCounts, checkpoints: bool = True) -> int:
    """Bytes of a ``BlockHost``'s own arrays (routes, link means, schedules, checkpoints);
    ``checkpoints=False``: a host that keeps none (``keep_checkpoints``: the simulator
    without crashes restored from a checkpoint)."""
    saved_values = F8 * (c.units + c.slots + 1) if checkpoints else 0
    # Routes keep no link table where hosts hold ranges of shards (``Routes.build``), as
    # every layout built here does.
    per_link = I8 * (2 if checkpoints else 1) + F8  # slot_count, saved_versions; link_mean
    per_shard = I8 * 8 + B1 * 3  # shard_host, restarts, next_tick, wake_at, saved_time,
    #                              colour, delivery scratch (first arrival, touched); local,
    #                              alive, fresh
    pair_ptr = I8 * (c.shards * c.hosts + 1)
    feeds_host = B1 * c.shards * c.hosts  # which hosts each shard sends frames to
    return saved_values + per_link * c.links + per_shard * c.shards + pair_ptr + feeds_host


def array_bytes(c: BlockCounts, local: bool = False, checkpoints: bool = True) -> int:
    """Every array a block host holds: layout, block and host state.

    ``local``: with a layout of the host's own shards only (``c`` scaled by 1 / hosts), the
    ``pair_ptr`` routing table still spanning its shards times the hosts. ``checkpoints``:
    whether the host keeps checkpoint copies (Ray hosts do; see ``host_bytes``).
    """
    if local:
        c = c.scaled(1.0 / c.hosts)
    return layout_bytes(c) + block_bytes(c) + host_bytes(c, checkpoints)


def held_array_bytes(*objects: Any) -> int:
    """``nbytes`` of every distinct numpy array reachable from ``objects``' attributes
    (through nested objects of this package): what ``array_bytes`` predicts, counted on
    built objects."""
    seen: set[int] = set()

    def walk(obj: Any) -> int:
        total = 0
        for value in getattr(obj, "__dict__", {}).values():
            if isinstance(value, np.ndarray):
                base = value if value.base is None else value.base
                if id(base) not in seen:
                    seen.add(id(base))
                    total += base.nbytes if isinstance(base, np.ndarray) else value.nbytes
            elif hasattr(value, "__dict__") and type(value).__module__.startswith(
                    "asyncbalance"):
                total += walk(value)
        return total

    return sum(walk(obj) for obj in objects)


def frame_bytes(entries: float, units_per_shard: float, frames: float = 1.0) -> float:
    """Upper bound on the encoded bytes of ``frames`` frames carrying ``entries`` in all."""
    return frames * FRAME_ENVELOPE + entries * (BYTES_PER_ENTRY_FIXED + 8.0 * units_per_shard)


# -- counts of a sparse MLP at neuron granularity -------------------------------------------

def sparse_mlp_counts(widths: Sequence[int], fan_in: int, hosts: int = 1) -> BlockCounts:
    """Expected counts of a ``sparse_mlp``'s hidden layers ``widths`` at neuron granularity:
    each hidden-to-hidden synapse is two terms, two halo slots and two directed links (its
    two neurons are distinct shards); every unit is assumed live."""
    widths = [int(w) for w in widths]
    synapses = sum(out * min(fan_in, below) for below, out in zip(widths[:-1], widths[1:],
                                                                    strict=True))
    units = sum(widths)
    return BlockCounts(units=units, terms=2 * synapses, slots=2 * synapses,
                       links=2 * synapses, shards=units, hosts=hosts)


def layer_shares(widths: Sequence[int], hosts: int) -> np.ndarray:
    """(layers, hosts): units of each layer on each host when the units, in layer order, are
    cut into ``hosts`` contiguous runs of equal length (as the Ray backend assigns them)."""
    bounds = np.concatenate([[0.0], np.cumsum(np.asarray(widths, float))])
    cuts = np.linspace(0.0, bounds[-1], hosts + 1)
    lo = np.maximum(bounds[:-1, None], cuts[None, :-1])
    hi = np.minimum(bounds[1:, None], cuts[None, 1:])
    return np.maximum(hi - lo, 0.0)


def entries_per_send(widths: Sequence[int], fan_in: int, hosts: int) -> float:
    """Frame entries per send of a neuron, averaged over the hidden neurons: the expected
    number of other hosts holding one of its neighbours. Neighbours below are ``fan_in``
    uniform draws from the layer below; above, each neuron of the layer above draws this
    one with probability fan_in / width. A host holds a contiguous run of the units
    (``layer_shares``); a draw lands on host h with the share of the layer h holds."""
    widths = [int(w) for w in widths]
    if hosts <= 1:
        return 0.0
    share = layer_shares(widths, hosts)
    fraction = share / np.asarray(widths, float)[:, None]
    total = 0.0
    for i, w in enumerate(widths):
        hit = np.zeros(hosts)  # P(some neighbour on host h), for a neuron of layer i
        miss = np.ones(hosts)
        if i > 0:
            miss *= (1.0 - fraction[i - 1]) ** min(fan_in, widths[i - 1])
        if i + 1 < len(widths):
            above = widths[i + 1]
            # ``above`` neurons each pick this one with probability k / w, independently.
            miss *= (1.0 - fraction[i + 1] * min(fan_in, w) / w) ** above
        hit = 1.0 - miss
        # Averaged over the hosts g this layer's neurons sit on, h != g.
        total += float(share[i] @ (hit.sum() - hit))
    return total / float(sum(widths))


# -- the fitted model -----------------------------------------------------------------------

@dataclass(frozen=True)
class Work:
    """What a host did (or does per time unit): the counts the CPU model is linear in."""

    windows: float
    shards: float
    moves: float
    links: float
    entries: float = 0.0
    frames: float = 0.0

    def features(self) -> list[float]:
        return [self.windows, self.windows * self.shards, self.moves, self.links,
                self.entries, self.frames]


CPU_NAMES = ("cpu_window", "cpu_window_shard", "cpu_move", "cpu_link", "cpu_entry",
             "cpu_frame")


@dataclass(frozen=True)
class CostModel:
    """Fitted constants; see the module docstring for the formulas they enter."""

    process_bytes: float = 1.2e8
    memory_factor: float = 1.0
    cpu_window: float = 5e-5
    cpu_window_shard: float = 1e-9
    cpu_move: float = 1e-6
    cpu_link: float = 1e-7
    cpu_entry: float = 1e-6
    cpu_frame: float = 1e-5
    ray_scale: float = 1.0
    ray_frame_seconds: float = 1e-4
    fitted: Mapping[str, Any] = field(default_factory=dict)

    def resident_bytes(self, array_bytes_: float) -> float:
        return self.process_bytes + self.memory_factor * array_bytes_

    def cpu_seconds(self, work: Work) -> float:
        coef = [getattr(self, name) for name in CPU_NAMES]
        return float(np.dot(coef, work.features()))

    def ray_cpu_seconds(self, work: Work) -> float:
        """CPU of free-running Ray hosts (see the module docstring)."""
        return self.ray_scale * self.cpu_seconds(work) + self.ray_frame_seconds * work.frames

    def paced_ray_cpu_seconds(self, work: Work) -> float:
        """CPU of paced Ray hosts: the in-process work plus each frame's transport."""
        return self.cpu_seconds(work) + self.ray_frame_seconds * work.frames

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _relative_nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Non-negative least squares on relative errors (each row divided by its target)."""
    from scipy.optimize import nnls

    return nnls(a / b[:, None], np.ones_like(b))[0]


def _work(row: Mapping[str, Any]) -> Work:
    return Work(row["windows"], row["shards"], row["moves"], row["links"],
                row.get("entries", 0.0), row.get("frames", 0.0))


def fit(points: Mapping[str, Sequence[Mapping[str, Any]]]) -> CostModel:
    """Fit the constants to measured points (the benchmark's ``points``).

    ``memory``: rows with ``array_bytes`` and ``resident_bytes`` (one host process);
    ``cpu``: ``windows``, ``shards``, ``moves``, ``links``, ``entries``, ``frames`` and
    ``cpu_seconds`` (the simulator and in-process block hosts);
    ``frames``: ``entries``, ``frames`` and ``exchange_cpu_seconds`` (the frame exchange
    between in-process hosts timed alone: fits ``cpu_entry`` and ``cpu_frame`` first, and the
    ``cpu`` rows then the rest);
    ``ray``: the same counts summed over a run's hosts and their ``cpu_seconds``
    (free-running), fitted last with the in-process constants fixed.
    """
    model = CostModel()
    values: dict[str, Any] = {}
    rows = points.get("memory", ())
    if rows:
        a = np.array([[1.0, r["array_bytes"]] for r in rows], float)
        b = np.array([r["resident_bytes"] for r in rows], float)
        values["process_bytes"], values["memory_factor"] = (float(v) for v in
                                                            _relative_nnls(a, b))
    rows = points.get("frames", ())
    if rows:
        # The frame exchange timed on its own: entries and frames only.
        a = np.array([[r["entries"], r["frames"]] for r in rows], float)
        b = np.array([r["exchange_cpu_seconds"] for r in rows], float)
        values["cpu_entry"], values["cpu_frame"] = (float(v) for v in _relative_nnls(a, b))
    rows = points.get("cpu", ())
    if rows:
        names = [n for n in CPU_NAMES if n not in values]
        columns = [CPU_NAMES.index(n) for n in names]
        a = np.array([_work(r).features() for r in rows], float)
        b = np.array([r["cpu_seconds"] for r in rows], float)
        known = [(CPU_NAMES.index(n), values[n]) for n in CPU_NAMES if n in values]
        rest = b - sum(a[:, i] * v for i, v in known) if known else b
        if (rest <= 0).any():
            raise ValueError("cpu: the frame exchange alone exceeds a point's CPU seconds")
        values.update(zip(names, (float(v) for v in _relative_nnls(a[:, columns], rest)),
                          strict=True))
    model = replace(model, **values)
    rows = points.get("ray", ())
    if rows:
        a = np.array([[model.cpu_seconds(_work(r)), r.get("frames", 0.0)] for r in rows], float)
        b = np.array([r["cpu_seconds"] for r in rows], float)
        scale, per_frame = (float(v) for v in _relative_nnls(a, b))
        model = replace(model, ray_scale=scale, ray_frame_seconds=per_frame)
    return replace(model, fitted={k: len(points.get(k, ()))
                                  for k in ("memory", "frames", "cpu", "ray")})


def prediction_ratios(model: CostModel, points: Mapping[str, Sequence[Mapping[str, Any]]]
                      ) -> dict[str, list[float]]:
    """Predicted / measured for every point, per kind (1.0 is a perfect fit)."""
    return {
        "memory": [model.resident_bytes(r["array_bytes"]) / r["resident_bytes"]
                   for r in points.get("memory", ())],
        "cpu": [model.cpu_seconds(_work(r)) / r["cpu_seconds"] for r in points.get("cpu", ())],
        "ray": [model.ray_cpu_seconds(_work(r)) / r["cpu_seconds"]
                for r in points.get("ray", ())],
        "frames": [(model.cpu_entry * r["entries"] + model.cpu_frame * r["frames"])
                   / r["exchange_cpu_seconds"] for r in points.get("frames", ())],
    }


SIZE_KEYS = {"memory": "array_bytes", "cpu": "links", "ray": "links", "frames": "entries"}


def held_out_ratios(points: Mapping[str, Sequence[Mapping[str, Any]]], kind: str,
                    n_largest: int = 1) -> list[float]:
    """Fit without the ``n_largest`` points of ``kind`` (by its size key), predict them."""
    rows = list(points.get(kind, ()))
    key = SIZE_KEYS[kind]
    order = sorted(range(len(rows)), key=lambda i: rows[i][key])
    held = [rows[i] for i in order[-n_largest:]]
    kept = [rows[i] for i in order[:-n_largest]]
    model = fit({**points, kind: kept})
    return prediction_ratios(model, {kind: held})[kind]


def worst_factor(ratios: Sequence[float]) -> float:
    """The largest factor by which a prediction misses (max of r and 1/r); 1.0 is exact."""
    return max((max(r, 1.0 / r) for r in ratios if r > 0 and math.isfinite(r)),
               default=math.inf if ratios else 1.0)


# -- extrapolation --------------------------------------------------------------------------

def rates_per_time_unit(widths: Sequence[int], fan_in: int, hosts: int, move_activity: float,
                        link_activity: float, windows_per_time_unit: float) -> Work:
    """One host's work per time unit, hosts holding equal shares of the neurons.

    ``move_activity``: unit moves per unit per time unit; ``link_activity``: link messages
    per directed link per time unit (both measured in the simulator over runs to tolerance);
    every send of a neuron also goes as one entry to each other host holding a neighbour.
    Each host scans all S shards per window (the whole layout).
    """
    counts = sparse_mlp_counts(widths, fan_in, hosts)
    part = 1.0 / hosts
    sends = counts.units * part * link_activity  # a send feeds each of the sender's links
    entries = sends * entries_per_send(widths, fan_in, hosts)
    # A frame per window to every host holding a neighbour layer of this host's layers
    # (a host in the middle of the run of units, the busiest case): as the in-process hosts
    # exchanged them; an upper bound where a host batches several windows per frame.
    share = layer_shares(widths, hosts)
    me = hosts // 2
    near: set[int] = set()
    for i in np.nonzero(share[:, me] > 0)[0]:
        for j in (i - 1, i + 1):
            if 0 <= j < len(widths):
                near |= set(np.nonzero(share[j] > 0)[0].tolist())
    frames = windows_per_time_unit * len(near - {me})
    return Work(windows=windows_per_time_unit, shards=counts.shards,
                moves=counts.units * part * move_activity,
                links=counts.links * part * link_activity, entries=entries, frames=frames)


def extrapolate(model: CostModel, widths: Sequence[int], fan_in: int, nodes: int,
                cores_per_node: int, move_activity: float, link_activity: float,
                windows_per_time_unit: float, time_units_to_tol: float) -> dict[str, float]:
    """One row of the many-node table: one host per core, each on its own core."""
    hosts = nodes * cores_per_node
    counts = sparse_mlp_counts(widths, fan_in, hosts)
    work = rates_per_time_unit(widths, fan_in, hosts, move_activity, link_activity,
                               windows_per_time_unit)
    cpu = model.paced_ray_cpu_seconds(work)
    whole = array_bytes(counts)
    local = array_bytes(counts, local=True)
    units_per_shard = 1.0
    return {
        "neurons": float(counts.units), "synapses": float(counts.terms / 2),
        "nodes": float(nodes), "hosts": float(hosts),
        "array_bytes_per_host": float(whole),
        "memory_per_host": model.resident_bytes(whole),
        "memory_per_node": cores_per_node * model.resident_bytes(whole),
        "local_array_bytes_per_host": float(local),
        "local_memory_per_host": model.resident_bytes(local),
        "entries_per_time_unit": work.entries,
        "wire_bytes_per_time_unit": frame_bytes(work.entries, units_per_shard, work.frames),
        "cpu_per_time_unit": cpu,
        "wall_per_time_unit": cpu,  # one core per host: CPU-bound, no waiting assumed
        "wall_to_tol": cpu * time_units_to_tol,
        "window_scan_share": (model.cpu_window_shard * work.windows * work.shards) / cpu
        if cpu > 0 else 0.0,
        "frame_share": ((model.cpu_frame + model.ray_frame_seconds) * work.frames) / cpu
        if cpu > 0 else 0.0,
    }
