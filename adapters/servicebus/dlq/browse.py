"""Reading an entity without changing it: browse every message (or dead letter) by sequence number.

Peeking takes no lock and raises no delivery count. It goes by sequence number, so a dropped
connection is ridden out by reconnecting and going on from the next one: nothing is seen twice or
missed. Every command browses the whole entity first and chooses its targets from what it saw.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from azure.servicebus import ServiceBusClient, ServiceBusReceivedMessage

from adapters.servicebus.convert import message_body, message_id_text
from adapters.servicebus.dlq.connection import Patience, close_quietly, gave_up, is_dropped, open_receiver
from adapters.servicebus.dlq.entity import Entity
from adapters.servicebus.dlq.letter import DeadLetter
from adapters.servicebus.dlq.selection import ReplayFilter, Selection, choose
from worker.service.redaction import redact

log = logging.getLogger(__name__)

_PAGE = 250


def _text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _optional_text(value: Any) -> str | None:
    return None if value is None else str(_text(value))


def _properties(message: ServiceBusReceivedMessage) -> dict[str, Any]:
    return {
        str(_text(k)): _text(v)
        for k, v in (message.application_properties or {}).items()
        if _text(k) not in {"DeadLetterReason", "DeadLetterErrorDescription"}
    }


def _body(message: ServiceBusReceivedMessage) -> bytes:
    # A dead letter is often there because its body is odd (an AMQP map with non-text keys, say):
    # the tools must still list, export and replay it rather than crash on it.
    try:
        return message_body(message)
    except (TypeError, ValueError, RecursionError):
        return repr(message.body).encode("utf-8", "replace")


def _seconds(value: Any) -> float | None:
    if isinstance(value, timedelta):
        return value.total_seconds()
    return None


def letter_from(message: ServiceBusReceivedMessage) -> DeadLetter:
    """A received or peeked message, decoded for people and files."""
    return DeadLetter(
        sequence_number=message.sequence_number or 0,
        enqueued_time=message.enqueued_time_utc,
        delivery_count=message.delivery_count or 0,
        reason=_optional_text(message.dead_letter_reason) or "",
        description=_optional_text(message.dead_letter_error_description) or "",
        message_id=message_id_text(message.message_id),
        correlation_id=_optional_text(message.correlation_id),
        content_type=_optional_text(message.content_type),
        body=_body(message),
        application_properties=_properties(message),
        subject=_optional_text(message.subject),
        reply_to=_optional_text(message.reply_to),
        reply_to_session_id=_optional_text(message.reply_to_session_id),
        session_id=_optional_text(message.session_id),
        to=_optional_text(message.to),
        partition_key=_optional_text(message.partition_key),
        time_to_live=_seconds(message.time_to_live),
    )


def browse(
    client: ServiceBusClient, entity: Entity, *, dead_letter: bool = True, patience: Patience = Patience()
) -> Iterator[DeadLetter]:
    """Every message of the DLQ (or the entity itself), in sequence order, without changing any.

    Peeking is by sequence number, so a dropped connection is ridden out by reconnecting and going
    on from the next sequence number: nothing is seen twice or missed.
    """
    for page in pages(client, entity, dead_letter=dead_letter, patience=patience):
        for message in page:
            yield letter_from(message)


def pages(
    client: ServiceBusClient, entity: Entity, *, dead_letter: bool, patience: Patience
) -> Iterator[list[ServiceBusReceivedMessage]]:
    """The entity's messages (or its dead letters) as the SDK peeked them, page by page in sequence order."""
    sequence, failures, size = 0, 0, _PAGE
    while True:
        receiver = open_receiver(client, entity, dead_letter=dead_letter)
        try:
            while True:
                page = receiver.peek_messages(max_message_count=size, sequence_number=sequence)
                if not page:
                    return
                failures = 0
                sequence = max(m.sequence_number or 0 for m in page) + 1
                yield page
        except Exception as exc:
            if not is_dropped(exc):
                raise
            failures += 1
            if patience.exhausted(failures):
                raise gave_up(f"browsing {entity}", failures, exc) from None
            log.info("Connection dropped while browsing %s (%s); reconnecting", entity, redact(str(exc)))
            # A smaller page has a better chance of arriving whole on a connection that keeps dropping.
            size = max(10, size // 2)
            patience.wait(failures)
        finally:
            close_quietly(receiver)


def peek(client: ServiceBusClient, entity: Entity, limit: int | None = None) -> list[DeadLetter]:
    """Dead letters without changing them: all of them, or the first ``limit``."""
    letters: list[DeadLetter] = []
    for letter in browse(client, entity):
        if limit is not None and len(letters) >= limit:
            break
        letters.append(letter)
    return letters


def select(
    client: ServiceBusClient,
    entity: Entity,
    selection: ReplayFilter,
    *,
    max_replays: int | None = None,
    limit: int | None = None,
    dead_letter: bool = True,
    patience: Patience = Patience(),
) -> Selection:
    """Browse the whole DLQ and decide which letters to act on (never capped silently)."""
    letters = browse(client, entity, dead_letter=dead_letter, patience=patience)
    return choose(letters, selection, max_replays=max_replays, limit=limit)
