"""The embeddable broker: lifecycle and thread handling (``ab-worker broker`` runs it in the foreground)."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

from .config import BrokerConfig
from .entities import BrokerState, SendFault, normalize_address
from .loop import EventLoop
from .server import TICK_SECONDS, BrokerHandler

_LOG = logging.getLogger(__name__)

_T = TypeVar("_T")
_CALL_TIMEOUT = 10.0


class LocalBroker:
    """An AMQP 1.0 server on 127.0.0.1 that the azure-servicebus SDK accepts as a namespace.

    Connect with :attr:`connection_string` (the emulator form, plain AMQP without TLS). Entities
    come from ``config`` (default: :meth:`BrokerConfig.default`). Pass ``state=old.state`` to start a
    new broker over the messages of a stopped one, e.g. to test a broker restart (the state's own
    config then wins over ``config``; never run two brokers over one state at the same time).
    Calling :meth:`start` again after :meth:`stop` reopens the same port.
    """

    def __init__(
        self,
        config: BrokerConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        state: BrokerState | None = None,
    ) -> None:
        self.config = state.config if state is not None else (config or BrokerConfig.default())
        self.state = state if state is not None else BrokerState(self.config)
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._handler: BrokerHandler | None = None
        self._loop: EventLoop | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> LocalBroker:
        """Bind, start the event loop in a daemon thread and return once it is serving."""
        if self._thread is not None:
            raise RuntimeError("broker already started")
        # A restarted broker keeps its port so connection strings handed out stay valid.
        port = self._port if self._port is not None else self._requested_port
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self._port = sock.getsockname()[1]
        handler = BrokerHandler(self.state)
        loop = EventLoop(sock, handler)

        def tick() -> None:
            handler.tick()
            loop.schedule(TICK_SECONDS, tick)

        loop.schedule(TICK_SECONDS, tick)

        def run() -> None:
            try:
                loop.run()
            except BaseException:
                _LOG.exception("local broker event loop failed")
            finally:
                handler.detach_state()

        self._handler = handler
        self._loop = loop
        self._thread = threading.Thread(target=run, name=f"localbroker-{self._port}", daemon=True)
        self._thread.start()
        self._call(lambda: None)
        _LOG.debug("local Service Bus broker listening on %s:%s", self.host, self._port)
        return self

    def stop(self) -> None:
        """Close every connection and the listening socket; the port is free on return."""
        thread = self._thread
        loop = self._loop
        if thread is None or loop is None:
            return
        if threading.current_thread() is thread:
            # Called from a broker callback: the loop finishes once this callback returns.
            loop.stop()
        elif thread.is_alive():
            with contextlib.suppress(Exception):
                loop.call(loop.stop).result(_CALL_TIMEOUT)
            thread.join(_CALL_TIMEOUT)
        self._thread = None
        self._handler = None
        self._loop = None

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- information and fault injection -----------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port the broker listens on (known once started)."""
        if self._port is None:
            raise RuntimeError("broker not started")
        return self._port

    @property
    def connection_string(self) -> str:
        """Emulator-style connection string; the SDK then speaks plain AMQP to this port."""
        host = self.host
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(host).is_unspecified:
                host = "127.0.0.1"
        return (
            f"Endpoint=sb://{host}:{self.port};SharedAccessKeyName=RootManageSharedAccessKey;"
            "SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;"
        )

    def drop_connections(self) -> int:
        """Abruptly cut every client connection (no AMQP close); returns how many were cut."""
        loop = self._loop
        if loop is None:
            return 0
        return int(self._call(loop.drop_connections))

    def refuse_sends(self, entity: str, condition: str, description: str = "", times: int | None = None) -> None:
        """Reject transfers to ``entity`` with an AMQP error ``condition`` (``times`` of them, or until cleared).

        The SDK maps the condition to its exception class as it does for Azure, e.g.
        ``com.microsoft:server-busy`` → ``ServiceBusServerBusyError``, ``amqp:unauthorized-access`` →
        ``ServiceBusAuthorizationError``. :meth:`clear_faults` ends every injected refusal.
        """
        fault = SendFault(condition, description or f"{condition} (injected by the local broker)", times)
        self._call(lambda: self.state.send_faults.__setitem__(normalize_address(entity), fault))

    def clear_faults(self) -> None:
        """End every refusal injected with :meth:`refuse_sends`."""
        self._call(self.state.send_faults.clear)

    def message_counts(self, entity: str) -> dict[str, int]:
        """Counts for a queue, topic, subscription (``topic/Subscriptions/sub``) or DLQ path.

        Keys: ``active`` (includes ``locked``), ``locked``, ``deferred``, ``dead_letter``,
        ``scheduled``. A topic reports the sum over its subscriptions. Raises ``KeyError`` for an
        unknown entity.
        """
        return self._call(lambda: self.state.counts(entity))

    def _call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on the event thread when it is running, else directly."""
        loop = self._loop
        thread = self._thread
        if loop is None or thread is None or not thread.is_alive():
            return fn()
        if threading.current_thread() is thread:
            return fn()
        result: _T = loop.call(fn).result(_CALL_TIMEOUT)
        return result
