"""The event log ``events.msgpack``: a stream of msgpack arrays, one per event.

Every record is ``[kind, time, *fields]``; the fields of each kind are listed in
``EVENT_FIELDS`` (the first record is always a ``header``). Time is simulated time for the
simulator and wall seconds since the run started for Ray. ``read_events`` turns the stream
back into dictionaries. Records are written as they happen, so memory stays flat however
long the run.

Kinds: ``header`` (format version, backend, unit and shard counts, seed); ``send`` (a state
message left ``src`` for ``dst``); ``deliver`` (it reached ``dst``; ``applied`` is false when
the view already held a newer or equal version: a duplicate or a reordered message);
``drop`` (``reason`` is ``loss``, ``partition`` or ``down``); ``duplicate`` (the network will
deliver an extra copy); ``crash`` and ``restart`` of a shard (``restore`` is ``checkpoint``
or ``zero``; the restarted shard's ``epoch``); ``batch`` (the array simulator's default
record, one per window of simulated time from ``time`` to ``until``: shards woken, messages
sent, delivered, applied, dropped and duplicated in it, mean and largest delay drawn);
``sample`` (a convergence sample:
``max_abs_error`` = max |u - u*|, ``relative_cost_gap`` = (R - R*) / R*, the message
counters and ``function_rel_error``, null when not checked at this sample).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import msgpack

from ..errors import InvalidInputError

EVENTS_FORMAT_VERSION = 1

EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    "header": ("version", "backend", "n_units", "n_shards", "seed"),
    "send": ("src", "dst", "epoch", "seq", "n_units", "bytes"),
    "deliver": ("src", "dst", "epoch", "seq", "applied"),
    "drop": ("src", "dst", "epoch", "seq", "reason"),
    "duplicate": ("src", "dst", "epoch", "seq"),
    "crash": ("shard",),
    "restart": ("shard", "restore", "epoch"),
    "batch": ("until", "wakes", "sent", "delivered", "applied", "dropped", "duplicated",
              "mean_delay", "max_delay"),
    "sample": ("max_abs_error", "relative_cost_gap", "messages_sent", "messages_delivered",
               "messages_dropped", "function_rel_error"),
}


class EventWriter:
    """Appends event records to an open binary file (or counts them when ``handle`` is None)."""

    def __init__(self, handle: IO[bytes] | None):
        self.handle = handle
        self.packer = msgpack.Packer(use_bin_type=True)
        self.count = 0

    def write(self, kind: str, time: float, *fields: Any) -> None:
        self.count += 1
        if self.handle is not None:
            self.handle.write(self.packer.pack([kind, time, *fields]))

    def header(self, backend: str, n_units: int, n_shards: int, seed: int) -> None:
        self.write("header", 0.0, EVENTS_FORMAT_VERSION, backend, n_units, n_shards, seed)


def read_events(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield each event of an ``events.msgpack`` file as ``{"kind", "time", field: value}``."""
    file = Path(path)
    if not file.is_file():
        raise InvalidInputError("events", f"no such file: {file}")
    with file.open("rb") as handle:
        for record in msgpack.Unpacker(handle, raw=False):
            if not isinstance(record, list) or len(record) < 2 or record[0] not in EVENT_FIELDS:
                raise InvalidInputError("events", f"{file}: unexpected record {record!r:.80}",
                                        tuple(EVENT_FIELDS))
            kind, time, *values = record
            names = EVENT_FIELDS[kind]
            if len(values) != len(names):
                raise InvalidInputError("events", f"{file}: a {kind!r} record has "
                                        f"{len(values)} fields, expected {len(names)}")
            yield {"kind": kind, "time": time, **dict(zip(names, values, strict=True))}
