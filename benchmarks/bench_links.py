"""Host-to-host latency: a Ray actor call against a frame on the direct stream links.

Two Ray actors stand in for two shard hosts. In the ``busy`` setting each runs the shard
host's loop shape for the transport measured (``actors/host_actor.py``), with the same short
GIL switch interval: numpy work in slices and, for Ray calls, three zero sleeps between
slices and a 0.2 ms pause every 2 ms; for frames, a ``pump`` of the links between slices and
three zero sleeps every millisecond (for Ray's control calls). In ``idle`` they only sleep.
Each sends the other 200 timestamps, 3 ms apart, first as Ray calls (``peer.receive.remote``),
then as frames over ``actors.links.StreamLinks``; the receiver records the one-way delay
(wall clock, one machine). Both transports are measured in the
same processes in one run, so the ratio is robust to a noisy machine.

Usage: .venv/bin/python benchmarks/bench_links.py [--messages 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import struct
import sys
import time

import numpy as np
import ray

from actors.host_actor import (
    BUSY_PAUSE_S,
    BUSY_SLICE_S,
    CONTROL_TURN_S,
    IO_TURNS,
    SWITCH_INTERVAL_S,
)
from actors.links import StreamLinks

TOKEN = b"bench-links-0001"


class LinkProbe:
    def __init__(self, host_id: int, busy: bool):
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.busy = busy
        self.ray_delays: list[float] = []
        self.stream_delays: list[float] = []
        self.peer = None
        self.links = StreamLinks(host_id, TOKEN, 8, self._on_frame, lambda: None)
        rng = np.random.default_rng(host_id)
        self.matrix = rng.random((400, 400))
        self.vector = rng.random(400)
        self.task: asyncio.Task | None = None
        self.shape = "calls"

    def _on_frame(self, payload: bytes) -> None:
        self.stream_delays.append(time.time() - struct.unpack("<d", payload)[0])

    async def listen(self):
        address = await self.links.listen("127.0.0.1")
        self.task = asyncio.get_running_loop().create_task(self._loop())
        return address

    async def connect(self, peer, address) -> None:
        self.peer = peer
        self.links.set_addresses({1 - self.links.host_id: tuple(address)})

    async def receive(self, stamp: float) -> None:
        self.ray_delays.append(time.time() - stamp)

    async def _loop(self) -> None:
        last_pause = time.perf_counter()
        while True:
            if not self.busy:
                await asyncio.sleep(0.001)
                continue
            for _ in range(3):
                self.matrix @ self.vector
            since = time.perf_counter() - last_pause
            if self.shape == "stream":
                self.links.pump()
                if since >= CONTROL_TURN_S:
                    for _ in range(IO_TURNS):
                        await asyncio.sleep(0)
                    last_pause = time.perf_counter()
            elif since >= BUSY_SLICE_S:
                await asyncio.sleep(BUSY_PAUSE_S)
                last_pause = time.perf_counter()
            else:
                for _ in range(IO_TURNS):
                    await asyncio.sleep(0)

    async def fire(self, count: int, transport: str) -> None:
        other = 1 - self.links.host_id
        self.shape = transport
        for _ in range(count):
            if transport == "calls":
                await self.peer.receive.remote(time.time())
            else:
                while not self.links.can_send(other):
                    await asyncio.sleep(0.0005)
                self.links.send(other, struct.pack("<d", time.time()))
            await asyncio.sleep(0.003)

    def delays(self) -> tuple[list[float], list[float]]:
        return self.ray_delays, self.stream_delays


def measure(busy: bool, count: int) -> tuple[np.ndarray, np.ndarray]:
    actor = ray.remote(LinkProbe).options(num_cpus=0, max_concurrency=1000)
    probes = [actor.remote(0, busy), actor.remote(1, busy)]
    addresses = ray.get([p.listen.remote() for p in probes])
    ray.get([probes[0].connect.remote(probes[1], addresses[1]),
             probes[1].connect.remote(probes[0], addresses[0])])
    time.sleep(0.5)
    for transport in ("calls", "stream"):
        ray.get([p.fire.remote(count, transport) for p in probes])
    time.sleep(0.2)
    calls, stream = [], []
    for ray_delays, stream_delays in ray.get([p.delays.remote() for p in probes]):
        calls += ray_delays
        stream += stream_delays
    for probe in probes:
        ray.kill(probe)
    return np.array(calls), np.array(stream)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=200)
    args = parser.parse_args()
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    print(f"one-way delay between two Ray actors, {os.cpu_count()} CPUs, "
          f"{args.messages} messages each way per transport")
    print(f"    {'hosts':>5}  {'transport':>9}  {'median ms':>9}  {'p90 ms':>7}  "
          f"{'max ms':>7}  {'median ratio calls/stream':>26}")
    try:
        for busy in (True, False):
            calls, stream = measure(busy, args.messages)
            ratio = np.median(calls) / np.median(stream)
            label = "busy" if busy else "idle"
            for name, values in (("calls", calls), ("stream", stream)):
                print(f"    {label:>5}  {name:>9}  {np.median(values) * 1e3:>9.2f}  "
                      f"{np.percentile(values, 90) * 1e3:>7.2f}  {values.max() * 1e3:>7.2f}  "
                      f"{f'{ratio:.1f}x' if name == 'stream' else '':>26}")
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
