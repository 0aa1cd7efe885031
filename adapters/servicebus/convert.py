"""Converting between SDK messages and ours: received message → Delivery, OutboundEvent → ServiceBusMessage."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping
from typing import Any

from azure.servicebus import ServiceBusMessage, ServiceBusReceivedMessage
from azure.servicebus.amqp import AmqpMessageBodyType

from worker.domain.errors import DeadLetterReason, PermanentError
from worker.service.ports import Delivery, OutboundEvent

#: Service Bus (and the SDK's ``ServiceBusMessage``) caps a session id at 128 characters.
MAX_SESSION_ID_CHARS = 128


def _text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class _Unreadable(Exception):
    """Why a received message cannot become a request; becomes the dead-letter description."""


def request_body(message: ServiceBusReceivedMessage) -> bytes:
    """The body as JSON bytes, whatever AMQP body type the publisher used; :class:`_Unreadable` otherwise.

    A data body is taken as it is. An AMQP value body is JSON-encoded when it has a JSON form (a map
    of text keys, text, numbers, booleans, nulls and lists of them); the SDK hands AMQP strings over
    as bytes, so they must be UTF-8. A sequence body, NaN or infinity, and values JSON has no form
    for (timestamps, UUIDs, binary that is not UTF-8) make the message unreadable.
    """
    body_type = message.body_type
    if body_type == AmqpMessageBodyType.DATA:
        return b"".join(message.body)
    if body_type == AmqpMessageBodyType.SEQUENCE:
        raise _Unreadable("the body is an AMQP sequence; a request is a JSON object in a data or value body")
    value = message.body
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    try:
        return json.dumps(_json_value(value, "body"), allow_nan=False, ensure_ascii=False).encode("utf-8")
    except ValueError as exc:  # NaN or infinity, or an integer too long to print
        raise _Unreadable(f"the AMQP value body has no JSON form: {exc}") from None


def _json_value(value: Any, where: str) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise _Unreadable(f"the AMQP value body's {where} is {value!r}; JSON has no NaN or infinity")
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise _Unreadable(f"the AMQP value body's {where} is binary that is not UTF-8 text") from None
    if isinstance(value, Mapping):
        converted: dict[str, Any] = {}
        for key, item in value.items():
            name = _json_value(key, f"key in {where}")
            if not isinstance(name, str):
                raise _Unreadable(
                    f"the AMQP value body's map {where} has a {type(key).__name__} key; JSON keys are text"
                )
            converted[name] = _json_value(item, f"{where}.{name}"[:200])
        return converted
    if isinstance(value, list | tuple):
        return [_json_value(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise _Unreadable(f"the AMQP value body's {where} is a {type(value).__name__}, which JSON has no form for")


def message_body(message: ServiceBusReceivedMessage) -> bytes:
    """The body as bytes for display and export: :func:`request_body`, or a best-effort rendering."""
    try:
        return request_body(message)
    except _Unreadable:
        pass
    try:
        sections = message.body if message.body_type == AmqpMessageBodyType.VALUE else list(message.body)
        return json.dumps(sections, default=repr, ensure_ascii=False).encode("utf-8")
    except Exception:  # a body no JSON rendering survives: its repr still shows what arrived
        return repr(message.body).encode("utf-8", "replace")


def _identifier(value: Any) -> str | None:
    """message-id and correlation-id: AMQP allows text, ulong, uuid and binary; their text form, or None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, uuid.UUID) or (isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    return None


def message_id_text(value: Any) -> str | None:
    """An AMQP message-id as the worker names it: text, ulong and uuid as text, binary as ``0x<hex>``.

    ``None`` for no message id (or one of no AMQP id type): the worker then names the message by its
    sequence number, ``seq-<n>``. Event ids derive from this name, so ``dlq`` names a dead letter by it
    too: a replayed copy must carry the very identity its original was decided under.
    """
    if isinstance(value, bytes):
        return "0x" + value.hex()
    return _identifier(value) or None


def message_identity(message_id: Any, sequence_number: int | None) -> str:
    """The worker's identity of a message: :func:`message_id_text`, else ``seq-<sequence number>``."""
    return message_id_text(message_id) or f"seq-{sequence_number}"


def _address(value: Any, field: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise _Unreadable(f"{field} is {len(value)} bytes of binary, not text") from None
    raise _Unreadable(f"{field} is a {type(value).__name__}, not text")


def to_delivery(message: ServiceBusReceivedMessage) -> Delivery:
    """Our view of a received message; the SDK object rides along as ``handle`` for settlement.

    Never raises: a message that cannot be read comes back with :attr:`Delivery.unreadable` set to the
    error that dead-letters it (``InvalidJson`` for the body, ``SchemaValidationFailed`` for a binary
    correlation id, ``ReplyUndeliverable`` for a reply address that is not text).
    """
    try:
        return _to_delivery(message)
    except Exception as exc:  # the last guard: whatever else the SDK hands over, this message alone fails
        return Delivery(
            body=b"",
            message_id=_fallback_id(message),
            handle=message,
            unreadable=PermanentError(
                DeadLetterReason.INVALID_JSON, f"the message could not be read: {type(exc).__name__}: {exc}"
            ),
        )


def _to_delivery(message: ServiceBusReceivedMessage) -> Delivery:
    properties = {_text(k): _text(v) for k, v in (message.application_properties or {}).items()}
    delivery = Delivery(
        body=b"",
        message_id=message_identity(message.message_id, message.sequence_number),
        content_type=_text(message.content_type),
        application_properties=properties,
        enqueued_time=message.enqueued_time_utc,
        delivery_count=message.delivery_count or 0,
        handle=message,
    )
    try:
        delivery.body = request_body(message)
    except _Unreadable as exc:
        delivery.unreadable = PermanentError(DeadLetterReason.INVALID_JSON, str(exc))
        return delivery
    correlation_id = message.correlation_id
    delivery.correlation_id = _identifier(correlation_id)
    if correlation_id is not None and delivery.correlation_id is None:
        delivery.unreadable = PermanentError(
            DeadLetterReason.SCHEMA_VALIDATION_FAILED,
            f"correlation_id is a {type(correlation_id).__name__}; it must be text (or an AMQP uuid or ulong)",
        )
        return delivery
    try:
        delivery.reply_to = _address(message.reply_to, "reply_to")
        delivery.reply_to_session_id = _address(message.reply_to_session_id, "reply_to_group_id")
        _check_reply_session(delivery)
    except _Unreadable as exc:
        delivery.unreadable = PermanentError(DeadLetterReason.REPLY_UNDELIVERABLE, str(exc))
    return delivery


def _check_reply_session(delivery: Delivery) -> None:
    """A reply's session id must be one Service Bus (and the SDK, which refuses to send it) takes.

    AMQP puts no bound on ``reply-to-group-id``; the SDK raises ``ValueError`` for a session id over
    128 characters when the reply is built, which must not be mistaken for an outage of the topic.
    """
    session = delivery.reply_to_session_id
    if delivery.reply_to and session and len(session) > MAX_SESSION_ID_CHARS:
        raise _Unreadable(
            f"reply_to_group_id is {len(session)} characters; "
            f"a Service Bus session id has at most {MAX_SESSION_ID_CHARS}"
        )


def _fallback_id(message: ServiceBusReceivedMessage) -> str:
    """An id for a message whose own is missing or unusable: binary ids by their bytes, else the sequence number."""
    try:
        return message_identity(message.message_id, message.sequence_number)
    except Exception:
        return "unreadable"


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
