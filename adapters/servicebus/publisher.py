"""The event publisher: assignment events to the topic in batches, replies to each request's ``reply_to``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from azure.servicebus import ServiceBusClient, ServiceBusMessage, ServiceBusSender
from azure.servicebus.exceptions import MessageSizeExceededError, ServiceBusError

from adapters.servicebus.convert import to_service_bus_message
from adapters.servicebus.liveness import Liveness, SilenceWatch
from worker.domain.errors import TransientError
from worker.service.ports import OutboundEvent
from worker.service.redaction import redact

log = logging.getLogger(__name__)


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
