"""Array frames between block hosts: one entry per changed shard per destination host.

A frame carries, for each sending shard, its version, the time it sent and its own
log-scales (all of its units, in layout order); the receiving host fans each entry out to
the links of its own shards through index arrays. A neuron's change therefore crosses the
wire once per host that holds a neighbour, however many neighbours it has there.

Wire format (msgpack array): ``[FRAME_FORMAT, src_host, generation, senders, versions,
times, values]``, arrays as raw little-endian bytes (``<u4``, ``<i8``, ``<f8``, ``<f8``).
The receiver knows each sender's unit count from the layout, so no lengths travel.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
import numpy as np

from ..errors import InvalidInputError

FRAME_FORMAT = 2


@dataclass(frozen=True, eq=False)
class Frame:
    """Entries of ``src_host``'s shards: ``values`` holds each sender's own log-scales in turn."""

    src_host: int
    generation: int
    senders: np.ndarray
    versions: np.ndarray
    times: np.ndarray
    values: np.ndarray

    @property
    def n_entries(self) -> int:
        return int(self.senders.shape[0])


def encode_frame(frame: Frame) -> bytes:
    return msgpack.packb([
        FRAME_FORMAT, frame.src_host, frame.generation,
        np.ascontiguousarray(frame.senders, dtype="<u4").tobytes(),
        np.ascontiguousarray(frame.versions, dtype="<i8").tobytes(),
        np.ascontiguousarray(frame.times, dtype="<f8").tobytes(),
        np.ascontiguousarray(frame.values, dtype="<f8").tobytes()], use_bin_type=True)


def decode_frame(payload: bytes) -> Frame:
    """Inverse of ``encode_frame``; a malformed payload raises ``InvalidInputError``."""
    try:
        fields = msgpack.unpackb(payload, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise InvalidInputError("frame", f"not a msgpack frame ({exc})") from None
    if not isinstance(fields, list) or len(fields) != 7 or fields[0] != FRAME_FORMAT:
        raise InvalidInputError("frame", f"expected a version-{FRAME_FORMAT} array frame")
    _, src, generation, senders, versions, times, values = fields
    try:
        arrays = (np.frombuffer(senders, dtype="<u4").astype(np.int64),
                  np.frombuffer(versions, dtype="<i8").astype(np.int64),
                  np.frombuffer(times, dtype="<f8").astype(np.float64),
                  np.frombuffer(values, dtype="<f8").astype(np.float64))
    except (TypeError, ValueError) as exc:
        raise InvalidInputError("frame", f"array payload malformed ({exc})") from None
    n = arrays[0].shape[0]
    if arrays[1].shape[0] != n or arrays[2].shape[0] != n:
        raise InvalidInputError("frame", "senders, versions and times differ in length")
    return Frame(int(src), int(generation), *arrays)
