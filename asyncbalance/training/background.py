"""Background balancing's driver side: a thread that keeps the latest log-scales at hand.

The shard hosts balance in their own processes. Sampling them (a poll over the runtime's
monitor links, a Ray call now and then) and loading new costs (a reload of every host)
take a round trip each, during which a training step would wait. Here one thread owns the
runtime after its start: it samples the hosts every ``interval`` seconds and performs the
reloads it is asked for, so a balancing boundary only reads the latest sample (tagged with
the generation of costs it belongs to) and never waits on a host.

Only the runtime's public interface is used (``advance``, ``elapsed``, ``owned_log_scales``,
``message_counters``, ``reload``); nothing else touches the runtime while the thread runs.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from ..graph import CostGraph


class BackgroundSampler:
    """Samples a started runtime from a thread; ``request_load`` hands it new costs."""

    def __init__(self, runtime: Any, specs: list[Any], n_units: int, shards_per_layer: int,
                 interval: float = 0.02) -> None:
        self.runtime = runtime
        self.specs = specs
        self.n_units = n_units
        self.shards_per_layer = shards_per_layer
        self.interval = interval
        self.lock = threading.Lock()
        self.published = threading.Condition(self.lock)
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self.pending: tuple[int, CostGraph] | None = None
        # (generation, log-scales reached in it, unit updates so far)
        self.latest: tuple[int, np.ndarray, int] = (0, np.zeros(n_units), 0)
        self.samples = 0
        self.latest_is_sample = False
        self.loads = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="background-sampler",
                                       daemon=True)
        self.thread.start()

    def request_load(self, generation: int, graph: CostGraph) -> None:
        """Load ``graph``'s costs as ``generation`` (replaces a load not yet performed)."""
        with self.lock:
            self.pending = (generation, graph)
        self.wake.set()

    def sample(self) -> tuple[int, np.ndarray, int]:
        """The latest (generation, log-scales, unit updates); re-raises a thread failure."""
        if self.error is not None:
            raise RuntimeError("background balancing failed") from self.error
        with self.lock:
            return self.latest

    def settled(self, generation: int, timeout: float) -> tuple[int, np.ndarray, int]:
        """A sample of ``generation`` taken after this call (waits at most ``timeout``
        seconds, then returns the latest): for the boundaries that are checked, where the
        distance to the optimum is measured, e.g. at the end of an epoch."""
        deadline = time.monotonic() + timeout
        with self.lock:
            seen = self.samples
            while (self.latest[0] != generation or self.samples <= seen or
                   not self.latest_is_sample) and self.error is None:
                left = deadline - time.monotonic()
                if left <= 0 or not self.thread.is_alive():
                    break
                self.wake.set()
                self.published.wait(left)
            latest = self.latest
        if self.error is not None:
            raise RuntimeError("background balancing failed") from self.error
        return latest

    def _run(self) -> None:
        from ..runtime import build_shard_specs, gather_log_scales, partition_units

        generation = 0
        sampled = True  # the loaded generation was sampled since its load
        try:
            while not self.stop_event.is_set():
                with self.lock:
                    # A generation is sampled at least once before the next load, so that
                    # reloads asked for faster than the hosts take them cannot starve the
                    # boundaries of every move.
                    job = self.pending if sampled else None
                    if job is not None:
                        self.pending = None
                if job is not None:
                    generation, graph = job
                    partition = partition_units(graph, "shard", self.shards_per_layer)
                    self.specs = build_shard_specs(graph, partition)
                    self.runtime.reload(self.specs)
                    self.loads += 1
                    sampled = False
                    values = np.zeros(self.n_units)
                else:
                    self.runtime.advance(self.runtime.elapsed())
                    values = gather_log_scales(self.n_units, self.specs,
                                               self.runtime.owned_log_scales())
                    sampled = True
                updates = int(self.runtime.message_counters().unit_updates)
                with self.lock:
                    if job is None:
                        self.samples += 1
                    self.latest = (generation, values, updates)
                    self.latest_is_sample = job is None
                    self.published.notify_all()
                if job is not None:  # the hosts run on the new costs before the next sample
                    self.stop_event.wait(self.interval)
                elif self.pending is None:
                    self.wake.wait(self.interval)
                    self.wake.clear()
        except BaseException as exc:  # surfaced at the next boundary, in the training thread
            with self.lock:
                self.error = exc
                self.published.notify_all()

    def stop(self) -> None:
        self.stop_event.set()
        self.wake.set()
        self.thread.join()
