"""The request source: a PEEK_LOCK receiver with prefetch; settles as the pump decides."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

from azure.servicebus import ServiceBusClient, ServiceBusReceivedMessage, ServiceBusReceiveMode, ServiceBusReceiver
from azure.servicebus.exceptions import (
    MessageAlreadySettled,
    MessageLockLostError,
    ServiceBusError,
    SessionLockLostError,
)

from adapters.servicebus.convert import to_delivery
from adapters.servicebus.liveness import Liveness, SilenceWatch, SilentConnectionError, connection_socket
from adapters.servicebus.lock import LockKeeper
from adapters.servicebus.settle import RangeSettlement, on_current_link, stamp_link
from adapters.settlement import complete_each
from worker.domain.errors import TransientError
from worker.service.ports import Delivery, SettlementLostError
from worker.service.redaction import redact

log = logging.getLogger(__name__)


#: The shortest socket read slice (seconds). The SDK checks the linger only between socket reads, and
#: a read waits up to the receiver's socket timeout for a frame that may never come, so reads are
#: sliced as short as the linger. Reads that time out mid-frame are kept by the SDK, and the TLS
#: handshake runs before the timeout applies.
MIN_READ_SLICE = 0.001

#: The socket read slice while a closing receiver drains its link (the SDK's own default). The SDK
#: stops draining after two reads that bring nothing; in linger-short slices that is before messages
#: already pushed on open credit cross a distant link, and they would stay locked until their lock expires.
DRAIN_READ_SLICE = 0.2


def set_linger(receiver: ServiceBusReceiver, seconds: float) -> bool:
    """Set how long a receive waits for more messages after the first; False (with a WARNING) if it cannot.

    The pinned SDK has no public option for it: it is the receiver's ``_further_pull_receive_timeout``.
    When an SDK upgrade renames it, receiving still works, with the SDK's 0.2 s.
    """
    if not isinstance(getattr(receiver, "_further_pull_receive_timeout", None), int | float):
        log.warning("Receive linger not set: the Service Bus SDK's internals changed; receives wait 0.2 s for more")
        return False
    receiver._further_pull_receive_timeout = seconds
    return True


def widen_read_slice(receiver: Any, seconds: float) -> bool:
    """Make the receiver's socket reads wait up to ``seconds``; False without a socket to reach."""
    sock = connection_socket(receiver)
    if sock is None:
        return False
    with contextlib.suppress(OSError):
        sock.settimeout(seconds)
    return True


