"""Runtime backends by name: the built-in simulator, and hosts registered by entry point.

A backend is any object with the ``Backend`` interface below. The simulator is built in;
other backends (the Ray backend among them) register a factory under the entry-point group
``asyncbalance.backends`` and are loaded only when a scenario names them, so this package
never imports them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any, Protocol

import numpy as np

from ..errors import InvalidInputError
from .events import EventWriter
from .scenario import Scenario
from .shard import ShardSpec
from .simulator import MessageCounters, Simulator

ENTRY_POINT_GROUP = "asyncbalance.backends"


class Backend(Protocol):
    """What the coordinator drives. Clocks are in scenario time units.

    A backend may also have ``final_poll()``: called once the run is to stop, before its
    last sample, to bring up to date what it collects less often than the log-scales
    (events, counters).
    """

    name: str

    def start(self) -> None: ...
    def advance(self, until: float) -> float: ...
    def owned_log_scales(self) -> list[np.ndarray]: ...
    def message_counters(self) -> MessageCounters: ...
    def close(self) -> None: ...


BackendFactory = Callable[..., Backend]


def _registered() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def backend_names() -> tuple[str, ...]:
    return tuple(sorted({"sim", *_registered()}))


def backend_factory(name: str, field: str = "backend") -> BackendFactory:
    """The factory ``(specs, scenario, events, address=None) -> Backend`` named ``name``."""
    if name == "sim":
        return _simulator
    found = _registered().get(name)
    if found is None:
        raise InvalidInputError(field, f"unknown backend {name!r}", backend_names())
    return found.load()


def _simulator(specs: Sequence[ShardSpec], scenario: Scenario, events: EventWriter,
               address: str | None = None) -> Backend:
    if address:
        raise InvalidInputError("--address", "applies to the Ray backend only, not to 'sim'")
    return Simulator(specs, scenario, events)
