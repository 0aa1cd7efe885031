"""Request/response operations on ``<entity>/$management`` and ``$cbs``.

Responses follow the Service Bus dialect the SDK parses (``_common/mgmt_handlers.py``): status in
the ``statusCode``/``statusDescription`` application properties, a failure's condition in
``errorCondition``, and the result as an AMQP-value map body. Requests for one message are answered
with the same conditions the service uses, so the SDK raises its usual exceptions
(``MessageLockLostError``, ``MessageNotFoundError``, ...).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any  # AMQP management bodies and properties as proton decodes them, read by key

from proton import Array, Data, Message, symbol, timestamp

from .entities import MessageStore, SendTarget
from .messages import parse_message, split_batch

_LOG = logging.getLogger(__name__)

LOCK_LOST = "com.microsoft:message-lock-lost"
MESSAGE_NOT_FOUND = "com.microsoft:message-not-found"
ARGUMENT_ERROR = "com.microsoft:argument-error"
NOT_IMPLEMENTED = "amqp:not-implemented"

_OP_PREFIX = "com.microsoft:"


@dataclass
class Reply:
    """A management response before encoding."""

    status: int
    description: str = "OK"
    body: dict[str, Any] = field(default_factory=dict)
    condition: str | None = None

    def to_message(self, correlation_id: Any, status_key: str, desc_key: str) -> Message:
        """Encode as an AMQP message answering the request ``correlation_id``."""
        props: dict[str, Any] = {status_key: self.status, desc_key: self.description}
        if self.condition is not None:
            props["errorCondition"] = symbol(self.condition)
            props["error-condition"] = symbol(self.condition)
        return Message(correlation_id=correlation_id, properties=props, body=self.body)


def _fail(status: int, condition: str, description: str) -> Reply:
    return Reply(status, description, {}, condition)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, Array):
        return list(value.elements)
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _tags(body: dict[str, Any]) -> list[bytes]:
    tokens = _as_list(body.get("lock-tokens"))
    return [(t if isinstance(t, uuid.UUID) else uuid.UUID(str(t))).bytes_le for t in tokens]


def _message_list(entries: Iterable[tuple[bytes, dict[str, Any]]]) -> dict[str, Any]:
    return {"messages": [{"message": raw, **extra} for raw, extra in entries]}


def cbs_reply(request: Message) -> Message:
    """Accept any token: the local broker does not authenticate."""
    return Reply(202, "Accepted", {}).to_message(request.id, "status-code", "status-description")


def handle(
    request: Message,
    store: MessageStore | None,
    target: SendTarget | None,
    now: int,
) -> Message:
    """Execute one management request against an entity and build the response message."""
    props: dict[Any, Any] = dict(request.properties or {})
    operation = str(props.get("operation", ""))
    body = request.body if isinstance(request.body, dict) else {}
    body = {str(k): v for k, v in body.items()}
    try:
        reply = _dispatch(operation, body, store, target, now)
    except (KeyError, TypeError, ValueError) as exc:
        _LOG.warning("management %s failed: %r", operation, exc)
        reply = _fail(400, ARGUMENT_ERROR, f"Invalid request: {exc}")
    return reply.to_message(request.id, "statusCode", "statusDescription")


_StoreOp = Callable[[dict[str, Any], MessageStore, int], "Reply"]
_TargetOp = Callable[[dict[str, Any], SendTarget, int], "Reply"]


def _dispatch(
    operation: str,
    body: dict[str, Any],
    store: MessageStore | None,
    target: SendTarget | None,
    now: int,
) -> Reply:
    name = operation.removeprefix(_OP_PREFIX)
    target_op = _TARGET_OPS.get(name)
    if target_op is not None:
        if target is None:
            return _fail(400, NOT_IMPLEMENTED, f"{operation} needs a queue or topic")
        return target_op(body, target, now)
    store_op = _STORE_OPS.get(name)
    if store_op is not None:
        if store is None:
            return _fail(400, NOT_IMPLEMENTED, f"{operation} needs a queue or subscription")
        return store_op(body, store, now)
    return _fail(501, NOT_IMPLEMENTED, f"Operation {operation!r} is not supported")


def _cancel_scheduled(body: dict[str, Any], target: SendTarget, now: int) -> Reply:
    for seq in _as_list(body.get("sequence-numbers")):
        target.cancel_scheduled(int(seq))
    return Reply(200)


def _renew_lock(body: dict[str, Any], store: MessageStore, now: int) -> Reply:
    expirations = []
    for tag in _tags(body):
        until = store.renew(tag, now)
        if until is None:
            return _fail(410, LOCK_LOST, "The lock supplied is invalid or has expired.")
        expirations.append(timestamp(until))
    return Reply(200, body={"expirations": Array(0, Data.TIMESTAMP, *expirations)})


def _peek(body: dict[str, Any], store: MessageStore, now: int) -> Reply:
    from_seq = int(body.get("from-sequence-number", 0))
    count = int(body.get("message-count", 1))
    found = store.peek(from_seq, count)
    if not found:
        return Reply(204, "No messages")
    return Reply(200, body=_message_list((m.encode(None), {}) for m in found))


def _receive_deferred(body: dict[str, Any], store: MessageStore, now: int) -> Reply:
    seqs = [int(s) for s in _as_list(body.get("sequence-numbers"))]
    # receiver-settle-mode 1 ("second") is PEEK_LOCK; 0 is RECEIVE_AND_DELETE.
    lock = int(body.get("receiver-settle-mode", 1)) == 1
    got = store.receive_deferred(seqs, now, lock=lock)
    if got is None:
        return _fail(404, MESSAGE_NOT_FOUND, "A requested deferred message was not found.")
    entries = []
    for msg, tag in got:
        extra = {"lock-token": uuid.UUID(bytes_le=tag)} if tag is not None else {}
        entries.append((msg.encode(tag), extra))
    return Reply(200, body=_message_list(entries))


def _update_disposition(body: dict[str, Any], store: MessageStore, now: int) -> Reply:
    status = str(body.get("disposition-status", ""))
    for tag in _tags(body):
        if status == "completed":
            ok = store.complete(tag, now)
        elif status == "abandoned":
            ok = store.abandon(tag, now)
        elif status == "defered":
            ok = store.defer(tag, now)
        elif status == "suspended":
            ok = store.dead_letter_locked(
                tag,
                now,
                _text(body.get("deadletter-reason")),
                _text(body.get("deadletter-description")),
            )
        else:
            return _fail(400, ARGUMENT_ERROR, f"Unknown disposition status {status!r}")
        if not ok:
            return _fail(410, LOCK_LOST, "The lock supplied is invalid or has expired.")
    return Reply(200)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _schedule(body: dict[str, Any], target: SendTarget, now: int) -> Reply:
    seqs: list[int] = []
    for entry in _as_list(body.get("messages")):
        raw = bytes(dict(entry)["message"])
        for inner in split_batch(raw) or [raw]:
            msg = parse_message(inner)
            if msg.scheduled_ms is None:
                msg.scheduled_ms = now
            seq = target.accept(msg, now)
            # A duplicate is dropped like the service does, but the caller still needs a number.
            seqs.append(seq if seq is not None else 0)
    return Reply(200, body={"sequence-numbers": Array(0, Data.LONG, *seqs)})


_TARGET_OPS: dict[str, _TargetOp] = {
    "schedule-message": _schedule,
    "cancel-scheduled-message": _cancel_scheduled,
}
_STORE_OPS: dict[str, _StoreOp] = {
    "renew-lock": _renew_lock,
    "update-disposition": _update_disposition,
    "peek-message": _peek,
    "receive-by-sequence-number": _receive_deferred,
}
