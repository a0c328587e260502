"""Direct host-to-host links: length-prefixed frames over TCP, acknowledged per frame.

Ray places, restarts and polls the shard hosts; the batches of state messages between hosts
travel over these streams instead of Ray actor calls. A Ray call between two busy processes
crosses several threads of each (and needs the GIL in both) before it reaches the other
host's event loop: a median 2.5 ms one way on 2 busy cores, against 0.3 ms for a frame
(``benchmarks/bench_links.py``).

The sockets are non-blocking and owned here, not by asyncio transports: the event loop
watches them while the host is idle (``add_reader``), and a busy host calls ``pump()``
between two shard moves, which reads whatever has arrived and applies it at once. A frame
therefore waits for at most one shard's move, not for the host's next turn of the event loop.

Protocol, per connection (the sender dials the receiver):

- hello: ``MAGIC`` + the run's 16-byte token + the sender's host id (u32). A connection
  without the token is closed: only hosts of this run may deliver state.
- frames, sender to receiver: a u32 length, then an ``encode_batch`` payload;
- acks, receiver to sender: one byte per frame, once the frame has been applied.

A monitor connection (the driver's, ``MonitorClient``) opens with ``MONITOR_MAGIC`` and the
same token; each byte it sends asks for the host's state, answered (between two slices of a
busy host's work) as one length-prefixed frame. The driver polls the hosts this way several
times as often as through Ray calls, each of which costs it 0.6 – 0.8 ms of CPU. A request
is ``ASK_NOW`` (answered at once), or ``ASK_AT_REST`` (answered once the host's ``rests()``
says it rests with news for the driver: through ``answer_at_rest``, called by the host, or
on arrival), which ``ASK_FLUSH`` turns into an answer at once; a flush with nothing
deferred is not answered, so every request gets exactly one reply.

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
from typing import Any

MAGIC = b"ABHL1"
MONITOR_MAGIC = b"ABMN1"
MONITOR_ID = 0xFFFFFFFF
TOKEN_BYTES = 16
MAX_FRAME_BYTES = 1 << 30
RETRY_SECONDS = 0.02
DIAL_TIMEOUT_S = 2.0
_RECV_BYTES = 1 << 16
_LENGTH = struct.Struct("<I")
_HELLO = struct.Struct(f"<{len(MAGIC)}s{TOKEN_BYTES}sI")
_ACK = b"\x06"
ASK_NOW = b"?"
ASK_AT_REST = b"~"
ASK_FLUSH = b"!"

Address = tuple[str, int]


class _Broken(Exception):
    """The connection closed or failed."""


class _Connection:
    """One non-blocking socket with its read buffer and the bytes still to write."""

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.watched_write = False
        self.closed = False

    def read(self) -> int:
        """Append what has arrived to ``inbox``; the byte count. Raises ``_Broken``."""
        got = 0
        while True:
            try:
                chunk = self.sock.recv(_RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                return got
            except OSError as exc:
                raise _Broken from exc
            if not chunk:
                raise _Broken
            self.inbox += chunk
            got += len(chunk)
            if len(chunk) < _RECV_BYTES:
                return got

    def write(self, data: bytes) -> None:
        """Send now what the socket takes; keep the rest for ``flush``. Raises ``_Broken``."""
        if self.outbox:
            self.outbox += data
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            raise _Broken from exc
        if sent < len(data):
            self.outbox += data[sent:]

    def flush(self) -> None:
        if not self.outbox:
            return
        try:
            sent = self.sock.send(self.outbox)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            raise _Broken from exc
        del self.outbox[:sent]


class _Inbound(_Connection):
    """A connection another host dialled: hello, then frames; acks go back. Or the driver's
    monitor: hello, then one byte per request; the state goes back."""

    def __init__(self, sock: socket.socket):
        super().__init__(sock)
        self.greeted = False
        self.monitor = False
        self.deferred = False  # an ASK_AT_REST waits for the host to rest


class _Peer(_Connection):
    """The sending side of the link to ``host``: its socket, the send times of
    unacknowledged frames."""

    def __init__(self, sock: socket.socket, host: int):
        super().__init__(sock)
        self.host = host
        self.sent_at: deque[float] = deque()


class StreamLinks:
    """Listens for frames from other hosts and sends frames to them.

    ``on_frame(payload)`` is called for every frame received (before its ack is sent), from
    the event loop or from ``pump``; ``on_progress()`` whenever a slot frees up or a link
    breaks, so that the host's loop can flush again. Every method runs in the thread of the
    event loop that ``listen`` ran in (``can_send`` needs that loop to dial).
    """

    def __init__(self, host_id: int, token: bytes, max_in_flight: int,
                 on_frame: Callable[[bytes], None], on_progress: Callable[[], None],
                 on_monitor: Callable[[Any], bytes] | None = None):
        if len(token) != TOKEN_BYTES:
            raise ValueError(f"token must be {TOKEN_BYTES} bytes")
        self.host_id = host_id
        self.token = token
        self.max_in_flight = max_in_flight
        self.on_frame = on_frame
        self.on_progress = on_progress
        self.on_monitor = on_monitor
        self.monitor_requests = 0
        # Whether the host rests with news since its last monitor reply (set by the host;
        # None: never, so a request at rest waits for its flush).
        self.rests: Callable[[], bool] | None = None
        self.addresses: dict[int, Address] = {}
        self.peers: dict[int, _Peer] = {}
        self.dialing: set[int] = set()
        self.retry_after: dict[int, float] = {}
        self.server: socket.socket | None = None
        self.tasks: set[asyncio.Task] = set()
        self.inbound: set[_Inbound] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.frames_sent = 0
        self.frames_received = 0
        self.ack_seconds = 0.0
        self.acked = 0
        self.lost_frames = 0
        self.refused = 0

    def _loop(self) -> asyncio.AbstractEventLoop:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        return self.loop

    # -- receiving ------------------------------------------------------------------------

    async def listen(self, host: str) -> Address:
        """Start listening on ``host`` (any free port); the address peers should dial."""
        if self.server is None:
            server = socket.create_server((host, 0))
            server.setblocking(False)
            self.server = server
            self._loop().add_reader(server.fileno(), self._accept)
        name = self.server.getsockname()
        return (str(name[0]), int(name[1]))

    def _accept(self) -> None:
        while self.server is not None:
            try:
                sock, _ = self.server.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            connection = _Inbound(sock)
            self.inbound.add(connection)
            self._loop().add_reader(sock.fileno(), self._read_inbound, connection)

    def _read_inbound(self, connection: _Inbound) -> None:
        if connection.closed:
            return
        try:
            connection.read()
            self._frames(connection)
            connection.flush()
            self._watch_write(connection)
        except _Broken:
            # The sender went away; its unacknowledged frames are lost on its side.
            self._close_inbound(connection)

    def _frames(self, connection: _Inbound) -> None:
        """Apply every whole frame in the buffer, then acknowledge them in one write."""
        data = connection.inbox
        at = 0
        if not connection.greeted:
            if len(data) < _HELLO.size:
                return
            magic, token, _sender = _HELLO.unpack_from(data)
            monitor = magic == MONITOR_MAGIC and self.on_monitor is not None
            if (magic != MAGIC and not monitor) or token != self.token:
                self.refused += 1
                raise _Broken
            connection.greeted = True
            connection.monitor = monitor
            at = _HELLO.size
        if connection.monitor:
            requests = bytes(data[at:])
            del data[:]
            for request in requests:
                if request == ASK_AT_REST[0]:
                    connection.deferred = True
                    if self.rests is not None and self.rests():
                        self._answer(connection)
                elif request != ASK_FLUSH[0] or connection.deferred:
                    self._answer(connection)
            return
        applied = 0
        try:
            while len(data) - at >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(data, at)
                if length > MAX_FRAME_BYTES:
                    self.refused += 1
                    raise _Broken
                end = at + _LENGTH.size + length
                if len(data) < end:
                    break
                payload = bytes(data[at + _LENGTH.size:end])
                at = end
                self.frames_received += 1
                self.on_frame(payload)
                applied += 1
        finally:
            del data[:at]
            if applied and not connection.closed:
                connection.write(_ACK * applied)

    def _close_inbound(self, connection: _Inbound) -> None:
        if connection.closed:
            return
        connection.closed = True
        self.inbound.discard(connection)
        self._forget(connection)

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
        self.frames_sent += 1
        try:
            peer.write(_LENGTH.pack(len(payload)) + payload)
            self._watch_write(peer)
        except _Broken:
            self._broken(peer)

    def in_flight(self) -> int:
        return sum(len(peer.sent_at) for peer in self.peers.values())

    def _answer(self, connection: _Inbound) -> None:
        # The connection carries what its last reply held (replies may be deltas).
        state = self.on_monitor(connection)  # type: ignore[misc]
        self.monitor_requests += 1
        connection.deferred = False
        connection.write(_LENGTH.pack(len(state)) + state)

    def answer_at_rest(self) -> None:
        """The host rests: answer the deferred monitor requests if ``rests()`` says so."""
        waiting = [c for c in self.inbound if c.monitor and c.deferred and not c.closed]
        if not waiting or self.rests is None or not self.rests():
            return
        for connection in waiting:
            try:
                self._answer(connection)
                connection.flush()
                self._watch_write(connection)
            except _Broken:
                self._close_inbound(connection)

    def pump(self) -> None:
        """Read and apply what has arrived on every link, without waiting (a busy host
        calls this between shard moves)."""
        for connection in list(self.inbound):
            self._read_inbound(connection)
        for peer in list(self.peers.values()):
            self._read_acks(peer)

    async def _dial(self, host: int) -> None:
        address = self.addresses[host]
        sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET,
                             socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(self._loop().sock_connect(sock, address),
                                   timeout=DIAL_TIMEOUT_S)
            if self.addresses.get(host) != address:
                sock.close()  # the peer moved while we dialled
                return
            peer = _Peer(sock, host)
            peer.write(_HELLO.pack(MAGIC, self.token, self.host_id))
            self.peers[host] = peer
            self._loop().add_reader(sock.fileno(), self._read_acks, peer)
            self._watch_write(peer)
        except (OSError, TimeoutError, _Broken):
            sock.close()
            self.peers.pop(host, None)
            self.retry_after[host] = time.perf_counter() + RETRY_SECONDS
        except asyncio.CancelledError:
            sock.close()  # closed while dialling
            raise
        finally:
            self.dialing.discard(host)
            self.on_progress()

    def _read_acks(self, peer: _Peer) -> None:
        if peer.closed:
            return
        try:
            peer.read()
        except _Broken:
            self._broken(peer)
            return
        if not peer.inbox:
            return
        now = time.perf_counter()
        for _ in range(min(len(peer.inbox), len(peer.sent_at))):
            self.ack_seconds += now - peer.sent_at.popleft()
            self.acked += 1
        peer.inbox.clear()
        self.on_progress()

    def _broken(self, peer: _Peer) -> None:
        if self.peers.get(peer.host) is peer:
            self._drop(peer.host)
            self.retry_after[peer.host] = time.perf_counter() + RETRY_SECONDS
            self.on_progress()
        else:
            peer.closed = True
            self._forget(peer)

    def _drop(self, host: int) -> None:
        peer = self.peers.pop(host, None)
        if peer is None:
            return
        self.lost_frames += len(peer.sent_at)
        peer.sent_at.clear()
        peer.closed = True
        self._forget(peer)

    # -- the event loop's watch over the sockets ------------------------------------------

    def _watch_write(self, connection: _Connection) -> None:
        """Have the loop finish a write the socket could not take at once."""
        want = bool(connection.outbox) and not connection.closed
        if want == connection.watched_write:
            return
        connection.watched_write = want
        loop = self._loop()
        if want:
            loop.add_writer(connection.sock.fileno(), self._finish_write, connection)
        else:
            loop.remove_writer(connection.sock.fileno())

    def _finish_write(self, connection: _Connection) -> None:
        try:
            connection.flush()
            self._watch_write(connection)
        except _Broken:
            if isinstance(connection, _Peer):
                self._broken(connection)
            elif isinstance(connection, _Inbound):
                self._close_inbound(connection)

    def _forget(self, connection: _Connection) -> None:
        """Stop watching a connection and close its socket."""
        fd = connection.sock.fileno()
        if fd >= 0 and self.loop is not None and not self.loop.is_closed():
            self.loop.remove_reader(fd)
            if connection.watched_write:
                self.loop.remove_writer(fd)
        connection.watched_write = False
        connection.sock.close()

    def _spawn(self, coroutine) -> asyncio.Task:
        # asyncio keeps only weak references to tasks: hold them until they finish.
        task = self._loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def close(self) -> None:
        for host in list(self.peers):
            self._drop(host)
        if self.server is not None:
            if self.loop is not None and not self.loop.is_closed():
                self.loop.remove_reader(self.server.fileno())
            self.server.close()
            self.server = None
        for connection in list(self.inbound):
            self._close_inbound(connection)
        for task in list(self.tasks):
            task.cancel()


class MonitorClient:
    """The driver's blocking link to one host's state (see the module docstring)."""

    def __init__(self, address: Address, token: bytes, timeout: float = 2.0):
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(_HELLO.pack(MONITOR_MAGIC, token, MONITOR_ID))

    def request(self, kind: bytes = ASK_NOW) -> None:
        """Ask for the state (``ASK_NOW``, ``ASK_AT_REST`` or ``ASK_FLUSH``: see the module
        docstring); ``reply`` reads it (ask every host first, then read)."""
        self.sock.sendall(kind)

    def reply(self) -> bytes:
        (length,) = _LENGTH.unpack(self._exactly(_LENGTH.size))
        if length > MAX_FRAME_BYTES:
            raise ConnectionError(f"monitor reply of {length} bytes")
        return self._exactly(length)

    def _exactly(self, size: int) -> bytes:
        chunks, got = [], 0
        while got < size:
            chunk = self.sock.recv(min(size - got, _RECV_BYTES))
            if not chunk:
                raise ConnectionError("the host closed its monitor link")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
