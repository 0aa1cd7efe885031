"""A minimal event loop driving proton's protocol engine over non-blocking sockets.

Proton's own ``Container`` reactor is written in Python and dispatches several bookkeeping events
(selectable, timer, quiesced, transport) per wake-up; at thousands of small messages per second
that bookkeeping dominated the broker's CPU. This loop uses the same engine objects (``Collector``,
``Connection``, ``Transport``) with an ``epoll`` selector, dispatches only the endpoint events the
broker handles, and flushes output once per wake-up.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import queue
import selectors
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar  # Any: the cross-thread call queue and _guard's socket operations

from proton import Collector, Connection, Event, ProtonException, Transport

_LOG = logging.getLogger(__name__)

_T = TypeVar("_T")

_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
_MAX_WAIT = 1.0


class EngineHandler(Protocol):
    """What the loop needs from the protocol handler besides ``on_<event>`` methods."""

    def connection_closed(self, connection: Connection) -> None:
        """A client connection is gone for good (its socket is closed)."""
        ...


class _Client:
    """One accepted socket and the proton engine objects bound to it."""

    __slots__ = ("connection", "interest", "sock", "transport")

    def __init__(self, sock: socket.socket, connection: Connection, transport: Transport):
        self.sock = sock
        self.connection = connection
        self.transport = transport
        self.interest = _READ


class EventLoop:
    """Runs on one thread; other threads talk to it only through :meth:`call`."""

    def __init__(self, listener: socket.socket, handler: EngineHandler) -> None:
        self._listener = listener
        self._handler = handler
        self._collector = Collector()
        self._selector = selectors.DefaultSelector()
        self._clients: dict[int, _Client] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # Any: calls of every result type share the queue; each pair's function and future agree (call()).
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._methods: dict[str, Callable[[Event], None] | None] = {}
        self._running = False
        self._selector.register(listener, _READ, "listen")
        self._selector.register(self._wake_r, _READ, "wake")

    # -- cross-thread and timers -------------------------------------------------------------

    def call(self, fn: Callable[[], _T]) -> Future[_T]:
        """Run ``fn`` on the loop thread; thread-safe."""
        future: Future[_T] = Future()
        self._calls.put((fn, future))
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        return future

    def schedule(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread after ``delay`` seconds."""
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq), fn))

    def stop(self) -> None:
        """Ask the loop to finish after the current iteration (loop thread only)."""
        self._running = False

    # -- connections -------------------------------------------------------------------------

    def drop_connections(self) -> int:
        """Cut every client socket without AMQP close frames."""
        clients = list(self._clients.values())
        for client in clients:
            with contextlib.suppress(OSError):
                client.sock.shutdown(socket.SHUT_RDWR)
        return len(clients)

    def _accept(self) -> None:
        while True:
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                _LOG.warning("accept failed: %r", exc)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = Connection()
            connection.collect(self._collector)
            transport = Transport(Transport.SERVER)
            sasl = transport.sasl()
            sasl.allow_insecure_mechs = True
            sasl.allowed_mechs("ANONYMOUS")
            transport.bind(connection)
            client = _Client(sock, connection, transport)
            self._clients[sock.fileno()] = client
            self._selector.register(sock, _READ, client)

    def _read(self, client: _Client) -> None:
        transport = client.transport
        try:
            capacity = transport.capacity()
        except ProtonException:
            capacity = -1
        if capacity <= 0:
            return
        try:
            data = client.sock.recv(capacity)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            transport.push(data)
        else:
            transport.close_tail()
            transport.close_head()

    def _flush(self, client: _Client, now: float) -> float:
        """Write what the engine has; returns the transport's next tick deadline (0 = none)."""
        transport = client.transport
        try:
            pending = transport.pending()
        except ProtonException:
            pending = -1
        while pending > 0:
            try:
                sent = client.sock.send(transport.peek(pending) or b"")
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                transport.close_head()
                transport.close_tail()
                pending = -1
                break
            transport.pop(sent)
            try:
                pending = transport.pending()
            except ProtonException:
                pending = -1
        if transport.closed:
            self._close(client)
            return 0.0
        interest = _READ | (_WRITE if pending > 0 else 0)
        if interest != client.interest:
            client.interest = interest
            self._selector.modify(client.sock, interest, client)
        return transport.tick(now)

    def _close(self, client: _Client) -> None:
        fd = client.sock.fileno()
        if self._clients.pop(fd, None) is None:
            return
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(client.sock)
        with contextlib.suppress(OSError):
            client.sock.close()
        try:
            self._handler.connection_closed(client.connection)
        except Exception:
            _LOG.exception("local broker failed releasing a closed connection")
        with contextlib.suppress(Exception):
            client.transport.unbind()
        # Events still queued for this connection refer to freed state; drain them now.
        self._dispatch()

    # -- main loop ---------------------------------------------------------------------------

    def _dispatch(self) -> None:
        collector = self._collector
        methods = self._methods
        handler = self._handler
        while True:
            event = collector.peek()
            if event is None:
                return
            name = event.type.method
            if name in methods:
                method = methods[name]
            else:
                method = getattr(handler, name, None)
                methods[name] = method
            if method is not None:
                try:
                    method(event)
                except Exception:
                    _LOG.exception("local broker failed handling %s", name)
            collector.pop()

    def _guard(self, operation: Callable[..., Any], client: _Client, *args: Any) -> Any:
        """Run socket work for one client; a failure drops that client, not the broker."""
        try:
            return operation(client, *args)
        except Exception:
            _LOG.exception("local broker I/O failed; dropping the connection")
            with contextlib.suppress(Exception):
                client.transport.close_head()
                client.transport.close_tail()
            self._close(client)
            return 0.0

    def _run_calls(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def _run_timers(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, fn = heapq.heappop(timers)
            try:
                fn()
            except Exception:
                _LOG.exception("local broker timer failed")

    def run(self) -> None:
        """Serve until :meth:`stop` is called, then close every connection."""
        self._running = True
        deadline = 0.0
        try:
            while self._running:
                now = time.monotonic()
                timeout = _MAX_WAIT
                if self._timers:
                    timeout = min(timeout, self._timers[0][0] - now)
                if deadline:
                    timeout = min(timeout, deadline - now)
                for key, mask in self._selector.select(max(timeout, 0.0)):
                    data = key.data
                    if data == "listen":
                        self._accept()
                    elif data == "wake":
                        self._run_calls()
                    elif mask & _READ:
                        self._guard(self._read, data)
                now = time.monotonic()
                self._run_timers(now)
                self._dispatch()
                deadline = 0.0
                for client in list(self._clients.values()):
                    tick = self._guard(self._flush, client, now)
                    if tick and (not deadline or tick < deadline):
                        deadline = tick
                # Flushing can raise more events (e.g. a transport closing); handle them now.
                self._dispatch()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        for client in list(self._clients.values()):
            with contextlib.suppress(Exception):
                client.connection.close()
                self._flush(client, time.monotonic())
            self._close(client)
        with contextlib.suppress(Exception):
            self._selector.close()
        for sock in (self._listener, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()
