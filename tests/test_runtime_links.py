"""The direct host-to-host links (``actors.links``), driven in one event loop without Ray.

Each test can fail: a link that ignored the token would deliver the intruder's frame; one
without the in-flight bound would accept a third frame; one that never re-dialled would not
deliver after the peer moved; one that forgot lost frames would report 0; one that read its
sockets only from the event loop would deliver nothing to a busy host that pumps.
"""

from __future__ import annotations

import asyncio
import select
import time

import pytest

from actors.links import ASK_AT_REST, ASK_FLUSH, MAGIC, MonitorClient, StreamLinks

TOKEN = b"0123456789abcdef"


class Endpoint:
    """A host's links plus what it received; its monitor state is ``state``."""

    def __init__(self, host_id: int, max_in_flight: int = 2, token: bytes = TOKEN,
                 monitor: bool = True):
        self.received: list[bytes] = []
        self.progress = 0
        self.state = b""
        self.links = StreamLinks(host_id, token, max_in_flight, self.received.append,
                                 self._progress, self._state if monitor else None)

    def _state(self, connection=None) -> bytes:
        return self.state

    def _progress(self) -> None:
        self.progress += 1


async def _until(condition, timeout: float = 5.0) -> None:
    deadline = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


async def _send_when_ready(sender: StreamLinks, host: int, payload: bytes) -> None:
    await _until(lambda: sender.can_send(host))
    sender.send(host, payload)


async def _connected(max_in_flight: int = 2, token: bytes = TOKEN
                     ) -> tuple[Endpoint, Endpoint, tuple[str, int]]:
    """Host 0 set up to send to host 1, which listens; and host 1's address."""
    a, b = Endpoint(0, max_in_flight, token), Endpoint(1)
    address = await b.links.listen("127.0.0.1")
    a.links.set_addresses({1: address})
    return a, b, address


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, timeout=20.0))


def test_frames_arrive_in_order_and_acks_free_the_slots():
    async def main():
        a, b, address = await _connected()
        payloads = [bytes([i]) * (1 + 1000 * i) for i in range(6)]
        for payload in payloads:
            await _send_when_ready(a.links, 1, payload)
        await _until(lambda: len(b.received) == len(payloads) and a.links.acked == 6)
        assert b.received == payloads
        assert a.links.frames_sent == 6 and a.links.in_flight() == 0
        assert a.links.ack_seconds > 0.0
        a.links.close()
        b.links.close()
    run(main())


def test_at_most_max_in_flight_frames_are_unacknowledged():
    async def main():
        a, b, address = await _connected(2)
        await _until(lambda: a.links.can_send(1))
        # Sent back to back without yielding: no ack can have arrived in between.
        a.links.send(1, b"x")
        a.links.send(1, b"y")
        assert not a.links.can_send(1)
        assert a.links.in_flight() == 2
        await _until(lambda: a.links.can_send(1))
        await _until(lambda: a.links.in_flight() == 0)
        assert b.received == [b"x", b"y"]
        a.links.close()
        b.links.close()
    run(main())


def test_a_connection_without_the_runs_token_delivers_nothing():
    async def main():
        intruder, b, address = await _connected(token=b"fedcba9876543210")
        # A link with the wrong token is refused as soon as it opens (it is dialled again
        # after each refusal, and may never get to send: no race is waited on here).
        intruder.links.can_send(1)
        await _until(lambda: b.links.refused >= 1)

        async def refused_raw(hello: bytes) -> None:
            before = b.links.refused
            reader, writer = await asyncio.open_connection(*address)
            # A whole frame after the hello: it must not be delivered.
            writer.write(hello + b"\1\0\0\0z")
            assert await reader.read(1) == b""  # closed unread, no ack
            assert b.links.refused == before + 1
            writer.close()

        await refused_raw(MAGIC + b"fedcba9876543210" + b"\0\0\0\0")  # wrong token
        await refused_raw(b"XXXXX" + TOKEN + b"\0\0\0\0")  # wrong magic
        await asyncio.sleep(0.05)
        assert b.received == []
        intruder.links.close()
        b.links.close()
    run(main())


