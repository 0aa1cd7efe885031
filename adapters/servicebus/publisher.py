"""The event publisher: assignment events to the topic in batches, then replies to each request's ``reply_to``.

Failures are classified here (see :mod:`adapters.servicebus.errors`). A transient failure raises
:class:`~worker.domain.errors.TransientError` and the pump retries the batch; events the broker had
already accepted are remembered and not sent again on the retry. A failure that is permanent for
one event — its reply entity is missing, forbidden, badly addressed or the requests queue itself,
or the event is larger than the entity takes — raises :class:`~worker.domain.errors.PublishRejected`
naming those events, after every other event was accepted, and saying which of them the topic had
already accepted (a reply refused after its event went out).
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from azure.servicebus import ServiceBusClient, ServiceBusMessage, ServiceBusSender
from azure.servicebus.exceptions import MessageSizeExceededError, ServiceBusError

from adapters.servicebus.convert import to_service_bus_message
from adapters.servicebus.errors import refused_entity, translated
from adapters.servicebus.liveness import Liveness, SilenceWatch
from worker.domain.errors import DeadLetterReason, PermanentError, PublishRejected, TransientError
from worker.service.ports import OutboundEvent
from worker.service.redaction import redact

log = logging.getLogger(__name__)

#: Reply senders kept open at once; requests may name many reply entities, each one a link.
MAX_REPLY_SENDERS = 32

#: Service Bus entity names: letters, digits, ``.``, ``-``, ``_`` and ``/`` (for nested paths), ≤ 260.
_ENTITY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-/]{0,259}")


class ServiceBusPublisher:
    """Publishes events to the topic in ``ServiceBusMessageBatch``es, then replies per ``reply_to`` entity.

    ``requests_queue`` is refused as a reply entity: a reply there would come back as a request.
    """

    def __init__(
        self,
        client: ServiceBusClient,
        topic_name: str,
        *,
        requests_queue: str | None = None,
        liveness: Liveness | None = None,
    ) -> None:
        self._client = client
        self.topic_name = topic_name
        self.requests_queue = requests_queue
        #: Bounds each send on a silent connection; see :mod:`adapters.servicebus.liveness`.
        self.watch = SilenceWatch(liveness or Liveness())
        self._sender: ServiceBusSender | None = None
        self._reply_senders: OrderedDict[str, ServiceBusSender] = OrderedDict()
        #: (entity, message id) the broker accepted during a publish that then failed transiently:
        #: the retry of that publish skips them, so no accepted event is sent twice.
        self._accepted: set[tuple[str, str]] = set()

    def publish(self, events: Sequence[OutboundEvent]) -> None:
        """Send every event (topic first, then replies per entity); see the module docstring for failures."""
        rejected: dict[str, PermanentError] = {}
        replies: dict[str, list[OutboundEvent]] = {}
        for event in events:
            if event.reply_to:
                try:
                    replies.setdefault(self.reply_entity(event.reply_to), []).append(event)
                except PermanentError as exc:
                    rejected[event.message_id] = exc
        try:
            topic_events = [e for e in events if e.message_id not in rejected]
            self._send(self.topic_name, self._topic_sender, topic_events, rejected, replies=False)
            for entity, batch in replies.items():
                pending = [e for e in batch if e.message_id not in rejected]
                self._send(entity, partial(self._reply_sender, entity), pending, rejected, replies=True)
        except TransientError:
            self._reset()
            raise
        reached = {m for m in rejected if (self.topic_name, m) in self._accepted}
        self._accepted.clear()
        if rejected:
            raise PublishRejected(rejected, reached_topic=reached)

    def reply_entity(self, reply_to: str) -> str:
        """The entity a ``reply_to`` names (a bare name or ``sb://namespace/entity``); PermanentError if unusable."""
        return reply_entity(reply_to, self._namespace(), self.requests_queue)

    def _send(
        self,
        entity: str,
        get_sender: Callable[[], ServiceBusSender],
        events: Sequence[OutboundEvent],
        rejected: dict[str, PermanentError],
        *,
        replies: bool,
    ) -> None:
        todo = [e for e in events if (entity, e.message_id) not in self._accepted]
        if not todo:
            return
        try:
            sender = get_sender()
            with self.watch.watchdog.deadline(self.watch.budget(), sender):
                self._send_all(entity, sender, todo, rejected, replies=replies)
        except (ServiceBusError, OSError, ValueError, AttributeError) as exc:
            # ValueError/AttributeError: the SDK's handler was shut down under us after a connection error.
            why = refused_entity(exc) if replies else None
            if why is None:
                failure = f"{type(exc).__name__}: {redact(str(exc))}"
                raise TransientError(f"publish to {entity!r} failed: {failure}") from None
            for event in todo:
                if (entity, event.message_id) not in self._accepted:
                    rejected.setdefault(event.message_id, _undeliverable(event.reply_to or entity, why))

    def _send_all(
        self,
        entity: str,
        sender: ServiceBusSender,
        todo: Sequence[OutboundEvent],
        rejected: dict[str, PermanentError],
        *,
        replies: bool,
    ) -> None:
        batch, in_batch = sender.create_message_batch(), list[OutboundEvent]()
        for event in todo:
            try:
                message = _message(event, replies)
            except ValueError as exc:
                # The SDK refuses to build it (a reply session id over 128 characters, say): that is
                # this event's problem for good, not the handler shut down under us (an outage).
                if not replies:
                    raise
                rejected[event.message_id] = _undeliverable(event.reply_to or entity, f"cannot be sent: {exc}")
                continue
            if not _add(batch, message):
                self._send_batch(entity, sender, batch, in_batch, rejected=rejected, replies=replies)
                batch, in_batch = sender.create_message_batch(), []
                if not _add(batch, message):
                    rejected[event.message_id] = _too_large(event, entity, batch.max_size_in_bytes)
                    continue
            in_batch.append(event)
        self._send_batch(entity, sender, batch, in_batch, rejected=rejected, replies=replies)

    def _send_batch(
        self,
        entity: str,
        sender: ServiceBusSender,
        batch: Any,
        events: list[OutboundEvent],
        *,
        rejected: dict[str, PermanentError],
        replies: bool,
    ) -> None:
        if not events:
            return
        try:
            sender.send_messages(batch)
        except MessageSizeExceededError:
            # The broker refused the batch as too large although the SDK sized it: send one by one to
            # find the event that does not fit (one alone that is refused is too large for good).
            if len(events) == 1:
                rejected[events[0].message_id] = _too_large(events[0], entity, batch.max_size_in_bytes)
                return
            for event in events:
                single = sender.create_message_batch()
                single.add_message(_message(event, replies))
                self._send_batch(entity, sender, single, [event], rejected=rejected, replies=replies)
            return
        self._accepted.update((entity, e.message_id) for e in events)

    def _namespace(self) -> str:
        return str(getattr(self._client, "fully_qualified_namespace", "") or "")

    def _topic_sender(self) -> ServiceBusSender:
        if self._sender is None:
            self._sender = self._client.get_topic_sender(self.topic_name)
        return self._sender

    def _reply_sender(self, entity: str) -> ServiceBusSender:
        sender = self._reply_senders.get(entity)
        if sender is None:
            sender = self._client.get_queue_sender(entity)
            self._reply_senders[entity] = sender
            if len(self._reply_senders) > MAX_REPLY_SENDERS:
                _close(self._reply_senders.popitem(last=False)[1])
        self._reply_senders.move_to_end(entity)
        return sender

    def _reset(self) -> None:
        senders = [s for s in (self._sender, *self._reply_senders.values()) if s is not None]
        self._sender, self._reply_senders = None, OrderedDict()
        for sender in senders:
            _close(sender)

    def close(self) -> None:
        """Close every sender."""
        self._reset()
        self.watch.watchdog.close()


def reply_entity(reply_to: str, namespace: str, requests_queue: str | None) -> str:
    """The entity a ``reply_to`` names (a bare name or ``sb://namespace/entity``); PermanentError if unusable.

    Publishers check their own ``reply_to`` with it (``ab-worker publish --reply-to``) by the worker's rule.
    """
    entity = reply_to
    if "://" in reply_to:
        scheme, _, rest = reply_to.partition("://")
        host, _, entity = rest.partition("/")
        if scheme.lower() not in ("sb", "amqp", "amqps") or not _same_host(host, namespace):
            raise _undeliverable(reply_to, "names another namespace or scheme; replies go to this namespace only")
    entity = entity.strip("/")
    if not _ENTITY_NAME.fullmatch(entity) or "/subscriptions/" in f"/{entity.lower()}/" or "$" in entity:
        raise _undeliverable(reply_to, "is not a queue or topic name")
    if requests_queue and entity.lower() == requests_queue.lower():
        raise _undeliverable(reply_to, "names the requests queue; a reply there would come back as a request")
    return entity


def _message(event: OutboundEvent, reply: bool) -> ServiceBusMessage:
    return to_service_bus_message(event, session_id=event.reply_to_session_id if reply else None)


def _add(batch: Any, message: ServiceBusMessage) -> bool:
    try:
        batch.add_message(message)
    except MessageSizeExceededError:
        return False
    return True


def _close(sender: ServiceBusSender) -> None:
    try:
        sender.close()
    except Exception as exc:  # a broken link may fail to close; the next publish reconnects
        log.debug("Ignoring error while closing a broken sender: %s", redact(str(exc)))


def _same_host(host: str, namespace: str) -> bool:
    def bare(name: str) -> str:
        return name.lower().rsplit("@", 1)[-1].split(":", 1)[0]

    return bool(namespace) and bare(host) == bare(namespace)


def _undeliverable(reply_to: str, why: str) -> PermanentError:
    return PermanentError(DeadLetterReason.REPLY_UNDELIVERABLE, f"reply_to {reply_to[:300]!r} {why}")


def _too_large(event: OutboundEvent, entity: str, limit: int) -> PermanentError:
    return PermanentError(
        DeadLetterReason.EVENT_TOO_LARGE,
        f"event {event.message_id} is {len(event.body)} bytes (body); {entity!r} accepts at most {limit} bytes "
        "per message",
    )


@dataclass(frozen=True, slots=True)
class RequestProperties:
    """Broker properties a publisher sets on the requests it sends: the request/reply pattern's fields.

    ``reply_to`` (and ``reply_to_session_id`` for a session-enabled reply queue) is where the worker
    sends the event as well as to the topic; ``correlation_id`` is copied to the event;
    ``session_id`` is for a session-enabled requests queue.
    """

    reply_to: str | None = None
    reply_to_session_id: str | None = None
    correlation_id: str | None = None
    session_id: str | None = None


def send_requests(
    client: ServiceBusClient,
    queue_name: str,
    bodies: Sequence[bytes],
    *,
    message_ids: Sequence[str] | None = None,
    application_properties: Sequence[dict[str, Any]] | None = None,
    properties: RequestProperties = RequestProperties(),
) -> int:
    """Publish request bodies to the queue in batches, as another service would; returns how many.

    Raises :class:`~worker.domain.errors.TransientError` or :class:`~worker.domain.errors.DependencyRefused`.
    """
    messages = [
        ServiceBusMessage(
            body=body,
            content_type="application/json",
            message_id=message_ids[i] if message_ids else None,
            application_properties=application_properties[i] if application_properties else None,  # type: ignore[arg-type]
            reply_to=properties.reply_to,
            reply_to_session_id=properties.reply_to_session_id,
            correlation_id=properties.correlation_id,
            session_id=properties.session_id,
        )
        for i, body in enumerate(bodies)
    ]
    with translated(f"publishing to {queue_name!r}"), client.get_queue_sender(queue_name) as sender:
        batch = sender.create_message_batch()
        for message in messages:
            if not _add(batch, message):
                sender.send_messages(batch)
                batch = sender.create_message_batch()
                batch.add_message(message)
        if len(batch):
            sender.send_messages(batch)
    return len(messages)
