"""A TCP fault proxy for tests and benchmarks: sits between a client and a server on 127.0.0.1.

``FaultProxy(upstream_port).start()`` listens on a free port of 127.0.0.1 and forwards every
connection to the upstream (the embedded broker, say). The fault is switched at run time, from any
thread, and applies to connections already open as well as new ones:

* :meth:`~FaultProxy.pass_through` — forward as is (also the recovery from every other fault);
* :meth:`~FaultProxy.latency` — hold every chunk ``seconds`` in each direction, order preserved
  (what a real network's one-way delay does to a protocol's round trips);
* :meth:`~FaultProxy.reset_after` — forward ``n`` more bytes per connection, then reset the client's
  connection (TCP RST), cutting it in the middle of whatever frame was in flight;
* :meth:`~FaultProxy.blackhole` — keep every connection open but forward nothing in either
  direction, ever again, on the connections that saw it (what an idle NAT or load-balancer timeout
  leaves behind: a half-open connection on which no byte ever arrives). New connections made during
  the blackhole are accepted and equally silent; new connections after the recovery work;
* :meth:`~FaultProxy.slow_drip` — forward one byte per ``interval`` seconds in each direction;
* :meth:`~FaultProxy.refuse` — reset every new connection as soon as it is accepted (open ones
  carry on), as a host with nothing listening would.

Part of the local tooling (``adapters.local``), like the broker: stdlib only, never in the image.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType

_LOG = logging.getLogger(__name__)
_CHUNK = 65536


class FaultKind(StrEnum):
    """What the proxy does to the bytes it carries."""

    PASS_THROUGH = "pass-through"  # noqa: S105 - not a password
    LATENCY = "latency"
    RESET = "reset"
    BLACKHOLE = "blackhole"
    SLOW_DRIP = "slow-drip"
    REFUSE = "refuse"


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault setting; a new object per switch, so connections can tell switches apart."""

    kind: FaultKind = FaultKind.PASS_THROUGH
    #: LATENCY: seconds each chunk is held in each direction.
    delay: float = 0.0
    #: RESET: bytes each connection may still forward before it is reset.
    reset_after: int = 0
    #: SLOW_DRIP: seconds between two forwarded bytes.
    drip_interval: float = 0.0


@dataclass
class ProxyStats:
    """What the proxy did, for tests and reports."""

    accepted: int = 0
    refused: int = 0
    resets: int = 0
    blackholed_connections: int = 0
    bytes_forwarded: int = 0
    bytes_dropped: int = 0
    open_connections: int = 0


@dataclass(eq=False)
class _Connection:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    #: A connection that went through a blackhole stays silent: its peer's state is gone.
    dead: bool = False
    #: Bytes forwarded under each RESET fault object, so a new reset_after() starts a new count.
    reset_budget: dict[int, int] = field(default_factory=dict)
    closed: bool = False


