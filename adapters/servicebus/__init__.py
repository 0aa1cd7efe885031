"""Azure Service Bus adapters: the request source (PEEK_LOCK receiver) and the event publisher.

SDK exceptions are translated into ours here, at the boundary: a failed receive or publish is a
:class:`~worker.domain.errors.TransientError` (the pump backs off and retries; the receiver is rebuilt so a
broker that went away is reconnected), and a settlement refused because the lock was lost or the
message was already settled is a :class:`~worker.service.ports.SettlementLostError` (logged and counted, never
fatal — the broker redelivers). Exception text is passed through :func:`worker.service.redaction.redact`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.servicebus import (
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusReceivedMessage,
    ServiceBusReceiveMode,
    ServiceBusReceiver,
    ServiceBusSender,
)
from azure.servicebus.amqp import AmqpMessageBodyType
from azure.servicebus.exceptions import (
    MessageAlreadySettled,
    MessageLockLostError,
    MessageSizeExceededError,
    ServiceBusError,
    SessionLockLostError,
)

from adapters.servicebus.liveness import DEFAULT_TRY_TIMEOUT, Liveness, SilenceWatch, SilentConnectionError
from adapters.settlement import complete_each
from worker.domain.errors import TransientError
from worker.service.ports import Delivery, OutboundEvent, SettlementLostError
from worker.service.redaction import redact

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServiceBusAuth:
    """How to reach the namespace: a connection string, or a namespace plus an Azure credential."""

    connection_string: str | None = None
    namespace: str | None = None

    def __repr__(self) -> str:
        # Never let the connection string reach a log line through a repr.
        secret = "***" if self.connection_string else None
        return f"ServiceBusAuth(namespace={self.namespace!r}, connection_string={secret})"


#: The SDK client the source and publisher share, named here so the composition root need not import the SDK.
Client = ServiceBusClient


def create_client(
    auth: ServiceBusAuth,
    *,
    retry_total: int = 3,
    retry_backoff_max: float = 10.0,
    try_timeout: float | None = DEFAULT_TRY_TIMEOUT,
) -> ServiceBusClient:
    """A ``ServiceBusClient`` from a connection string, or ``DefaultAzureCredential`` on a namespace.

    ``try_timeout`` bounds each SDK attempt (see :mod:`adapters.servicebus.liveness`): without it a
    send on a silent connection waits forever.
    """
    options: dict[str, Any] = {
        "retry_total": retry_total,
        "retry_backoff_factor": 0.5,
        "retry_backoff_max": retry_backoff_max,
    }
    if try_timeout is not None:
        options["try_timeout"] = try_timeout
    if auth.connection_string:
        return ServiceBusClient.from_connection_string(auth.connection_string, **options)
    if auth.namespace:
        from azure.identity import DefaultAzureCredential

        namespace = auth.namespace if "." in auth.namespace else f"{auth.namespace}.servicebus.windows.net"
        return ServiceBusClient(namespace, DefaultAzureCredential(), **options)
    raise ValueError(
        "Service Bus is not configured: set AB_WORKER_SERVICEBUS_CONNECTION_STRING or AB_WORKER_SERVICEBUS_NAMESPACE"
    )


def _text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def message_body(message: ServiceBusReceivedMessage) -> bytes:
    """The body as bytes, whatever AMQP body type the publisher used."""
    body_type = message.body_type
    if body_type == AmqpMessageBodyType.DATA:
        return b"".join(message.body)
    value = message.body
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value, default=str).encode("utf-8")


def to_delivery(message: ServiceBusReceivedMessage) -> Delivery:
    """Our view of a received message; the SDK object rides along as ``handle`` for settlement."""
    properties = {_text(k): _text(v) for k, v in (message.application_properties or {}).items()}
    return Delivery(
        body=message_body(message),
        message_id=str(message.message_id) if message.message_id is not None else f"seq-{message.sequence_number}",
        correlation_id=message.correlation_id,
        content_type=message.content_type,
        application_properties=properties,
        enqueued_time=message.enqueued_time_utc,
        delivery_count=message.delivery_count or 0,
        reply_to=message.reply_to,
        reply_to_session_id=message.reply_to_session_id,
        handle=message,
    )


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
            self.renew_due()

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
            except (ServiceBusError, MessageAlreadySettled, ValueError) as exc:
                self.failures += 1
                log.info("Lock renewal failed for %s: %s", message.message_id, redact(str(exc)))
                with self._lock:
                    self._held.pop(key, None)


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
        #: Settle consecutive completions with one AMQP disposition (see :meth:`complete_batch`).
        self.range_settlement = True
        self.range_settlements = 0

    def _get_receiver(self) -> ServiceBusReceiver:
        if self._receiver is None:
            self._receiver = self._client.get_queue_receiver(
                self.queue_name, receive_mode=ServiceBusReceiveMode.PEEK_LOCK, prefetch_count=self.prefetch
            )
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
            with self.watch.watchdog.deadline(self.watch.budget(wait), receiver):
                messages = receiver.receive_messages(max_message_count=max_messages, max_wait_time=wait)
            self._check_silence(receiver, heard=bool(messages) or fresh)
        except (ServiceBusError, SilentConnectionError) as exc:
            self._drop_receiver()
            raise TransientError(f"receive from {self.queue_name!r} failed: {redact(str(exc))}") from None
        if messages:
            _stamp_link(receiver, messages)
            self.locks.hold(receiver, messages)
        return [to_delivery(m) for m in messages]

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
        if not _on_current_link(receiver, message):
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
        """Complete many messages, settling each run of consecutive deliveries with one disposition.

        The SDK completes one message per round trip and waits for the broker's answer each time;
        an AMQP disposition may cover a range of delivery ids, which is 3-4x faster here. This uses
        the pinned SDK's internals (``_handler.settle_messages`` with a ``(first, last)`` range), so
        any surprise falls back to completing one by one, which is always correct.
        """
        receiver = self._live_receiver()
        messages: list[ServiceBusReceivedMessage] = [d.handle for d in deliveries]
        if receiver is None or not self.range_settlement or len(messages) < 2:
            return complete_each(self.complete, deliveries)
        # Only messages that came on the current link may share a range: delivery ids restart on a new one.
        remaining = [d for d in deliveries if not _on_current_link(receiver, d.handle)]
        current = [d for d in deliveries if _on_current_link(receiver, d.handle)]
        for run in _consecutive_runs(current):
            if len(run) < 2 or not self._settle_range(receiver, [d.handle for d in run]):
                remaining.extend(run)
        return complete_each(self.complete, remaining)

    def _settle_range(self, receiver: ServiceBusReceiver, run: list[ServiceBusReceivedMessage]) -> bool:
        now = datetime.now(UTC)
        if any(m._settled or (m.locked_until_utc is not None and m.locked_until_utc <= now) for m in run):
            return False
        try:
            receiver._handler.settle_messages(
                (run[0]._delivery_id, run[-1]._delivery_id),
                run[0]._delivery_tag,
                "accepted",
                await_outcome=True,
                outcome_timeout=self.watch.liveness.try_timeout,
            )
        except Exception as exc:  # any failure: settle these one by one instead, which reports each
            log.info("Range settlement failed (%s); completing one by one", redact(str(exc)))
            # On a silent connection each one-by-one completion would wait 60 s: check it first.
            self._confirm_alive(receiver)
            return False
        for message in run:
            message._settled = True
            self.locks.release(message)
        self.range_settlements += 1
        self.watch.heard()
        return True

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
            receiver.close()


#: Each received message carries the receiver and the SDK handler (its AMQP link) it arrived on.
_LINK_ATTRIBUTE = "_ab_received_on"


def _stamp_link(receiver: ServiceBusReceiver, messages: Sequence[ServiceBusReceivedMessage]) -> None:
    """Remember which link each message arrived on (the SDK reopens its handler, a new link, after errors)."""
    link = (receiver, getattr(receiver, "_handler", None))
    for message in messages:
        setattr(message, _LINK_ATTRIBUTE, link)


def _on_current_link(receiver: ServiceBusReceiver, message: ServiceBusReceivedMessage) -> bool:
    """True when ``message`` arrived on the link ``receiver`` is on now.

    AMQP delivery ids are per link and start again at 0 on a new one: settling a message from an
    earlier link by its delivery id would settle whichever new message holds that id — completing a
    request whose event was never published. Such a message's lock died with its link; the broker
    redelivers it.
    """
    stamped = getattr(message, _LINK_ATTRIBUTE, None)
    if stamped is None:
        return True
    seen_receiver, seen_handler = stamped
    return bool(seen_receiver is receiver and seen_handler is getattr(receiver, "_handler", None))


def _consecutive_runs(deliveries: Sequence[Delivery]) -> list[list[Delivery]]:
    """Split into runs whose AMQP delivery ids are consecutive (one disposition can cover each run)."""
    ordered = sorted(deliveries, key=lambda d: d.handle._delivery_id)
    runs: list[list[Delivery]] = []
    for delivery in ordered:
        if runs and delivery.handle._delivery_id == runs[-1][-1].handle._delivery_id + 1:
            runs[-1].append(delivery)
        else:
            runs.append([delivery])
    return runs


def _properties(values: Mapping[str, str]) -> dict[str | bytes, Any]:
    return dict(values.items())


def to_service_bus_message(event: OutboundEvent, session_id: str | None = None) -> ServiceBusMessage:
    """Body = event JSON; ``message_id`` = the deterministic event id (duplicate detection drops repeats)."""
    return ServiceBusMessage(
        body=event.body,
        content_type=event.content_type,
        message_id=event.message_id,
        correlation_id=event.correlation_id,
        application_properties=_properties(event.application_properties),
        session_id=session_id,
    )


class ServiceBusPublisher:
    """Publishes events to the topic in ``ServiceBusMessageBatch``es, and replies to ``reply_to``."""

    def __init__(self, client: ServiceBusClient, topic_name: str, *, liveness: Liveness | None = None) -> None:
        self._client = client
        self.topic_name = topic_name
        #: Bounds each send on a silent connection; see :mod:`adapters.servicebus.liveness`.
        self.watch = SilenceWatch(liveness or Liveness())
        self._sender: ServiceBusSender | None = None
        self._reply_senders: dict[str, ServiceBusSender] = {}

    def _topic_sender(self) -> ServiceBusSender:
        if self._sender is None:
            self._sender = self._client.get_topic_sender(self.topic_name)
        return self._sender

    def _reply_sender(self, entity: str) -> ServiceBusSender:
        sender = self._reply_senders.get(entity)
        if sender is None:
            sender = self._client.get_queue_sender(entity)
            self._reply_senders[entity] = sender
        return sender

    def publish(self, events: Sequence[OutboundEvent]) -> None:
        """Send every event (and reply), or raise ``TransientError``."""
        try:
            self._send_guarded(self._topic_sender(), [to_service_bus_message(e) for e in events])
            replies: dict[str, list[ServiceBusMessage]] = {}
            for event in events:
                if event.reply_to:
                    message = to_service_bus_message(event, session_id=event.reply_to_session_id)
                    replies.setdefault(_entity_name(event.reply_to), []).append(message)
            for entity, messages in replies.items():
                self._send_guarded(self._reply_sender(entity), messages)
        except (ServiceBusError, OSError, ValueError, AttributeError) as exc:
            # ValueError/AttributeError: the SDK's handler was shut down under us after a connection error.
            self._reset()
            raise TransientError(f"publish to {self.topic_name!r} failed: {redact(str(exc))}") from None

    def _send_guarded(self, sender: ServiceBusSender, messages: Sequence[ServiceBusMessage]) -> None:
        with self.watch.watchdog.deadline(self.watch.budget(), sender):
            self._send_batched(sender, messages)

    @staticmethod
    def _send_batched(sender: ServiceBusSender, messages: Sequence[ServiceBusMessage]) -> None:
        batch = sender.create_message_batch()
        for message in messages:
            try:
                batch.add_message(message)
            except MessageSizeExceededError:
                sender.send_messages(batch)
                batch = sender.create_message_batch()
                batch.add_message(message)
        if len(batch):
            sender.send_messages(batch)

    def _reset(self) -> None:
        senders = [s for s in (self._sender, *self._reply_senders.values()) if s is not None]
        self._sender, self._reply_senders = None, {}
        for sender in senders:
            try:
                sender.close()
            except Exception as exc:  # a broken link may fail to close; the next publish reconnects
                log.debug("Ignoring error while closing a broken sender: %s", redact(str(exc)))

    def close(self) -> None:
        """Close every sender."""
        self._reset()
        self.watch.watchdog.close()


def _entity_name(reply_to: str) -> str:
    """``reply_to`` may be a bare entity name or an address like ``sb://ns/queue``; return the entity."""
    if "://" in reply_to:
        return reply_to.split("://", 1)[1].split("/", 1)[-1].strip("/")
    return reply_to


