"""The deterministic simulator at array speed: one ``BlockHost`` of every shard on a
simulated clock.

Same scenario semantics as the per-message simulator (``simulator.Simulator``, which runs the
reference ``ShardHost`` event by event): per-shard wake schedules and event-driven wakes, a
delay draw per message on each directed link (with the link's own mean for heterogeneity),
loss, duplication, partition windows, scripted crashes with a restart from the last checkpoint
or from u = 0, anti-entropy re-sends. What changes is the bookkeeping:

- **Windows.** Time is taken in windows of ``step`` time units. In a window, the messages due
  in it are applied first (in the order of their delivery times, with the reference's
  version rule), then every shard whose wake falls in the window moves, all in one array
  computation, on the view at the window's end. Send and delivery times stay exact; only the
  order of a wake and a delivery less than ``step`` apart can differ from the event-by-event
  order. The default step is 1/5 of the shorter of the wake period and the mean delay
  (1/20 of the period without delays).
- **Queue of arrays.** Messages in flight wait in a timing wheel: one bucket per window,
  each a list of array chunks (delivery times, links, versions, values), drawn as vectors from
  the scenario's seeded generator.
- **Event log.** One ``batch`` record per window (counts, time span, delay statistics); with
  ``record_events = "messages"`` also one record per message, in the reference's schema.

Everything random comes from generators seeded by the scenario: one for wake times, loss,
duplication and delays other than exponential, drawn in window order, and a stream of
standard exponential draws that exponential delays scale (``draws.DelayDraws``), taken in
the order of the link messages; with two threads the second draws a window's share of that
stream ahead while the first sorts the window's deliveries, the same values. The same seed
gives the same record, byte for byte, on one thread or two.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import numpy as np
from scipy import special

from ..graph import CostGraph
from . import block_loops
from .block_host import BlockHost
from .events import EventWriter
from .host import settings_for
from .layout import BlockLayout, build_layout
from .partition import runs_as_blocks
from .scenario import Scenario
from .shard import ShardSpec
from .simulator import HostReadings

STEP_FRACTION = 1.0 / 5.0


def uses_blocks(specs: Sequence[ShardSpec]) -> bool:
    """Whether shards run as shard blocks: a few units each (``partition.runs_as_blocks``)."""
    return runs_as_blocks([spec.units for spec in specs])


def default_step(scenario: Scenario) -> float:
    """1/5 of the shorter of the wake period and the mean delay; without delays, 1/20 of
    the period (then only the order of wakes within a window differs from event by event,
    and a message reaches a shard that wakes later in the window only across windows:
    measured 36 time units to 1e-8 at 1/5 against 30 event by event, 32 at 1/20)."""
    period = scenario.wake.period
    mean = scenario.links.mean
    return STEP_FRACTION * min(period, mean) if mean > 0 else period / 20.0


def event_level(scenario: Scenario) -> str:
    """``none``, ``batches`` (default) or ``messages`` from ``record_events``."""
    level = scenario.record_events
    if level is False:
        return "none"
    if level is True:
        return "batches"
    return str(level)


class ArraySimulator(HostReadings):
    """Runs a block host of every shard in simulated time; ``advance(until)`` plays up to
    ``until``."""

    name = "sim"

    def __init__(self, specs: Sequence[ShardSpec], scenario: Scenario, events: EventWriter,
                 graph: CostGraph, step: float | None = None,
                 layout: BlockLayout | None = None):
        self.specs = list(specs)
        self.scenario = scenario
        self.events = events
        self.layout = layout if layout is not None else build_layout(
            graph, [spec.units for spec in self.specs])
        lay = self.layout
        self.step = float(step) if step is not None else default_step(scenario)
        settings = settings_for(scenario, {})
        self.host = BlockHost(0, lay, np.zeros(lay.n_shards, dtype=np.int64), settings,
                              link_mean_array(scenario, lay), self.step,
                              level=event_level(scenario),
                              keep_checkpoints=any(c.restore == "checkpoint"
                                                   for c in settings.crashes))
        # One process on the machine: large batches of deliveries and large windows of moves
        # use a second core where there is one (the same results; ``ShardBlock.threads``).
        self.host.block.threads = 2 if (os.cpu_count() or 1) >= 2 else 1
        self.now = 0.0
        self.busy_seconds = 0.0
        # Compile the loops (or load them from numba's cache, ~0.2 s) before the clock, so
        # that a first run after an install does not count their compilation as balancing.
        block_loops.warm_up()

    @property
    def block(self):
        return self.host.block

    @property
    def alive(self) -> np.ndarray:
        return self.host.alive

    @property
    def crash_log(self):
        return self.host.crash_log

    @property
    def counters(self) -> dict[str, int]:
        return self.host.counters

    @property
    def windows(self) -> int:
        return self.host.windows

    def start(self) -> None:
        """Nothing to start: the simulator runs inside ``advance``."""

    def advance(self, until: float) -> float:
        began = time.perf_counter()
        self.host.advance(until)
        for record in self.host.take_events():
            self.events.write(*record)
        self.now = until
        self.busy_seconds += time.perf_counter() - began
        return until

    def elapsed(self) -> float:
        return self.now

    def owned_log_scales(self) -> list[np.ndarray]:
        """Each owner's own values; a shard that is down counts with what it restarts from."""
        lay = self.layout
        own = self.host.owned_log_scales()
        return [own[lay.unit_ptr[s]:lay.unit_ptr[s + 1]].copy() for s in range(lay.n_shards)]

    def log_scale_vector(self, n_units: int) -> np.ndarray:
        """``gather_log_scales`` of ``owned_log_scales`` in one scatter."""
        lay = self.layout
        u = np.zeros(n_units)
        positions, _ = lay.shard_positions(np.array(self.host.order, dtype=np.int64))
        u[lay.units[positions]] = self.host.owned_log_scales()
        return u

    def queue_length(self) -> int:
        return self.host.queue_length()

    def close(self) -> None:
        """Nothing to release."""


def link_mean_array(scenario: Scenario, layout: BlockLayout) -> np.ndarray:
    """Mean delay of every link of ``layout``: a mean-one lognormal factor per directed link
    (sigma ``links.heterogeneity``), a function of the seed and the link's two shards only,
    so that every host's part of a layout draws the same mean for the same link."""
    links = scenario.links
    return link_means_of(layout, links.mean, links.heterogeneity, scenario.seed)


def link_means_of(layout: BlockLayout, mean: float, heterogeneity: float,
                  seed: int) -> np.ndarray:
    """``link_mean_array`` from the three numbers it depends on."""
    h = heterogeneity
    if h <= 0:
        return np.full(layout.n_links, mean)
    key = (layout.link_src.astype(np.uint64) << np.uint64(32)) ^ \
        layout.link_dst.astype(np.uint64)
    uniform = (_splitmix64(key ^ _splitmix64(np.uint64(seed))) >> np.uint64(11)) \
        .astype(np.float64) * 2.0 ** -53 + 2.0 ** -54
    return mean * np.exp(-0.5 * h * h + h * special.ndtri(uniform))


def _splitmix64(x: np.ndarray | np.uint64) -> np.ndarray:
    """A counter-based mix of 64-bit integers (SplitMix64's finaliser): uniform bits from a
    key, the same on every host and platform."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))