class FaultProxy:
    """A threaded asyncio TCP proxy with switchable faults; use as a context manager or start()/stop()."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._requested_port = port
        self._port: int | None = None
        self._fault = Fault()
        self.stats = ProxyStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[_Connection] = set()

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Listen on 127.0.0.1 (a free port unless one was given) and serve from a daemon thread."""
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._accept, "127.0.0.1", self._requested_port, reuse_address=True)
                )
                self._port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="faultproxy", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        _LOG.info("fault proxy 127.0.0.1:%s → %s:%s", self._port, *self.upstream)
        return self

    def stop(self) -> None:
        """Close the listener and every connection; the thread ends."""
        loop, self._loop = self._loop, None
        if loop is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for conn in list(self._connections):
                self._close(conn)
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(RuntimeError, TimeoutError):
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port the proxy listens on (known once started)."""
        if self._port is None:
            raise RuntimeError("the proxy is not started")
        return self._port

    def connection_string(self, upstream_connection_string: str) -> str:
        """An emulator connection string for the upstream broker, pointed at this proxy instead."""
        host, port = self.upstream
        target = f"sb://{host}:{port}"
        if target not in upstream_connection_string:
            raise ValueError("the connection string does not name this proxy's upstream")
        return upstream_connection_string.replace(target, f"sb://127.0.0.1:{self.port}")

    # -- faults ------------------------------------------------------------------------------

    @property
    def fault(self) -> Fault:
        """The fault in force."""
        return self._fault

    def set_fault(self, fault: Fault) -> None:
        """Switch to ``fault`` (thread-safe: a single attribute store)."""
        _LOG.info("fault proxy %s: %s", self._port, fault)
        self._fault = fault

    def pass_through(self) -> None:
        """Forward everything as is; the recovery from any fault (blackholed connections stay dead)."""
        self.set_fault(Fault())

    recover = pass_through

    def latency(self, seconds: float) -> None:
        """Delay every chunk by ``seconds`` in each direction, order preserved."""
        self.set_fault(Fault(FaultKind.LATENCY, delay=seconds))

    def reset_after(self, nbytes: int) -> None:
        """Let each connection forward ``nbytes`` more bytes (both directions together), then reset it."""
        self.set_fault(Fault(FaultKind.RESET, reset_after=nbytes))

    def blackhole(self) -> None:
        """Forward nothing on any connection, and never again on those open meanwhile; keep them open."""
        self.set_fault(Fault(FaultKind.BLACKHOLE))

    def slow_drip(self, interval: float) -> None:
        """Forward one byte per ``interval`` seconds in each direction."""
        self.set_fault(Fault(FaultKind.SLOW_DRIP, drip_interval=interval))

    def refuse(self) -> None:
        """Reset new connections as soon as they are accepted; open connections carry on."""
        self.set_fault(Fault(FaultKind.REFUSE))

    # -- the proxy ---------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(writer)
        if self._fault.kind is FaultKind.REFUSE:
            self.stats.refused += 1
            _reset(writer)
            return
        self.stats.accepted += 1
        self._connections.add(conn)
        self.stats.open_connections = len(self._connections)
        try:
            up_reader, conn.upstream = await asyncio.open_connection(*self.upstream)
        except OSError:
            self._close(conn, reset=True)
            return
        if self._fault.kind is FaultKind.BLACKHOLE:
            self._kill(conn)
        await asyncio.gather(
            self._pipe(reader, conn.upstream, conn),
            self._pipe(up_reader, conn.client, conn),
            return_exceptions=True,
        )
        self._close(conn)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Connection) -> None:
        """One direction: a reader stamps chunks as they arrive, a writer releases them when due."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def read() -> None:
            try:
                while not conn.closed:
                    data = await reader.read(_CHUNK)
                    if not data:
                        break
                    queue.put_nowait((loop.time(), data))
            except OSError:
                pass
            queue.put_nowait(None)

        reading = asyncio.create_task(read())
        try:
            while True:
                item = await queue.get()
                if item is None or conn.closed:
                    break
                await self._deliver(conn, writer, *item)
        except OSError:
            pass
        finally:
            reading.cancel()
            # Either side gone: close both, as a real middlebox forwarding a FIN/RST would.
            self._close(conn)

    async def _deliver(self, conn: _Connection, writer: asyncio.StreamWriter, arrived: float, data: bytes) -> None:
        fault = self._fault
        if fault.kind is FaultKind.BLACKHOLE:
            self._kill(conn)
        if conn.dead:
            self.stats.bytes_dropped += len(data)
            return
        if fault.kind is FaultKind.LATENCY:
            wait = arrived + fault.delay - asyncio.get_running_loop().time()
            if wait > 0:
                await asyncio.sleep(wait)
        elif fault.kind is FaultKind.SLOW_DRIP:
            await self._drip(conn, writer, data)
            return
        elif fault.kind is FaultKind.RESET:
            used = conn.reset_budget.get(id(fault), 0)
            allowed = max(0, fault.reset_after - used)
            conn.reset_budget = {id(fault): used + min(allowed, len(data))}
            if allowed < len(data):
                await self._write(conn, writer, data[:allowed])
                self.stats.resets += 1
                self._close(conn, reset=True)
                return
        await self._write(conn, writer, data)

    async def _drip(self, conn: _Connection, writer: asyncio.StreamWriter, data: bytes) -> None:
        for i in range(len(data)):
            fault = self._fault
            if fault.kind is not FaultKind.SLOW_DRIP:
                # The drip ended mid-chunk: the rest goes under the new fault, in order.
                await self._deliver(conn, writer, asyncio.get_running_loop().time(), data[i:])
                return
            await self._write(conn, writer, data[i : i + 1])
            await asyncio.sleep(fault.drip_interval)

    async def _write(self, conn: _Connection, writer: asyncio.StreamWriter, data: bytes) -> None:
        if conn.closed or not data:
            return
        # Counted before the write: the transport may send at once, and the peer (another thread)
        # read it before this line ran.
        self.stats.bytes_forwarded += len(data)
        writer.write(data)
        await writer.drain()

    def _kill(self, conn: _Connection) -> None:
        if not conn.dead:
            conn.dead = True
            self.stats.blackholed_connections += 1

    def _close(self, conn: _Connection, reset: bool = False) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._connections.discard(conn)
        self.stats.open_connections = len(self._connections)
        if reset:
            _reset(conn.client)
        else:
            conn.client.close()
        if conn.upstream is not None:
            conn.upstream.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST rather than a FIN (SO_LINGER on, zero timeout)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@contextlib.contextmanager
def delayed(upstream_port: int, one_way_delay: float) -> Iterator[FaultProxy]:
    """A proxy to ``upstream_port`` adding ``one_way_delay`` seconds each way (0: pass-through), stopped on exit.

    For benchmarks measuring what real network latency costs (issue 12 §2): connect through
    ``proxy.connection_string(broker_connection_string)``.
    """
    proxy = FaultProxy(upstream_port).start()
    try:
        if one_way_delay > 0:
            proxy.latency(one_way_delay)
        yield proxy
    finally:
        proxy.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m adapters.local.faultproxy --upstream-port P [--delay S]``: a delaying proxy in its own process.

    Prints ``port=N`` once listening, then serves until stdin closes or the process is terminated
    (so benchmarks can keep the proxy's CPU off the process they measure).
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="TCP proxy on 127.0.0.1 adding a fixed one-way delay.")
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds added each way (default 0)")
    args = parser.parse_args(argv)
    with delayed(args.upstream_port, args.delay) as proxy:
        print(f"port={proxy.port}", flush=True)
        sys.stdin.read()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
