"""Keeping the locks of in-flight messages alive while the pump works on them (or holds them)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from azure.servicebus import ServiceBusReceivedMessage, ServiceBusReceiver
from azure.servicebus.exceptions import MessageAlreadySettled, ServiceBusError

from worker.service.redaction import redact

log = logging.getLogger(__name__)


class LockKeeper:
    """Renews the locks of in-flight messages from one background thread.

    The SDK's ``AutoLockRenewer`` re-queues a task per message and spins while any is registered;
    this wakes once a second and renews only the locks that will expire within ``margin`` seconds.
    Locks are held for up to ``max_duration`` (an hour by default) so that a downstream outage,
    during which the pump holds its batch and retries, does not burn delivery counts.
    """

    def __init__(self, margin: float = 10.0, max_duration: float = 3600.0, interval: float = 1.0) -> None:
        self.margin = margin
        self.max_duration = max_duration
        self.interval = interval
        self.renewals = 0
        self.failures = 0
        self._held: dict[int, tuple[ServiceBusReceiver, ServiceBusReceivedMessage, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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
            held = list(self._held.items())
        deadline = datetime.now(UTC) + timedelta(seconds=self.margin)
        for key, (receiver, message, since) in held:
            if time.monotonic() - since > self.max_duration:
                self.release(message)
                continue
            locked_until = message.locked_until_utc
            if locked_until is None or locked_until > deadline:
                continue
            try:
                receiver.renew_message_lock(message)
                self.renewals += 1
            except (ServiceBusError, MessageAlreadySettled, ValueError, AttributeError, TypeError) as exc:
                # AttributeError/TypeError: the SDK tearing the handler down under a concurrent close
                # (seen through a blackholed connection: "'NoneType' object has no attribute 'close'").
                self.failures += 1
                log.info("Lock renewal failed for %s: %s", message.message_id, redact(str(exc)))
                with self._lock:
                    self._held.pop(key, None)
