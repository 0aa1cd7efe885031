"""Noticing a silent connection: a half-open TCP connection must not hang the worker forever.

An idle NAT or load-balancer timeout leaves a connection that is open on our side and on which no
byte ever arrives again, and the pinned SDK (azure-servicebus 7.15, pyAMQP) neither closes it nor
errors: what each call does then, what was measured and what is left is in the manual
(``docs/operations.md``, "Network faults and half-open connections").

The SDK's connection idle timeout is not reachable through its public API. What this module uses:

1. ``try_timeout`` on the client (public since 7.15): bounds each send attempt and management
   operation (but, on the sync client, not a blocking handshake);
2. a cheap management round trip on the receiver's own connection (``peek_messages``) that proves
   the connection alive: :class:`SilenceWatch` asks for it when the receiver has been quiet for
   ``probe_after`` seconds and before settling on a receiver not heard from for that long;
3. a :class:`Watchdog` that shuts down the socket under any SDK call outliving its deadline, so
   the blocked call fails like a dropped connection would. The socket is private to the SDK
   (:func:`adapters.servicebus.internals.connection_socket`); if it moves, that guard logs a
   WARNING and the bounds of 1 and 2 remain.

Whatever fails, the adapter drops the sender or receiver and the next call opens a new connection.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TypeAlias

from azure.servicebus import ServiceBusReceiver, ServiceBusSender
from azure.servicebus.exceptions import ServiceBusError

from adapters.servicebus.internals import connection_socket
from worker.service.redaction import redact

#: What has a connection the watchdog can abort: an SDK receiver or sender.
HandlerOwner: TypeAlias = ServiceBusReceiver | ServiceBusSender

log = logging.getLogger(__name__)

#: Default of :attr:`Liveness.try_timeout`.
DEFAULT_TRY_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Liveness:
    """Bounds on how long a silent connection may go unnoticed."""

    #: Seconds one SDK attempt may take (send, link open, management operation); the SDK's ``try_timeout``.
    try_timeout: float = DEFAULT_TRY_TIMEOUT
    #: Seconds without hearing from the receiver's connection before its liveness is checked.
    probe_after: float = 15.0


class SilentConnectionError(Exception):
    """The receiver's connection did not answer a liveness check in time."""


class SilenceWatch:
    """Tracks when the receiver's connection last proved alive, and checks it when that is too long ago.

    Anything the connection answers counts (a receive that brought messages, a link opened, a lock
    renewal, a settlement), not only the peek: a management link busy answering other requests is
    not a silent connection, so a peek that times out while something else on the connection was
    answered is not taken for silence.
    """

    def __init__(self, liveness: Liveness) -> None:
        self.liveness = liveness
        #: Aborts the connection under a call that outlives :meth:`budget`.
        self.watchdog = Watchdog(repeat=liveness.try_timeout)
        self.probes = 0
        self.silences = 0
        #: Peeks that failed while the connection answered something else: not silence.
        self.crowded = 0
        #: Wraps each peek (the source serialises every management request on its connection).
        self.around: Callable[[ServiceBusReceiver], AbstractContextManager[object]] = lambda _: contextlib.nullcontext()
        self._heard = time.monotonic()

    def heard(self) -> None:
        """The connection just answered (messages arrived, a link opened, a probe or a renewal succeeded)."""
        self._heard = time.monotonic()

    @property
    def last_heard(self) -> float:
        """``time.monotonic()`` when the connection last answered."""
        return self._heard

    def budget(self, wait: float = 0.0) -> float:
        """The longest an SDK call that waits ``wait`` seconds by design may take before it is aborted."""
        return wait + 2 * self.liveness.try_timeout

    def due(self) -> bool:
        """True when the connection has been quiet for ``probe_after`` seconds."""
        return time.monotonic() - self._heard >= self.liveness.probe_after

    def check(self, receiver: ServiceBusReceiver) -> None:
        """Prove the connection alive with one peek (a management round trip), or raise SilentConnectionError."""
        self.probes += 1
        started = time.monotonic()
        try:
            with self.around(receiver), self.watchdog.deadline(self.budget(), receiver):
                receiver.peek_messages(max_message_count=1, timeout=self.liveness.try_timeout)
        except (ServiceBusError, ValueError, AttributeError, OSError) as exc:
            # ValueError/AttributeError: the SDK shut the handler down under us; the connection is gone either way.
            if self._heard > started:
                self.crowded += 1
                log.info("Liveness peek failed while the connection answered other requests: %s", redact(str(exc)))
                return
            self.silences += 1
            raise SilentConnectionError(
                f"the connection did not answer a liveness check within {self.liveness.try_timeout:g}s: "
                f"{redact(str(exc))}"
            ) from None
        self.heard()


def abort_connection(handler_owner: HandlerOwner) -> bool:
    """Shut down the socket under an SDK sender or receiver, waking any call blocked on it; False without one."""
    sock = connection_socket(handler_owner)
    if sock is None:
        return False
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    return True


class Watchdog:
    """Aborts the connection under an SDK call that outlives its deadline (one daemon thread, started lazily).

    A call still running after its deadline is aborted again every ``repeat`` seconds: the SDK may
    retry on a new connection that is just as silent.
    """

    def __init__(self, repeat: float, interval: float = 0.25) -> None:
        self.repeat = repeat
        self.interval = interval
        self.aborts = 0
        self._armed: dict[int, tuple[float, HandlerOwner]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned = False

    @contextlib.contextmanager
    def deadline(self, seconds: float, handler_owner: HandlerOwner) -> Iterator[None]:
        """Abort ``handler_owner``'s connection if the block is still running after ``seconds``."""
        token = object()
        with self._lock:
            self._armed[id(token)] = (time.monotonic() + seconds, handler_owner)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="servicebus-watchdog", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._armed.pop(id(token), None)

    def close(self) -> None:
        """Stop the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            with self._lock:
                due = [(key, owner) for key, (at, owner) in self._armed.items() if at <= now]
                for key, owner in due:
                    self._armed[key] = (now + self.repeat, owner)
            for _, owner in due:
                self._abort(owner)

    def _abort(self, owner: HandlerOwner) -> None:
        if abort_connection(owner):
            self.aborts += 1
            log.warning("A Service Bus call outlived its deadline on a silent connection; aborting the connection")
        elif not self._warned:
            self._warned = True
            log.warning("A Service Bus call outlived its deadline and its connection could not be aborted")