def test_a_peer_that_moves_is_dialled_at_its_new_address_and_lost_frames_are_counted():
    async def main():
        a, b, address = await _connected(4)
        await _send_when_ready(a.links, 1, b"first")
        await _until(lambda: b.received == [b"first"] and a.links.in_flight() == 0)
        # The peer's process dies: its server and connections go away.
        b.links.close()
        await _until(lambda: 1 not in a.links.peers)
        # Dialling the dead address is refused and retried, never delivered.
        assert not a.links.can_send(1)
        await asyncio.sleep(0.05)
        assert not a.links.can_send(1)
        # A new process for the same host listens elsewhere; the driver hands out the address.
        b2 = Endpoint(1)
        new_address = await b2.links.listen("127.0.0.1")
        assert new_address != address
        a.links.set_addresses({1: new_address})
        await _send_when_ready(a.links, 1, b"second")
        await _until(lambda: b2.received == [b"second"])
        a.links.close()
        b2.links.close()
    run(main())


def test_frames_in_flight_when_the_link_breaks_are_lost_not_resent():
    async def main():
        a = Endpoint(0, max_in_flight=8)
        # A receiver that reads the hello and frames but never acknowledges, then hangs up.
        got = asyncio.Event()

        async def silent(reader, writer):
            await reader.readexactly(len(MAGIC) + len(TOKEN) + 4)
            await reader.readexactly(4 + 3)
            got.set()
            await asyncio.sleep(0.05)
            writer.close()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        a.links.set_addresses({1: server.sockets[0].getsockname()[:2]})
        await _send_when_ready(a.links, 1, b"one")
        a.links.send(1, b"two")
        a.links.send(1, b"333")
        await got.wait()
        await _until(lambda: a.links.lost_frames == 3)
        assert a.links.acked == 0 and a.links.in_flight() == 0
        server.close()
        a.links.close()
    run(main())


