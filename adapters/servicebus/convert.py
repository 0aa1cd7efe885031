"""Converting between SDK messages and ours: received message → Delivery, OutboundEvent → ServiceBusMessage."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from azure.servicebus import ServiceBusMessage, ServiceBusReceivedMessage
from azure.servicebus.amqp import AmqpMessageBodyType

from worker.service.ports import Delivery, OutboundEvent


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
