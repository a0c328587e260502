"""``--address`` at a port where something listens that is not Ray: refused in seconds, one
line naming the option, nothing written (it used to hang for minutes in ``ray.init``).

The listeners are private to the test (loopback, ephemeral ports): one that accepts and says
nothing, one that answers like an HTTP/1 server.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from actors.cluster import ClusterError, check_address

ROOT = Path(__file__).resolve().parents[1]
PROBE_TIMEOUT_S = 10.0  # check_address's default


class _Listener:
    """Accepts connections on 127.0.0.1; answers each with ``reply`` (None: silence)."""

    def __init__(self, reply: bytes | None):
        self.reply = reply
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.open: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.open.append(conn)
            if self.reply is not None:
                conn.recv(1024)
                conn.sendall(self.reply)
                conn.close()

    def close(self) -> None:
        for conn in self.open:
            conn.close()
        self.server.close()


@pytest.fixture(params=[None, b"HTTP/1.1 400 Bad Request\r\n\r\n"], ids=["silent", "http1"])
def listener(request: pytest.FixtureRequest):
    lst = _Listener(request.param)
    yield lst
    lst.close()


def test_probe_refuses_a_port_that_is_not_ray(listener: _Listener) -> None:
    began = time.monotonic()
    with pytest.raises(ClusterError, match=r"^address: .* is not a Ray cluster"):
        check_address(listener.address)
    assert time.monotonic() - began <= PROBE_TIMEOUT_S + 2.0


def test_run_with_a_non_ray_address_fails_fast_naming_the_option(
        listener: _Listener, tmp_path: Path) -> None:
    out = tmp_path / "run"
    began = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "asyncbalance.cli", "run", str(ROOT / "scenarios/quickstart.toml"),
         "--backend", "ray", "--address", listener.address, "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    # Start-up of the interpreter and imports (~5 s on 2 loaded cores) plus the probe.
    assert time.monotonic() - began <= PROBE_TIMEOUT_S + 30.0
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--address: {listener.address}" in lines[0], result.stderr
    assert "is not a Ray cluster" in lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.ray
def test_probe_accepts_a_real_ray_cluster(ray_session) -> None:
    check_address(ray_session.get_runtime_context().gcs_address)
