"""The request source: a PEEK_LOCK receiver with prefetch; settles as the pump decides."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime

from azure.servicebus import ServiceBusClient, ServiceBusReceivedMessage, ServiceBusReceiveMode, ServiceBusReceiver
from azure.servicebus.exceptions import (
    MessageAlreadySettled,
    MessageLockLostError,
    MessageNotFoundError,
    ServiceBusError,
    SessionLockLostError,
)

from adapters.sdk_guards import SdkSurfaceMissing
from adapters.servicebus.convert import to_delivery
from adapters.servicebus.internals import (
    connection_socket,
    keep_unreturned_on_failure,
    renew_locks,
    set_receive_linger,
    settle_by_lock_token,
    stop_keep_alive,
    top_up_management_credit,
)
from adapters.servicebus.liveness import Liveness, SilenceWatch, SilentConnectionError
from adapters.servicebus.lock import MAX_TOKENS_PER_REQUEST, LockKeeper
from adapters.servicebus.settle import RangeSettlement, on_current_link, received_message, stamp_link
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

#: Management requests on one connection after which, when the SDK's link credit cannot be topped up
#: (:func:`~adapters.servicebus.internals.top_up_management_credit`), the receiver is rebuilt: pyAMQP grants
#: 10,000 and never more.
MANAGEMENT_REQUESTS_PER_CONNECTION = 9000

#: The SDK's settle methods and their names as management-link dispositions.
_TOKEN_ACTIONS = {"complete_message": "complete", "abandon_message": "abandon", "dead_letter_message": "dead-letter"}

#: What the SDK raises when the broker no longer holds a lock (or the message) for us.
_LOCK_GONE = (MessageLockLostError, SessionLockLostError, MessageAlreadySettled, MessageNotFoundError)


def widen_read_slice(receiver: ServiceBusReceiver, seconds: float) -> bool:
    """Make the receiver's socket reads wait up to ``seconds``; False without a socket to reach.

    Without it (not connected, or the connection socket guard tripped) a closing receiver releases
    only what crossed the link within two linger-short reads.
    """
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
        #: Renews held locks in bulk on the current connection, whatever link each message came on.
        self.locks = lock_keeper or LockKeeper()
        self.locks.renew = self._renew
        #: Notices a silent (half-open) connection; see :mod:`adapters.servicebus.liveness`.
        self.watch = SilenceWatch(liveness or Liveness())
        self.watch.around = self._management
        self._receiver: ServiceBusReceiver | None = None
        #: True until the receiver returned from its first receive (that receive opens the link).
        self._fresh = True
        #: One SDK call at a time on the receiver (receives, settlements, renewals, liveness peeks),
        #: and making or dropping it: the SDK's handler is not thread-safe, and the lock keeper's
        #: thread renews on it (and may open it) between the pump's calls. A renewal waits for at
        #: most one receive.
        self._receiver_lock = threading.RLock()
        self._management_requests = 0
        self._top_up = True
        self._recycle = False
        #: ``time.monotonic()`` of the last settlement by lock token that failed on the connection:
        #: none is tried again until the connection has answered since (an outage must not cost a
        #: connection attempt per held message).
        self._token_failed_at: float | None = None
        self.reconnects = 0
        #: Messages settled by lock token over the management link (received on a replaced link).
        self.settled_by_token = 0
        #: Messages a broken receive had already taken delivery of, returned by the next receive.
        self._kept: list[ServiceBusReceivedMessage] = []
        self.kept_from_broken_receives = 0
        #: True while this source closes a receiver itself (the SDK then releases what it buffered).
        self._closing = False
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
        with self._receiver_lock:
            if self._receiver is None:
                receiver = self._client.get_queue_receiver(
                    self.queue_name,
                    receive_mode=ServiceBusReceiveMode.PEEK_LOCK,
                    prefetch_count=self.prefetch,
                    socket_timeout=None if self.linger is None else max(MIN_READ_SLICE, self.linger),
                )
                if self.linger is not None:
                    set_receive_linger(receiver, self.linger)
                with contextlib.suppress(SdkSurfaceMissing):  # the guard said so; such messages wait out their locks
                    keep_unreturned_on_failure(receiver, lambda: not self._closing, self._keep_from(receiver))
                with contextlib.suppress(SdkSurfaceMissing):  # the guard said so: the SDK's thread reads too
                    stop_keep_alive(receiver)
                self._receiver, self._fresh, self._management_requests = receiver, True, 0
            return self._receiver

    def _drop_receiver(self) -> None:
        with self._receiver_lock:
            receiver, self._receiver = self._receiver, None
            if receiver is not None:
                self.reconnects += 1
                self._closing = True
                try:
                    receiver.close()
                except Exception as exc:  # closing a broken link may fail in many ways; none matter
                    log.debug("Ignoring error while closing a broken receiver: %s", redact(str(exc)))
                finally:
                    self._closing = False

    def _keep_from(self, receiver: ServiceBusReceiver) -> Callable[[list[ServiceBusReceivedMessage]], None]:
        """Keeps messages stamped with ``receiver``'s dying link: settled by lock token, never by delivery id."""

        def keep(messages: list[ServiceBusReceivedMessage]) -> None:
            stamp_link(receiver, messages)
            self._keep(messages)

        return keep

    def _keep(self, messages: list[ServiceBusReceivedMessage]) -> None:
        """Messages delivered to a receive that broke: the next receive returns them (settled by lock token)."""
        log.info("Keeping %d messages a broken receive had already taken delivery of", len(messages))
        if self._receiver is not None:
            # Renewed from now on: the pump may be holding a batch and not receive for a while.
            self.locks.hold(self._receiver, messages)
        self._kept.extend(messages)
        self.kept_from_broken_receives += len(messages)

    def receive(self, max_messages: int, max_wait: float) -> Sequence[Delivery]:
        """Up to ``max_messages`` deliveries; raises ``TransientError`` when the broker is unreachable."""
        with self._receiver_lock:
            return self._receive(max_messages, max_wait)

    def _receive(self, max_messages: int, max_wait: float) -> Sequence[Delivery]:
        if self._kept:
            kept, self._kept = self._kept[:max_messages], self._kept[max_messages:]
            self.locks.hold(self._receiver or self._get_receiver(), kept)
            return [to_delivery(m) for m in kept]
        if self._recycle:
            self._recycle = False
            log.info("Rebuilding the receiver before its management link runs out of credit")
            self._drop_receiver()
        try:
            receiver = self._get_receiver()
            fresh = self._fresh
            # The SDK opens the link inside the first receive and counts that against max_wait_time; a
            # short wait would time the open out and rebuild the receiver forever.
            wait = max(max_wait, self.link_open_wait) if fresh else max_wait
            with self.watch.watchdog.deadline(self.watch.budget(wait + self.window), receiver):
                messages = receiver.receive_messages(max_message_count=max_messages, max_wait_time=wait)
                # Stamped per call: the SDK may reopen its handler (a new link) between two calls.
                stamp_link(receiver, messages)
                if messages and self.linger is not None:
                    messages = self._gather(receiver, messages, max_messages, self.linger)
            self._fresh = False
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

    # -- management requests on the receiver's connection ------------------------------------

    @contextlib.contextmanager
    def _management(self, receiver: ServiceBusReceiver) -> Iterator[None]:
        """One management request on ``receiver``'s connection: serialised, bounded, and counted as an answer."""
        with self._receiver_lock, self.watch.watchdog.deadline(self.watch.budget(), receiver):
            yield
            self._management_requests += 1
            if self._top_up:
                try:
                    top_up_management_credit(receiver)
                except SdkSurfaceMissing:  # the guard said so: rebuilt every MANAGEMENT_REQUESTS_PER_CONNECTION
                    self._top_up = False
            if not self._top_up and self._management_requests >= MANAGEMENT_REQUESTS_PER_CONNECTION:
                self._recycle = True
        self.watch.heard()

    def _management_receiver(self) -> ServiceBusReceiver:
        """The receiver to send a management request on: the current one, or a new one (not yet linked)."""
        return self._get_receiver()

    def _renew(self, _held_with: ServiceBusReceiver, messages: Sequence[ServiceBusReceivedMessage]) -> None:
        """The lock keeper's renewal: one request for all ``messages``, on the current connection."""
        receiver = self._management_receiver()
        with self._management(receiver):
            renew_locks(receiver, messages, timeout=self.watch.liveness.try_timeout)

    def _settle_by_token(self, messages: Sequence[ServiceBusReceivedMessage], action: str, **kwargs: str) -> None:
        """Settle by lock token over the management link (any link's messages); SettlementLostError if not."""
        now = datetime.now(UTC)
        for message in messages:
            if message.lock_token is None:
                raise SettlementLostError("already settled")
            if message.locked_until_utc is not None and message.locked_until_utc <= now:
                raise SettlementLostError("its lock expired; the broker redelivers it")
        if self._token_failed_at is not None and self.watch.last_heard <= self._token_failed_at:
            raise SettlementLostError("the connection failed and has not answered since; the broker redelivers it")
        try:
            receiver = self._management_receiver()
            with self._management(receiver):
                settle_by_lock_token(
                    receiver,
                    _TOKEN_ACTIONS[action],
                    messages,
                    reason=kwargs.get("reason"),
                    description=kwargs.get("error_description"),
                )
        except SdkSurfaceMissing:  # the guard said so, once per process
            raise SettlementLostError("cannot settle by lock token; the broker redelivers it") from None
        except _LOCK_GONE as exc:
            raise SettlementLostError(f"{type(exc).__name__}: {redact(str(exc))}") from None
        except (ServiceBusError, ValueError, AttributeError, TypeError, OSError) as exc:
            self._token_failed_at = time.monotonic()
            raise SettlementLostError(f"settlement by lock token failed: {redact(str(exc))}") from None
        self.settled_by_token += len(messages)

    def _complete_by_token(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        """Complete messages from replaced links, many per request; returns those not completed."""
        lost: list[Delivery] = []
        for start in range(0, len(deliveries), MAX_TOKENS_PER_REQUEST):
            group = list(deliveries[start : start + MAX_TOKENS_PER_REQUEST])
            for delivery in group:
                self.locks.release(received_message(delivery))
            try:
                self._settle_by_token([received_message(d) for d in group], "complete_message")
                continue
            except SettlementLostError as exc:
                if len(group) == 1:
                    log.info("Message %s was not completed: %s", group[0].message_id, exc)
                    lost.extend(group)
                    continue
            # One lock of the group is gone (or expired): each message reports its own outcome.
            for delivery in group:
                try:
                    self._settle_by_token([received_message(delivery)], "complete_message")
                except SettlementLostError as exc:
                    log.info("Message %s was not completed: %s", delivery.message_id, exc)
                    lost.append(delivery)
        return lost

    # -- settling -------------------------------------------------------------------------------

    def _settle(self, delivery: Delivery, action: str, **kwargs: str) -> None:
        with self._receiver_lock:
            self._settle_locked(delivery, action, **kwargs)

    def _settle_locked(self, delivery: Delivery, action: str, **kwargs: str) -> None:
        message = received_message(delivery)
        receiver = self._live_receiver()
        self.locks.release(message)
        current = None if receiver is None else on_current_link(receiver, message)
        if receiver is None or current is False:
            # Received on a link that has since been replaced: its delivery id means nothing on the
            # new one, its lock token still does while the lock holds.
            self._settle_by_token([message], action, **kwargs)
            return
        if current is None:
            self.ranges.turn_off("cannot tell which AMQP link a message arrived on")
        try:
            with self.watch.watchdog.deadline(self.watch.budget(), receiver):
                getattr(receiver, action)(message, **kwargs)
        except _LOCK_GONE as exc:
            raise SettlementLostError(f"{type(exc).__name__}: {redact(str(exc))}") from None
        except (ServiceBusError, ValueError, AttributeError) as exc:
            # ValueError: the SDK shut the handler down after a connection error ("Failed to complete
            # the message as the handler has already been shutdown"). The link broke under us; the
            # lock did not: settle by lock token on a new connection.
            log.info("%s on the receive link failed (%s); settling by lock token", action, redact(str(exc)))
            self._drop_receiver()
            self._settle_by_token([message], action, **kwargs)
            return
        self.watch.heard()

    def complete(self, delivery: Delivery) -> None:
        """Complete (remove) the message."""
        self._settle(delivery, "complete_message")

    def complete_batch(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        """Complete many; returns those whose lock was lost.

        Messages from the current link are completed a run of consecutive deliveries per disposition
        (:class:`~adapters.servicebus.settle.RangeSettlement`) or else one by one, which is always
        correct; messages from a link that has since been replaced, many per management request by
        lock token.
        """
        with self._receiver_lock:
            return self._complete_batch(deliveries)

    def _complete_batch(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        receiver = self._live_receiver()
        current: list[Delivery] = []
        stale: list[Delivery] = []
        unknown: list[Delivery] = []
        for delivery in deliveries:
            on = None if receiver is None else on_current_link(receiver, received_message(delivery))
            if receiver is None or on is False:
                stale.append(delivery)
            else:
                (current if on else unknown).append(delivery)
        if unknown:
            self.ranges.turn_off("cannot tell which AMQP link a message arrived on")
        left = current
        if receiver is not None and current:
            failures, settlements = self.ranges.failures, self.ranges.settlements
            left = self.ranges.settle(receiver, current)
            if self.ranges.settlements > settlements:
                self.watch.heard()
            if self.ranges.failures > failures:
                # On a silent connection each one-by-one completion would wait 60 s: check it first.
                self._confirm_alive(receiver)
        unsettled = {id(d) for d in left}
        for delivery in current:
            if id(delivery) not in unsettled:
                self.locks.release(received_message(delivery))
        # A failed range may have cost the link: what is no longer on the current one goes by token.
        receiver = self._receiver
        still = [d for d in left if receiver is not None and on_current_link(receiver, received_message(d)) is True]
        kept = {id(d) for d in still}
        stale.extend(d for d in left if id(d) not in kept)
        return complete_each(self.complete, still + unknown) + self._complete_by_token(stale)

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
        with self._receiver_lock:
            receiver, self._receiver = self._receiver, None
            if receiver is not None:
                if self.linger is not None:
                    widen_read_slice(receiver, max(DRAIN_READ_SLICE, self.linger))
                self._closing = True
                try:
                    receiver.close()
                finally:
                    self._closing = False