class ServiceBusSource:
    """Receives request batches in PEEK_LOCK with prefetch; settles as the pump decides."""

    def __init__(
        self,
        client: ServiceBusClient,
        queue_name: str,
        *,
        prefetch: int = 0,
        lock_keeper: LockKeeper | None = None,
        liveness: Liveness | None = None,
        range_settlement: RangeSettlement | None = None,
        linger: float | None = None,
        window: float = 0.0,
    ) -> None:
        self._client = client
        self.queue_name = queue_name
        self.prefetch = prefetch
        self.locks = lock_keeper or LockKeeper()
        #: Notices a silent (half-open) connection; see :mod:`adapters.servicebus.liveness`.
        self.watch = SilenceWatch(liveness or Liveness())
        self._receiver: ServiceBusReceiver | None = None
        self.reconnects = 0
        #: Seconds the first receive on a new link may take (it includes opening the link).
        self.link_open_wait = 10.0
        #: Settles consecutive completions with one AMQP disposition (see :meth:`complete_batch`).
        self.ranges = range_settlement or RangeSettlement()
        #: Seconds a receive waits for the next message before returning what it has (None: the SDK's
        #: 0.2 s after the first message, however many follow). With a linger a receive returns as soon
        #: as messages stop coming, and keeps gathering for up to ``window`` seconds while they keep
        #: coming: a trickle is answered at once, a backlog still comes in full batches.
        self.linger = linger
        #: Seconds a batch keeps gathering after its first message (with a linger): bounds what
        #: gathering adds to a request's latency when messages arrive just faster than the linger.
        self.window = window if linger is not None else 0.0

    def _get_receiver(self) -> ServiceBusReceiver:
        if self._receiver is None:
            self._receiver = self._client.get_queue_receiver(
                self.queue_name,
                receive_mode=ServiceBusReceiveMode.PEEK_LOCK,
                prefetch_count=self.prefetch,
                socket_timeout=None if self.linger is None else max(MIN_READ_SLICE, self.linger),
            )
            if self.linger is not None:
                set_linger(self._receiver, self.linger)
        return self._receiver

    def _drop_receiver(self) -> None:
        receiver, self._receiver = self._receiver, None
        if receiver is not None:
            self.reconnects += 1
            try:
                receiver.close()
            except Exception as exc:  # closing a broken link may fail in many ways; none matter
                log.debug("Ignoring error while closing a broken receiver: %s", redact(str(exc)))

    def receive(self, max_messages: int, max_wait: float) -> Sequence[Delivery]:
        """Up to ``max_messages`` deliveries; raises ``TransientError`` when the broker is unreachable."""
        try:
            fresh = self._receiver is None
            receiver = self._get_receiver()
            # The SDK opens the link inside the first receive and counts that against max_wait_time; a
            # short wait would time the open out and rebuild the receiver forever.
            wait = max(max_wait, self.link_open_wait) if fresh else max_wait
            with self.watch.watchdog.deadline(self.watch.budget(wait + self.window), receiver):
                messages = receiver.receive_messages(max_message_count=max_messages, max_wait_time=wait)
                # Stamped per call: the SDK may reopen its handler (a new link) between two calls.
                stamp_link(receiver, messages)
                if messages and self.linger is not None:
                    messages = self._gather(receiver, messages, max_messages, self.linger)
            self._check_silence(receiver, heard=bool(messages) or fresh)
        except (ServiceBusError, SilentConnectionError) as exc:
            self._drop_receiver()
            raise TransientError(f"receive from {self.queue_name!r} failed: {redact(str(exc))}") from None
        if messages:
            self.locks.hold(receiver, messages)
        return [to_delivery(m) for m in messages]

    def _gather(
        self, receiver: ServiceBusReceiver, messages: list[ServiceBusReceivedMessage], max_messages: int, linger: float
    ) -> list[ServiceBusReceivedMessage]:
        """Keep receiving while each wait of one linger brings more, up to ``window`` after the first message.

        Each call asks for what the batch still lacks: the link credit granted by the first call stands,
        so a backlog streams in without another round trip.
        """
        end = time.monotonic() + self.window
        while len(messages) < max_messages and (left := end - time.monotonic()) > 0:
            more = receiver.receive_messages(
                max_message_count=max_messages - len(messages), max_wait_time=max(MIN_READ_SLICE, min(linger, left))
            )
            if not more:
                break
            stamp_link(receiver, more)
            messages.extend(more)
        return messages

    def _check_silence(self, receiver: ServiceBusReceiver, *, heard: bool) -> None:
        """Raise SilentConnectionError when a receiver quiet for too long fails its liveness check."""
        if heard:
            self.watch.heard()
        elif self.watch.due():
            self.watch.check(receiver)

    def _live_receiver(self) -> ServiceBusReceiver | None:
        """The receiver to settle on, or None once a silent connection was detected and dropped.

        Settling on a silent connection waits 60 s per message in the SDK; check first when quiet.
        """
        receiver = self._receiver
        if receiver is not None and self.watch.due():
            self._confirm_alive(receiver)
        return self._receiver

    def _confirm_alive(self, receiver: ServiceBusReceiver) -> None:
        """Check the receiver's connection now; drop the receiver when it is silent."""
        try:
            self.watch.check(receiver)
        except SilentConnectionError as exc:
            log.warning("Receiver connection is silent; rebuilding it: %s", exc)
            self._drop_receiver()

    def _settle(self, delivery: Delivery, action: str, **kwargs: Any) -> None:
        message: ServiceBusReceivedMessage = delivery.handle
        receiver = self._live_receiver()
        self.locks.release(message)
        if receiver is None:
            raise SettlementLostError("the receiver was rebuilt after a connection loss; the lock is gone")
        if not on_current_link(receiver, message):
            raise SettlementLostError("received on a link that has since been replaced; the broker redelivers it")
        try:
            with self.watch.watchdog.deadline(self.watch.budget(), receiver):
                getattr(receiver, action)(message, **kwargs)
        except (MessageLockLostError, SessionLockLostError, MessageAlreadySettled) as exc:
            raise SettlementLostError(f"{type(exc).__name__}: {redact(str(exc))}") from None
        except (ServiceBusError, ValueError, AttributeError) as exc:
            # ValueError: the SDK shut the handler down after a connection error ("Failed to complete
            # the message as the handler has already been shutdown").
            # The link broke under us: the lock dies with it and the broker will redeliver.
            self._drop_receiver()
            raise SettlementLostError(f"{action} failed, connection lost: {redact(str(exc))}") from None
        self.watch.heard()

    def complete(self, delivery: Delivery) -> None:
        """Complete (remove) the message."""
        self._settle(delivery, "complete_message")

    def complete_batch(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        """Complete many, each run of consecutive deliveries by one disposition if possible; returns those lost.

        What :class:`~adapters.servicebus.settle.RangeSettlement` does not settle is completed one by
        one, which is always correct.
        """
        receiver = self._live_receiver()
        if receiver is None:
            return complete_each(self.complete, deliveries)
        failures, settlements = self.ranges.failures, self.ranges.settlements
        # Only messages that came on the current link may share a range (delivery ids restart on a new
        # one); the others are reported lost by ``complete`` below.
        current: list[Delivery] = []
        stale: list[Delivery] = []
        for delivery in deliveries:
            (current if on_current_link(receiver, delivery.handle) else stale).append(delivery)
        left = stale + self.ranges.settle(receiver, current)
        if self.ranges.settlements > settlements:
            self.watch.heard()
        if self.ranges.failures > failures:
            # On a silent connection each one-by-one completion would wait 60 s: check it first.
            self._confirm_alive(receiver)
        unsettled = {id(d) for d in left}
        for delivery in deliveries:
            if id(delivery) not in unsettled:
                self.locks.release(delivery.handle)
        return complete_each(self.complete, left)

    def dead_letter(self, delivery: Delivery, reason: str, description: str) -> None:
        """Dead-letter with ``DeadLetterReason`` and ``DeadLetterErrorDescription``."""
        self._settle(delivery, "dead_letter_message", reason=reason, error_description=description)

    def abandon(self, delivery: Delivery) -> None:
        """Release the lock so the message is redelivered (its delivery count goes up)."""
        self._settle(delivery, "abandon_message")

    def close(self) -> None:
        """Stop renewing locks and close the receiver."""
        self.locks.close()
        self.watch.watchdog.close()
        receiver, self._receiver = self._receiver, None
        if receiver is not None:
            if self.linger is not None:
                widen_read_slice(receiver, max(DRAIN_READ_SLICE, self.linger))
            receiver.close()
