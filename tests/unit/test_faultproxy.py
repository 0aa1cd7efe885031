"""The TCP fault proxy itself, against an echo server on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from adapters.local.faultproxy import FaultKind, FaultProxy, delayed


class EchoServer:
    """Echoes every byte back, one thread per connection."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy(echo.port) as running:
        yield running


def connect(proxy: FaultProxy, timeout: float = 30.0) -> socket.socket:
    """A client connection through the proxy; ``timeout`` bounds each socket call (a hang guard)."""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def read_until_closed(sock: socket.socket, got: list[bytes]) -> None:
    """Send a little, then read until the connection ends; an orderly close (FIN) fails the test."""
    with sock:
        sock.sendall(b"hi")
        while chunk := sock.recv(100):
            got.append(chunk)
    raise AssertionError(f"closed with a FIN, not reset, after {got!r}")


def round_trip(sock: socket.socket, payload: bytes) -> float:
    started = time.perf_counter()
    sock.sendall(payload)
    assert recv_exactly(sock, len(payload)) == payload
    return time.perf_counter() - started


def test_pass_through_carries_a_megabyte_unchanged(proxy: FaultProxy) -> None:
    """Every byte arrives, in order, both ways."""
    payload = bytes(range(256)) * 4096
    with connect(proxy) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        assert recv_exactly(sock, len(payload)) == payload
        sender.join()
    assert proxy.stats.bytes_forwarded >= 2 * len(payload)


def test_latency_delays_each_direction_and_keeps_order(proxy: FaultProxy) -> None:
    """100 ms each way makes a round trip at least 200 ms; many chunks still arrive in order; recover ends it.

    The delay is a lower bound a busy machine cannot break; without it, round trips are compared with
    the delayed ones in the same run, not with a fixed bound a busy machine can exceed.
    """
    with connect(proxy) as sock:
        fast = min(round_trip(sock, b"x") for _ in range(3))
        proxy.latency(0.1)
        slow = min(round_trip(sock, b"y") for _ in range(3))
        pieces = [f"{i:05d}".encode() for i in range(200)]
        for piece in pieces:
            sock.sendall(piece)
        assert recv_exactly(sock, 5 * len(pieces)) == b"".join(pieces)
        proxy.recover()
        after = min(round_trip(sock, b"z") for _ in range(3))
    assert slow >= 0.2
    assert fast < slow
    assert after < slow


def test_reset_after_cuts_the_connection_with_a_reset(proxy: FaultProxy) -> None:
    """After the allowed bytes the client's connection is reset; new connections are cut the same way."""
    with connect(proxy) as sock:
        round_trip(sock, b"before")
        proxy.reset_after(10)
        sock.sendall(b"abcdefghijklmnopqrstuvwxyz")
        got: list[bytes] = []
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            read_until_closed(sock, got)
        assert len(b"".join(got)) <= 10
    assert proxy.stats.resets == 1
    proxy.recover()
    with connect(proxy) as sock:
        round_trip(sock, b"after")


def test_blackhole_keeps_connections_open_and_silent_until_new_ones_after_recovery(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    """No byte either way, no FIN, no reset; the old connection stays dead after recovery, new ones work."""
    with connect(proxy) as old:
        round_trip(old, b"hello")
        # Silence is what is proven: a short timeout on reads only (a busy machine can only delay bytes,
        # making a wrong byte arrive later, never a right silence fail).
        old.settimeout(0.3)
        proxy.blackhole()
        old.sendall(b"into the void")
        with pytest.raises(TimeoutError):
            old.recv(100)
        with connect(proxy) as during:
            during.settimeout(0.3)
            during.sendall(b"anyone?")
            with pytest.raises(TimeoutError):
                during.recv(100)
        proxy.recover()
        old.sendall(b"still there?")
        with pytest.raises(TimeoutError):
            old.recv(100)
        with connect(proxy) as fresh:
            round_trip(fresh, b"new connection")
    assert proxy.stats.blackholed_connections == 2
    assert proxy.stats.bytes_dropped >= len(b"into the void")


def test_slow_drip_sends_one_byte_per_interval(proxy: FaultProxy) -> None:
    """Ten bytes at 20 ms per byte (each way, pipelined) take at least nine intervals and arrive intact."""
    with connect(proxy) as sock:
        proxy.slow_drip(0.02)
        took = round_trip(sock, b"0123456789")
        proxy.recover()
        assert round_trip(sock, b"quick") < took
    assert took >= 9 * 0.02


def test_refuse_resets_new_connections_only(proxy: FaultProxy, echo: EchoServer) -> None:
    """While refusing, a new connection is reset before any byte; an open one keeps working."""
    with connect(proxy) as kept:
        round_trip(kept, b"open")
        proxy.refuse()
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            read_until_closed(connect(proxy), [])
        round_trip(kept, b"still open")
        assert proxy.stats.refused == 1
        assert echo.accepted == 1
        proxy.recover()
        with connect(proxy) as sock:
            round_trip(sock, b"accepted again")
    assert proxy.fault.kind is FaultKind.PASS_THROUGH


def test_delayed_is_a_fixed_delay_proxy_for_benchmarks(echo: EchoServer) -> None:
    """``delayed(port, 0.01)`` adds 10 ms each way; ``delayed(port, 0)`` adds nothing."""
    with delayed(echo.port, 0.01) as slow, connect(slow) as sock:
        assert min(round_trip(sock, b"x") for _ in range(3)) >= 0.02
    with delayed(echo.port, 0) as plain:
        assert plain.fault.kind is FaultKind.PASS_THROUGH


def test_connection_string_points_at_the_proxy(proxy: FaultProxy) -> None:
    """The emulator connection string is rewritten to the proxy's port, and refuses a foreign one."""
    host, port = proxy.upstream
    upstream = f"Endpoint=sb://{host}:{port};SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true"
    assert proxy.connection_string(upstream) == upstream.replace(f":{port};", f":{proxy.port};")
    with pytest.raises(ValueError, match="upstream"):
        proxy.connection_string("Endpoint=sb://elsewhere:1;UseDevelopmentEmulator=true")
