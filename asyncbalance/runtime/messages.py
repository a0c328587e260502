"""State messages between shards: absolute log-scales in msgpack envelopes.

A message carries the sender's current log-scales, never increments, so applying it twice, late
or out of order is harmless: the receiver keeps only the newest version per sender. Versions are
``(epoch, seq)`` pairs compared lexicographically; a shard restarted after a crash gets a
higher epoch, so its fresh messages win over anything it sent before the crash.

Wire format (msgpack array): ``[FORMAT_VERSION, sender, receiver, epoch, seq, units, values]``
with ``units`` the global unit ids as raw little-endian uint32 bytes and ``values`` the
log-scales as raw little-endian float64 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
import numpy as np

from ..errors import InvalidInputError

FORMAT_VERSION = 1
_UNIT_DTYPE = np.dtype("<u4")
_VALUE_DTYPE = np.dtype("<f8")


@dataclass(frozen=True, eq=False)
class StateMessage:
    """The absolute log-scales of some of ``sender``'s units, addressed to ``receiver``."""

    sender: int
    receiver: int
    epoch: int
    seq: int
    units: np.ndarray
    log_scales: np.ndarray

    @property
    def version(self) -> tuple[int, int]:
        return (self.epoch, self.seq)


def encode_message(message: StateMessage) -> bytes:
    units = np.ascontiguousarray(message.units, dtype=_UNIT_DTYPE)
    values = np.ascontiguousarray(message.log_scales, dtype=_VALUE_DTYPE)
    if units.shape != values.shape:
        raise InvalidInputError("message", f"{units.shape[0]} unit ids for "
                                f"{values.shape[0]} log-scales")
    return msgpack.packb([FORMAT_VERSION, message.sender, message.receiver, message.epoch,
                          message.seq, units.tobytes(), values.tobytes()], use_bin_type=True)


def decode_message(payload: bytes) -> StateMessage:
    """Inverse of ``encode_message``; malformed payloads raise ``InvalidInputError``."""
    try:
        fields = msgpack.unpackb(payload, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise InvalidInputError("message", f"not a msgpack envelope ({exc})") from None
    if not isinstance(fields, list) or len(fields) != 7 or fields[0] != FORMAT_VERSION:
        raise InvalidInputError("message", f"expected a version-{FORMAT_VERSION} state envelope")
    _, sender, receiver, epoch, seq, units_raw, values_raw = fields
    if len(units_raw) % _UNIT_DTYPE.itemsize or len(values_raw) % _VALUE_DTYPE.itemsize:
        raise InvalidInputError("message", "array payload length is not a whole number of items")
    # Read-only views of the payload: receivers copy what they keep.
    units = np.frombuffer(units_raw, dtype=_UNIT_DTYPE)
    values = np.frombuffer(values_raw, dtype=_VALUE_DTYPE)
    if units.shape != values.shape:
        raise InvalidInputError("message", f"{units.shape[0]} unit ids for "
                                f"{values.shape[0]} log-scales")
    return StateMessage(int(sender), int(receiver), int(epoch), int(seq), units, values)


def encode_batch(messages: list[StateMessage]) -> bytes:
    """Several state messages for one destination host, as one msgpack array of envelopes."""
    return msgpack.packb([encode_message(m) for m in messages], use_bin_type=True)


def decode_batch(payload: bytes) -> list[StateMessage]:
    """Inverse of ``encode_batch``; malformed payloads raise ``InvalidInputError``."""
    try:
        envelopes = msgpack.unpackb(payload, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise InvalidInputError("message", f"not a msgpack batch ({exc})") from None
    if not isinstance(envelopes, list) or not all(isinstance(e, bytes) for e in envelopes):
        raise InvalidInputError("message", "expected a batch: a list of state envelopes")
    return [decode_message(e) for e in envelopes]
