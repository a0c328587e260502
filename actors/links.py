"""Direct host-to-host links: length-prefixed frames over TCP, acknowledged per frame.

Ray places, restarts and polls the shard hosts; the batches of state messages between hosts
travel over these streams instead of Ray actor calls. A Ray call between two busy processes
crosses several threads of each (and needs the GIL in both) before it reaches the other
host's event loop: a median 2.5 ms one way on 2 busy cores, against 0.3 ms for a frame that
the receiving loop reads from its socket itself (``benchmarks/bench_links.py``).

Protocol, per connection (the sender dials the receiver):

- hello: ``MAGIC`` + the run's 16-byte token + the sender's host id (u32). A connection
  without the token is closed: only hosts of this run may deliver state.
- frames, sender to receiver: a u32 length, then an ``encode_batch`` payload;
- acks, receiver to sender: one byte per frame, once the frame has been applied.

At most ``max_in_flight`` frames are unacknowledged per pair of hosts; an ack frees a slot
(backpressure), and what accumulates meanwhile stays coalesced in the host's outbox. A
broken or refused connection loses its unacknowledged frames, exactly like lost messages:
anti-entropy re-sends the state once the peer is back (possibly at a new address, which the
driver hands out with ``set_addresses``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections import deque
from collections.abc import Callable

MAGIC = b"ABHL1"
TOKEN_BYTES = 16
MAX_FRAME_BYTES = 1 << 30
RETRY_SECONDS = 0.02
_LENGTH = struct.Struct("<I")
_HELLO = struct.Struct(f"<{len(MAGIC)}s{TOKEN_BYTES}sI")
_ACK = b"\x06"

Address = tuple[str, int]


class _Peer:
    """The sending side of one link: its stream, the send times of unacknowledged frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.sent_at: deque[float] = deque()
        self.acks: asyncio.Task | None = None


class StreamLinks:
    """Listens for frames from other hosts and sends frames to them.

    ``on_frame(payload)`` is called in the event loop for every frame received (before its
    ack is sent); ``on_progress()`` whenever a slot frees up or a link breaks, so that the
    host's loop can flush again.
    """

    def __init__(self, host_id: int, token: bytes, max_in_flight: int,
                 on_frame: Callable[[bytes], None], on_progress: Callable[[], None]):
        if len(token) != TOKEN_BYTES:
            raise ValueError(f"token must be {TOKEN_BYTES} bytes")
        self.host_id = host_id
        self.token = token
        self.max_in_flight = max_in_flight
        self.on_frame = on_frame
        self.on_progress = on_progress
        self.addresses: dict[int, Address] = {}
        self.peers: dict[int, _Peer] = {}
        self.dialing: set[int] = set()
        self.retry_after: dict[int, float] = {}
        self.server: asyncio.base_events.Server | None = None
        self.tasks: set[asyncio.Task] = set()
        self.inbound: set[asyncio.StreamWriter] = set()
        self.frames_sent = 0
        self.frames_received = 0
        self.ack_seconds = 0.0
        self.acked = 0
        self.lost_frames = 0
        self.refused = 0

    # -- receiving ------------------------------------------------------------------------

    async def listen(self, host: str) -> Address:
        """Start the server on ``host`` (any free port); the address peers should dial."""
        if self.server is None:
            self.server = await asyncio.start_server(self._serve, host, 0)
        name = self.server.sockets[0].getsockname()
        return (str(name[0]), int(name[1]))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _no_delay(writer)
        self.inbound.add(writer)
        try:
            magic, token, _sender = _HELLO.unpack(await reader.readexactly(_HELLO.size))
            if magic != MAGIC or token != self.token:
                self.refused += 1
                return
            while True:
                (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
                if length > MAX_FRAME_BYTES:
                    self.refused += 1
                    return
                payload = await reader.readexactly(length)
                self.frames_received += 1
                self.on_frame(payload)
                writer.write(_ACK)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            return  # the sender went away; its unacknowledged frames are lost on its side
        finally:
            self.inbound.discard(writer)
            writer.close()

    # -- sending --------------------------------------------------------------------------

    def set_addresses(self, addresses: dict[int, Address]) -> None:
        """Where each host listens (this host's own entry is ignored); a changed address
        drops the old link (the peer moved)."""
        for host, given in addresses.items():
            if host == self.host_id:
                continue
            address = (str(given[0]), int(given[1]))
            if self.addresses.get(host) != address:
                self._drop(host)
                self.retry_after.pop(host, None)
            self.addresses[host] = address

    def can_send(self, host: int) -> bool:
        """True when a frame to ``host`` may go now; otherwise starts dialling if needed."""
        peer = self.peers.get(host)
        if peer is not None:
            return len(peer.sent_at) < self.max_in_flight
        if host in self.addresses and host not in self.dialing and \
                time.perf_counter() >= self.retry_after.get(host, 0.0):
            self.dialing.add(host)
            self._spawn(self._dial(host))
        return False

    def send(self, host: int, payload: bytes) -> None:
        """Send one frame; the caller checked ``can_send``."""
        peer = self.peers[host]
        peer.sent_at.append(time.perf_counter())
        peer.writer.write(_LENGTH.pack(len(payload)) + payload)
        self.frames_sent += 1

    def in_flight(self) -> int:
        return sum(len(peer.sent_at) for peer in self.peers.values())

    async def _dial(self, host: int) -> None:
        address = self.addresses[host]
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(*address), timeout=2.0)
            _no_delay(writer)
            writer.write(_HELLO.pack(MAGIC, self.token, self.host_id))
            if self.addresses.get(host) != address:
                writer.close()  # the peer moved while we dialled
                return
            peer = _Peer(reader, writer)
            self.peers[host] = peer
            peer.acks = self._spawn(self._read_acks(host, peer))
        except (OSError, TimeoutError):
            self.retry_after[host] = time.perf_counter() + RETRY_SECONDS
        finally:
            self.dialing.discard(host)
            self.on_progress()

    async def _read_acks(self, host: int, peer: _Peer) -> None:
        try:
            while True:
                acks = await peer.reader.read(4096)
                if not acks:
                    break
                now = time.perf_counter()
                for _ in range(min(len(acks), len(peer.sent_at))):
                    self.ack_seconds += now - peer.sent_at.popleft()
                    self.acked += 1
                self.on_progress()
        except (ConnectionError, OSError):
            pass
        if self.peers.get(host) is peer:
            self._drop(host)
            self.retry_after[host] = time.perf_counter() + RETRY_SECONDS
            self.on_progress()

    def _drop(self, host: int) -> None:
        peer = self.peers.pop(host, None)
        if peer is None:
            return
        self.lost_frames += len(peer.sent_at)
        peer.sent_at.clear()
        peer.writer.close()
        if peer.acks is not None and peer.acks is not asyncio.current_task():
            peer.acks.cancel()

    def _spawn(self, coroutine) -> asyncio.Task:
        # asyncio keeps only weak references to tasks: hold them until they finish.
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def close(self) -> None:
        for host in list(self.peers):
            self._drop(host)
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer in list(self.inbound):
            writer.close()  # the server's close leaves accepted connections open
        for task in list(self.tasks):
            task.cancel()


def _no_delay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