def send_requests(
    client: ServiceBusClient,
    queue_name: str,
    bodies: Sequence[bytes],
    *,
    message_ids: Sequence[str] | None = None,
    application_properties: Sequence[dict[str, Any]] | None = None,
) -> int:
    """Publish request bodies to the queue in batches, as another service would; returns how many."""
    messages = [
        ServiceBusMessage(
            body=body,
            content_type="application/json",
            message_id=message_ids[i] if message_ids else None,
            application_properties=application_properties[i] if application_properties else None,  # type: ignore[arg-type]
        )
        for i, body in enumerate(bodies)
    ]
    with client.get_queue_sender(queue_name) as sender:
        ServiceBusPublisher._send_batched(sender, messages)
    return len(messages)


class SubscriptionTail:
    """Reads a topic subscription in a background thread and hands each event body to ``on_event``."""

    def __init__(self, client: ServiceBusClient, topic_name: str, subscription: str, on_event: Any) -> None:
        self._client = client
        self.topic_name = topic_name
        self.subscription = subscription
        self._on_event = on_event
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="subscription-tail", daemon=True)
        self.received = 0

    def start(self) -> None:
        """Start reading."""
        self._thread.start()

    def _run(self) -> None:
        with self._client.get_subscription_receiver(
            self.topic_name, self.subscription, receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE
        ) as receiver:
            while not self._stop.is_set():
                try:
                    messages = receiver.receive_messages(max_message_count=200, max_wait_time=0.5)
                except ServiceBusError as exc:
                    log.warning("Reading %s/%s failed: %s", self.topic_name, self.subscription, redact(str(exc)))
                    self._stop.wait(1.0)
                    continue
                for message in messages:
                    self.received += 1
                    self._on_event(message_body(message))

    def stop(self, drain_seconds: float = 0.0) -> None:
        """Stop reading, after ``drain_seconds`` more of reading what is left."""
        if drain_seconds:
            time.sleep(drain_seconds)
        self._stop.set()
        self._thread.join(timeout=10)
