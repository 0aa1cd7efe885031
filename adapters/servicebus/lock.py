"""Keeping the locks of in-flight messages alive while the pump works on them (or holds them)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from azure.servicebus import ServiceBusReceivedMessage, ServiceBusReceiver
from azure.servicebus.exceptions import MessageAlreadySettled, MessageLockLostError, ServiceBusError

from adapters.sdk_guards import SdkSurfaceMissing
from adapters.servicebus.internals import renew_locks
from worker.service.redaction import redact

log = logging.getLogger(__name__)

#: Lock tokens per management request (renewal or settlement): a few KB on the wire.
MAX_TOKENS_PER_REQUEST = 500

#: Renews a group of locks in one request (raises like :func:`adapters.servicebus.internals.renew_locks`).
Renew = Callable[[ServiceBusReceiver, Sequence[ServiceBusReceivedMessage]], None]

#: What a renewal may raise that concerns its messages or its connection, not the keeper.
#: AttributeError/TypeError: the SDK tearing the handler down under a concurrent close (seen through
#: a blackholed connection: "'NoneType' object has no attribute 'close'").
_RENEWAL_ERRORS = (ServiceBusError, MessageAlreadySettled, ValueError, AttributeError, TypeError, OSError)


def _default_renew(receiver: ServiceBusReceiver, messages: Sequence[ServiceBusReceivedMessage]) -> None:
    renew_locks(receiver, messages, timeout=None)


class LockKeeper:
    """Renews the locks of in-flight messages from one background thread, many locks per request.

    Wakes every ``interval`` seconds and renews the locks that expire within ``margin`` seconds, in
    requests of up to ``batch`` lock tokens (Service Bus's ``renew-lock`` takes an array): on a 5 s
    lock every held lock is due every round, and 4,000 renewals one by one took longer than the lock
    (and spent the SDK's management-link credit, see :mod:`adapters.servicebus.internals`). A request
    refused because one of its locks is gone is retried one by one to find it; a request that fails
    on the connection keeps its messages held while their locks may still be alive (the source
    settles them by lock token on its next connection). Locks are held for up to ``max_duration``
    (an hour by default) so that a downstream outage, during which the pump holds its batch and
    retries, does not burn delivery counts.

    ``renew`` renews one group (default: on the receiver the message was held with); the source
    passes one that renews on its current connection, whatever link the messages came on.
    """

    def __init__(
        self,
        margin: float = 10.0,
        max_duration: float = 3600.0,
        interval: float = 1.0,
        *,
        batch: int = MAX_TOKENS_PER_REQUEST,
        renew: Renew | None = None,
    ) -> None:
        self.margin = margin
        self.max_duration = max_duration
        self.interval = interval
        self.batch = batch
        self.renew: Renew = renew or _default_renew
        #: Locks renewed, renewal requests sent, and rounds that renewed anything.
        self.renewals = 0
        self.requests = 0
        self.rounds = 0
        #: Locks given up (lost, settled elsewhere, or expired while the connection was down).
        self.failures = 0
        #: Renewal requests that failed on the connection (their messages stay held).
        self.request_failures = 0
        self._held: dict[int, tuple[ServiceBusReceiver, ServiceBusReceivedMessage, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bulk = True

    def hold(self, receiver: ServiceBusReceiver, messages: Sequence[ServiceBusReceivedMessage]) -> None:
        """Keep these messages' locks alive until :meth:`release`."""
        now = time.monotonic()
        with self._lock:
            for message in messages:
                self._held[id(message)] = (receiver, message, now)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="servicebus-lock-keeper", daemon=True)
            self._thread.start()

    def release(self, message: ServiceBusReceivedMessage) -> None:
        """Stop renewing (the message was settled)."""
        with self._lock:
            self._held.pop(id(message), None)

    @property
    def held(self) -> int:
        """How many locks are kept alive now."""
        return len(self._held)

    def close(self) -> None:
        """Stop the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.renew_due()
            except Exception:  # the keeper must outlive any surprise: a dead keeper renews nothing again
                log.exception("Lock renewal round failed; retrying in %.1f s", self.interval)

    def renew_due(self) -> None:
        """Renew every held lock expiring within the margin (and not held longer than max_duration)."""
        with self._lock:
            held = list(self._held.values())
        now = datetime.now(UTC)
        deadline = now + timedelta(seconds=self.margin)
        due: dict[int, tuple[ServiceBusReceiver, list[ServiceBusReceivedMessage]]] = {}
        for receiver, message, since in held:
            if time.monotonic() - since > self.max_duration:
                self.release(message)
                continue
            locked_until = message.locked_until_utc
            if locked_until is None or locked_until > deadline:
                continue
            if locked_until <= now:
                self._give_up(message, "its lock expired before it could be renewed")
                continue
            due.setdefault(id(receiver), (receiver, []))[1].append(message)
        if not due:
            return
        self.rounds += 1
        for receiver, messages in due.values():
            for start in range(0, len(messages), self.batch):
                self._renew_group(receiver, messages[start : start + self.batch])

    def _renew_group(self, receiver: ServiceBusReceiver, messages: list[ServiceBusReceivedMessage]) -> None:
        if self._bulk or len(messages) == 1:
            try:
                self.requests += 1
                self.renew(receiver, messages)
                self.renewals += len(messages)
                return
            except SdkSurfaceMissing:
                # Fails closed (the guard said so, once per process): the public API, one lock per request.
                self._bulk = False
            except MessageLockLostError:
                if len(messages) == 1:
                    self._give_up(messages[0], "its lock was lost")
                    return
                # One lock of the group is gone: find which, one request each.
            except _RENEWAL_ERRORS as exc:
                self.request_failures += 1
                log.info("Lock renewal of %d messages failed; retrying next round: %s", len(messages), redact(str(exc)))
                return
        for message in messages:
            self._renew_one(receiver, message)

    def _renew_one(self, receiver: ServiceBusReceiver, message: ServiceBusReceivedMessage) -> None:
        try:
            self.requests += 1
            if self._bulk:
                self.renew(receiver, [message])
            else:
                receiver.renew_message_lock(message)
            self.renewals += 1
        except (MessageLockLostError, MessageAlreadySettled, SdkSurfaceMissing) as exc:
            self._give_up(message, f"{type(exc).__name__}: {redact(str(exc))}")
        except _RENEWAL_ERRORS as exc:
            self.request_failures += 1
            log.info("Lock renewal failed for %s; retrying next round: %s", message.message_id, redact(str(exc)))

    def _give_up(self, message: ServiceBusReceivedMessage, why: str) -> None:
        self.failures += 1
        log.info("Lock of %s no longer renewed: %s", message.message_id, why)
        self.release(message)