@pytest.mark.parametrize("length", [0, 1, 70_000])
def test_frame_lengths_round_trip(length):
    async def main():
        a, b, address = await _connected()
        payload = bytes(range(256)) * (length // 256) + bytes(length % 256)
        await _send_when_ready(a.links, 1, payload)
        await _until(lambda: len(b.received) == 1)
        assert b.received[0] == payload
        a.links.close()
        b.links.close()
    run(main())


def test_a_new_address_replaces_a_link_that_is_still_up():
    async def main():
        a, old, new = Endpoint(0), Endpoint(1), Endpoint(1)
        a.links.set_addresses({1: await old.links.listen("127.0.0.1")})
        await _send_when_ready(a.links, 1, b"to the old process")
        await _until(lambda: len(old.received) == 1)
        # The driver moved host 1 while the old process still answers: the new one gets it.
        a.links.set_addresses({1: await new.links.listen("127.0.0.1")})
        await _send_when_ready(a.links, 1, b"to the new process")
        await _until(lambda: len(new.received) == 1)
        assert old.received == [b"to the old process"]
        for endpoint in (a, old, new):
            endpoint.links.close()
    run(main())


def test_a_host_never_dials_itself():
    async def main():
        a, b, address = await _connected()
        own = await a.links.listen("127.0.0.1")
        # The driver hands every host the whole map, its own entry included.
        a.links.set_addresses({0: own, 1: address})
        assert 0 not in a.links.addresses
        assert not a.links.can_send(0) and 0 not in a.links.dialing
        a.links.close()
        b.links.close()
    run(main())


def test_a_busy_host_applies_frames_by_pumping_without_the_event_loop():
    # A host in the middle of its work never yields to the event loop between two shard
    # moves: ``pump`` must read and apply a frame (and the sender must see its ack) without
    # one turn of the loop. A pump that left the reading to the loop's callbacks receives
    # nothing here.
    async def main():
        a, b, _ = await _connected()
        await _until(lambda: a.links.can_send(1) and len(b.links.inbound) == 1)
        for payload in (b"first", b"second"):
            a.links.send(1, payload)
            deadline = time.perf_counter() + 2.0
            while payload not in b.received and time.perf_counter() < deadline:
                b.links.pump()  # no await: the loop does not turn
            while a.links.in_flight() and time.perf_counter() < deadline:
                a.links.pump()
        assert b.received == [b"first", b"second"]
        assert a.links.in_flight() == 0 and a.links.acked == 2
        a.links.close()
        b.links.close()
    run(main())


def _monitor_reply(client: MonitorClient, host: Endpoint) -> bytes:
    """The reply to one request, the host pumping (never turning its loop) until it is in."""
    client.request()
    deadline = time.perf_counter() + 2.0
    while not select.select([client.sock], [], [], 0)[0]:
        assert time.perf_counter() < deadline, "no monitor reply"
        host.links.pump()
    return client.reply()


def test_the_drivers_monitor_link_reads_the_current_state_between_slices():
    # The driver samples a busy host over its monitor link: every request is answered with
    # the state of that moment, by ``pump`` alone. A link that answered from the event loop
    # only, or once per connection, or with a stale state, fails here.
    async def main():
        b = Endpoint(1)
        address = await b.links.listen("127.0.0.1")
        client = MonitorClient(address, TOKEN)
        await _until(lambda: len(b.links.inbound) == 1)
        for state in (b"first state", b"", bytes(range(256)) * 400):
            b.state = state
            assert _monitor_reply(client, b) == state
        assert b.links.monitor_requests == 3 and b.received == []
        client.close()
        b.links.close()
    run(main())


def _replied(client: MonitorClient, host: Endpoint, seconds: float = 0.2) -> bool:
    """Whether a reply begins to arrive within ``seconds``, the host pumping meanwhile."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        host.links.pump()
        if select.select([client.sock], [], [], 0.005)[0]:
            return True
    return False


def test_a_request_at_rest_waits_for_the_host_to_rest_or_for_its_flush():
    # One reply per request, never two: a request at rest is answered when the host says it
    # rests (on arrival, or later through answer_at_rest), or at once after a flush; a flush
    # with nothing deferred gets no reply. A link that answered at rest requests at once, or
    # answered a flush on its own, or twice, fails here.
    async def main():
        b = Endpoint(1)
        resting = [False]
        b.links.rests = lambda: resting[0]
        address = await b.links.listen("127.0.0.1")
        client = MonitorClient(address, TOKEN)
        await _until(lambda: len(b.links.inbound) == 1)
        b.state = b"busy"
        client.request(ASK_AT_REST)
        assert not _replied(client, b)  # the host works: deferred
        b.links.answer_at_rest()
        assert not _replied(client, b)  # asked, but rests() is False
        b.state, resting[0] = b"rested", True
        b.links.answer_at_rest()
        assert _replied(client, b) and client.reply() == b"rested"
        client.request(ASK_AT_REST)  # the host rests already: answered on arrival
        assert _replied(client, b) and client.reply() == b"rested"
        client.request(ASK_FLUSH)  # nothing deferred: no reply
        assert not _replied(client, b)
        resting[0] = False
        b.state = b"flushed"
        client.request(ASK_AT_REST)
        client.request(ASK_FLUSH)
        assert _replied(client, b) and client.reply() == b"flushed"
        assert not _replied(client, b)  # exactly one reply for the pair
        assert b.links.monitor_requests == 3
        client.close()
        b.links.close()
    run(main())


@pytest.mark.parametrize("case", ["wrong token", "host without a monitor"])
def test_a_monitor_link_without_the_token_or_a_monitor_is_closed(case):
    async def main():
        b = Endpoint(1, monitor=case != "host without a monitor")
        address = await b.links.listen("127.0.0.1")
        token = b"fedcba9876543210" if case == "wrong token" else TOKEN
        client = MonitorClient(address, token)
        await _until(lambda: b.links.refused == 1)
        client.request()
        with pytest.raises(OSError):
            client.reply()
        assert b.links.monitor_requests == 0
        client.close()
        b.links.close()
    run(main())
